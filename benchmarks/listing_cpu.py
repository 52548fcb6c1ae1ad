#!/usr/bin/env python3
"""Per-key CPU after a listing page arrives (issue 13 §2): what filtering, planning, the journal, the tally and a
dry run's per-key log line cost, in microseconds per key, apart from the listing's own requests and XML parsing.

Why this exists: "a dry run of 1 M keys is bound by the server, not by us" needs the client's per-key work to be
small next to a page's round trip. This script lists a SeaweedFS bucket once into memory (that time is the
listing's, reported on its own), then runs the run's own after-the-page path (_Run.planned_pages ->
within_budget -> dispatch) over those pages, with the CLI's log handlers, so nothing but our per-key work is
timed::

    python benchmarks/listing_cpu.py                 # 100,000 keys under 1,000 prefixes (seeded once, cached)
    python benchmarks/listing_cpu.py --profile       # and the top functions of each case under cProfile

Cases: a dry run (every key logged as "Would download"), and a real run's planning where every file is already
on disk and in the journal (so each key is a stat and a journal lookup, then a skip). Timings are the best of
``--repeat`` rounds; the machine may be shared, so compare figures from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run_benchmark as bench  # noqa: E402  (the server and its cached seeding)

import aws_data_downloader as adl  # noqa: E402


@contextlib.contextmanager
def seeded_bucket(workdir: Path, count: int, prefixes: int) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    """A SeaweedFS serving ``count`` 64 B keys under ``prefixes`` folders (seeded once, cached in ``workdir``):
    (workload, server, the tools' environment). first_file.py lists the same bucket."""
    bench.ensure_requirements()
    workload = bench.Workload("ttfb", f"bench-cpu-{count}", count, 64, prefixes=prefixes)
    workdir.mkdir(parents=True, exist_ok=True)
    server = bench.SeaweedFS(bench.find_binary("weed"), workdir / "seaweedfs")  # type: ignore[arg-type]
    server.start()
    try:
        env = bench.tool_env(workdir, server.endpoint)
        bench.seed(workdir, server, workload, bench.s5cmd_binary(), env)  # type: ignore[arg-type]
        yield workload, server, env
    finally:
        server.stop()


def list_everything(config: adl.Config, creds: adl.Credentials) -> list[list[adl.S3Object]]:
    """Every page of the bucket, as the run's engine lists and parses them."""
    redactor = adl.SecretRedactingFilter()
    session = adl.make_session(config, creds, redactor)
    engine = adl.make_engine(session, adl.SharedClient(session, config), config)
    try:
        attempts = lambda what: adl.Attempts(what, config, threading.Event())  # noqa: E731
        return list(adl.list_pages(engine, config.buckets[0], "", attempts))
    finally:
        engine.close()


def make_run(config: adl.Config, root: Path, dry_run: bool, pages: list[list[adl.S3Object]]) -> adl._Run:
    """A _Run whose listing is the pages in memory: everything after the page is the run's own code."""
    redactor = adl.SecretRedactingFilter()
    redactor.add_credentials(bench.ACCESS_KEY, bench.SECRET_KEY, None)  # as a run does: every record is checked
    run = adl._Run(
        config,
        adl.Credentials(bench.ACCESS_KEY, bench.SECRET_KEY, None),
        root,
        dry_run,
        None,
        threading.Event(),
        redactor,
    )
    run.filters = adl.Filters.from_config(config)
    run.open_outputs()
    run.pages = lambda: iter(pages)  # type: ignore[method-assign]
    return run


def after_the_page(run: adl._Run) -> None:
    """What execute() does with the pages, minus the listing."""
    workers = adl._DryRun(run)
    for plans in run.within_budget(run.planned_pages()):
        run.dispatch(plans, workers)


def timed(
    label: str, keys: int, body: Callable[..., object], repeat: int, profile: bool, setup: Callable[[], object] = tuple
) -> float:
    """The best of ``repeat`` rounds of ``body(*setup())`` (setup untimed), per key; with --profile, its top costs."""
    best = float("inf")
    for _ in range(repeat):
        given = setup()
        started = time.perf_counter()
        body(*given)
        best = min(best, time.perf_counter() - started)
    print(f"  {label:<46} {best * 1e6 / keys:7.2f} us/key  ({best:.2f} s for {keys:,} keys)", flush=True)
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(body, *setup())
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        print("\n".join("    " + line for line in text.getvalue().splitlines()[6:22]), flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--prefixes", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "listing-cpu")
    args = parser.parse_args()
    with seeded_bucket(args.workdir, args.count, args.prefixes) as (workload, server, env):
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        config = adl.build_config({"buckets": [workload.bucket], "endpoint_url": server.endpoint})
        creds = adl.Credentials(bench.ACCESS_KEY, bench.SECRET_KEY, None)
        started = time.perf_counter()
        pages = list_everything(config, creds)
        listing = time.perf_counter() - started
        keys = sum(map(len, pages))
        print(
            f"listing (requests + XML parsing, not per-key planning): {listing * 1e6 / keys:.2f} us/key, "
            f"{listing:.2f} s for {keys:,} keys in {len(pages):,} pages",
            flush=True,
        )
        measure(config, pages, keys, args.repeat, args.profile)


def measure(config: adl.Config, pages: list[list[adl.S3Object]], keys: int, repeat: int, profile: bool) -> None:
    objects = [obj for page in pages for obj in page]
    filters = adl.Filters.from_config(config)
    with tempfile.TemporaryDirectory(prefix="adl-cpu-") as scratch:
        root = Path(scratch) / "data"
        root.mkdir()
        print("components:")
        timed(
            "filter_reason (no filters)",
            keys,
            lambda: [adl.filter_reason(o, filters) for o in objects],
            repeat,
            profile,
        )
        null = adl.NullJournal()
        timed(
            "plan_object, no local file, no journal",
            keys,
            lambda: [adl.plan_object(o, root, False, null) for o in objects],
            repeat,
            profile,
        )
        timed(
            "plan_object, as above, with the run's LocalTree",
            keys,
            lambda: [adl.plan_object(o, root, False, null, files=tree) for tree in [adl.LocalTree()] for o in objects],
            repeat,
            profile,
        )
        tally = adl.Tally()
        timed(
            "Tally.add_selected per page + record per key",
            keys,
            lambda: [
                (
                    tally.add_selected(o.size for o in page),
                    [tally.record(adl.DownloadResult(o, "skipped", "already downloaded")) for o in page],
                )
                for page in pages
            ],
            repeat,
            profile,
        )

        sink = open(os.devnull, "w")  # the console of a dry run, piped away (closed below)
        log_file = Path(scratch) / "run.log"
        redactor = adl.SecretRedactingFilter()
        redactor.add_credentials(bench.ACCESS_KEY, bench.SECRET_KEY, None)
        stderr, sys.stderr = sys.stderr, sink
        try:
            with adl.cli_logging(logging.INFO, str(log_file), redactor):
                print("dry run, after the page (log lines to a file and a console sent to /dev/null):")
                sys.stdout.flush()
                timed(
                    "planned_pages + within_budget + dispatch",
                    keys,
                    after_the_page,
                    repeat,
                    profile,
                    lambda: (make_run(config, root, True, pages),),
                )
                # Every file present and journalled, as after a complete run: the real run's planning is all
                # skip checks. The files are written here (64 B each), the journal by the run's own writer.
                journal = adl.ResumeJournal(root / config.resume_file).load()
                for obj in objects:
                    target = adl.local_path_for(root, obj.bucket, obj.key)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(b"\0" * obj.size)
                    journal.record_done(obj, None, str(target))
                journal.close()
                print("real run, every file present (all skip checks):")
                timed(
                    "planned_pages + within_budget + dispatch",
                    keys,
                    after_the_page,
                    repeat,
                    profile,
                    lambda: (make_run(config, root, False, pages),),
                )
        finally:
            sys.stderr = stderr
            sink.close()


if __name__ == "__main__":
    main()
