"""One run's lifecycle against an in-memory engine (tests/fakeengine.py): the exact number of tries a user gets
for retry_attempts, restarts after a checksum mismatch or a new version, dry runs, the stop reason, and the
redactor that belongs to one downloader and one run. The same behaviour over real sockets is in
test_retries.py, test_verify.py and test_cron.py; here every request the run made is on record."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from fakeengine import FakeEngine

import aws_data_downloader as adl

BUCKET = "run-data"
KiB = 1024
MiB = 1024 * KiB


def downloader(tmp_path: Path, **config: object) -> adl.AWSDataDownloader:
    settings = {"buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "retry_backoff_s": 0.0, "log_file": ""}
    return adl.AWSDataDownloader({**settings, **config})


def on_disk(tmp_path: Path, key: str) -> bytes:
    return (tmp_path / "data" / BUCKET / key).read_bytes()


# -- how many tries retry_attempts gives --------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 2, 4])
@pytest.mark.parametrize(
    "fault", [ConnectionResetError("reset"), adl.S3Error(503, "SlowDown"), TimeoutError("slow")], ids=str
)
def test_a_persistent_fault_costs_exactly_retry_attempts_plus_one_gets(
    tmp_path: Path, fake_engine, retries: int, fault: BaseException
) -> None:
    engine: FakeEngine = fake_engine({BUCKET: {"bad.bin": b"x" * 1000, "good.bin": b"y" * 1000}})
    engine.fail("bad.bin", fault, times=100)

    summary = downloader(tmp_path, retry_attempts=retries).run_full_download()

    assert (summary.downloaded, summary.failed) == (1, 1)
    assert len(engine.gets("bad.bin")) == retries + 1, "one level of retries, not one inside another"
    assert on_disk(tmp_path, "good.bin") == b"y" * 1000
    assert not list((tmp_path / "data").rglob(".adl-*"))


def test_each_part_of_a_large_object_has_its_own_tries(tmp_path: Path, fake_engine) -> None:
    body = bytes(range(256)) * (3 * MiB // 256)  # 3 parts of 1 MiB
    engine: FakeEngine = fake_engine({BUCKET: {"large.bin": body}})
    engine.fail("large.bin", ConnectionResetError("reset"), times=2)  # the first two GETs, whichever parts

    summary = downloader(
        tmp_path, verify_checksums=False, multipart_threshold_mb=1, multipart_chunksize_mb=1, retry_attempts=2
    ).run_full_download()

    assert summary.ok and summary.downloaded == 1
    assert on_disk(tmp_path, "large.bin") == body
    assert len(engine.gets("large.bin")) == 3 + 2
    assert sorted({request.range for request in engine.gets("large.bin")}) == [
        (0, MiB - 1),
        (MiB, 2 * MiB - 1),
        (2 * MiB, 3 * MiB - 1),
    ]


@pytest.mark.parametrize("retries", [1, 3])
def test_a_checksum_mismatch_refetches_the_object_at_most_retry_attempts_times(
    tmp_path: Path, fake_engine, retries: int
) -> None:
    engine: FakeEngine = fake_engine({BUCKET: {"flipped.bin": b"z" * 5000}})
    engine.corrupt("flipped.bin", times=100)

    summary = downloader(tmp_path, retry_attempts=retries, small_object_kb=0).run_full_download()

    assert [(f.key, f.reason) for f in summary.failures] == [("flipped.bin", "checksum mismatch")]
    assert len(engine.gets("flipped.bin")) == retries + 1
    assert not (tmp_path / "data" / BUCKET / "flipped.bin").exists()


def test_a_flipped_byte_once_is_fetched_again_and_the_file_is_right(tmp_path: Path, fake_engine) -> None:
    engine: FakeEngine = fake_engine({BUCKET: {"flipped.bin": b"z" * 5000}})
    engine.corrupt("flipped.bin", times=1)

    summary = downloader(tmp_path, retry_attempts=1).run_full_download()

    assert summary.ok and summary.downloaded == 1
    assert on_disk(tmp_path, "flipped.bin") == b"z" * 5000
    assert len(engine.gets("flipped.bin")) == 2


def test_an_object_replaced_after_listing_is_fetched_as_it_is_now(tmp_path: Path, fake_engine) -> None:
    engine: FakeEngine = fake_engine({BUCKET: {"moving.txt": b"old"}})
    first_get = engine.get

    def get_after_an_upload(obj, request):
        if not engine.gets(obj.key):
            engine.replace(BUCKET, obj.key, b"new and longer")
        return first_get(obj, request)

    engine.get = get_after_an_upload  # type: ignore[method-assign]
    summary = downloader(tmp_path).run_full_download()

    assert summary.ok and on_disk(tmp_path, "moving.txt") == b"new and longer"
    [head] = [request for request in engine.requests if request.method == "HEAD"]
    assert head.key == "moving.txt"
    etags = [request.headers["if-match"] for request in engine.gets("moving.txt")]
    assert len(etags) == 2 and etags[0] != etags[1], "the second GET asks for the new version"


# -- dry runs and stops -------------------------------------------------------------------------------------


def test_a_dry_run_lists_and_plans_but_sends_no_get(tmp_path: Path, fake_engine) -> None:
    engine: FakeEngine = fake_engine({BUCKET: {"a.png": b"a" * 10, "b.png": b"b" * 20, "c.txt": b"c"}})

    summary = downloader(tmp_path, file_extensions=[".png"]).run_full_download(dry_run=True)

    assert summary.dry_run and (summary.total_files, summary.downloaded) == (2, 2)
    assert summary.resume_file is None
    assert [r.method for r in engine.requests if r.method in ("GET", "HEAD")] == []
    assert not (tmp_path / "data").exists(), "a dry run writes nothing, not even the download directory"


def test_a_listing_in_pages_reaches_every_object(tmp_path: Path, fake_engine) -> None:
    files = {f"k{n:03d}": bytes([n]) * 10 for n in range(25)}
    engine: FakeEngine = fake_engine({BUCKET: files}, page_size=7)

    summary = downloader(tmp_path, list_concurrency=1).run_full_download()  # page after page, by token

    assert summary.ok and summary.downloaded == 25
    assert [r.query for r in engine.requests if r.method == "LIST"] == [
        (("token", ""),),
        (("token", "7"),),
        (("token", "14"),),
        (("token", "21"),),
    ]
    assert all(on_disk(tmp_path, key) == body for key, body in files.items())
    assert engine.closed, "the run closes its engine"


def test_the_first_stop_reason_is_the_one_reported(tmp_path: Path) -> None:
    run = adl._Run(
        adl.Config(), adl.Credentials(), tmp_path, False, None, threading.Event(), adl.SecretRedactingFilter()
    )
    run.halt("disk space")
    assert run.stop_reason == "disk space" and not run.stop.is_set(), "a full budget only stops dispatching"
    run.halt("interrupted")
    assert run.stop_reason == "disk space" and run.stop.is_set()
    run.halt("disk full")
    assert run.stop_reason == "disk space"


def test_a_stop_from_another_thread_ends_the_run_as_interrupted(tmp_path: Path, fake_engine) -> None:
    files = {f"k{n:03d}": bytes([n]) * 10 for n in range(40)}
    engine: FakeEngine = fake_engine({BUCKET: files}, page_size=1)
    dl = downloader(tmp_path, parallel_downloads=1, list_concurrency=1)  # parallel: tests/test_listing.py
    listed = engine.list_page

    def stop_at_page_fifteen(bucket, prefix, token, max_keys=None):
        if token == "15":
            dl.stop()
        return listed(bucket, prefix, token, max_keys)

    engine.list_page = stop_at_page_fifteen  # type: ignore[method-assign]
    with pytest.raises(adl.DownloadInterrupted) as caught:
        dl.run_full_download()

    summary = caught.value.summary
    assert summary is not None and summary.interrupted and summary.stopped_reason is None
    assert summary.downloaded < len(files)
    assert len([r for r in engine.requests if r.method == "LIST"]) == 16, "listing stops at the page it was on"
    assert dl._run is None, "the downloader forgets the run when it ends"


# -- the redactor belongs to the downloader -----------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_a_notebook_handler_sees_no_secret_during_a_run(tmp_path: Path, fake_engine) -> None:
    """A handler the caller set up (logging.basicConfig in a notebook) is filtered while the run is active."""
    fake_engine({BUCKET: {"a.bin": b"a"}})
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    secret = "nb-secret-" + "s" * 24
    try:
        dl = downloader(tmp_path)
        summary = dl.run_full_download("AKIANOTEBOOKKEY12345", secret)
        logging.getLogger("botocore.test").debug("header x-amz-secret: %s", secret)  # after the run: not filtered
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    during = [line for line in handler.lines if "x-amz-secret" not in line]
    assert summary.ok and any("AKIA************2345" in line for line in during), "the access key shows masked"
    assert not any(secret in line or "AKIANOTEBOOKKEY12345" in line for line in during)
    assert adl.SecretRedactingFilter not in {type(f) for f in handler.filters}, "the filter is removed afterwards"
    after = [line for line in handler.lines if "x-amz-secret" in line]
    assert after == [f"header x-amz-secret: {secret}"], "after the run the caller's handler is not redacted"


def test_the_redactor_holds_only_the_current_runs_secrets(tmp_path: Path, fake_engine) -> None:
    fake_engine({BUCKET: {"a.bin": b"a"}})
    dl = downloader(tmp_path)
    dl.run_full_download("AKIAFIRSTRUNKEY00001", "first-secret-value-xxxxxxxx")
    assert dl.redactor.redact("first-secret-value-xxxxxxxx") == "****"
    dl.run_full_download("AKIASECONDRUNKEY0002", "second-secret-value-yyyyyyy")
    assert dl.redactor.redact("first-secret-value-xxxxxxxx") == "first-secret-value-xxxxxxxx"
    assert dl.redactor.redact("second-secret-value-yyyyyyy") == "****"
    other = downloader(tmp_path)
    assert other.redactor is not dl.redactor
    assert other.redactor.redact("second-secret-value-yyyyyyy") == "second-secret-value-yyyyyyy"
