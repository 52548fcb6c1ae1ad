#!/usr/bin/env python3
"""Time to the first file on a slow-listing server (issue 13 §3): us against s5cmd, through a proxy that adds
20 ms to every list request, on a bucket of many listing pages.

Why this exists: on a bucket of millions of keys the first download must not wait for the listing. The target
is "time to the first file <= s5cmd's + 0.1 s (our start-up)". Each tool is started as a user would start it,
on a fresh download directory; the clock runs from the start of the process until a complete file (a regular,
non-hidden file of the object's size) appears under the download directory, then the process is stopped. The
tools run interleaved, so a load change on the (shared) machine hits them alike::

    python benchmarks/first_file.py                         # 100,000 keys (100 pages), 5 rounds
    python benchmarks/first_file.py --baseline old_adl.py   # also an earlier copy of the script

It times the script as `python aws_data_downloader.py` starts it (compiled at every start) and as the installed
`aws-data-downloader` command starts it (adl-installed: the module imported from its compiled bytecode).

The server and its seeding are run_benchmark.py's (cached under benchmarks/.cache/); the delay is
tests/faultproxy.py's ``delay`` rule on the requests carrying ``list-type=2``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import run_benchmark as bench  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from listing_cpu import seeded_bucket  # noqa: E402  (the same cached bucket)


def first_file(directory: Path, size: int, suffix: str = ".bin") -> bool:
    """Whether a complete file is under ``directory``: temporary files are hidden (ours) or named otherwise (s5cmd's
    end in digits)."""
    pending = [directory]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
                        if entry.stat().st_size == size:
                            return True
    return False


def time_to_first_file(command: list[str], env: dict[str, str], directory: Path, size: int, limit: float) -> float:
    """Seconds from starting ``command`` until a complete file appears in ``directory``; the process is stopped."""
    directory.mkdir(parents=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while time.perf_counter() - started < limit:
            if first_file(directory, size):
                return time.perf_counter() - started
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited {process.returncode} before writing a file")
            time.sleep(0.002)
        raise RuntimeError(f"no file from {command[0]} within {limit} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--prefixes", type=int, default=1_000)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another copy of aws_data_downloader.py, run as adl-baseline")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "listing-cpu")
    args = parser.parse_args()
    with seeded_bucket(args.workdir, args.count, args.prefixes) as (workload, server, env):
        with FaultProxy(server.endpoint) as proxy:
            proxy.delay(seconds=args.delay_ms / 1000, where=lambda request: "list-type=2" in request.query)
            # adl-installed: the installed aws-data-downloader command's start (the module's compiled bytecode)
            bench.compile_installed()
            starts = {
                "adl": [sys.executable, str(bench.TOOL_SCRIPT)],
                "adl-installed": bench.INSTALLED_START,
                **({"adl-baseline": [sys.executable, str(args.baseline)]} if args.baseline else {}),
            }
            commands = {
                name: lambda dest, start=start: [
                    *start,
                    "--buckets",
                    workload.bucket,
                    "--download-dir",
                    str(dest),
                    "--endpoint-url",
                    proxy.url,
                    "--log-file",
                    "",
                    "--quiet",
                ]
                for name, start in starts.items()
            }
            s5cmd = bench.s5cmd_binary()
            commands["s5cmd"] = lambda dest: [
                s5cmd,
                "--endpoint-url",
                proxy.url,
                "cp",
                f"s3://{workload.bucket}/*",
                f"{dest}/",
            ]
            times: dict[str, list[float]] = {name: [] for name in commands}
            with tempfile.TemporaryDirectory(prefix="adl-first-") as scratch:
                for round_number in range(args.rounds):
                    for name, command in commands.items():
                        dest = Path(scratch) / f"{name}-{round_number}"
                        times[name].append(time_to_first_file(command(dest), env, dest, workload.size, 120))
                    print(
                        f"round {round_number + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()),
                        flush=True,
                    )
            lists = proxy.count(key=f"/{workload.bucket}")
        print(
            f"time to the first file, {args.delay_ms:g} ms added per list request, {workload.count:,} keys "
            f"(median of {args.rounds}; {lists} requests to the bucket in all):"
        )
        for name, values in times.items():
            print(f"  {name:<13} median {statistics.median(values):.3f} s   min {min(values):.3f} s")


if __name__ == "__main__":
    main()
