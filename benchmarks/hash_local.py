"""How fast --checksum and --verify-local hash local files: MB/s by algorithm and by threads, tmpfs and disk.

Runs the tool's own hashing (``_hash_file_range`` feeding a ``StreamHasher``, as ``Transfer.compare_local``
does) over a set of files from a thread pool, the way the worker threads do. For the disk figures each file is
written, fsynced and dropped from the page cache with posix_fadvise(DONTNEED) (only these files: nothing
machine-wide) before it is hashed, so the bytes come from the device.

    python benchmarks/hash_local.py                      # tmpfs (/dev/shm) and disk (the current directory)
    python benchmarks/hash_local.py --files 8 --size-mb 64 --threads 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aws_data_downloader as adl

#: "unverifiable" hashes nothing: the cost of reading alone.
ALGORITHMS = ("unverifiable", "md5", "crc64nvme", "crc32c", "crc32")


def make_files(directory: Path, count: int, size: int) -> list[Path]:
    block = os.urandom(adl.MiB)
    paths = []
    for index in range(count):
        path = directory / f"hash-{index}.bin"
        with open(path, "wb") as handle:
            for _ in range(size // adl.MiB):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        paths.append(path)
    return paths


def uncache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hash_all(paths: list[Path], size: int, algorithm: str, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to hash every file, ``threads`` at a time. On a shared machine
    the CPU figure says what the hashing costs when the wall figure is bound by the other jobs."""

    def one(path: Path) -> None:
        adl._hash_file_range(path, 0, size, adl.StreamHasher(algorithm, ""))

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--places", nargs="+", default=["/dev/shm", "."])
    args = parser.parse_args()
    size = args.size_mb * adl.MiB
    total_mb = args.files * size / 1e6
    print(f"{args.files} files x {args.size_mb} MiB; MB/s (10^6 bytes) per algorithm and thread count, and MB per")
    print("CPU-second of this process in parentheses")
    for place in args.places:
        with tempfile.TemporaryDirectory(dir=place, prefix="adl-hash-") as directory:
            paths = make_files(Path(directory), args.files, size)
            disk = not place.startswith("/dev/shm")
            for algorithm in ALGORITHMS:
                cells = []
                for threads in args.threads:
                    if disk:
                        uncache(paths)
                    seconds, cpu = hash_all(paths, size, algorithm, threads)
                    cells.append(f"{threads}t {total_mb / seconds:6.0f} ({total_mb / max(cpu, 1e-9):5.0f}/cpu-s)")
                kind = "disk, uncached" if disk else "tmpfs"
                print(f"{place:>10} ({kind:>14}) {algorithm:>9}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
