"""What a new user reads after a run (issue 12): the log's header and outcome lines, an interrupted run's
unfinished objects and the bytes it kept, a dry run's summary and JSON, one size convention (1024-based),
where the files went, and log words that say what the code does.

Every test runs the CLI as a user does (in-process ``run_cli``, or a subprocess that gets a real SIGINT)
against moto, and asserts the lines, JSON keys, log file and exit code the user sees.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, MiB, S3Server, write_config
from faultproxy import FaultProxy, KiB

import aws_data_downloader as adl


def log_lines(path: Path) -> list[str]:
    """The messages of a log file, without the timestamp, level and logger name."""
    return [line.split(" - ", 3)[-1] for line in path.read_text().splitlines()]


# -- 6: the log file records who ran what, and how it ended ----------------------------------------------------


def test_the_log_starts_with_the_masked_command_line_and_ends_with_the_outcome(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    s3.make_bucket("hdr-bkt")
    s3.put("hdr-bkt", "a.txt", b"alpha")
    s3.put("hdr-bkt", "bad//b.txt", b"beta")  # an unsafe key: one failure, exit 1
    config = write_config(tmp_path, {"parallel_downloads": 2})
    access_key = "AKIAHEADERTEST000001"
    argv = [
        "--buckets", "hdr-bkt", "--download-dir", "data", "--endpoint-url", s3.endpoint, "--config", config,
        "--log-file", "run.log", "--access-key", access_key,
        "--secret", "Zq9",  # abbreviated flag, and too short for the redactor: masked by its flag
        "--session-token=tok-header-123456",
    ]  # fmt: skip

    code, out, err = run_cli(*argv)

    assert code == adl.EXIT_FAILED, (out, err)
    lines = log_lines(tmp_path / "run.log")
    prog = adl.build_parser().prog
    command = " ".join([prog, *argv[:11], adl.mask_access_key(access_key), "--secret", "****", "--session-token=****"])
    assert lines[0] == (
        f"aws-data-downloader {adl.__version__} starting: {command}; config file: {config}; "
        f"download dir: {tmp_path / 'data'}"
    )
    assert re.fullmatch(
        r"Run finished: exit code 1; 2 objects: 1 downloaded, 0 skipped, 1 failed; 5 B downloaded; \d+\.\d s",
        lines[-1],
    ), lines[-1]
    log_text = (tmp_path / "run.log").read_text()
    assert "Zq9" not in log_text and "tok-header-123456" not in log_text and access_key not in log_text
    # The console shows both lines too, at INFO.
    assert f" - INFO - aws-data-downloader {adl.__version__} starting: {prog} --buckets hdr-bkt" in err
    assert " - INFO - Run finished: exit code 1; 2 objects:" in err.splitlines()[-1]
    assert "Zq9" not in err and "DOWNLOAD SUMMARY" in out


def test_quiet_keeps_both_lines_out_of_the_console_but_in_the_log(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("quiet-bkt")
    s3.put("quiet-bkt", "a.txt", b"alpha")

    code, out, err = run_cli(
        "--buckets", "quiet-bkt", "--download-dir", "data", "--endpoint-url", s3.endpoint, "--quiet"
    )  # fmt: skip

    assert code == adl.EXIT_OK, (out, err)
    assert err == "" and out.startswith("=" * 60 + "\nDOWNLOAD SUMMARY\n")
    lines = log_lines(tmp_path / "aws_downloader.log")
    assert lines[0].startswith(f"aws-data-downloader {adl.__version__} starting: ")
    assert lines[0].endswith(f"; config file: none; download dir: {tmp_path / 'data'}")
    assert re.fullmatch(
        r"Run finished: exit code 0; 1 object: 1 downloaded, 0 skipped, 0 failed; 5 B downloaded; \d+\.\d s",
        lines[-1],
    )


def test_a_run_that_ends_in_an_error_still_ends_its_log_with_the_exit_code(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    code, out, err = run_cli("--buckets", "absent-bkt", "--download-dir", "data", *s3.args())

    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert err.splitlines()[-1] == "Error: bucket 'absent-bkt' does not exist"  # still the console's last line
    lines = log_lines(tmp_path / "aws_downloader.log")
    assert lines[0].startswith(f"aws-data-downloader {adl.__version__} starting: ")
    assert re.fullmatch(r"Run finished: exit code 6, before any object was listed, after \d+\.\d s", lines[-1])


# -- 8: an interrupted run says what it did not finish, and the bytes it kept ------------------------------------

BIG = "big/road video.bin"
BIG_SIZE = 8 * MiB + 123


def interrupted_run(s3: S3Server, tmp_path: Path, *extra: str, multipart: bool = False) -> tuple[int, str, str, bytes]:
    """The CLI in a subprocess on one large object served slowly; SIGINT once 1 MiB of it has arrived."""
    body = bytes(range(256)) * (BIG_SIZE // 256) + b"x" * (BIG_SIZE % 256)
    s3.make_bucket("stop-bkt")
    if multipart:  # fetched in ranged parts on its own part boundaries, in parallel
        s3.put_multipart("stop-bkt", BIG, body, part_size=5 * MiB)
    else:  # one stream with journaled checkpoints
        s3.put("stop-bkt", BIG, body)
    config = write_config(tmp_path, {"multipart_threshold_mb": 1, "multipart_chunksize_mb": 1})
    with FaultProxy(s3.endpoint) as proxy:
        proxy.slow(key=BIG, chunk=64 * KiB, interval_s=0.05)
        argv = ["--buckets", "stop-bkt", "--download-dir", "data", "--endpoint-url", proxy.url, "--config", config]
        process = subprocess.Popen(
            [sys.executable, str(REPO / "aws_data_downloader.py"), *argv, "--log-file", "run.log", *extra],
            cwd=tmp_path,
            env=s3.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while proxy.bytes_sent("GET", BIG) < MiB:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the download never started"
                time.sleep(0.02)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, out, err, body


def refetched_bytes(s3: S3Server, tmp_path: Path, run_cli, body: bytes) -> int:
    """Run again to the end (no slowing); the body bytes the re-run fetched."""
    with FaultProxy(s3.endpoint) as proxy:
        code, out, err = run_cli("--buckets", "stop-bkt", "--download-dir", "data", "--endpoint-url", proxy.url,
                                 "--config", str(tmp_path / "config.json"), "--json")  # fmt: skip
        assert code == adl.EXIT_OK, (out, err)
        assert json.loads(out)["downloaded"] == 1
        fetched = proxy.bytes_sent("GET", BIG)
    assert (tmp_path / "data" / "stop-bkt" / BIG).read_bytes() == body
    return fetched


def test_an_interrupted_run_shows_the_unfinished_object_and_the_bytes_kept(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    code, out, err, body = interrupted_run(s3, tmp_path)

    assert code == adl.EXIT_INTERRUPTED, (out, err)
    assert "Stopping: no new files are started; in-flight ones stop at their next chunk" in err
    lines = out.splitlines()
    assert lines[3:9] == [
        "Total files:      1",
        "Downloaded:       0",
        "Skipped:          0",
        "Failed:           0",
        "Interrupted:      1",
        "Total size:       8.0 MB",
    ]
    assert lines[9] == "Downloaded size:  0 B"
    kept = re.fullmatch(r"Resumable:        (\d+\.\d [KM]B) of 1 unfinished file, kept on disk", lines[10])
    assert kept, lines[10]
    outcome = log_lines(tmp_path / "run.log")[-1]
    assert outcome.startswith(
        "Run finished: exit code 130; 1 object: 0 downloaded, 0 skipped, 0 failed, 1 interrupted; "
        f"0 B downloaded, {kept.group(1)} kept for resume; "
    ), outcome

    # What the summary called kept is what the re-run did not fetch again.
    assert adl.format_size(BIG_SIZE - refetched_bytes(s3, tmp_path, run_cli, body)) == kept.group(1)


@pytest.mark.parametrize("multipart", [False, True], ids=["stream", "parts"])
def test_an_interrupted_runs_json_counts_the_object_and_its_kept_bytes(
    s3: S3Server, tmp_path: Path, run_cli, multipart: bool
) -> None:
    code, out, err, body = interrupted_run(s3, tmp_path, "--json", multipart=multipart)

    assert code == adl.EXIT_INTERRUPTED, (out, err)
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert (summary["total_files"], summary["downloaded"], summary["interrupted_files"]) == (1, 0, 1)
    assert summary["downloaded_bytes"] == 0
    assert summary["partial_files"] == 1 and 0 < summary["partial_bytes"] < BIG_SIZE
    assert refetched_bytes(s3, tmp_path, run_cli, body) == BIG_SIZE - summary["partial_bytes"]


# -- 9: a dry run says what it would do ----------------------------------------------------------------------------


def seed_for_dry_run(s3: S3Server, run_cli) -> None:
    """Two images already downloaded, and one 1.5 MiB video new since."""
    s3.make_bucket("dry-bkt")
    s3.put("dry-bkt", "img/a.png", b"a" * 3000)
    s3.put("dry-bkt", "img/b.png", b"b" * 2000)
    code, out, err = run_cli("--buckets", "dry-bkt", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_OK, (out, err)
    s3.put("dry-bkt", "video/drive.mp4", b"v" * (3 * MiB // 2))


def test_a_dry_run_summary_says_would_download_and_would_skip_without_speed_or_rate(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    seed_for_dry_run(s3, run_cli)

    code, out, err = run_cli("--buckets", "dry-bkt", "--download-dir", "data", "--dry-run", *s3.args())

    assert code == adl.EXIT_OK, (out, err)
    lines = out.splitlines()
    assert lines[:8] == [
        "=" * 60,
        "DRY RUN SUMMARY (nothing was written)",
        "=" * 60,
        "Total files:      3",
        "Would download:   1 (1.5 MB)",
        "Would skip:       2",
        "Would fail:       0",
        "Total size:       1.5 MB",
    ]
    assert re.fullmatch(r"Duration:         \d+\.\d seconds", lines[8])
    assert lines[9:] == [
        f"Download dir:     {tmp_path / 'data'}",
        "Would skip, by reason:",
        "  exists locally (same size, not older): 2",  # a dry run does not read the resume journal
    ]
    assert "Would download dry-bkt/video/drive.mp4 (1.5 MB)" in err


def test_a_dry_runs_json_says_would_download_and_keeps_the_other_keys(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed_for_dry_run(s3, run_cli)
    argv = ("--buckets", "dry-bkt", "--download-dir", "data", "--json", *s3.args())

    code, out, err = run_cli(*argv, "--dry-run")

    assert code == adl.EXIT_OK, (out, err)
    dry = json.loads(out)
    assert "downloaded" not in dry
    assert (dry["would_download"], dry["would_download_bytes"], dry["skipped"]) == (1, 3 * MiB // 2, 2)
    assert (dry["downloaded_bytes"], dry["average_speed_mb_s"], dry["success_rate"]) == (0, 0.0, None)
    assert dry["dry_run"] is True
    code, out, err = run_cli(*argv)
    assert code == adl.EXIT_OK, (out, err)
    real = json.loads(out)
    renamed = {"would_download": "downloaded", "would_delete": "deleted"}  # would_download_bytes is the dry run's own
    assert {renamed.get(key, key) for key in dry} - {"would_download_bytes"} == set(real)
    assert real["downloaded"] == 1 and "would_download" not in real


# -- 10: sizes are 1024-based everywhere ---------------------------------------------------------------------------


def test_a_1_5_mib_object_is_shown_as_1_5_mb_everywhere(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("size-bkt")
    s3.put("size-bkt", "video.mp4", b"v" * (3 * MiB // 2))

    code, out, err = run_cli("--buckets", "size-bkt", "--download-dir", "data", *s3.args())

    assert code == adl.EXIT_OK, (out, err)
    assert "Total size:       1.5 MB" in out.splitlines()
    assert "Downloaded size:  1.5 MB" in out.splitlines()
    assert "Found 1 object (1.5 MB); listing complete" in err


def test_max_file_size_mb_1_admits_exactly_1_mib(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("limit-bkt")
    for name, size in {"under.bin": MiB - 1, "exact.bin": MiB, "over.bin": MiB + 1}.items():
        s3.put("limit-bkt", name, b"z" * size)
    config = write_config(tmp_path, {"max_file_size_mb": 1, "min_file_size_mb": 1})

    code, out, err = run_cli(
        "--buckets", "limit-bkt", "--download-dir", "data", "--config", config, "--json", *s3.args()
    )  # fmt: skip

    assert code == adl.EXIT_OK, (out, err)
    summary = json.loads(out)
    assert (summary["downloaded"], summary["downloaded_bytes"]) == (1, 1_048_576)
    assert [p.name for p in (tmp_path / "data" / "limit-bkt").iterdir()] == ["exact.bin"]


def test_the_size_flags_help_says_mib(run_cli) -> None:
    code, out, err = run_cli("--help")
    assert code == 0, (out, err)
    help_text = " ".join(out.split())
    for flag in ("--min-size-mb", "--max-size-mb", "--multipart-threshold-mb"):
        assert f"{flag} MiB" in help_text
    assert "Skip objects smaller than this (MiB)" in help_text
    assert "Skip objects larger than this (MiB)" in help_text
    assert "Skip objects larger than this (MiB)" in help_text


# -- 11: the summary says where the files went ----------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [None, "dataset.jsonl"])
def test_the_summary_names_the_download_dir_and_the_manifest(
    s3: S3Server, tmp_path: Path, run_cli, manifest: str | None
) -> None:
    s3.make_bucket("where-bkt")
    s3.put("where-bkt", "a.txt", b"alpha")
    extra = ("--manifest", manifest) if manifest else ()

    code, out, err = run_cli("--buckets", "where-bkt", "--download-dir", "data", *extra, *s3.args())

    assert code == adl.EXIT_OK, (out, err)
    lines = out.splitlines()
    assert lines[12] == f"Download dir:     {tmp_path / 'data'}"
    if manifest:
        assert lines[13] == "Manifest:         dataset.jsonl"
        assert (tmp_path / manifest).is_file()
    else:
        assert not any(line.startswith("Manifest:") for line in lines)


# -- 20: words that match behaviour ---------------------------------------------------------------------------------


def test_found_counts_objects_and_leaves_skips_to_the_summary(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("words-bkt")
    s3.put("words-bkt", "a.txt", b"alpha")
    argv = ("--buckets", "words-bkt", "--download-dir", "data", *s3.args())
    code, out, err = run_cli(*argv)
    assert code == adl.EXIT_OK, (out, err)
    assert "Found 1 object (5 B); listing complete" in err

    s3.put("words-bkt", "b.txt", b"beta")
    assert run_cli(*argv)[0] == adl.EXIT_OK
    code, out, err = run_cli(*argv)  # both are on disk: found, and all skipped
    assert code == adl.EXIT_OK, (out, err)
    assert "Found 2 objects (9 B); listing complete" in err
    assert "to download" not in err
    assert "Skipped:          2" in out.splitlines() and "Downloaded:       0" in out.splitlines()
