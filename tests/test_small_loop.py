"""The small-object loop: objects up to small_object_kb come over one thread's keep-alive connections.

The loop handles only a clean 200; anything else hands the object to the worker threads as its first failed
attempt. These tests prove which path an object took by wrapping Transfer.store_small (the loop's only way to
store a body) and Transfer.download (the threads' entry point), and prove a fallback by its retry line and by
the requests the fault proxy (tests/faultproxy.py) saw. The proxy and moto close every connection after one
response, so keep-alive reuse is checked against SeaweedFS and against moto behind a keep-alive TLS terminator.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import logging
import random
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, S3Server, cli_json, retry_lines
from faultproxy import FaultProxy, KiB, ProxyRequest

import aws_data_downloader as adl

#: Small backoff and few attempts, so a test with faults still takes well under a second.
FAST = {"retry_backoff_s": 0.01, "retry_attempts": 3, "parallel_downloads": 4, "log_file": ""}

BUCKET = "small-loop"


def seed(server: S3Server, sizes: dict[str, int], bucket: str = BUCKET, seed: int = 11) -> dict[str, bytes]:
    rng = random.Random(seed)
    server.make_bucket(bucket)
    files = {key: rng.randbytes(size) for key, size in sizes.items()}
    for key, body in files.items():
        server.put(bucket, key, body)
    return files


def small_keys(count: int, prefix: str = "small") -> dict[str, int]:
    """``count`` keys of a few KiB, with spaces and non-ASCII characters in their names."""
    return {f"{prefix}/dir {n % 3} ü/{n:02d} résumé 日本.bin": 2 * KiB + 397 * n for n in range(count)}


def run_json(
    run_cli, endpoint: str, tmp_path: Path, bucket: str = BUCKET, out_dir: str = "data", **config: object
) -> tuple[int, dict]:
    """The CLI with --json against ``endpoint``; returns (exit code, summary)."""
    return cli_json(run_cli, endpoint, tmp_path, bucket, {**FAST, **config}, out_dir)


def assert_files(root: Path, files: dict[str, bytes], bucket: str = BUCKET) -> None:
    for key, body in files.items():
        assert (root / bucket / key).read_bytes() == body, key
    assert list(root.rglob(".adl-*")) == []


def gets(proxy: FaultProxy, key: str) -> list[ProxyRequest]:
    return [r for r in proxy.requests("GET") if r.path == f"/{BUCKET}/{key}"]


@pytest.fixture
def stored(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys the small-object loop stored (Transfer.store_small returned for them)."""
    keys: list[str] = []
    original = adl.Transfer.store_small

    def store_small(self, obj, target, headers, body):
        result = original(self, obj, target, headers, body)
        keys.append(obj.key)
        return result

    monkeypatch.setattr(adl.Transfer, "store_small", store_small)
    return keys


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys handed to the worker threads (Transfer.download was called for them)."""
    keys: list[str] = []
    original = adl.Transfer.download

    def download(self, obj, target, failed_attempt=None):
        keys.append(obj.key)
        return original(self, obj, target, failed_attempt)

    monkeypatch.setattr(adl.Transfer, "download", download)
    return keys


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[adl._LoopConnection]:
    """Connections the loop opened (an idle connection taken again is not counted)."""
    connections: list[adl._LoopConnection] = []
    original = adl.SmallObjectLoop._connection

    def connection(self, address):
        result = original(self, address)
        if not result.reused:
            connections.append(result)
        return result

    monkeypatch.setattr(adl.SmallObjectLoop, "_connection", connection)
    return connections


# -- which path an object takes --------------------------------------------------------------------------------


def test_small_objects_go_through_the_loop_and_large_ones_through_the_threads(
    s3: S3Server, tmp_path: Path, run_cli, stored: list[str], threaded: list[str]
) -> None:
    small = small_keys(40)
    small |= {"edge/exactly-256KiB.bin": 256 * KiB, "edge/empty.txt": 0}
    files = seed(s3, {**small, "big/one-MiB.bin": 1 * MiB, "edge/256KiB-plus-1.bin": 256 * KiB + 1})
    rng = random.Random(2)
    multipart = {"big/multipart.bin": rng.randbytes(5 * MiB + 1000), "edge/small-multipart.bin": rng.randbytes(9000)}
    etags = {key: s3.put_multipart(BUCKET, key, body) for key, body in multipart.items()}
    files |= multipart
    assert etags["edge/small-multipart.bin"].endswith("-1")  # small, but only its parts can verify it

    code, summary = run_json(run_cli, s3.endpoint, tmp_path)

    assert code == adl.EXIT_OK
    assert (summary["total_files"], summary["downloaded"], summary["failed"]) == (len(files), len(files), 0)
    assert_files(tmp_path / "data", files)
    assert sorted(stored) == sorted(small)
    assert sorted(threaded) == sorted(set(files) - set(small))
    resume = json.loads((tmp_path / "data" / "download_resume.json").read_text())
    completed = resume["completed"][BUCKET]
    assert set(completed) == set(files)
    for key, body in files.items():
        expected = f"md5-multipart:{etags[key]}" if key in etags else f"md5:{hashlib.md5(body).hexdigest()}"
        assert completed[key]["checksum"] == expected, key
        assert completed[key]["size"] == len(body)
        assert completed[key]["path"] == str(tmp_path / "data" / BUCKET / key)


@pytest.mark.parametrize("limit_kb", [0, 4])
def test_small_object_kb_sets_the_limit_and_zero_turns_the_loop_off(
    s3: S3Server, tmp_path: Path, run_cli, stored: list[str], threaded: list[str], limit_kb: int
) -> None:
    files = seed(s3, {**small_keys(12), "small/4KiB.bin": 4 * KiB, "small/4KiB-plus-1.bin": 4 * KiB + 1})

    code, summary = run_json(run_cli, s3.endpoint, tmp_path, small_object_kb=limit_kb)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert_files(tmp_path / "data", files)
    expected = sorted(key for key, body in files.items() if len(body) <= limit_kb * KiB)
    assert sorted(stored) == expected
    assert sorted(threaded) == sorted(set(files) - set(expected))
    if limit_kb == 0:
        assert stored == []


# -- faults in the loop go to the threads ----------------------------------------------------------------------

FAULTED = "small/dir 1 ü/07 résumé 日本.bin"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("reset", "network error"),
        ("truncate", "network error: IncompleteBody"),
        ("error-503", "S3 error SlowDown"),
        ("error-500", "S3 error InternalError"),
        ("flip", "checksum mismatch"),
    ],
)
def test_a_fault_in_the_loop_is_the_first_failed_attempt_of_the_threads(
    s3: S3Server,
    proxy: FaultProxy,
    tmp_path: Path,
    run_cli,
    caplog: pytest.LogCaptureFixture,
    stored: list[str],
    threaded: list[str],
    fault: str,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, small_keys(10))
    assert len(files[FAULTED]) > 4 * KiB  # the resets and truncations cut inside the body
    path = f"/{BUCKET}/{FAULTED}"
    if fault == "reset":
        proxy.reset(path=path, after=2 * KiB, times=1)
    elif fault == "truncate":
        proxy.truncate(path=path, after=2 * KiB, times=1)
    elif fault == "flip":
        proxy.flip(path=path, times=1)
    else:
        proxy.error(path=path, status=int(fault.split("-")[1]), times=1)

    code, summary = run_json(run_cli, proxy.url, tmp_path)

    assert code == adl.EXIT_OK
    assert (summary["downloaded"], summary["failed"]) == (len(files), 0)
    assert_files(tmp_path / "data", files)
    assert sorted(stored) == sorted(set(files) - {FAULTED})
    assert threaded == [FAULTED]
    requests = gets(proxy, FAULTED)
    assert [r.faults for r in requests] == [[fault.split("-")[0]], []]
    assert requests[-1].status == 200 and requests[-1].range is None
    if fault.startswith("error"):
        assert requests[0].status == int(fault.split("-")[1])
    [line] = retry_lines(caplog, FAULTED)
    assert f"{BUCKET}/{FAULTED} (attempt 2 of 4) after {reason}" in line and "waiting" in line


@pytest.mark.parametrize(
    ("status", "reason"), [(404, "not found (deleted since listing)"), (403, "access denied")], ids=["404", "403"]
)
def test_a_client_error_in_the_loop_fails_at_once(
    s3: S3Server,
    proxy: FaultProxy,
    tmp_path: Path,
    run_cli,
    caplog: pytest.LogCaptureFixture,
    stored: list[str],
    status: int,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, small_keys(10))
    proxy.error(path=f"/{BUCKET}/{FAULTED}", status=status)

    code, summary = run_json(run_cli, proxy.url, tmp_path)

    assert code == adl.EXIT_FAILED
    assert (summary["downloaded"], summary["failed"]) == (len(files) - 1, 1)
    assert summary["failures"] == [{"bucket": BUCKET, "key": FAULTED, "reason": reason}]
    assert [r.status for r in gets(proxy, FAULTED)] == [status]
    assert retry_lines(caplog, FAULTED) == []
    assert not (tmp_path / "data" / BUCKET / FAULTED).exists()
    del files[FAULTED]
    assert_files(tmp_path / "data", files)
    assert sorted(stored) == sorted(files)


def test_a_read_timeout_in_the_loop_is_retried_by_the_threads(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture, stored: list[str]
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, small_keys(10))
    assert FAULTED in files
    proxy.delay(path=f"/{BUCKET}/{FAULTED}", seconds=2.0, times=1)

    started = time.monotonic()
    code, summary = run_json(run_cli, proxy.url, tmp_path, read_timeout_s=0.5)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert time.monotonic() - started < 2.0, "the loop gave up after the read timeout, not after the delay"
    assert_files(tmp_path / "data", files)
    assert FAULTED not in stored and len(stored) == len(files) - 1
    assert [r.faults for r in gets(proxy, FAULTED)] == [["delay"], []]
    [line] = retry_lines(caplog, FAULTED)
    assert "(attempt 2 of 4) after network error: TimeoutError" in line


# -- backpressure, and a loop that dies ------------------------------------------------------------------------


def test_the_listing_waits_while_the_loop_is_backlog_objects_behind(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, stored: list[str]
) -> None:
    files = seed(s3, small_keys(60))
    monkeypatch.setattr(adl.SmallObjectLoop, "BACKLOG", 3)
    queued_after_submit: list[tuple[int, int]] = []
    submit = adl.SmallObjectLoop.submit

    def recording_submit(self, plans):
        submit(self, plans)
        queued_after_submit.append((len(plans), len(self._queue)))

    monkeypatch.setattr(adl.SmallObjectLoop, "submit", recording_submit)

    code, summary = run_json(run_cli, s3.endpoint, tmp_path, parallel_downloads=2)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert_files(tmp_path / "data", files)
    assert len(stored) == len(files) == 60
    assert sum(submitted for submitted, _ in queued_after_submit) == 60
    assert all(queued <= 3 for _, queued in queued_after_submit), queued_after_submit


def test_a_bug_in_the_loop_hands_everything_to_the_threads(
    s3: S3Server,
    tmp_path: Path,
    run_cli,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stored: list[str],
    threaded: list[str],
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, small_keys(12))

    def broken_start(self, planned):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(adl.SmallObjectLoop, "_start", broken_start)

    code, summary = run_json(run_cli, s3.endpoint, tmp_path)

    assert "The small-object loop failed; continuing with worker threads" in caplog.messages
    assert stored == []
    lost = sorted(set(files) - set(threaded))
    assert lost == [], "objects the dead loop had taken never reached the threads"
    assert sorted(threaded) == sorted(files)
    assert (summary["total_files"], summary["downloaded"], summary["failed"]) == (len(files), len(files), 0)
    assert code == adl.EXIT_OK
    assert_files(tmp_path / "data", files)


# -- keep-alive ------------------------------------------------------------------------------------------------


def test_the_loop_honours_connection_close_against_moto(
    s3: S3Server, tmp_path: Path, run_cli, stored: list[str], threaded: list[str], opened: list[adl._LoopConnection]
) -> None:
    """moto's server (werkzeug) answers every response with Connection: close: the loop must open a fresh
    connection for each object, never send on one the server has closed (that would hand objects over)."""
    files = seed(s3, small_keys(30))

    code, summary = run_json(run_cli, s3.endpoint, tmp_path, parallel_downloads=1)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert_files(tmp_path / "data", files)
    assert len(stored) == 30 and threaded == []
    assert len(opened) == 30


@pytest.mark.seaweedfs
def test_one_connection_serves_many_objects_against_seaweedfs(
    seaweed: S3Server,
    tmp_path: Path,
    run_cli,
    stored: list[str],
    threaded: list[str],
    opened: list[adl._LoopConnection],
) -> None:
    bucket = f"small-loop-{uuid.uuid4().hex[:10]}"
    files = seed(seaweed, small_keys(30), bucket=bucket)

    code, summary = run_json(run_cli, seaweed.endpoint, tmp_path, bucket=bucket, parallel_downloads=1)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert_files(tmp_path / "data", files, bucket=bucket)
    assert len(stored) == 30 and threaded == []
    assert 1 <= len(opened) <= 3, f"{len(opened)} connections for 30 objects: keep-alive is not reused"


# -- stopping --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [4, 2], ids=["others-done", "others-queued"])
def test_stop_ends_objects_in_flight_and_queued_in_the_loop_as_interrupted(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, stored: list[str], threaded: list[str], connections: int
) -> None:
    """Three objects stall mid-body. With four connections every other object is stored before the stop; with
    two, both connections hold a stalled object and the rest wait in the loop's queue."""
    files = seed(s3, small_keys(12))
    held = sorted(files)[:3]  # the listing's order, so the loop starts them first
    for key in held:
        proxy.stall(path=f"/{BUCKET}/{key}", after=1 * KiB)
    done_before_stop = len(files) - len(held) if connections > len(held) else 0
    config = {**FAST, "buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}
    config["parallel_downloads"] = connections
    downloader = adl.AWSDataDownloader(config)
    in_flight = threading.Event()

    def stop_once_stalled() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not in_flight.is_set():
            stalled = [r for r in proxy.requests("GET") if "stall" in r.faults and r.bytes_sent == 1 * KiB]
            if len(stalled) == min(len(held), connections) and len(stored) == done_before_stop:
                in_flight.set()
            time.sleep(0.02)
        downloader.stop()

    stopper = threading.Thread(target=stop_once_stalled, daemon=True)
    try:
        stopper.start()
        started = time.monotonic()
        with pytest.raises(adl.DownloadInterrupted) as raised:
            downloader.run_full_download()
        assert time.monotonic() - started < 10, "the stop did not end the stalled responses"
    finally:
        proxy.clear_rules()  # releases the held responses
        stopper.join(25)
    assert in_flight.is_set(), "the held objects never stalled in the loop"
    summary = raised.value.summary
    assert summary is not None and summary.interrupted
    assert (summary.total_files, summary.downloaded, summary.failed) == (len(files), done_before_stop, 0)
    assert threaded == [], "nothing the loop held or queued was handed to the threads"
    root = tmp_path / "data"
    assert list(root.rglob(".adl-*")) == []
    assert sorted(p.relative_to(root / BUCKET).as_posix() for p in root.rglob("*.bin")) == sorted(stored)
    for key in held:
        assert not (root / BUCKET / key).exists(), key
    assert len(proxy.requests("GET", key=f"/{BUCKET}/small/")) == done_before_stop + min(len(held), connections)
    completed = json.loads((root / "download_resume.json").read_text())["completed"].get(BUCKET, {})
    assert sorted(completed) == sorted(stored)

    summary = adl.AWSDataDownloader(config).run_full_download()

    assert summary.ok and (summary.downloaded, summary.skipped) == (len(files) - done_before_stop, done_before_stop)
    assert_files(root, files)


# -- TLS -------------------------------------------------------------------------------------------------------


class _Forward(http.server.BaseHTTPRequestHandler):
    """Forwards one request to the upstream on a connection of its own; the client's connection stays open."""

    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries its Content-Length
    timeout = 10  # a connection the client left open ends on its own
    server: _TlsServer

    def do_GET(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=10)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)  # Host kept: the signature holds
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", response.getheader("content-length", "0"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


