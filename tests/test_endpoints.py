"""Endpoints and request options: custom endpoints (flag and environment), path-style addressing, anonymous
requests, requester-pays, and the checksum settings strict S3-compatible stores need."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import S3Server, free_port

import aws_data_downloader as adl

FILES = {"img/a.png": b"a" * 3000, "img/b.png": b"b" * 5000, "labels.json": b"{}"}


def seed(server: S3Server, bucket: str, **extra: str) -> dict[str, bytes]:
    server.make_bucket(bucket)
    for key, body in FILES.items():
        server.put(bucket, key, body, **extra)
    return FILES


def assert_downloaded(root: Path, bucket: str) -> None:
    for key, body in FILES.items():
        assert (root / bucket / key).read_bytes() == body, key


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  #: lower-cased names


@dataclass
class RecordingProxy:
    """A reverse proxy on 127.0.0.1 that forwards every request to an S3 server and records what it saw."""

    upstream: str
    requests: list[Recorded] = field(default_factory=list)
    endpoint: str = ""

    def object_gets(self, bucket: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "GET" and r.path.split("?")[0].startswith(f"/{bucket}/")]


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[RecordingProxy]:
    recorder = RecordingProxy(s3.endpoint)
    upstream_host = s3.endpoint.removeprefix("http://")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def forward(self) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            recorder.requests.append(Recorded(self.command, self.path, headers))
            length = int(headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else None
            connection = http.client.HTTPConnection(upstream_host, timeout=30)
            try:
                connection.request(
                    self.command,
                    self.path,
                    body=body,
                    headers={k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP},
                )
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", response.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            finally:
                connection.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="recording-proxy", daemon=True)
    thread.start()
    recorder.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- where requests go -----------------------------------------------------------------------------------------


def test_endpoint_url_flag(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "flagged")
    code, out, err = run_cli("--buckets", "flagged", "--download-dir", "d", "--endpoint-url", s3.endpoint)
    assert code == 0, (out, err)
    assert_downloaded(tmp_path / "d", "flagged")


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_from_the_environment_without_the_flag(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    seed(s3, "fromenv")
    monkeypatch.setenv(variable, s3.endpoint)
    code, out, err = run_cli("--buckets", "fromenv", "--download-dir", "d")
    assert code == 0, (out, err)
    assert_downloaded(tmp_path / "d", "fromenv")


def test_endpoint_precedence_flag_then_s3_variable_then_generic(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(s3, "precedence")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here: using it would fail the run
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    code, out, err = run_cli("--buckets", "precedence", "--download-dir", "d1", "--retry-attempts", "0")
    assert code == 0, (out, err)
    assert_downloaded(tmp_path / "d1", "precedence")

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    code, out, err = run_cli("--buckets", "precedence", "--download-dir", "d2", "--endpoint-url", s3.endpoint)
    assert code == 0, (out, err)
    assert_downloaded(tmp_path / "d2", "precedence")

    assert adl.resolve_endpoint_url(adl.Config(endpoint_url="http://flag:1")) == "http://flag:1"
    assert adl.resolve_endpoint_url(adl.Config()) == dead


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_custom_endpoints_use_path_style_addressing(
    proxy: RecordingProxy, s3: S3Server, tmp_path: Path, run_cli, engine: str
):
    (tmp_path / "aws_downloader_config.yaml").write_text(f"engine: {engine}\n")
    seed(s3, "pathstyle")
    code, out, err = run_cli("--buckets", "pathstyle", "--download-dir", "d", "--endpoint-url", proxy.endpoint)
    assert code == 0, (out, err)
    assert_downloaded(tmp_path / "d", "pathstyle")
    host = proxy.endpoint.removeprefix("http://")
    assert proxy.requests
    for request in proxy.requests:
        assert request.headers["host"] == host, request  # never pathstyle.127.0.0.1
        assert request.path.startswith("/pathstyle"), request
    assert {r.path.split("?")[0] for r in proxy.object_gets("pathstyle")} == {f"/pathstyle/{k}" for k in FILES}


def test_make_client_addressing_style() -> None:
    import boto3

    session = boto3.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
    custom = adl.make_client(session, adl.Config(endpoint_url="http://127.0.0.1:9"))
    assert custom.meta.config.s3["addressing_style"] == "path"
    assert custom.meta.endpoint_url == "http://127.0.0.1:9"
    aws = adl.make_client(session, adl.Config())
    assert aws.meta.config.s3["addressing_style"] == "auto"  # virtual-hosted on AWS itself
    forced = adl.make_client(session, adl.Config(endpoint_url="http://127.0.0.1:9", addressing_style="virtual"))
    assert forced.meta.config.s3["addressing_style"] == "virtual"


# -- checksum settings -----------------------------------------------------------------------------------------


def test_client_computes_and_validates_checksums_only_when_required() -> None:
    """Some S3-compatible stores reject botocore's newer default checksum headers; the tool verifies bytes itself."""
    import boto3

    session = boto3.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
    for config in (adl.Config(), adl.Config(endpoint_url="http://127.0.0.1:9", no_sign_request=True)):
        client = adl.make_client(session, config)
        assert client.meta.config.request_checksum_calculation == "when_required"
        assert client.meta.config.response_checksum_validation == "when_required"
        assert f"aws-data-downloader/{adl.__version__}" in client.meta.config.user_agent_extra


