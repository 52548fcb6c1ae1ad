"""Planning from an S3 Inventory: rows/s and peak memory for a 1,000,000-row CSV gzip inventory (issue 13).

    python benchmarks/inventory_plan.py              # 1,000,000 rows in 4 data files
    python benchmarks/inventory_plan.py --rows 200000
    python benchmarks/inventory_plan.py --per-second 1   # every row with a date of its own (default: 100 a second)

It writes the data files locally (a temporary directory) and serves them to an InventoryReader through a stub
engine that reads those files, so what is timed is the run's own path, without a server: fetch into the temp
file with its MD5 checked, gunzip, CSV, one S3Object per row, then what _Run.planned_pages does with each page
(filter_reason, plan_object with the run's LocalTree against an empty download directory); the reading alone is timed first. Peak RSS (ru_maxrss) is printed after the
data files are built and again after planning, and the RSS at every 100,000th row, so a growth would show.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import resource
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aws_data_downloader as adl

SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass, IsMultipartUploaded"


def rss_mib() -> float:
    """Resident memory now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_inventory(folder: Path, rows: int, files: int, per_second: int = 100) -> dict:
    """Data files of road-image-like keys (with spaces, so URL-encoded), and the manifest listing them. Dates are
    as an upload in key order at ``per_second`` objects a second leaves them (S3's dates are to the second); 1
    gives every row a date of its own."""
    start = 1_796_032_800  # 2026-11-30T10:00:00Z
    entries = []
    per_file = -(-rows // files)
    for number in range(files):
        path = folder / f"part-{number}.csv.gz"
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as out:
            for n in range(number * per_file, min(rows, (number + 1) * per_file)):
                key = urllib.parse.quote(f"coryell/Co Rd {n % 500}/img/{n:07d}_31.708136_-97.693460.png", safe="/")
                etag = hashlib.md5(str(n).encode()).hexdigest()
                date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(start + n // per_second))
                out.write(f'"bench","{key}","{32768 + n % 1000}","{date}","{etag}","STANDARD","FALSE"\n')
        body = path.read_bytes()
        entries.append({"key": path.name, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()})
    return {
        "sourceBucket": "bench",
        "destinationBucket": "arn:aws:s3:::reports",
        "fileFormat": "CSV",
        "fileSchema": SCHEMA,
        "files": entries,
    }


class LocalFiles:
    """The part of an Engine an InventoryReader uses: GET of a whole object, here a local file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, obj: adl.S3Object, request: adl.ObjectRequest) -> object:
        return open(self.folder / obj.key, "rb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument(
        "--per-second", type=int, default=100, help="rows sharing a date (an upload at N objects/s); 1: all differ"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adl-inventory-bench-") as work:
        folder = Path(work)
        started = time.perf_counter()
        manifest_data = write_inventory(folder, args.rows, args.files, args.per_second)
        gz_bytes = sum(entry["size"] for entry in manifest_data["files"])
        print(f"built {args.rows:,} rows in {args.files} gzip data files ({gz_bytes / 2**20:.1f} MiB) "
              f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
        config = adl.Config()
        stop = threading.Event()
        reader = adl.InventoryReader(
            LocalFiles(folder),  # type: ignore[arg-type]
            "s3://reports/manifest.json",
            lambda what: adl.Attempts(what, config, stop),
            None,
        )
        reader.manifest = adl.parse_inventory_manifest(json.dumps(manifest_data).encode(), reader.url)
        root = folder / "download"
        root.mkdir()
        filters, journal, filtered = adl.Filters.from_config(config), adl.NullJournal(), Counter()
        base_rss, base_peak = rss_mib(), peak_mib()
        print(f"before planning: RSS {base_rss:.1f} MiB, peak RSS {base_peak:.1f} MiB")
        started, cpu = time.perf_counter(), time.process_time()
        rows = sum(len(page) for page in reader.pages((), set(), filtered))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"read {rows:,} rows into S3Objects (fetch, MD5, gunzip, CSV, decode) in {seconds:.2f} s "
              f"({cpu:.2f} s CPU): {rows / seconds:,.0f} rows/s wall, {rows / cpu:,.0f} rows/s per CPU second")  # fmt: skip
        planned = to_fetch = 0
        next_mark = 100_000
        started, cpu = time.perf_counter(), time.process_time()
        files = adl.LocalTree()
        for page in reader.pages((), set(), filtered):
            for obj in page:
                if adl.filter_reason(obj, filters) is None:
                    plan = adl.plan_object(obj, root, False, journal, files=files)
                    to_fetch += plan.result is None
            planned += len(page)
            if planned >= next_mark:
                print(f"  {planned:>9,} rows planned: RSS {rss_mib():.1f} MiB")
                next_mark += 100_000
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert planned == args.rows and to_fetch == args.rows, (planned, to_fetch)
        print(f"planned {planned:,} rows in {seconds:.2f} s ({cpu:.2f} s CPU): {planned / seconds:,.0f} rows/s "
              f"wall, {planned / cpu:,.0f} rows/s per CPU second")  # fmt: skip
        print(f"after planning: RSS {rss_mib():.1f} MiB, peak RSS {peak_mib():.1f} MiB "
              f"(+{peak_mib() - base_peak:.1f} MiB over the peak before planning)")  # fmt: skip


if __name__ == "__main__":
    main()
