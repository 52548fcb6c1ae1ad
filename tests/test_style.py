"""The code stays `ruff check` and `ruff format` clean; CI runs this with the rest of the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    command = [shutil.which("ruff") or sys.executable, *([] if shutil.which("ruff") else ["-m", "ruff"]), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean() -> None:
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
