"""The small-object loop: objects up to small_object_kb come over one thread's keep-alive connections.

The loop handles only a clean 200; anything else hands the object to the worker threads as its first failed
attempt. These tests prove which path an object took by wrapping Transfer.store_small (the loop's only way to
store a body) and Transfer.download (the threads' entry point), and prove a fallback by its retry line and by
the requests the fault proxy (tests/faultproxy.py) saw. The proxy and moto close every connection after one
response, so keep-alive reuse is checked against SeaweedFS and against moto behind a keep-alive TLS terminator.
Faults no real server stages on cue (a handshake that never ends, a reset as an idle connection is reused, a 103
before the 200) come from raw scripted servers, with the loop run alone (the last section).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import logging
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MiB, S3Server, cli_json, retry_lines
from faultproxy import FaultProxy, KiB, ProxyRequest

import aws_data_downloader as adl

#: Small backoff and few attempts, so a test with faults still takes well under a second.
FAST = {"retry_backoff_s": 0.01, "retry_attempts": 3, "parallel_downloads": 4, "log_file": ""}

BUCKET = "small-loop"


def seed(server: S3Server, sizes: dict[str, int], bucket: str = BUCKET, seed: int = 11) -> dict[str, bytes]:
    return server.seed_random(bucket, sizes, seed)


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
    original = adl._LoopConnection.__init__

    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        connections.append(self)

    monkeypatch.setattr(adl._LoopConnection, "__init__", init)
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

    assert code == adl.EXIT_OK, summary
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
    edges = {"small/empty.bin": 0, "small/4KiB.bin": 4 * KiB, "small/4KiB-plus-1.bin": 4 * KiB + 1}
    files = seed(s3, {**small_keys(12), **edges})

    code, summary = run_json(run_cli, s3.endpoint, tmp_path, small_object_kb=limit_kb)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
    assert_files(tmp_path / "data", files)
    expected = sorted(key for key, body in files.items() if limit_kb and len(body) <= limit_kb * KiB)
    assert sorted(stored) == expected
    assert sorted(threaded) == sorted(set(files) - set(expected))
    if limit_kb == 0:
        assert stored == []


def test_objects_from_the_multipart_threshold_up_never_go_through_the_loop(
    s3: S3Server, tmp_path: Path, run_cli, stored: list[str], threaded: list[str]
) -> None:
    """From multipart_threshold up an object keeps its resume checkpoints, which only the threads write: a
    small_object_kb above the threshold must not send it through the loop."""
    files = seed(s3, {"small/3KiB.bin": 3 * KiB, "big/1.5MiB.bin": 3 * MiB // 2, "big/1MiB-minus-1.bin": MiB - 1})

    code, summary = run_json(run_cli, s3.endpoint, tmp_path, small_object_kb=2048, multipart_threshold_mb=1)

    assert code == adl.EXIT_OK and (summary["downloaded"], summary["failed"]) == (len(files), 0), summary
    assert_files(tmp_path / "data", files)
    assert sorted(stored) == ["big/1MiB-minus-1.bin", "small/3KiB.bin"]
    assert threaded == ["big/1.5MiB.bin"]


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

    assert code == adl.EXIT_OK, summary
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

    assert code == adl.EXIT_FAILED, summary
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
    # The delay is far beyond the read timeout, and the read timeout far beyond any answer on a loaded machine:
    # the loop's GET times out (the retry line says so) and the threads' retry succeeds.
    proxy.delay(path=f"/{BUCKET}/{FAULTED}", seconds=120, times=1)

    code, summary = run_json(run_cli, proxy.url, tmp_path, read_timeout_s=3.0)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
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

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
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
    assert code == adl.EXIT_OK, summary
    assert_files(tmp_path / "data", files)


# -- keep-alive ------------------------------------------------------------------------------------------------


def test_the_loop_honours_connection_close_against_moto(
    s3: S3Server, tmp_path: Path, run_cli, stored: list[str], threaded: list[str], opened: list[adl._LoopConnection]
) -> None:
    """moto's server (werkzeug) answers every response with Connection: close: the loop must open a fresh
    connection for each object, never send on one the server has closed (that would hand objects over)."""
    files = seed(s3, small_keys(30))

    code, summary = run_json(run_cli, s3.endpoint, tmp_path, parallel_downloads=1)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
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

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
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
    config["read_timeout_s"] = 600  # no stalled read times out while the test runs: only the stop ends them
    downloader = adl.AWSDataDownloader(config)
    in_flight, ended = threading.Event(), threading.Event()
    released_by_guard: list[bool] = []

    def stop_once_stalled() -> None:
        deadline = time.monotonic() + 60  # a hang guard: the stalls are normally reached within a second
        while time.monotonic() < deadline and not in_flight.is_set():
            stalled = [r for r in proxy.requests("GET") if "stall" in r.faults and r.bytes_sent == 1 * KiB]
            if len(stalled) == min(len(held), connections) and len(stored) == done_before_stop:
                in_flight.set()
            time.sleep(0.02)
        downloader.stop()
        # The held responses never end on their own: a run that ends now was ended by the stop. A hang guard
        # releases them after 60 s so a broken stop fails the test instead of hanging it.
        if not ended.wait(60):
            released_by_guard.append(True)
            proxy.clear_rules()

    stopper = threading.Thread(target=stop_once_stalled, daemon=True)
    try:
        stopper.start()
        with pytest.raises(adl.DownloadInterrupted) as raised:
            try:
                downloader.run_full_download()
            finally:
                ended.set()
    finally:
        proxy.clear_rules()  # releases the held responses
        stopper.join(120)
    assert in_flight.is_set(), "the held objects never stalled in the loop"
    assert not released_by_guard, "the stop did not end the stalled responses: the run waited for them"
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
    timeout = 60  # a connection the client left open ends on its own
    server: _TlsServer

    def do_GET(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
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


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the cryptography package (a dependency of moto), so
    the TLS tests never depend on an openssl command being installed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@pytest.fixture
def tls_endpoint(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An https:// endpoint for moto, with a self-signed certificate trusted through AWS_CA_BUNDLE.

    The terminator speaks HTTP, not just bytes: moto closes every connection after one response, and the
    terminator keeps the client's TLS connection open across requests so the loop can reuse it.
    """
    cert, key = self_signed_certificate(tmp_path)
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

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
    assert_files(tmp_path / "data", files)
    assert sorted(stored) == sorted(set(files) - {"big/300KiB.bin"})
    assert threaded == ["big/300KiB.bin"]
    assert opened and all(connection.tls for connection in opened)

    stored.clear()
    threaded.clear()
    opened.clear()
    code, summary = run_json(run_cli, tls_endpoint, tmp_path, out_dir="one-connection", parallel_downloads=1)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
    assert_files(tmp_path / "one-connection", files)
    assert len(stored) == 20 and threaded == ["big/300KiB.bin"]
    assert 1 <= len(opened) <= 3, f"{len(opened)} TLS connections for 20 objects: keep-alive is not reused"


