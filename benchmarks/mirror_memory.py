#!/usr/bin/env python3
"""What --delete costs: memory per listed key, and time per local file checked.

A --delete run remembers every listed key until the listing ends (Mirror.listed: one hash() per key). This
measures that set's memory per key with tracemalloc, against a set of the keys themselves, for road-image-like
keys (``coryell/Co Rd 4235/img/000_31.708136_-97.693460.png``, ~50 characters), then times Mirror.unlisted over a
local tree of files that are all listed (the common case: nothing to delete, every file checked), and the CPU
Mirror.add adds to the listing, per key.

    python benchmarks/mirror_memory.py                 # 1,000,000 keys, 20,000 local files
    python benchmarks/mirror_memory.py --keys 200000   # smaller
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aws_data_downloader as adl


def road_keys(count: int) -> list[str]:
    return [f"coryell/Co Rd {4000 + n // 1000}/img/{n % 1000:03}_31.{n:06}_-97.693460.png" for n in range(count)]


def bytes_per_key(build, count: int) -> float:
    keys = road_keys(count)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = build(keys)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held
    return (after - before) / count


def hashes(keys: list[str]) -> object:
    mirror = adl.Mirror(Path("/nonexistent"), adl.Filters(), Path("/nonexistent/r.json"), ())
    page = 1000
    for start in range(0, len(keys), page):  # as the run feeds it: a listing page at a time
        mirror.add([adl.S3Object("b", key, 1, "", 0.0) for key in keys[start : start + page]])
    return mirror.listed


def key_strings(keys: list[str]) -> object:
    return {"b": {str(key.encode().decode()) for key in keys}}  # fresh copies, as a listing's would be


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{args.keys:,} keys, mean length {sum(map(len, road_keys(1000))) / 1000:.0f} characters")
    print(f"  Mirror.listed (hash per key): {bytes_per_key(hashes, args.keys):6.1f} bytes/key")
    print(f"  set of the key strings:       {bytes_per_key(key_strings, args.keys):6.1f} bytes/key")

    fresh = road_keys(100_000)  # new strings: a listing's keys have no cached hash yet
    pages = [[adl.S3Object("b", key, 1, "", 0.0) for key in fresh[n : n + 1000]] for n in range(0, 100_000, 1000)]
    mirror = adl.Mirror(Path("/nonexistent"), adl.Filters(), Path("/nonexistent/r.json"), ())
    started = time.perf_counter()
    for page in pages:
        mirror.add(page)
    seconds = time.perf_counter() - started
    print(f"  Mirror.add during the listing: {seconds / 100_000 * 1e9:.0f} ns/key")

    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        keys = road_keys(args.files)
        for key in keys:
            path = adl.local_path_for(root, "b", key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        mirror = adl.Mirror(root, adl.Filters(), root / "download_resume.json", ())
        mirror.add([adl.S3Object("b", key, 0, "", 0.0) for key in keys])
        started = time.perf_counter()
        doomed = list(mirror.unlisted("b", [""]))
        seconds = time.perf_counter() - started
    assert not doomed
    print(
        f"  Mirror.unlisted over {args.files:,} listed local files: {seconds:.2f} s ({seconds / args.files * 1e6:.1f} us/file)"
    )


if __name__ == "__main__":
    main()