def test_no_request_carries_botocores_default_checksum_headers(proxy: RecordingProxy, s3: S3Server, run_cli) -> None:
    seed(s3, "nochecksums")
    code, out, err = run_cli("--buckets", "nochecksums", "--download-dir", "d", "--endpoint-url", proxy.endpoint)
    assert code == 0, (out, err)
    for request in proxy.requests:
        sent = {name for name in request.headers if name.startswith(("x-amz-checksum-", "x-amz-sdk-checksum"))}
        assert sent <= {"x-amz-checksum-mode"}, request  # asking for stored checksums is fine; sending some is not


# -- anonymous requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_no_sign_request_needs_no_credentials(
    proxy: RecordingProxy, s3: S3Server, tmp_path: Path, run_cli, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "aws_downloader_config.yaml").write_text(f"engine: {engine}\n")
    seed(s3, "public", ACL="public-read")  # moto, like S3, serves anonymous GETs of public objects only
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, out, err = run_cli(
        "--buckets", "public", "--download-dir", "d", "--no-sign-request", "--endpoint-url", proxy.endpoint, "--json"
    )
    assert code == 0, (out, err)
    assert json.loads(out)["downloaded"] == len(FILES)
    assert_downloaded(tmp_path / "d", "public")
    assert proxy.requests
    assert all("authorization" not in r.headers and "x-amz-date" not in r.headers for r in proxy.requests)
    assert "X-Amz-Signature" not in "".join(r.path for r in proxy.requests)


@pytest.mark.seaweedfs
def test_no_sign_request_to_a_private_bucket_is_denied_clearly(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    bucket = f"private-{tmp_path.name[-20:].lower().replace('_', '-')}"
    seed(seaweed, bucket)
    code, out, err = run_cli(
        "--buckets", bucket, "--download-dir", "d", "--no-sign-request", "--retry-attempts", "0", *seaweed.args()
    )
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Access Denied" in errors[0] and bucket in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "d" / bucket).exists()


# -- requester pays --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_request_payer_header_reaches_the_server(
    proxy: RecordingProxy, s3: S3Server, tmp_path: Path, run_cli, engine: str
):
    (tmp_path / "aws_downloader_config.yaml").write_text(f"engine: {engine}\n")
    seed(s3, "payer")
    s3.put_multipart("payer", "big.bin", b"x" * (11 * 1024 * 1024), part_size=5 * 1024 * 1024)
    code, out, err = run_cli(
        "--buckets", "payer", "--download-dir", "d", "--request-payer", "requester", "--endpoint-url", proxy.endpoint
    )
    assert code == 0, (out, err)
    assert_downloaded(tmp_path / "d", "payer")
    assert (tmp_path / "d" / "payer" / "big.bin").stat().st_size == 11 * 1024 * 1024
    data_plane = [
        r for r in proxy.requests if r.path.startswith("/payer/") or (r.method == "GET" and "list-type" in r.path)
    ]
    assert len(data_plane) >= len(FILES) + 2, proxy.requests  # listing, GETs, the part-size HEAD, ranged GETs
    for request in data_plane:
        assert request.headers.get("x-amz-request-payer") == "requester", request

    proxy.requests.clear()
    code, out, err = run_cli("--buckets", "payer", "--download-dir", "d2", "--endpoint-url", proxy.endpoint)
    assert code == 0, (out, err)
    assert all("x-amz-request-payer" not in r.headers for r in proxy.requests)


# -- start-up without a botocore client ------------------------------------------------------------------------


def test_named_buckets_on_a_path_style_endpoint_build_no_botocore_client(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the client is ~0.06 s of a ~0.23 s start-up: a run that can address buckets itself skips it."""
    seed(s3, "noclient")
    built: list[object] = []
    original = adl.make_client

    def counting_make_client(*args, **kwargs):
        built.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(adl, "make_client", counting_make_client)
    code, out, err = run_cli("--buckets", "noclient", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_OK, (out, err)
    assert_downloaded(tmp_path / "data", "noclient")
    assert built == []

    # Discovering every bucket needs ListBuckets, which still goes through botocore.
    code, out, err = run_cli("--download-dir", "data2", *s3.args())
    assert code == adl.EXIT_OK, (out, err)
    assert_downloaded(tmp_path / "data2", "noclient")
    assert len(built) == 1


def test_named_buckets_on_a_path_style_endpoint_report_problems_like_botocore(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    seed(s3, "here")
    code, out, err = run_cli("--buckets", "here", "not-here", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert "bucket 'not-here' does not exist" in err
    assert_downloaded(tmp_path / "data", "here")


def test_a_manifest_run_without_credentials_fails_instead_of_sending_unsigned_requests(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(s3, "signed")
    code, out, err = run_cli("--buckets", "signed", "--download-dir", "data", "--manifest", "m.jsonl", *s3.args())
    assert code == adl.EXIT_OK, (out, err)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, out, err = run_cli("--from-manifest", "m.jsonl", "--download-dir", "again", *s3.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert "Error: AWS credentials not found" in err and out == ""
    assert not (tmp_path / "again" / "signed").exists()
