"""Unattended runs (cron, pipes): the directory lock, SIGINT/SIGTERM, kill -9, and output without a terminal.

The CLI runs as a real subprocess against moto through the fault proxy, which slows or stalls chosen bodies
so a run is still going when the test locks, signals or kills it; no assertion depends on wall-clock time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, MiB, S3Server
from faultproxy import FaultProxy, KiB

import aws_data_downloader as adl

BUCKET = "cron-data"
TEMP_NAME = re.compile(r"^\.adl-[0-9a-f]{20}\.part$")


def seed(server: S3Server) -> dict[str, bytes]:
    """Small objects that finish at once (s/), a two-part multipart object and a tail of larger ones (t/)."""
    rng = random.Random(7)
    server.make_bucket(BUCKET)
    files = {f"s/{i:02d}.bin": rng.randbytes(64 * KiB) for i in range(6)}
    files.update({f"t/{i:02d}.bin": rng.randbytes(512 * KiB) for i in range(10)})
    for key, body in files.items():
        server.put(BUCKET, key, body)
    big = rng.randbytes(6 * MiB + 11)
    server.put_multipart(BUCKET, "big.bin", big, part_size=5 * MiB)
    files["big.bin"] = big
    return files


class Run:
    """A CLI subprocess whose stderr is read as it arrives (so a test can wait for a line)."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *argv: str) -> None:
        self.stderr_lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "aws_data_downloader.py"), *argv],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._stdout: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr_lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stdout, self._stdout), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        """The exit code, stdout and stderr; a run still going after ``timeout`` (a hang guard) is killed and
        fails the test with what it printed."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            for reader in self._readers:
                reader.join(30)
            pytest.fail(
                f"the run did not end within {timeout:g}s:\n{''.join(self._stdout)}\n{''.join(self.stderr_lines)}"
            )
        for reader in self._readers:
            reader.join(30)
        return code, "".join(self._stdout), "".join(self.stderr_lines)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                code, out, err = self.wait()
                pytest.fail(f"the run ended ({code}) before {what}:\n{out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{''.join(self.stderr_lines)}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def cli_args(download_dir: Path, endpoint: str, *extra: str) -> list[str]:
    return ["--buckets", BUCKET, "--download-dir", str(download_dir), "--endpoint-url", endpoint, *extra]


def assert_consistent(download_dir: Path, files: dict[str, bytes]) -> set[str]:
    """Every file at a final path holds its object's bytes; the rest are hidden temp files. Returns keys done."""
    done = set()
    for path in (download_dir / BUCKET).rglob("*"):
        if path.is_dir():
            continue
        if TEMP_NAME.match(path.name):
            continue
        key = path.relative_to(download_dir / BUCKET).as_posix()
        assert key in files, f"unexpected file {path}"
        assert path.read_bytes() == files[key], f"{key} is on disk with other bytes"
        done.add(key)
    extra = {p.name for p in download_dir.iterdir()} - {
        BUCKET,
        "download_resume.json",
        "download_resume.json.journal",
        "download_resume.json.progress",  # bytes on disk inside the parts a stopped run had in flight
        ".aws_downloader.lock",
    }
    assert not extra, extra
    return done


def assert_complete(download_dir: Path, files: dict[str, bytes]) -> None:
    assert assert_consistent(download_dir, files) == set(files)
    assert not list(download_dir.rglob(".adl-*")), "temp files left after a complete run"


@pytest.fixture
def dataset(s3: S3Server) -> dict[str, bytes]:
    return seed(s3)


@contextlib.contextmanager
def slowed_run(
    s3: S3Server, tmp_path: Path, download_dir: Path, *, stall: bool, extra: tuple[str, ...] = ()
) -> Iterator[tuple[FaultProxy, Run]]:
    """A CLI run mid-download: the s/ objects are done, big.bin and a t/ object are in flight (slowed or
    stalled), the other t/ objects not started."""
    with FaultProxy(s3.endpoint) as proxy:
        for key in ("/big.bin", "/t/"):
            if stall:
                proxy.stall(key=key, after=128 * KiB)
            else:
                proxy.slow(key=key, chunk=16 * KiB, interval_s=0.05, after=128 * KiB)
        run = Run(
            tmp_path, s3.env(), *cli_args(download_dir, proxy.url, "--parallel", "2", "--log-file", "run.log", *extra)
        )
        try:
            run.wait_for(
                lambda: (
                    all((download_dir / BUCKET / "s" / f"{i:02d}.bin").is_file() for i in range(6))
                    and any(r.bytes_sent for r in proxy.requests("GET", "/big.bin"))
                    and any(r.bytes_sent for r in proxy.requests("GET", "/t/"))
                ),
                "the run is mid-download",
            )
            yield proxy, run
        finally:
            run.kill()


# -- the lock -------------------------------------------------------------------------------------------------


