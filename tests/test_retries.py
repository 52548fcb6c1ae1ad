"""Transfer retries: network faults, truncated bodies, 5xx and slow answers heal; 403/404 fail at once.

Every test runs the downloader against moto behind the fault-injecting proxy (tests/faultproxy.py), which
breaks responses on purpose and counts the body bytes it sent, so a test can tell a resumed body (a ranged GET
from the bytes already written) from one fetched again from zero.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from conftest import MiB, S3Server, cli_json, retry_lines, write_config
from faultproxy import FaultProxy, KiB, ProxyRequest

import aws_data_downloader as adl

#: Small backoff and few attempts, so a test with faults still takes well under a second.
FAST = {"retry_backoff_s": 0.01, "retry_attempts": 3, "parallel_downloads": 4, "log_file": ""}

BUCKET = "retry-data"


def seed(s3: S3Server, sizes: dict[str, int], seed: int = 3) -> dict[str, bytes]:
    return s3.seed_random(BUCKET, sizes, seed)


def run_json(run_cli, proxy: FaultProxy, tmp_path: Path, **config: object) -> tuple[int, dict]:
    """The CLI with --json through the proxy; returns (exit code, summary)."""
    return cli_json(run_cli, proxy.url, tmp_path, BUCKET, {**FAST, **config})


def assert_files(tmp_path: Path, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        assert (tmp_path / "data" / BUCKET / key).read_bytes() == body, key


def gets(proxy: FaultProxy, key: str) -> list[ProxyRequest]:
    return proxy.requests("GET", key=f"/{BUCKET}/{key}")


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_reset_mid_body_resumes_from_the_bytes_written(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture, engine: str
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, {"reset.bin": 3 * MiB, "other.bin": 200 * KiB})
    proxy.reset(key="reset.bin", after=1 * MiB, times=1)

    code, summary = run_json(run_cli, proxy, tmp_path, engine=engine)

    assert code == adl.EXIT_OK, summary
    assert (summary["downloaded"], summary["failed"]) == (2, 0)
    assert_files(tmp_path, files)
    requests = gets(proxy, "reset.bin")
    assert len(requests) == 2
    assert requests[0].faults == ["reset"] and requests[0].range is None
    first, _last = requests[1].range
    assert 0 < first <= 1 * MiB, "the retry starts where the written bytes end, not at zero"
    assert requests[1].headers.get("if-match", "").strip('"') == s3.client.head_object(Bucket=BUCKET, Key="reset.bin")[
        "ETag"
    ].strip('"')
    assert proxy.bytes_sent("GET", key="reset.bin") < 2 * len(files["reset.bin"])
    [line] = retry_lines(caplog, "reset.bin")
    assert f"{BUCKET}/reset.bin" in line and "attempt 2 of 4" in line and "network error" in line
    assert "waiting" in line


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_truncated_body_resumes_with_a_range(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture, engine: str
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, {"short.bin": 3 * MiB})
    proxy.truncate(key="short.bin", after=2 * MiB, times=1)

    code, summary = run_json(run_cli, proxy, tmp_path, engine=engine)

    assert code == adl.EXIT_OK and summary["downloaded"] == 1, summary
    assert_files(tmp_path, files)
    requests = gets(proxy, "short.bin")
    assert [r.faults for r in requests] == [["truncate"], []]
    assert requests[1].range == (2 * MiB, 3 * MiB - 1)
    assert proxy.bytes_sent("GET", key="short.bin") == 3 * MiB
    [line] = retry_lines(caplog, "short.bin")
    assert "attempt 2 of 4" in line and "network error" in line


@pytest.mark.parametrize(
    ("status", "reason"), [(500, "S3 error InternalError"), (503, "S3 error SlowDown")], ids=["500", "503"]
)
def test_server_errors_are_retried_and_logged(
    s3: S3Server,
    proxy: FaultProxy,
    tmp_path: Path,
    run_cli,
    caplog: pytest.LogCaptureFixture,
    status: int,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, {"flaky.txt": 100 * KiB, "fine.txt": 10 * KiB})
    proxy.error(key="flaky.txt", status=status, times=2)

    code, summary = run_json(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_OK and summary["downloaded"] == 2, summary
    assert_files(tmp_path, files)
    assert [r.status for r in gets(proxy, "flaky.txt")] == [status, status, 200]
    lines = retry_lines(caplog, "flaky.txt")
    assert len(lines) == 2
    for attempt, line in enumerate(lines, 2):
        assert f"{BUCKET}/flaky.txt (attempt {attempt} of 4)" in line and reason in line and "waiting" in line


def test_multipart_part_fault_resumes_within_the_part(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rng = random.Random(5)
    s3.make_bucket(BUCKET)
    body = rng.randbytes(11 * MiB)
    s3.put_multipart(BUCKET, "parts.bin", body, part_size=5 * MiB)
    proxy.reset(key="parts.bin", after=3 * MiB, times=1, where=lambda r: r.range is not None and r.range[0] == 5 * MiB)
    proxy.error(key="parts.bin", status=503, times=1, where=lambda r: r.range is not None and r.range[0] == 0)

    summary = adl.AWSDataDownloader(
        {**FAST, "buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}
    ).run_full_download()

    assert summary.ok and summary.downloaded == 1
    assert (tmp_path / "data" / BUCKET / "parts.bin").read_bytes() == body
    ranges = sorted(r.range for r in gets(proxy, "parts.bin") if r.status == 200 or r.status == 206)
    assert (5 * MiB, 10 * MiB - 1) in ranges
    resumed = [r for r in ranges if r[0] not in (0, 5 * MiB, 10 * MiB)]
    assert len(resumed) == 1 and 5 * MiB < resumed[0][0] <= 8 * MiB and resumed[0][1] == 10 * MiB - 1
    assert proxy.bytes_sent("GET", key="parts.bin") < 2 * len(body)
    assert len(retry_lines(caplog, "parts.bin")) == 2


def test_slow_responses_still_download(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> None:
    files = seed(s3, {"late.bin": 600 * KiB, "trickle.bin": 600 * KiB})
    proxy.delay(key="late.bin", seconds=0.5, times=1)
    proxy.slow(key="trickle.bin", chunk=128 * KiB, interval_s=0.05)

    code, summary = run_json(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_OK and summary["downloaded"] == 2, summary
    assert_files(tmp_path, files)
    assert gets(proxy, "late.bin")[0].faults == ["delay"]


def test_a_response_slower_than_the_read_timeout_is_retried(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, {"stuck.bin": 300 * KiB})
    # The delay is far beyond the read timeout, and the read timeout far beyond any answer on a loaded machine:
    # the first GET times out, the retry succeeds (the delayed answer ends when the proxy stops).
    proxy.delay(key="stuck.bin", seconds=120, times=1)

    code, summary = run_json(run_cli, proxy, tmp_path, read_timeout_s=3.0)

    assert code == adl.EXIT_OK and summary["downloaded"] == 1, summary
    assert_files(tmp_path, files)
    assert len(gets(proxy, "stuck.bin")) == 2
    [line] = retry_lines(caplog, "stuck.bin")
    assert "attempt 2 of 4" in line


@pytest.mark.parametrize(
    ("status", "reason"), [(404, "not found (deleted since listing)"), (403, "access denied")], ids=["404", "403"]
)
def test_client_errors_fail_once_without_retry(
    s3: S3Server,
    proxy: FaultProxy,
    tmp_path: Path,
    run_cli,
    caplog: pytest.LogCaptureFixture,
    status: int,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    files = seed(s3, {"gone.txt": 50 * KiB, "kept.txt": 50 * KiB})
    proxy.error(key="gone.txt", status=status)

    code, summary = run_json(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_FAILED, summary
    assert (summary["downloaded"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [{"bucket": BUCKET, "key": "gone.txt", "reason": reason}]
    assert len(gets(proxy, "gone.txt")) == 1
    assert retry_lines(caplog, "gone.txt") == []
    assert (tmp_path / "data" / BUCKET / "kept.txt").read_bytes() == files["kept.txt"]
    assert not (tmp_path / "data" / BUCKET / "gone.txt").exists()


def test_key_deleted_after_listing_fails_as_not_found(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> None:
    files = seed(s3, {"deleted.txt": 20 * KiB, "kept.txt": 20 * KiB})
    proxy.on_request(lambda _request: s3.client.delete_object(Bucket=BUCKET, Key="deleted.txt"), key="deleted.txt")

    code, summary = run_json(run_cli, proxy, tmp_path)

    assert code == adl.EXIT_FAILED, summary
    assert summary["failures_by_reason"] == {"not found (deleted since listing)": 1}
    assert [r.status for r in gets(proxy, "deleted.txt")] == [404]
    assert (tmp_path / "data" / BUCKET / "kept.txt").read_bytes() == files["kept.txt"]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("reset", "network error"), ("error", "S3 error SlowDown"), ("truncate", "network error")],
)
def test_persistent_faults_fail_that_object_and_the_run_completes(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, fault: str, reason: str
) -> None:
    files = seed(s3, {"bad.bin": 1 * MiB, "good1.bin": 100 * KiB, "good2.bin": 100 * KiB})
    if fault == "error":
        proxy.error(key="bad.bin", status=503)
    elif fault == "reset":
        proxy.reset(key="bad.bin", after=0)
    else:
        proxy.truncate(key="bad.bin", after=0)

    code, summary = run_json(run_cli, proxy, tmp_path, retry_attempts=2)

    assert code == adl.EXIT_FAILED, summary
    assert (summary["total_files"], summary["downloaded"], summary["failed"]) == (3, 2, 1)
    [failure] = summary["failures"]
    assert failure["key"] == "bad.bin" and failure["reason"].startswith(reason)
    assert len(gets(proxy, "bad.bin")) == 3  # the first attempt and two retries
    for key in ("good1.bin", "good2.bin"):
        assert (tmp_path / "data" / BUCKET / key).read_bytes() == files[key]
    assert not (tmp_path / "data" / BUCKET / "bad.bin").exists()
    assert list((tmp_path / "data").rglob(".adl-*")) == []


def test_a_listing_that_keeps_failing_is_one_clear_error(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    """The listing retries resets itself; when they persist the run ends with one line, not a traceback."""
    seed(s3, {"a.bin": 100})
    proxy.reset(method="GET", where=lambda request: "list-type=2" in request.query)

    code, out, err = run_cli(
        "--buckets",
        BUCKET,
        "--download-dir",
        str(tmp_path / "data"),
        "--endpoint-url",
        proxy.url,
        "--config",
        write_config(tmp_path, FAST),
    )

    assert code == adl.EXIT_FAILED, (out, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"listing bucket '{BUCKET}' failed after 3 retries" in errors[0]
    assert proxy.count("GET", key=BUCKET) == 4  # the first try and three retries
