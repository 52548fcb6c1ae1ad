#!/usr/bin/env python3
"""Download s3://BUCKET/PREFIX into DEST/<key> with obstore: the benchmark's peer for a Python user.

obstore (Python bindings to the Rust `object_store` crate) is a library, not a CLI, so this is the short
script a user would write with it: list the prefix, GET with 32 requests in flight, write each object to
DEST/<key>, streaming bodies larger than one chunk so a 256 MiB object is never held in memory. No
verification: obstore does none. Credentials and region come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
and AWS_REGION, as the benchmark sets them::

    python benchmarks/obstore_download.py --endpoint-url http://127.0.0.1:8333 BUCKET PREFIX DEST
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import obstore
from obstore.store import S3Store

#: Requests in flight, as for the other tools (adl's default, rclone's --transfers 32).
CONCURRENCY = 32
#: Bodies up to this size are taken whole; larger ones are written chunk by chunk as they arrive.
CHUNK = 8 * 1024 * 1024


def make_store(bucket: str, endpoint: str) -> S3Store:
    """A path-style S3Store for a plain-HTTP endpoint (obstore refuses http:// unless allow_http is set)."""
    return S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ.get("AWS_REGION", "us-east-1"),
        client_options={"allow_http": True},
        virtual_hosted_style_request=False,
    )


async def download(store: S3Store, prefix: str, dest: Path) -> int:
    """List `prefix` and fetch every object into dest/<key> with CONCURRENCY workers; returns the count.

    Listing feeds a queue while the workers already download, so the first file lands before the listing ends.
    """
    queue: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
    made: set[Path] = set()

    async def worker() -> int:
        done = 0
        while (item := await queue.get()) is not None:
            key, size = item
            path = dest / key
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            result = await obstore.get_async(store, key)
            with open(path, "wb") as handle:
                if size <= CHUNK:
                    handle.write(await result.bytes_async())
                else:
                    async for chunk in result.stream(min_chunk_size=CHUNK):
                        handle.write(chunk)
            done += 1
        return done

    workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
    try:
        async for batch in obstore.list(store, prefix or None, chunk_size=1000):
            for meta in batch:
                queue.put_nowait((meta["path"], meta["size"]))
        for _ in workers:
            queue.put_nowait(None)
        return sum(await asyncio.gather(*workers))
    finally:
        for task in workers:
            task.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint-url", required=True)
    parser.add_argument("bucket")
    parser.add_argument("prefix", help="key prefix ('' for the whole bucket)")
    parser.add_argument("dest", type=Path, help="objects are written to DEST/<key>")
    args = parser.parse_args()
    asyncio.run(download(make_store(args.bucket, args.endpoint_url), args.prefix, args.dest))
    return 0


if __name__ == "__main__":
    code = main()
    # Every file is written and closed by now. Skip interpreter finalization: with obstore 0.12.1 it sometimes
    # dies there with SIGABRT ("Fatal Python error: Aborted", no Python frame; ~1 exit in 30 after a 64 MiB
    # GET), which would fail a download that had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