def test_second_run_exits_4_naming_the_running_ones_pid(
    s3: S3Server, dataset: dict[str, bytes], tmp_path: Path, run_cli
) -> None:
    download_dir = tmp_path / "data"
    with slowed_run(s3, tmp_path, download_dir, stall=True) as (_proxy, run):
        before = assert_consistent(download_dir, dataset)
        code, out, err = run_cli(*cli_args(download_dir, s3.endpoint))
        assert code == adl.EXIT_LOCKED, (out, err)
        assert f"pid {run.pid}" in err and str(download_dir) in err
        assert out == ""
        # It exited at once: it wrote nothing, and the holder's pid is still in the lock file.
        assert assert_consistent(download_dir, dataset) == before
        assert (download_dir / ".aws_downloader.lock").read_text() == str(run.pid)
        run.kill()  # kill -9: the lock goes with the process

    code, out, err = run_cli(*cli_args(download_dir, s3.endpoint, "--json"))
    assert code == adl.EXIT_OK, (out, err)
    assert_complete(download_dir, dataset)
    assert json.loads(out)["failed"] == 0


def test_lock_held_in_process_blocks_a_subprocess_run(s3: S3Server, tmp_path: Path) -> None:
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "k", b"v")
    download_dir = tmp_path / "data"
    download_dir.mkdir()
    lock = adl.DirectoryLock(download_dir)
    lock.acquire()
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / "aws_data_downloader.py"), *cli_args(download_dir, s3.endpoint)],
            cwd=tmp_path,
            env=s3.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        lock.release()
    assert result.returncode == adl.EXIT_LOCKED, (result.stdout, result.stderr)
    assert f"(pid {os.getpid()})" in result.stderr
    assert result.stdout == ""
    assert not (download_dir / BUCKET).exists()


def test_lock_of_a_killed_holder_never_blocks_the_next_run(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "k", b"v")
    download_dir = tmp_path / "data"
    download_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); import aws_data_downloader as a; "
            "from pathlib import Path; lock = a.DirectoryLock(Path(sys.argv[2])); lock.acquire(); "
            "print('locked', flush=True); "
            "time.sleep(600)",
            str(REPO),
            str(download_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = run_cli(*cli_args(download_dir, s3.endpoint))
        assert code == adl.EXIT_LOCKED and f"pid {holder.pid}" in err, (out, err)
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdout.close()
    # The stale pid is still in the file, but the OS dropped the lock with the process.
    assert (download_dir / ".aws_downloader.lock").read_text() == str(holder.pid)
    code, out, err = run_cli(*cli_args(download_dir, s3.endpoint))
    assert code == adl.EXIT_OK, (out, err)
    assert (download_dir / BUCKET / "k").read_bytes() == b"v"


def test_kill_9_mid_download_leaves_a_state_the_next_run_completes(
    s3: S3Server, dataset: dict[str, bytes], tmp_path: Path, run_cli
) -> None:
    download_dir = tmp_path / "data"
    with slowed_run(s3, tmp_path, download_dir, stall=False) as (_proxy, run):
        run.kill()
        code, out, err = run.wait()
        assert code == -signal.SIGKILL, (out, err)
    assert_consistent(download_dir, dataset)
    code, out, err = run_cli(*cli_args(download_dir, s3.endpoint))
    assert code == adl.EXIT_OK, (out, err)
    assert_complete(download_dir, dataset)


# -- signals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_a_rerun_completes(
    s3: S3Server, dataset: dict[str, bytes], tmp_path: Path, run_cli, signum: int
) -> None:
    download_dir = tmp_path / "data"
    with slowed_run(s3, tmp_path, download_dir, stall=False) as (proxy, run):
        run.process.send_signal(signum)
        code, out, err = run.wait()
        requested = {r.path for r in proxy.requests("GET", "/t/")}
    assert code == adl.EXIT_INTERRUPTED, (out, err)
    assert "Stopping: no new files are started; in-flight ones stop at their next chunk" in err
    assert "Second interrupt" not in err
    # The summary so far, on stdout.
    assert "DOWNLOAD SUMMARY" in out and "Interrupted: run the same command again to continue." in out
    assert re.search(r"^Failed:\s+0$", out, re.M), "objects never started are not failures"
    downloaded = int(re.search(r"Downloaded:\s+(\d+)", out).group(1))
    assert 6 <= downloaded < len(dataset)
    # It stopped taking new objects: most of the slow tail was never requested.
    assert len(requested) < 10
    done = assert_consistent(download_dir, dataset)
    assert {f"s/{i:02d}.bin" for i in range(6)} <= done and "big.bin" not in done
    # The ranged parts of big.bin are kept for resume (hidden temp file), the journal says which.
    resume = json.loads((download_dir / "download_resume.json").read_text())
    assert set(resume["completed"][BUCKET]) == done
    log_text = (tmp_path / "run.log").read_text()
    assert "interrupted; completed files and resume state are saved" in log_text
    assert "Traceback" not in err and "Traceback" not in log_text

    code, out, err = run_cli(*cli_args(download_dir, s3.endpoint, "--json"))
    assert code == adl.EXIT_OK, (out, err)
    summary = json.loads(out)
    assert summary["skipped"] == len(done) and summary["downloaded"] == len(dataset) - len(done)
    assert_complete(download_dir, dataset)