class _TlsServer(http.server.ThreadingHTTPServer):
    """HTTPS in front of a plain HTTP upstream; the TLS handshake runs on the connection's own thread."""

    daemon_threads = True

    def __init__(self, upstream: str, cert: Path, key: Path) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        super().__init__(("127.0.0.1", 0), _Forward)

    def finish_request(self, request, client_address) -> None:
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except OSError:
            return
        super().finish_request(request, client_address)


@pytest.fixture
def tls_endpoint(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An https:// endpoint for moto, with a self-signed certificate trusted through AWS_CA_BUNDLE.

    The terminator speaks HTTP, not just bytes: moto closes every connection after one response, and the
    terminator keeps the client's TLS connection open across requests so the loop can reuse it.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed, so no test certificate can be made")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
    command += ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    server = _TlsServer(s3.endpoint, cert, key)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_loop_works_over_tls_and_reuses_its_connections(
    s3: S3Server,
    tls_endpoint: str,
    tmp_path: Path,
    run_cli,
    stored: list[str],
    threaded: list[str],
    opened: list[adl._LoopConnection],
) -> None:
    files = seed(s3, {**small_keys(20), "big/300KiB.bin": 300 * KiB})

    code, summary = run_json(run_cli, tls_endpoint, tmp_path)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert_files(tmp_path / "data", files)
    assert sorted(stored) == sorted(set(files) - {"big/300KiB.bin"})
    assert threaded == ["big/300KiB.bin"]
    assert opened and all(connection.tls for connection in opened)

    stored.clear()
    threaded.clear()
    opened.clear()
    code, summary = run_json(run_cli, tls_endpoint, tmp_path, out_dir="one-connection", parallel_downloads=1)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files)
    assert_files(tmp_path / "one-connection", files)
    assert len(stored) == 20 and threaded == ["big/300KiB.bin"]
    assert 1 <= len(opened) <= 3, f"{len(opened)} TLS connections for 20 objects: keep-alive is not reused"
