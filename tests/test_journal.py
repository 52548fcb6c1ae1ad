"""The resume journal: crash-safe, skips what is provably done, notices changed objects, holds no secrets,
and costs one small append per completion.

State lives in ``<download_dir>/download_resume.json`` (a snapshot, replaced atomically) plus
``download_resume.json.journal`` (one JSON line per completion since the snapshot). Requests are counted by the
fault proxy (tests/faultproxy.py) in front of moto.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pytest
from conftest import S3Server, cli_json
from faultproxy import FaultProxy, KiB

import aws_data_downloader as adl

BUCKET = "journal-data"
SETTINGS = {"retry_backoff_s": 0.01, "parallel_downloads": 4, "log_file": ""}


@pytest.fixture
def files(s3: S3Server) -> dict[str, bytes]:
    rng = random.Random(21)
    s3.make_bucket(BUCKET)
    files = {f"dir/file-{i}.bin": rng.randbytes(20 * KiB + i) for i in range(4)}
    for key, body in files.items():
        s3.put(BUCKET, key, body)
    return files


def run(run_cli, proxy: FaultProxy, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    return cli_json(run_cli, proxy.url, tmp_path, BUCKET, SETTINGS, extra=extra)


def resume_paths(tmp_path: Path) -> tuple[Path, Path]:
    snapshot = tmp_path / "data" / "download_resume.json"
    return snapshot, snapshot.with_name(snapshot.name + ".journal")


def test_a_complete_object_with_the_same_etag_is_not_fetched_again(
    proxy: FaultProxy, tmp_path: Path, files: dict[str, bytes], run_cli
) -> None:
    code, summary = run(run_cli, proxy, tmp_path)
    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
    snapshot, journal = resume_paths(tmp_path)
    state = json.loads(snapshot.read_text())
    assert state["format"] == adl.RESUME_FORMAT and state["partial"] == {}
    assert set(state["completed"][BUCKET]) == set(files)
    assert not journal.exists()  # folded into the snapshot at the end of the run
    proxy.reset_stats()

    code, summary = run(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_OK, summary
    assert (summary["downloaded"], summary["skipped"]) == (0, len(files))
    assert summary["skipped_reasons"] == {"already downloaded": len(files)}
    assert proxy.count("GET", key="/dir/") == 0
    assert proxy.count("HEAD", key="/dir/") == 0


def test_a_changed_object_is_downloaded_again(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, files: dict[str, bytes], run_cli
) -> None:
    code, summary = run(run_cli, proxy, tmp_path)
    assert code == adl.EXIT_OK, summary
    changed = "dir/file-2.bin"
    new_body = random.Random(22).randbytes(len(files[changed]))  # same size: only the ETag tells
    new_etag = s3.put(BUCKET, changed, new_body)
    proxy.reset_stats()

    code, summary = run(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_OK, summary
    assert (summary["downloaded"], summary["skipped"]) == (1, len(files) - 1)
    assert [r.path for r in proxy.requests("GET", key="/dir/")] == [f"/{BUCKET}/{changed}"]
    assert (tmp_path / "data" / BUCKET / changed).read_bytes() == new_body
    entry = json.loads(resume_paths(tmp_path)[0].read_text())["completed"][BUCKET][changed]
    assert entry["etag"] == new_etag and entry["checksum"] == f"md5:{new_etag}"


def test_a_torn_last_journal_line_is_ignored(
    proxy: FaultProxy, tmp_path: Path, files: dict[str, bytes], run_cli
) -> None:
    code, summary = run(run_cli, proxy, tmp_path)
    assert code == adl.EXIT_OK, summary
    snapshot, journal = resume_paths(tmp_path)
    # As a kill -9 leaves it: an older snapshot, whole journal lines, and one torn line at the end.
    state = json.loads(snapshot.read_text())
    entries = state["completed"][BUCKET]
    moved = {key: entries.pop(key) for key in sorted(entries)[:2]}
    snapshot.write_text(json.dumps(state))
    lines = [json.dumps({"op": "done", "bucket": BUCKET, "key": key, **entry}) for key, entry in moved.items()]
    journal.write_text("\n".join(lines) + "\n" + lines[0][:40])
    loaded = adl.ResumeJournal(snapshot).load()
    assert len(loaded) == len(files)
    assert loaded.completed(BUCKET, sorted(files)[0]) == adl.CompletedEntry(**moved[sorted(files)[0]])
    loaded.close()
    proxy.reset_stats()

    code, summary = run(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_OK, summary
    assert summary["skipped_reasons"] == {"already downloaded": len(files)}
    assert proxy.count("GET", key="/dir/") == 0
    assert not journal.exists()
    assert set(json.loads(snapshot.read_text())["completed"][BUCKET]) == set(files)


def test_a_corrupt_snapshot_is_moved_aside_and_the_run_still_works(
    proxy: FaultProxy, tmp_path: Path, files: dict[str, bytes], run_cli, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    snapshot, _journal = resume_paths(tmp_path)
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text('{"format": "aws-data-downloader/resume", "completed": {"x": ')

    code, summary = run(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_OK and summary["downloaded"] == len(files), summary
    aside = snapshot.with_name("download_resume.json.corrupt")
    assert aside.read_text().endswith('"completed": {"x": ')
    assert set(json.loads(snapshot.read_text())["completed"][BUCKET]) == set(files)
    for key, body in files.items():
        assert (tmp_path / "data" / BUCKET / key).read_bytes() == body
    assert any("unreadable" in m and ".corrupt" in m for m in caplog.messages)


def test_the_resume_file_never_holds_credentials(
    proxy: FaultProxy, tmp_path: Path, files: dict[str, bytes], run_cli
) -> None:
    secret, token = "SECRET-do-not-store-4f2a9c", "TOKEN-do-not-store-77d1e0"
    access_key = "AKIATESTJOURNAL00001"
    log_file = tmp_path / "run.log"
    code, summary = run(
        run_cli,
        proxy,
        tmp_path,
        "--access-key",
        access_key,
        "--secret-key",
        secret,
        "--session-token",
        token,
        "--log-file",
        str(log_file),
    )
    assert code == adl.EXIT_OK, summary
    assert "Using access key" in log_file.read_text()
    # The Python API with explicit credentials, into a second directory.
    summary = adl.AWSDataDownloader(
        {**SETTINGS, "buckets": [BUCKET], "download_dir": str(tmp_path / "data2"), "endpoint_url": proxy.url}
    ).run_full_download(access_key, secret, session_token=token)
    assert summary.ok

    written = [p for d in ("data", "data2") for p in (tmp_path / d).rglob("*") if p.is_file()] + [log_file]
    resume_files = [p for p in written if p.name.startswith("download_resume.json")]
    assert resume_files
    for path in written:
        if path.parent.name == BUCKET:
            continue  # the downloaded objects themselves
        text = path.read_bytes()
        assert secret.encode() not in text and token.encode() not in text, path
        assert access_key.encode() not in text, path


def test_a_hundred_thousand_completions_cost_appends_not_snapshots(tmp_path: Path) -> None:
    count = 100_000
    journal = adl.ResumeJournal(tmp_path / "download_resume.json").load()
    started = time.perf_counter()
    for i in range(count):
        obj = adl.S3Object("bucket", f"images/{i:06d}.png", 1000 + i, f"{i:032x}", 0.0)
        journal.record_done(obj, f"md5:{i:032x}", f"/data/bucket/images/{i:06d}.png")
    appended = time.perf_counter() - started
    journal.compact()
    journal.close()
    elapsed = time.perf_counter() - started
    print(
        f"\n{count:,} completions: {journal.appends:,} appends, {journal.snapshots} snapshot(s), "
        f"{appended:.2f}s appending, {elapsed:.2f}s with the final snapshot"
    )

    assert journal.appends == count
    assert journal.snapshots == 1
    reloaded = adl.ResumeJournal(tmp_path / "download_resume.json").load()
    assert len(reloaded) == count
    assert reloaded.completed("bucket", "images/099999.png") == adl.CompletedEntry(
        f"{99_999:032x}", 1000 + 99_999, None, f"md5:{99_999:032x}", "/data/bucket/images/099999.png"
    )
    reloaded.close()


def test_journal_replay_without_a_snapshot_costs_no_snapshot(tmp_path: Path) -> None:
    """A run killed before its final snapshot leaves only the journal; loading it writes nothing."""
    journal = adl.ResumeJournal(tmp_path / "download_resume.json").load()
    for i in range(1000):
        journal.record_done(adl.S3Object("b", f"k{i}", i, f"{i:032x}", 0.0), None, None)
    journal.close()
    assert (journal.appends, journal.snapshots) == (1000, 0)
    assert not journal.path.exists()
    reloaded = adl.ResumeJournal(journal.path).load()
    assert len(reloaded) == 1000 and reloaded.snapshots == 0 and reloaded.appends == 0
    reloaded.close()