def test_second_sigint_exits_at_once_without_corrupting(
    s3: S3Server, dataset: dict[str, bytes], tmp_path: Path, run_cli
) -> None:
    download_dir = tmp_path / "data"
    # Stalled bodies: after the first SIGINT the in-flight objects cannot finish, so only the second ends it.
    with slowed_run(s3, tmp_path, download_dir, stall=True) as (_proxy, run):
        run.process.send_signal(signal.SIGINT)
        run.wait_for(lambda: any("Stopping" in line for line in run.stderr_lines), "the first SIGINT is handled")
        assert run.process.poll() is None
        run.process.send_signal(signal.SIGINT)
        code, out, err = run.wait()
    assert code == adl.EXIT_INTERRUPTED, (out, err)
    assert "Second interrupt: exiting now" in err
    done = assert_consistent(download_dir, dataset)
    assert {f"s/{i:02d}.bin" for i in range(6)} <= done

    code, out, err = run_cli(*cli_args(download_dir, s3.endpoint))
    assert code == adl.EXIT_OK, (out, err)
    assert_complete(download_dir, dataset)


def test_one_sigint_ends_a_run_stalled_on_silent_connections(
    s3: S3Server, dataset: dict[str, bytes], tmp_path: Path, run_cli
) -> None:
    """A read blocked on a server that sends nothing would wait for read_timeout_s (an hour here, so no read
    times out during the test); the stop shuts the sockets down after AWSDataDownloader.STOP_GRACE_S instead,
    so one Ctrl-C ends the run."""
    download_dir = tmp_path / "data"
    (tmp_path / "patient.yaml").write_text("read_timeout_s: 3600\n")
    with slowed_run(s3, tmp_path, download_dir, stall=True, extra=("--config", "patient.yaml")) as (_proxy, run):
        run.process.send_signal(signal.SIGINT)
        code, out, err = run.wait()  # a hang guard far below the read timeout
    assert code == adl.EXIT_INTERRUPTED, (out, err)
    assert "DOWNLOAD SUMMARY" in out and "Failed:           0" in out
    assert_consistent(download_dir, dataset)

    code, out, err = run_cli(*cli_args(download_dir, s3.endpoint))
    assert code == adl.EXIT_OK, (out, err)
    assert_complete(download_dir, dataset)


# -- output without a terminal ----------------------------------------------------------------------------------


def piped_run(s3: S3Server, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "ok/a.bin", b"a" * 1000)
    s3.put(BUCKET, "ok/b.bin", b"b" * 1000)
    s3.put(BUCKET, "ok/c.bin", b"c" * 1000)
    s3.put(BUCKET, "bad\x01key", b"x")  # one failure, to see how it is reported
    (tmp_path / "cron.yaml").write_text("progress_interval_s: 0.1\nparallel_downloads: 1\n")
    with FaultProxy(s3.endpoint) as proxy:
        proxy.delay(key="/ok/", seconds=0.25)  # each object takes longer than the progress interval
        run = Run(tmp_path, s3.env(), *cli_args(tmp_path / "data", proxy.url, "--config", "cron.yaml", *extra))
        return run.wait()


def test_not_on_a_tty_progress_is_log_lines_without_carriage_returns(s3: S3Server, tmp_path: Path) -> None:
    code, out, err = piped_run(s3, tmp_path)
    assert code == adl.EXIT_FAILED, (out, err)
    for text in (out, err, (tmp_path / "aws_downloader.log").read_text()):
        assert "\r" not in text and "\x1b" not in text
    assert "files/s" not in err and "Downloading:" not in err and "it/s" not in err  # no tqdm bar
    progress = [line for line in err.splitlines() if "Progress:" in line]
    assert progress and all(" - INFO - Progress: " in line for line in progress)
    assert "Failed cron-data/bad\\x01key: unsafe key: control character in key" in err
    assert "DOWNLOAD SUMMARY" in out
    assert "Progress:" in (tmp_path / "aws_downloader.log").read_text()


def test_quiet_prints_only_errors_and_the_summary(s3: S3Server, tmp_path: Path) -> None:
    code, out, err = piped_run(s3, tmp_path, "--quiet")
    assert code == adl.EXIT_FAILED, (out, err)
    assert err == ""
    assert out.startswith("=" * 60 + "\nDOWNLOAD SUMMARY\n")
    assert "Failures by reason:" in out and "bad\\x01key" in out
    assert "\r" not in out and " - INFO - " not in out


def test_quiet_still_prints_a_run_stopping_error(s3: S3Server, tmp_path: Path) -> None:
    (tmp_path / "cron.yaml").write_text("quiet: true\n")
    run = Run(tmp_path, s3.env(), *cli_args(tmp_path / "data", s3.endpoint, "--config", "cron.yaml"))
    code, out, err = run.wait()
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)  # the bucket was never made: it does not exist
    assert out == ""
    assert "Error: " in err and BUCKET in err
    assert " - INFO - " not in err
