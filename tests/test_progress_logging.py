"""Logging and progress: handlers only while main() runs, a log file, quiet/verbose, bar on a TTY, lines elsewhere."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, S3Server, run_on_terminal

import aws_data_downloader as adl


def seed(server: S3Server, bucket: str, count: int, size: int = 2000) -> None:
    server.make_bucket(bucket)
    for index in range(count):
        server.put(bucket, f"img/{index:03d}.png", bytes([index % 256]) * size)


def handlers_everywhere() -> list[tuple[str, logging.Handler]]:
    found = [("root", handler) for handler in logging.getLogger().handlers]
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            found += [(name, handler) for handler in logger.handlers]
    return found


def test_importing_the_module_adds_no_handler_anywhere() -> None:
    script = (
        "import logging, aws_data_downloader\n"
        "found = [n for n, l in [('root', logging.getLogger())] + list(logging.Logger.manager.loggerDict.items())"
        " if isinstance(l, logging.Logger) and l.handlers]\n"
        "print(found, logging.getLogger().level)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == f"[] {logging.WARNING}"


def test_main_adds_console_and_file_handlers_and_removes_them(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "log-bkt", 2)
    before = handlers_everywhere()
    root_level = logging.getLogger().level
    code, out, err = run_cli("--buckets", "log-bkt", "--download-dir", "data", *s3.args())
    assert code == 0, (out, err)
    assert handlers_everywhere() == before
    assert logging.getLogger().level == root_level

    assert "- INFO - Discovered 1 accessible bucket" in err
    assert " - DEBUG - " not in err
    log_text = (tmp_path / "aws_downloader.log").read_text()
    assert "INFO - aws_data_downloader - Discovered 1 accessible bucket" in log_text
    assert "INFO - aws_data_downloader - AWS credentials validated successfully" in log_text


def test_two_runs_in_one_process_log_each_line_once(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "twice-bkt", 1)
    for _ in range(2):
        code, out, err = run_cli("--buckets", "twice-bkt", "--download-dir", "data", *s3.args())
        assert code == 0, (out, err)
        assert err.count("Discovered 1 accessible bucket") == 1
    assert (tmp_path / "aws_downloader.log").read_text().count("Discovered 1 accessible bucket") == 2


def test_verbose_logs_debug_to_console_and_file(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "verbose-bkt", 1)
    code, out, err = run_cli("--buckets", "verbose-bkt", "--download-dir", "data", "--verbose", *s3.args())
    assert code == 0, (out, err)
    assert " - DEBUG - " in err
    assert " - DEBUG - " in (tmp_path / "aws_downloader.log").read_text()


def test_log_file_flag_and_no_log_file(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "logfile-bkt", 1)
    code, out, err = run_cli("--buckets", "logfile-bkt", "--download-dir", "data", "--log-file", "run.log", *s3.args())
    assert code == 0, (out, err)
    assert "Discovered 1 accessible bucket" in (tmp_path / "run.log").read_text()
    assert not (tmp_path / "aws_downloader.log").exists()

    (tmp_path / "aws_downloader_config.yaml").write_text("log_file: ''\n")
    code, out, err = run_cli("--buckets", "logfile-bkt", "--download-dir", "data2", *s3.args())
    assert code == 0, (out, err)
    assert not (tmp_path / "aws_downloader.log").exists()

    code, out, err = run_cli("--log-file", str(tmp_path / "no-dir" / "x.log"), "--buckets", "logfile-bkt", *s3.args())
    assert code == adl.EXIT_USAGE and out == "", (out, err)
    assert err.startswith("Error: cannot open log file ") and "Traceback" not in err


def test_non_tty_has_no_bar_and_logs_progress_lines(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    seed(s3, "progress-bkt", 10)
    original = adl.Transfer.download

    def slow_download(self, obj, target):  # a run long enough for several progress intervals on any machine
        time.sleep(0.05)
        return original(self, obj, target)

    monkeypatch.setattr(adl.Transfer, "download", slow_download)
    # small_object_kb: 0 keeps every object in the (slowed) worker threads.
    (tmp_path / "slow-progress.yaml").write_text("progress_interval_s: 0.1\nsmall_object_kb: 0\n")
    code, out, err = run_cli(
        "--config", "slow-progress.yaml", "--buckets", "progress-bkt", "--download-dir", "data", "--parallel", "1",
        *s3.args(),
    )  # fmt: skip
    assert code == 0, (out, err)
    assert "\r" not in err and "Downloading" not in err
    progress = [line for line in err.splitlines() if " - INFO - Progress: " in line]
    assert progress, err
    assert " of 10 files done (" in progress[-1] and " MB/s" in progress[-1]
    assert "Downloaded:       10" in out
    assert (tmp_path / "data" / "progress-bkt" / "img" / "009.png").read_bytes() == bytes([9]) * 2000


def test_default_interval_prints_no_progress_line_in_a_short_run(s3: S3Server, run_cli) -> None:
    seed(s3, "quick-bkt", 3)
    code, out, err = run_cli("--buckets", "quick-bkt", "--download-dir", "data", *s3.args())
    assert code == 0, (out, err)
    assert "Progress:" not in err


def test_quiet_prints_only_errors_and_the_summary(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "quiet-bkt", 3)
    code, out, err = run_cli("--buckets", "quiet-bkt", "--download-dir", "data", "--quiet", *s3.args())
    assert code == 0, (out, err)
    assert err == ""
    assert out.startswith("=" * 60 + "\nDOWNLOAD SUMMARY\n") and "Downloaded:       3" in out
    assert "Discovered 1 accessible bucket" in (tmp_path / "aws_downloader.log").read_text()

    code, out, err = run_cli("--buckets", "missing-bkt", "--download-dir", "data", "--quiet", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert err == "Error: bucket 'missing-bkt' does not exist\n"
    assert out == ""


def test_an_error_is_shown_once_on_the_console_and_kept_in_the_log(s3: S3Server, tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("--buckets", "absent-bkt", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert err.count("bucket 'absent-bkt' does not exist") == 1, err  # the one "Error:" line, no warning before it
    assert err.splitlines()[-1] == "Error: bucket 'absent-bkt' does not exist"
    assert (
        "ERROR - aws_data_downloader - bucket 'absent-bkt' does not exist"
        in (tmp_path / "aws_downloader.log").read_text()
    )


def test_json_keeps_info_lines_off_the_console(s3: S3Server, run_cli) -> None:
    seed(s3, "json-log-bkt", 2)
    code, out, err = run_cli("--buckets", "json-log-bkt", "--download-dir", "data", "--json", *s3.args())
    assert code == 0, (out, err)
    assert err == ""
    assert json.loads(out)["downloaded"] == 2


def test_a_terminal_gets_a_progress_bar(s3: S3Server, tmp_path: Path) -> None:
    seed(s3, "tty-bkt", 5)
    text, out, code = run_on_terminal(["--buckets", "tty-bkt", "--download-dir", "data"], tmp_path, s3.env())
    assert code == 0, (out, text)
    assert "Downloading" in text
    assert "\r" in text.replace("\r\n", "")  # the bar redraws its line (the tty turns "\n" into "\r\n")
    final_frame = text.replace("\r\n", "\n").split("\r")[-1]
    assert "5/5" in final_frame and "Success=5, Failed=0" in final_frame
    assert "Discovered 1 accessible bucket" in text
    assert "Downloaded:       5" in out
    assert (tmp_path / "data" / "tty-bkt" / "img" / "004.png").read_bytes() == bytes([4]) * 2000
