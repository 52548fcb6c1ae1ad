"""Byte-level resume: a run killed (kill -9) or interrupted (SIGINT) in the middle of a large object continues
from the parts on disk; a replaced object is fetched whole, never stitched from two versions.

The CLI runs as a subprocess behind the fault proxy (tests/faultproxy.py); the proxy holds or slows the body of
one part so the run is stopped at a known point, and counts the bytes each run fetched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, MiB, S3Server, multipart_etag_of
from faultproxy import FaultProxy, KiB

import aws_data_downloader as adl

BUCKET = "resume-data"
KEY = "shards/big.bin"
PART = 5 * MiB
#: One object worker and one part worker: parts go in order, so "the third part" is a known point.
SETTINGS = {
    "retry_backoff_s": 0.01,
    "retry_attempts": 2,
    "parallel_downloads": 1,
    "log_file": "",
    "multipart_chunksize_mb": 1,
}


@pytest.fixture
def dataset(s3: S3Server) -> dict[str, bytes]:
    """A 4-part multipart object (5 MiB parts) and a small one."""
    rng = random.Random(11)
    s3.make_bucket(BUCKET)
    files = {KEY: rng.randbytes(4 * PART - 123), "small.txt": rng.randbytes(10 * KiB)}
    s3.put_multipart(BUCKET, KEY, files[KEY], part_size=PART)
    s3.put(BUCKET, "small.txt", files["small.txt"])
    return files


def argv(proxy: FaultProxy, tmp_path: Path) -> list[str]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SETTINGS))
    download_dir = str(tmp_path / "data")
    return ["--buckets", BUCKET, "--download-dir", download_dir, "--endpoint-url", proxy.url, "--config", str(config)]


def start_cli(s3: S3Server, proxy: FaultProxy, tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "aws_data_downloader.py"), *argv(proxy, tmp_path), "--quiet", *extra],
        cwd=tmp_path,
        env=s3.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def journal_records(tmp_path: Path) -> list[dict]:
    path = tmp_path / "data" / "download_resume.json.journal"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return records


def wait_for_parts(
    process: subprocess.Popen, tmp_path: Path, count: int, timeout: float = 120.0, key: str = KEY
) -> list[dict]:
    """Wait until the run has journaled ``count`` parts of ``key``; returns those records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [r for r in journal_records(tmp_path) if r["op"] == "part" and r["key"] == key]
        if len(parts) >= count:
            return parts
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}): {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no {count} journaled parts within {timeout}s: {process.communicate()}")


def assert_ranged_gets_carry_if_match(proxy: FaultProxy, etag: str) -> None:
    ranged = [r for r in proxy.requests("GET", key=KEY) if r.range is not None]
    assert ranged
    for request in ranged:
        assert request.headers.get("if-match") == f'"{etag}"', request


def test_kill_9_mid_object_then_rerun_fetches_only_the_missing_parts(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, dataset: dict[str, bytes], run_cli, caplog
) -> None:
    caplog.set_level(logging.INFO)
    body = dataset[KEY]
    etag = multipart_etag_of(body, PART)
    held = proxy.stall(key=KEY, after=1 * MiB, skip=2)  # parts 1 and 2 pass, part 3 stops after 1 MiB
    process = start_cli(s3, proxy, tmp_path)
    parts = wait_for_parts(process, tmp_path, 2)
    process.kill()  # SIGKILL: no handler, no final snapshot
    process.wait(60)
    held.release()

    assert process.returncode == -signal.SIGKILL, process.communicate()
    layout = [PART, PART, PART, PART - 123]
    assert sorted(p["part"] for p in parts) == [0, 1]
    for record in parts:
        start = record["part"] * PART
        assert record == {
            "op": "part",
            "bucket": BUCKET,
            "key": KEY,
            "etag": etag,
            "size": len(body),
            "layout": layout,
            "part": record["part"],
            "md5": hashlib.md5(body[start : start + PART]).hexdigest(),
        }
    assert not (tmp_path / "data" / BUCKET / KEY).exists()
    proxy.clear_rules()
    proxy.reset_stats()

    code, out, err = run_cli(*argv(proxy, tmp_path), "--quiet")

    assert code == adl.EXIT_OK, (out, err)
    assert (tmp_path / "data" / BUCKET / KEY).read_bytes() == body
    assert (tmp_path / "data" / BUCKET / "small.txt").read_bytes() == dataset["small.txt"]
    missing = len(body) - 2 * PART
    ranges = sorted(r.range for r in proxy.requests("GET", key=KEY))
    # Parts 3 and 4 continue after the bytes the killed run had written of them (the stall let 1 MiB through).
    assert [(end + 1) for _start, end in ranges] == [3 * PART, len(body)]
    kept = [start - part_start for (start, _end), part_start in zip(ranges, (2 * PART, 3 * PART), strict=True)]
    assert all(0 <= k <= 1 * MiB for k in kept), kept
    assert proxy.bytes_sent("GET", key=KEY) == missing - sum(kept), "exactly the bytes that were not on disk"
    assert_ranged_gets_carry_if_match(proxy, etag)
    assert any(m.startswith(f"Resuming {BUCKET}/{KEY}: 2 of 4 parts") for m in caplog.messages)
    snapshot = json.loads((tmp_path / "data" / "download_resume.json").read_text())
    assert snapshot["partial"] == {}
    assert snapshot["completed"][BUCKET][KEY]["checksum"] == f"md5-multipart:{etag}"
    assert list((tmp_path / "data").rglob(".adl-*")) == []


def test_kill_9_mid_large_single_part_object_resumes_at_a_part_boundary(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, caplog
) -> None:
    caplog.set_level(logging.INFO)
    s3.make_bucket(BUCKET)
    body = random.Random(14).randbytes(6 * MiB + 9)
    etag = s3.put(BUCKET, "plain.bin", body)
    held = proxy.stall(key="plain.bin", after=3 * MiB + 500 * KiB, times=1)
    small_parts = ("--multipart-threshold-mb", "1")
    process = start_cli(s3, proxy, tmp_path, *small_parts)
    wait_for_parts(process, tmp_path, 3, key="plain.bin")
    process.kill()
    process.wait(60)
    held.release()
    proxy.clear_rules()
    proxy.reset_stats()

    code, out, err = run_cli(*argv(proxy, tmp_path), "--quiet", *small_parts)

    assert code == adl.EXIT_OK, (out, err)
    assert (tmp_path / "data" / BUCKET / "plain.bin").read_bytes() == body
    [request] = proxy.requests("GET", key="plain.bin")
    first, _last = request.range
    assert 3 * MiB <= first <= 3 * MiB + 500 * KiB
    assert request.headers.get("if-match") == f'"{etag}"'
    assert any(m.startswith(f"Resuming {BUCKET}/plain.bin at byte") for m in caplog.messages)
    entry = json.loads((tmp_path / "data" / "download_resume.json").read_text())["completed"][BUCKET]["plain.bin"]
    assert entry["checksum"] == f"md5:{etag}"


def test_sigint_exits_130_and_a_rerun_completes(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, dataset: dict[str, bytes], run_cli
) -> None:
    body = dataset[KEY]
    proxy.slow(key=KEY, chunk=256 * KiB, interval_s=0.05)  # ~5 MiB/s: a part takes about a second
    process = start_cli(s3, proxy, tmp_path)
    wait_for_parts(process, tmp_path, 1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)

    assert process.returncode == adl.EXIT_INTERRUPTED, (out, err)
    snapshot = json.loads((tmp_path / "data" / "download_resume.json").read_text())
    done = snapshot["partial"][BUCKET][KEY]["done"]
    assert 1 <= len(done) < 4
    proxy.clear_rules()
    proxy.reset_stats()

    code, out, err = run_cli(*argv(proxy, tmp_path), "--quiet")

    assert code == adl.EXIT_OK, (out, err)
    assert (tmp_path / "data" / BUCKET / KEY).read_bytes() == body
    # Each part not done is fetched from the bytes the stopped run had written of it (its progress slot) to its
    # end: a part cut by the stop continues where it stopped, one never started is fetched whole.
    layout = [PART, PART, PART, len(body) - 3 * PART]
    starts = [n * PART for n in range(4)]
    left = [n for n in range(4) if str(n) not in done]
    ranges = sorted(r.range for r in proxy.requests("GET", key=KEY))
    assert [end for _start, end in ranges] == [starts[n] + layout[n] - 1 for n in left], ranges
    kept = [start - starts[n] for (start, _end), n in zip(ranges, left, strict=True)]
    assert all(0 <= k < layout[n] for k, n in zip(kept, left, strict=True)), kept
    missing = len(body) - len(done) * PART
    assert proxy.bytes_sent("GET", key=KEY) == missing - sum(kept), "exactly the bytes that were not on disk"
    assert_ranged_gets_carry_if_match(proxy, multipart_etag_of(body, PART))


def test_object_replaced_between_runs_is_downloaded_whole(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, dataset: dict[str, bytes], run_cli, caplog
) -> None:
    caplog.set_level(logging.INFO)
    held = proxy.stall(key=KEY, after=1 * MiB, skip=2)
    process = start_cli(s3, proxy, tmp_path)
    wait_for_parts(process, tmp_path, 2)
    process.kill()
    process.wait(60)
    held.release()
    proxy.clear_rules()
    proxy.reset_stats()
    new_body = random.Random(12).randbytes(len(dataset[KEY]))
    new_etag = s3.put_multipart(BUCKET, KEY, new_body, part_size=PART)

    code, out, err = run_cli(*argv(proxy, tmp_path), "--quiet")

    assert code == adl.EXIT_OK, (out, err)
    assert (tmp_path / "data" / BUCKET / KEY).read_bytes() == new_body
    assert proxy.bytes_sent("GET", key=KEY) == len(new_body)
    assert not any(m.startswith("Resuming") for m in caplog.messages)
    assert_ranged_gets_carry_if_match(proxy, new_etag)
    snapshot = json.loads((tmp_path / "data" / "download_resume.json").read_text())
    assert snapshot["completed"][BUCKET][KEY]["etag"] == new_etag
    assert snapshot["partial"] == {}


@pytest.mark.parametrize("multipart", [True, False], ids=["ranged-parts", "single-stream"])
def test_object_replaced_during_download_is_never_stitched(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, caplog, multipart: bool
) -> None:
    caplog.set_level(logging.INFO)
    rng = random.Random(13)
    s3.make_bucket(BUCKET)
    old_body, new_body = rng.randbytes(2 * PART + 7), rng.randbytes(2 * PART + 1000)
    old_etag = s3.put_multipart(BUCKET, KEY, old_body, part_size=PART) if multipart else s3.put(BUCKET, KEY, old_body)

    def replace(_request) -> None:
        s3.put(BUCKET, KEY, new_body)

    if multipart:
        proxy.on_request(replace, key=KEY, skip=1, times=1)  # before the second ranged GET
    else:
        proxy.reset(key=KEY, after=1 * MiB, times=1)  # the resumed GET asks for a Range of the old version
        proxy.on_request(replace, key=KEY, skip=1, times=1)

    summary = adl.AWSDataDownloader(
        {**SETTINGS, "buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}
    ).run_full_download()

    assert summary.ok and summary.downloaded == 1
    assert (tmp_path / "data" / BUCKET / KEY).read_bytes() == new_body
    new_etag = s3.client.head_object(Bucket=BUCKET, Key=KEY)["ETag"].strip('"')
    requests = proxy.requests("GET", key=KEY)
    assert 412 in [r.status for r in requests]
    for request in requests:
        if request.range is not None:
            assert request.headers.get("if-match") in (f'"{old_etag}"', f'"{new_etag}"')
    # Nothing of the old version is kept: the new version is fetched whole, from its first byte.
    new_version = [r for r in requests if r.status in (200, 206) and r.headers.get("if-match") == f'"{new_etag}"']
    assert sum(r.bytes_sent for r in new_version) == len(new_body)
    assert min(r.range[0] if r.range else 0 for r in new_version) == 0
    assert any("changed since it was listed" in m for m in caplog.messages)
    entry = json.loads((tmp_path / "data" / "download_resume.json").read_text())["completed"][BUCKET][KEY]
    assert entry["size"] == len(new_body) and entry["etag"] != old_etag
    assert list((tmp_path / "data").rglob(".adl-*")) == []


def test_resume_file_holds_no_parts_of_another_version(tmp_path: Path) -> None:
    """A journaled part of one ETag is never offered for another version or layout of the same key."""
    journal = adl.ResumeJournal(tmp_path / "download_resume.json").load()
    obj = adl.S3Object(BUCKET, KEY, 10 * MiB, "a" * 32 + "-2", 0.0)
    journal.record_part(obj, [PART, PART], 0, "0" * 32)
    assert journal.partial_parts(obj, [PART, PART]) == {0: "0" * 32}
    changed = adl.S3Object(BUCKET, KEY, 10 * MiB, "b" * 32 + "-2", 0.0)
    assert journal.partial_parts(changed, [PART, PART]) == {}
    assert journal.partial_parts(obj, [8 * MiB, 2 * MiB]) == {}
    journal.close()
    assert os.path.getsize(journal.journal_path) > 0