# -- the loop against scripted servers -------------------------------------------------------------------------
# Faults moto and the fault proxy cannot stage (a TLS handshake that never ends, a reset just as an idle keep-alive
# connection is reused, a 103 before the 200) come from raw TCP servers whose handler scripts each connection.
# The loop runs alone between a stand-in engine (unsigned requests) and a stand-in transfer that keeps bodies in
# memory, so a test sees exactly what the loop did with each object: stored, handed over (and with what), or
# interrupted.

HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def read_request(conn: socket.socket) -> bytes:
    """One request head (the loop sends no bodies); b"" when the client closed the connection first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(64 * KiB)
        if not chunk:
            return b""
        data += chunk
    return data


def open_sockets() -> set[str]:
    """The sockets this process holds ("socket:[inode]"), where /proc shows them; empty elsewhere."""
    links: set[str] = set()
    fds = Path("/proc/self/fd")
    if fds.is_dir():
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):  # the directory's own fd, gone by now
                link = os.readlink(fd)
                if link.startswith("socket:"):
                    links.add(link)
    return links


class RawServer:
    """A TCP server on 127.0.0.1 that runs ``handler(conn)`` on a thread of its own per accepted connection,
    after a TLS handshake when given a context. close() cuts every connection and joins every thread."""

    def __init__(self, handler: Callable[[socket.socket], None], tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # accept() wakes up to see close()
        self.port: int = self.listener.getsockname()[1]
        #: Every connection accepted, oldest first (TLS-wrapped when the server speaks TLS).
        self.connections: list[socket.socket] = []
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="raw-server", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:  # the timeout that lets close() in, or a client that gave up
                continue
            conn.settimeout(60)  # a handler never waits on a forgotten client for ever
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="raw-server", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client left, or close() cut the connection
            if isinstance(conn, ssl.SSLSocket):
                conn.do_handshake()
            self.handler(conn)

    def close(self) -> None:
        self._closing.set()
        self._threads[0].join(30)  # no connection is accepted after this
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv (close() alone does not)
        for thread in self._threads:
            thread.join(30)
        for conn in self.connections:
            conn.close()
        self.listener.close()


class StubEngine:
    """What the loop uses of HttpEngine, for a scripted server: one address, no signature, no verification."""

    def __init__(self, port: int, scheme: str) -> None:
        self.bucket_address = adl.BucketAddress(scheme, f"127.0.0.1:{port}", "/b", "us-east-1")

    def address(self, bucket: str) -> adl.BucketAddress:
        return self.bucket_address

    def signed_headers(
        self, address: adl.BucketAddress, method: str, path: str, query: object, headers: dict[str, str]
    ) -> dict[str, str]:
        return {**headers, "host": address.host}

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the scripted servers' certificates are throwaway
        return context


class MemoryTransfer:
    """What the loop uses of Transfer: the config, the stop flag, and a store_small that keeps bodies in memory."""

    def __init__(self, **config: object) -> None:
        # Timeouts only guard against hangs here; a test that needs one to fire sets its own.
        defaults = {"parallel_downloads": 1, "connect_timeout_s": 30, "read_timeout_s": 30, "verify_checksums": False}
        self.config = adl.build_config({**defaults, **config})
        self.stop = threading.Event()
        #: Bodies the loop stored, by key, in the order it stored them.
        self.stored: dict[str, bytes] = {}

    def store_small(self, obj: adl.S3Object, target: Path, headers: dict[str, str], body: bytes) -> adl.DownloadResult:
        if len(body) != obj.size:
            raise ConnectionError(f"body ended at {len(body)} of {obj.size} bytes")
        self.stored[obj.key] = body
        return adl.DownloadResult(obj, "downloaded", "", str(target), None, len(body), 1)


class LoopRun:
    """A SmallObjectLoop between a StubEngine and a MemoryTransfer, over objects k0, k1, ... of ``size`` bytes."""

    def __init__(self, port: int, count: int, size: int, scheme: str, config: dict[str, object]) -> None:
        self.transfer = MemoryTransfer(**config)
        self.plans = [
            adl.Planned(adl.S3Object("b", f"k{n}", size, "", 0.0), Path("memory", f"k{n}"), None) for n in range(count)
        ]
        #: What the loop ended itself (stored, interrupted), and what it handed to the threads: (key, exception).
        self.results: list[adl.DownloadResult] = []
        self.fallbacks: list[tuple[str, BaseException | None]] = []
        engine, transfer = StubEngine(port, scheme), self.transfer
        self.loop = adl.SmallObjectLoop(
            engine,  # type: ignore[arg-type]
            transfer.config,
            transfer.stop,
            self._deliver,
            self._fallback,
            self._interrupted,
        )
        self._closer: threading.Thread | None = None

    def _deliver(self, planned: adl.Planned, headers: dict[str, str], body: bytes) -> None:
        """As the run does it: store the body, or hand the object over with why storing failed."""
        try:
            self.results.append(self.transfer.store_small(planned.obj, planned.target, headers, body))
        except Exception as exc:
            self._fallback(planned, exc)

    def _fallback(self, planned: adl.Planned, exc: BaseException | None) -> None:
        self.fallbacks.append((planned.obj.key, exc))

    def _interrupted(self, planned: adl.Planned) -> None:
        self.results.append(adl.DownloadResult(planned.obj, "interrupted", "stopped"))

    def run(self, within: float = 60.0) -> None:
        """Submit every object and close() (see close())."""
        self.loop.submit(self.plans)
        self.close(within)

    def close(self, within: float = 60.0) -> None:
        """close() the loop; the test fails if it is still waiting after ``within`` (teardown ends it)."""
        self._closer = threading.Thread(target=self.loop.close, name="loop-close", daemon=True)
        self._closer.start()
        self._closer.join(within)
        assert not self._closer.is_alive(), f"close() still waiting after {within:g}s"

    def end(self) -> None:
        """Stop the loop and wait for it, whatever state the test left it in."""
        self.transfer.stop.set()
        if self._closer is None:
            self._closer = threading.Thread(target=self.loop.close, name="loop-close", daemon=True)
            self._closer.start()
        self._closer.join(30)


class Scripted:
    """The scripted servers and loops of one test; finish() ends them and checks that no thread or socket
    started during the test outlives it."""

    def __init__(self) -> None:
        self.servers: list[RawServer] = []
        self.runs: list[LoopRun] = []
        self._threads = set(threading.enumerate())
        self._sockets = open_sockets()

    def serve(self, handler: Callable[[socket.socket], None], tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler, tls)
        self.servers.append(server)
        return server

    def loop(self, server: RawServer, count: int, size: int = 5, scheme: str = "http", **config: object) -> LoopRun:
        run = LoopRun(server.port, count, size, scheme, config)
        self.runs.append(run)
        return run

    def finish(self) -> None:
        for run in self.runs:
            run.transfer.stop.set()
        for server in self.servers:  # first: a connector thread in a handshake ends when its server goes
            server.close()
        for run in self.runs:
            run.end()
        deadline = time.monotonic() + 30  # a hang guard: the threads normally end within milliseconds
        while True:
            left = [t for t in threading.enumerate() if t not in self._threads and t.is_alive()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not left, f"threads outlived the test: {left}"
        leaked = open_sockets() - self._sockets
        assert not leaked, f"sockets outlived the test: {sorted(leaked)}"


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    harness = Scripted()
    try:
        yield harness
    finally:
        harness.finish()


@pytest.fixture(scope="module")
def tls_server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server-side TLS context with a throwaway self-signed certificate, for scripted servers."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("scripted-tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def answering(*parts: bytes, pause_s: float = 0.0) -> Callable[[socket.socket], None]:
    """A handler that answers every request on its connection with ``parts``, sent one write each."""

    def handler(conn: socket.socket) -> None:
        while read_request(conn):
            for n, part in enumerate(parts):
                if n and pause_s:
                    time.sleep(pause_s)
                conn.sendall(part)

    return handler


def reset_after(answers: int) -> Callable[[socket.socket], None]:
    """A handler that answers ``answers`` requests, then resets the connection as the next request arrives (a
    keep-alive timeout firing just then): the request is left unread, so the close sends a RST."""

    def handler(conn: socket.socket) -> None:
        for _ in range(answers):
            if not read_request(conn):
                return
            conn.sendall(HELLO)
        conn.recv(1, socket.MSG_PEEK)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    return handler


def never_answering(conn: socket.socket) -> None:
    """Accepts the connection and reads whatever comes (a TLS ClientHello) without ever answering."""
    while conn.recv(64 * KiB):
        pass


@pytest.fixture
def handshakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Connections being opened on the loop's connector threads: "now", the most at once ("peak"), and how many
    openings have returned ("ended"). The first eight openings wait (60 s at most) until all eight have begun, so
    however slowly a loaded machine starts threads, eight that can run at once do meet; openings that run one
    after another never reach eight, and the peak says so."""
    counts = {"now": 0, "peak": 0, "ended": 0, "started": 0}
    lock = threading.Lock()
    all_begun = threading.Event()
    original = adl.SmallObjectLoop._open_socket

    def open_socket(self, address):
        with lock:
            counts["now"] += 1
            counts["started"] += 1
            counts["peak"] = max(counts["peak"], counts["now"])
            first_round = counts["started"] <= 8
            if counts["now"] == 8:
                all_begun.set()
        if first_round:
            all_begun.wait(60)
        try:
            return original(self, address)
        finally:
            with lock:
                counts["now"] -= 1
                counts["ended"] += 1

    monkeypatch.setattr(adl.SmallObjectLoop, "_open_socket", open_socket)
    return counts


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """A hang guard: fail with ``what`` if ``condition`` is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_server_that_never_answers_the_tls_handshake_times_out_eight_at_a_time(
    scripted: Scripted, handshakes: dict[str, int]
) -> None:
    """Handshakes run on connector threads, eight at once for parallel_downloads 8: twelve objects time out in
    two rounds of connect_timeout_s, not one after another, and each is handed to the threads."""
    server = scripted.serve(never_answering)
    run = scripted.loop(server, 12, scheme="https", parallel_downloads=8, connect_timeout_s=1)
    keys = sorted(planned.obj.key for planned in run.plans)

    run.run()

    assert handshakes["peak"] == 8, handshakes  # eight handshakes were waiting at once
    assert handshakes["ended"] == 12, handshakes
    assert run.results == []
    assert sorted(key for key, _ in run.fallbacks) == keys
    assert all(isinstance(exc, TimeoutError) for _, exc in run.fallbacks), run.fallbacks
    assert len(server.connections) == 12  # one connection per object: the loop reached the server for each
    assert run.loop._open == 0


def test_a_stop_ends_every_object_waiting_for_a_tls_handshake_at_once(
    scripted: Scripted, handshakes: dict[str, int]
) -> None:
    """A stop while eight handshakes hang (connect_timeout_s far beyond the test) ends every object, the eight
    being connected and the four queued, as interrupted: close() returns while the handshakes still hang."""
    server = scripted.serve(never_answering)
    run = scripted.loop(server, 12, scheme="https", parallel_downloads=8, connect_timeout_s=600)
    keys = sorted(planned.obj.key for planned in run.plans)
    run.loop.submit(run.plans)
    wait_until(lambda: handshakes["now"] == 8 and len(server.connections) == 8, "eight handshakes in flight")

    run.transfer.stop.set()
    run.close()

    assert handshakes["ended"] == 0, "close() waited for a handshake to end"
    assert sorted((r.obj.key, r.status) for r in run.results) == [(key, "interrupted") for key in keys]
    assert run.fallbacks == []
    # The scripted fixture then closes the server, which ends the hanging handshakes and their threads.


@pytest.mark.parametrize("connection", ["reused", "new"])
def test_a_reset_before_the_answer_refetches_on_a_reused_connection_and_fails_on_a_new_one(
    scripted: Scripted, connection: str
) -> None:
    """The server resets the connection as the request arrives. On a reused keep-alive connection that is the
    server having dropped it while idle: the object is handed over with None (fetched again, no attempt
    counted). On a new connection it is a network fault like any other: the failed attempt is passed on."""
    server = scripted.serve(reset_after(1 if connection == "reused" else 0))
    run = scripted.loop(server, 2)

    run.run()

    if connection == "reused":
        assert run.transfer.stored == {"k0": b"hello"}
        assert run.fallbacks == [("k1", None)]
        assert len(server.connections) == 1
    else:
        assert run.transfer.stored == {}
        assert [key for key, _ in run.fallbacks] == ["k0", "k1"]
        assert all(isinstance(exc, ConnectionResetError) for _, exc in run.fallbacks), run.fallbacks
        assert len(server.connections) == 2
    assert [r.obj.key for r in run.results] == list(run.transfer.stored)
    assert run.loop._open == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_idle_connection_the_server_closed_is_dropped_before_it_is_reused(
    scripted: Scripted, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """The server closes a keep-alive connection 0.2 s after its last answer. The loop is busy storing the last
    object of the first batch (a slow disk) as that happens, so it has not seen the close when the second batch
    comes: the check of a connection idle longer than IDLE_CHECK_S must find it, and no object is handed over."""
    monkeypatch.setattr(adl.SmallObjectLoop, "IDLE_CHECK_S", 0.1)
    idle_closed = threading.Event()

    def close_when_idle(conn: socket.socket) -> None:
        answered = 0
        while read_request(conn):
            conn.sendall(HELLO)
            answered += 1
            if answered < len(first):
                continue  # mid-batch: the next request comes however slowly the loaded machine sends it
            # The batch's last answer: the loop is held in slow_store, so nothing comes within 0.2 s.
            readable, _, _ = select.select([conn], [], [], 0.2)
            if not readable:
                conn.close()
                idle_closed.set()
                return

    tls = request.getfixturevalue("tls_server_context") if scheme == "https" else None
    server = scripted.serve(close_when_idle, tls)
    run = scripted.loop(server, 6, scheme=scheme)
    first, second = run.plans[:3], run.plans[3:]
    storing_last, second_queued = threading.Event(), threading.Event()
    store = run.transfer.store_small

    def slow_store(obj: adl.S3Object, target: Path, headers: dict[str, str], body: bytes) -> adl.DownloadResult:
        if obj.key == first[-1].obj.key:
            storing_last.set()
            assert second_queued.wait(60) and idle_closed.wait(60), "hang guard"
            time.sleep(0.05)  # the close reaches the loop's end of the connection
        return store(obj, target, headers, body)

    run.transfer.store_small = slow_store  # type: ignore[method-assign]
    run.loop.submit(first)
    assert storing_last.wait(60)
    run.loop.submit(second)
    second_queued.set()
    run.close()

    assert idle_closed.is_set()
    assert run.fallbacks == []
    assert list(run.transfer.stored) == [planned.obj.key for planned in run.plans]
    assert [r.status for r in run.results] == ["downloaded"] * 6
    assert len(server.connections) == 2  # the second batch on a new connection, after the first was closed
    assert run.loop._open == 0


@pytest.mark.parametrize(
    ("status", "interim"), [(100, True), (102, True), (103, True), (101, False), (200, False), (204, False)]
)
def test_is_interim(status: int, interim: bool) -> None:
    assert adl.is_interim(status) is interim


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


def test_the_loop_skips_an_interim_answer(scripted: Scripted) -> None:
    """A 103 Early Hints (sent on its own, so it arrives as a read of its own) comes before every 200."""
    server = scripted.serve(answering(EARLY_HINTS, HELLO, pause_s=0.02))
    run = scripted.loop(server, 3)

    run.run()

    assert run.fallbacks == []
    assert run.transfer.stored == {"k0": b"hello", "k1": b"hello", "k2": b"hello"}
    assert len(server.connections) == 1  # the framing held: one keep-alive connection for all three


def test_the_threads_connection_skips_an_interim_answer(scripted: Scripted) -> None:
    server = scripted.serve(answering(EARLY_HINTS, HELLO, pause_s=0.02))
    host = f"127.0.0.1:{server.port}"
    connection = adl._Http11Connection("http", host, 30.0, 30.0, None)
    try:
        answers = []
        for key in ("k0", "k1"):
            response = connection.request("GET", f"/b/{key}", {"host": host})
            answers.append((response.status, response.read(64), response.isclosed()))
    finally:
        connection.close()

    assert answers == [(200, b"hello", True)] * 2
    assert len(server.connections) == 1


@pytest.mark.parametrize("fault", ["etag", "signer"])
def test_a_request_that_cannot_be_built_hands_over_only_its_object(
    scripted: Scripted, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A listing ETag that is not latin-1 (on a new connection) or credentials that fail to refresh (on a reused
    one) end that object's request before it is sent: the loop hands it over with the error and goes on."""
    caplog.set_level(logging.ERROR)
    server = scripted.serve(answering(HELLO))
    run = scripted.loop(server, 4)
    if fault == "etag":
        bad = "k0"
        run.plans[0] = adl.Planned(adl.S3Object("b", bad, 5, "abc\u0119", 0.0), run.plans[0].target, None)
    else:
        bad = "k1"
        engine = run.loop.engine
        signed_headers = engine.signed_headers
        calls = []

        def failing_second_time(*args: object) -> dict[str, str]:
            calls.append(args)
            if len(calls) == 2:
                raise RuntimeError("credential refresh failed")
            return signed_headers(*args)

        engine.signed_headers = failing_second_time  # type: ignore[method-assign]

    run.run()

    assert [key for key, _ in run.fallbacks] == [bad], run.fallbacks
    exc = run.fallbacks[0][1]
    assert isinstance(exc, UnicodeEncodeError if fault == "etag" else RuntimeError), exc
    assert sorted(run.transfer.stored) == sorted({"k0", "k1", "k2", "k3"} - {bad})
    assert "The small-object loop failed; continuing with worker threads" not in caplog.messages
    assert run.loop._open == 0
