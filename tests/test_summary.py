"""The summary: the block the README shows, failures grouped by reason, JSON, and the Python API's contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import S3Server

import aws_data_downloader as adl

GB = 1024**3


def seed_like_summary(**changes) -> adl.DownloadSummary:
    values = {
        "total_files": 1234,
        "downloaded": 1200,
        "skipped": 28,
        "failed": 6,
        "total_bytes": int(15.2 * GB),
        "downloaded_bytes": int(14.8 * GB),
        "duration_s": 1245.3,
    }
    values.update(changes)
    return adl.DownloadSummary(**values)


def test_format_matches_the_readme_block() -> None:
    lines = seed_like_summary().format().splitlines()
    assert lines[:12] == [
        "=" * 60,
        "DOWNLOAD SUMMARY",
        "=" * 60,
        "Total files:      1,234",
        "Downloaded:       1,200",
        "Skipped:          28",
        "Failed:           6",
        "Total size:       15.2 GB",
        "Downloaded size:  14.8 GB",
        "Duration:         1,245.3 seconds",
        "Average speed:    12.2 MB/s",
        "Success rate:     99.5%",
    ]
    assert len(lines) == 12


def test_failures_are_grouped_by_reason_with_example_keys() -> None:
    failures = (
        *(adl.FailedObject("bkt", f"img/{i}.png", "access denied") for i in range(5)),
        adl.FailedObject("bkt", "odd\nkey", "checksum mismatch after 6 attempts"),
    )
    text = seed_like_summary(failed=6, failures=failures, skipped_reasons={"already downloaded": 28}).format()
    tail = text.splitlines()[12:]
    assert tail == [
        "Skipped by reason:",
        "  already downloaded: 28",
        "Failures by reason:",
        "  access denied (5): bkt/img/0.png, bkt/img/1.png, bkt/img/2.png, ... (2 more)",
        "  checksum mismatch after 6 attempts (1): bkt/odd\\x0akey",
    ]


def test_problems_interruptions_and_dry_runs_are_stated() -> None:
    summary = seed_like_summary(
        bucket_problems=(adl.BucketProblem("gone", "bucket 'gone' does not exist"),), interrupted=True
    )
    text = summary.format()
    assert "Bucket not downloaded: bucket 'gone' does not exist" in text
    assert "Interrupted: run the same command again to continue." in text
    assert not summary.ok
    assert "Stopped: not enough disk space" in seed_like_summary(stopped_reason="not enough disk space").format()

    dry = seed_like_summary(dry_run=True, downloaded=3, skipped=0, failed=0, total_files=3).format()
    assert "DRY RUN SUMMARY (nothing was written)" in dry
    assert "Would download:   3 (14.8 GB)" in dry and "Success rate:" not in dry


def test_rates_and_ok() -> None:
    empty = adl.DownloadSummary(0, 0, 0, 0, 0, 0, 0.0)
    assert empty.success_rate == 100.0 and empty.average_speed == 0.0 and empty.ok
    summary = seed_like_summary(failed=0, skipped=34)
    assert summary.ok
    assert summary.average_speed == pytest.approx(int(14.8 * GB) / 1245.3)
    assert not seed_like_summary().ok


def test_to_dict_round_trips_through_json() -> None:
    summary = seed_like_summary(
        failures=(adl.FailedObject("bkt", "a.png", "access denied"),),
        skipped_reasons={"already downloaded": 28},
        buckets=("bkt",),
        bucket_problems=(adl.BucketProblem("gone", "bucket 'gone' does not exist"),),
        download_dir="/data",
    )
    data = summary.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["failures"] == [{"bucket": "bkt", "key": "a.png", "reason": "access denied"}]
    assert data["failures_by_reason"] == {"access denied": 1}
    assert data["bucket_problems"] == [{"bucket": "gone", "reason": "bucket 'gone' does not exist", "missing": False}]
    assert data["success_rate"] == 99.51
    assert data["total_files"] == 1234 and data["download_dir"] == "/data"


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (1536, "1.5 KB"),
        (5 * 1024**2, "5.0 MB"),
        (2 * 1024**4, "2.0 TB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert adl.format_size(size) == text


# -- the Python API, against the server ----------------------------------------------------------------------


@pytest.fixture
def no_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args) -> None:
        raise AssertionError("the API must never call sys.exit")

    monkeypatch.setattr(sys, "exit", refuse)


def test_run_full_download_returns_the_summary(s3: S3Server, tmp_path: Path, no_exit) -> None:
    s3.make_bucket("api-bkt")
    s3.put("api-bkt", "a/1.txt", b"one")
    s3.put("api-bkt", "a/2.txt", b"two!")
    s3.put("api-bkt", "a/bad//3.txt", b"three")
    downloader = adl.AWSDataDownloader({"buckets": ["api-bkt"], "endpoint_url": s3.endpoint}, download_dir="out")
    summary = downloader.run_full_download("api-key-id", "api-test-secret-0123", region="us-east-1")
    assert isinstance(summary, adl.DownloadSummary)
    assert (summary.total_files, summary.downloaded, summary.skipped, summary.failed) == (3, 2, 0, 1)
    assert summary.total_bytes == 12 and summary.downloaded_bytes == 7
    assert summary.failures == (adl.FailedObject("api-bkt", "a/bad//3.txt", "unsafe key: path component '(empty)'"),)
    assert summary.buckets == ("api-bkt",)
    assert summary.download_dir == str(tmp_path / "out")
    assert not summary.ok
    assert (tmp_path / "out" / "api-bkt" / "a" / "2.txt").read_bytes() == b"two!"

    again = downloader.run_full_download(dry_run=True)
    assert again.dry_run and again.skipped == 2 and again.downloaded == 0


def test_api_errors_are_downloader_errors_with_the_cli_message(s3: S3Server, no_exit, run_cli) -> None:
    with pytest.raises(adl.NothingAccessibleError) as caught:
        adl.AWSDataDownloader({"buckets": ["nope-bkt"], "endpoint_url": s3.endpoint}).run_full_download()
    assert isinstance(caught.value, adl.DownloaderError)
    code, out, err = run_cli("--buckets", "nope-bkt", *s3.args())
    assert code == caught.value.exit_code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert f"Error: {caught.value}\n" in err

    with pytest.raises(adl.ConfigError, match="'parallel_downloads'") as caught_config:
        adl.AWSDataDownloader({"parallel_downloads": "20-30"})
    assert caught_config.value.exit_code == adl.EXIT_USAGE

    with pytest.raises(adl.CredentialsError, match="both an access key and a secret key"):
        adl.AWSDataDownloader({"buckets": ["nope-bkt"], "endpoint_url": s3.endpoint}).run_full_download("only-key")


def test_download_dir_that_is_a_file_is_a_config_error(s3: S3Server, tmp_path: Path, no_exit, run_cli) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(adl.ConfigError, match="taken"):
        adl.AWSDataDownloader({"download_dir": "taken", "endpoint_url": s3.endpoint}).run_full_download()
    code, out, err = run_cli("--download-dir", "taken", *s3.args())
    assert code == adl.EXIT_USAGE and out == "", (out, err)
    assert "\nError: download directory " in err and "Traceback" not in err
