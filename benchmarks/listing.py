#!/usr/bin/env python3
"""Listing a bucket of many pages on a slow-listing server (issue 13 §1): a dry run of this tool with its default
list_concurrency and with 1 (page after page), against s5cmd `ls` and rclone `lsf -R` of the same bucket.

Why this exists: on AWS a 1,000-key page takes tens of milliseconds, so a bucket of millions of keys listed one
page after another takes minutes before anything is known. The bucket is listing_cpu.py's (cached), served by
SeaweedFS through the tests' fault proxy, which adds ``--delay-ms`` to every GET (every list request:
ListObjectsV2, and rclone's V1). The tools run interleaved, ``--rounds`` times; the script prints each one's
median wall time and peak RSS (GNU time)::

    python benchmarks/listing.py                          # 100,000 keys under 1,000 prefixes, 100 ms a page
    python benchmarks/listing.py --count 200000 --prefixes 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import run_benchmark as bench  # noqa: E402
from listing_cpu import seeded_bucket  # noqa: E402


def measured(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, keys listed: --json's would_download, or lines printed) of one run."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as times:
        started = time.perf_counter()
        done = subprocess.run(
            [bench.gnu_time() or "/usr/bin/time", "-f", "%M", "-o", times.name, *command],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} exited {done.returncode}: {done.stderr[-500:]}")
        out = done.stdout
        count = json.loads(out)["would_download"] if out.startswith("{") else out.count("\n")
        return wall, int(times.read().split()[-1]) / 1024, count


def run_tools(bucket: str, endpoint: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, list]:
    """Every tool ``args.rounds`` times, interleaved, through listing_endpoint: a proxy that delays each list
    request (the server itself with --delay-ms 0)."""
    with (
        bench.listing_endpoint(endpoint, args.delay_ms) as url,
        tempfile.TemporaryDirectory(prefix="adl-listing-") as scratch,
    ):
        bins = {"s5cmd": bench.s5cmd_binary(), "rclone": bench.find_binary("rclone")}
        names = {"adl": "adl (list_concurrency 16)", "adl-list1": "adl --list-concurrency 1",
                 "s5cmd": "s5cmd ls", "rclone": "rclone lsf -R"}  # fmt: skip
        commands = {
            label: bench.listing_command(tool, bins, url, bucket, Path(scratch) / tool)  # type: ignore[arg-type]
            for tool, label in names.items()
        }
        env = {**env, "RCLONE_CONFIG_BENCH_ENDPOINT": url}
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                results[name].append(measured([str(part) for part in command], env))
                print(f"  {name}: {results[name][-1][0]:.2f} s, {results[name][-1][2]:,} keys", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--prefixes", type=int, default=1_000)
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "listing-cpu")
    args = parser.parse_args()
    with seeded_bucket(args.workdir, args.count, args.prefixes) as (workload, server, env):
        results = run_tools(workload.bucket, server.endpoint, env, args)
    print(f"\n{args.count:,} keys under {args.prefixes:,} prefixes, {args.delay_ms:.0f} ms per list request, "
          f"median of {args.rounds}:\n")  # fmt: skip
    print("| tool | wall s | peak RSS MiB | vs s5cmd ls |\n|---|---|---|---|")
    s5cmd = statistics.median(r[0] for r in results["s5cmd ls"])
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        print(f"| {name} | {wall:.2f} | {max(r[1] for r in runs):.0f} | {s5cmd / wall:.2f}x |")


if __name__ == "__main__":
    main()
