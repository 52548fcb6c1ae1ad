"""The Python API as a notebook or training script uses it, packaging, and the README's Python examples."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, S3Server

import aws_data_downloader as adl

FILES = {"coryell/img/000.png": b"\x89PNG" + b"0" * 4000, "coryell/img/001.png": b"\x89PNG" + b"1" * 6000}
FILES["coryell/ann/labels.json"] = b'{"images": 2}'


def seed(server: S3Server, bucket: str) -> dict[str, bytes]:
    server.make_bucket(bucket)
    for key, body in FILES.items():
        server.put(bucket, key, body)
    return FILES


def test_run_full_download_returns_a_summary(s3: S3Server, tmp_path: Path) -> None:
    seed(s3, "api")
    s3.put("api", "coryell//bad.png", b"unsafe")
    downloader = adl.AWSDataDownloader(
        {"buckets": ["api"], "download_dir": "data", "endpoint_url": s3.endpoint, "manifest": "m.jsonl"}
    )
    summary = downloader.run_full_download()
    assert isinstance(summary, adl.DownloadSummary)
    assert (summary.total_files, summary.downloaded, summary.skipped, summary.failed) == (4, 3, 0, 1)
    assert summary.total_bytes == sum(map(len, FILES.values())) + len(b"unsafe")
    assert summary.downloaded_bytes == sum(map(len, FILES.values()))
    assert not summary.ok and summary.buckets == ("api",)
    [failure] = summary.failures
    assert (failure.bucket, failure.key) == ("api", "coryell//bad.png") and failure.reason.startswith("unsafe key")
    assert list(summary.failures_by_reason()) == [failure.reason]
    assert summary.download_dir == str(tmp_path / "data")
    assert summary.resume_file == str(tmp_path / "data" / "download_resume.json")
    assert Path(summary.resume_file).is_file()
    assert summary.manifest == "m.jsonl" and len((tmp_path / "m.jsonl").read_text().splitlines()) == 4
    for key, body in FILES.items():
        assert (Path(summary.download_dir) / "api" / key).read_bytes() == body

    as_dict = json.loads(json.dumps(summary.to_dict()))  # plain JSON types only
    assert as_dict["downloaded"] == 3 and as_dict["failed"] == 1
    assert as_dict["failures"] == [{"bucket": "api", "key": "coryell//bad.png", "reason": failure.reason}]
    assert as_dict["failures_by_reason"] == {failure.reason: 1}
    assert as_dict["download_dir"] == summary.download_dir and as_dict["resume_file"] == summary.resume_file
    assert as_dict["manifest"] == "m.jsonl"

    again = downloader.run_full_download()  # the same object runs again: everything good is skipped
    assert (again.downloaded, again.skipped, again.failed) == (0, 3, 1)
    assert again.skipped_reasons == {"already downloaded": 3}


@pytest.mark.parametrize("form", ["yaml", "yml-path-object", "json", "dict", "config", "overrides"])
def test_config_as_path_dict_or_config(s3: S3Server, tmp_path: Path, form: str) -> None:
    seed(s3, "forms")
    values = {"buckets": ["forms"], "download_dir": "out", "endpoint_url": s3.endpoint, "file_extensions": [".png"]}
    if form == "yaml":
        (tmp_path / "c.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()))
        config: object = "c.yaml"
    elif form == "yml-path-object":
        (tmp_path / "c.yml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()))
        config = tmp_path / "c.yml"
    elif form == "json":
        (tmp_path / "c.json").write_text(json.dumps(values))
        config = "c.json"
    elif form == "dict":
        config = values
    else:
        config = adl.build_config(values)
    downloader = (
        adl.AWSDataDownloader(
            {"buckets": ["forms"]}, download_dir="out", endpoint_url=s3.endpoint, file_extensions=[".png"]
        )
        if form == "overrides"
        else adl.AWSDataDownloader(config)
    )
    assert downloader.config.buckets == ("forms",) and downloader.config.file_extensions == (".png",)
    summary = downloader.run_full_download()
    assert summary.ok and summary.downloaded == 2
    assert summary.download_dir == str(tmp_path / "out")
    assert not (tmp_path / "out" / "forms" / "coryell" / "ann").exists()


def test_bad_configs_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(adl.ConfigError, match="unknown config key 'bucket'"):
        adl.AWSDataDownloader({"bucket": ["x"]})
    with pytest.raises(adl.ConfigError, match="config file not found"):
        adl.AWSDataDownloader("nope.yaml")
    with pytest.raises(adl.ConfigError, match="parallel_downloads"):
        adl.AWSDataDownloader({}, parallel_downloads=0)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(adl.ConfigError) as raised:
        adl.AWSDataDownloader("list.json")
    assert raised.value.exit_code == adl.EXIT_USAGE


def test_run_errors_are_exceptions_not_exits(s3: S3Server) -> None:
    downloader = adl.AWSDataDownloader({"buckets": ["does-not-exist"], "endpoint_url": s3.endpoint})
    with pytest.raises(adl.NothingAccessibleError, match="bucket 'does-not-exist' does not exist") as raised:
        downloader.run_full_download()
    assert raised.value.exit_code == adl.EXIT_NOTHING_LISTED


def _adl_threads() -> set[threading.Thread]:
    # moto's server answers each connection on a thread of its own; those are the server's, not ours.
    return {t for t in threading.enumerate() if "process_request_thread" not in t.name}


def test_many_downloaders_in_one_process_log_once_and_leave_no_threads(s3: S3Server, tmp_path: Path) -> None:
    seed(s3, "notebook")
    logger = logging.getLogger("aws_data_downloader")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root_handlers, logger_handlers, old_level = list(logging.getLogger().handlers), list(logger.handlers), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    threads_before = _adl_threads()
    try:
        summaries = []
        for n in range(3):
            downloader = adl.AWSDataDownloader(
                {"buckets": ["notebook"], "download_dir": f"run{n}", "endpoint_url": s3.endpoint}
            )
            summaries.append(downloader.run_full_download())
        summaries.append(downloader.run_full_download())  # and one object run twice
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [s.downloaded for s in summaries] == [3, 3, 3, 0]
    messages = [r.getMessage() for r in records]
    assert messages.count("Discovered 1 accessible bucket") == 4, messages  # once per run, not once per downloader
    assert messages.count("AWS credentials validated successfully") == 4, messages
    assert logging.getLogger().handlers == root_handlers  # the API adds no handlers, so nothing prints twice
    assert logger.handlers == logger_handlers
    deadline = time.monotonic() + 60  # a hang guard: the threads normally end within milliseconds
    while (_adl_threads() - threads_before) and time.monotonic() < deadline:
        time.sleep(0.05)  # a pool's threads may take a moment to return after shutdown(wait=True)
    assert _adl_threads() - threads_before == set()


def test_python_m_version(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "aws_data_downloader", "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.strip().endswith(adl.__version__)


def test_console_script_entry_point(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the tool itself supports 3.10
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"aws-data-downloader": "aws_data_downloader:console_main"}
    assert project["name"] == "aws-data-downloader"
    monkeypatch.setattr(sys, "argv", ["aws-data-downloader", "--version"])
    with pytest.raises(SystemExit) as raised:
        adl.console_main()
    output = capsys.readouterr()
    assert raised.value.code == 0, (output.out, output.err)
    assert adl.__version__ in output.out


def test_setuptools_metadata_declares_the_console_script(tmp_path: Path) -> None:
    """What `pip install .` would install, from setuptools' own reading of pyproject.toml (in a copy of the
    project, so no build/ or egg-info lands in the repository)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "aws_data_downloader.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    if not (source / "README.md").exists():
        (source / "README.md").write_text("# aws-data-downloader\n")
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "egg_info"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    [info] = source.glob("*.egg-info")
    entry_points = (info / "entry_points.txt").read_text()
    assert "[console_scripts]" in entry_points
    assert "aws-data-downloader = aws_data_downloader:console_main" in entry_points
    assert f"Version: {adl.__version__}" in (info / "PKG-INFO").read_text()
    assert (info / "top_level.txt").read_text().split() == ["aws_data_downloader"]


# -- the README's Python examples, run as written --------------------------------------------------------------

README_HEADINGS = re.compile(r"python|programmatic|integration", re.IGNORECASE)
README_BUCKET = "my-road-data-bucket"


def readme_python_blocks() -> list[tuple[str, str]]:
    """(heading, code) of every ```python block whose nearest heading names Python, Programmatic or Integration."""
    readme = REPO / "README.md"
    if not readme.exists():
        return []
    blocks, heading = [], ""
    fence_or_heading = re.compile(r"^(#{1,6} [^\n]*)$|^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
    for match in fence_or_heading.finditer(readme.read_text()):
        if match.group(1):
            heading = match.group(1)
        elif match.group(2) == "python" and README_HEADINGS.search(heading):
            blocks.append((heading, match.group(3)))
    return blocks


def test_readme_python_examples_run_as_written(s3: S3Server, tmp_path: Path) -> None:
    """The README's examples assume: credentials and the endpoint in the environment (here: moto via
    AWS_ENDPOINT_URL), a bucket 'my-road-data-bucket' holding PNGs under 'coryell/', and, where a block names
    it, ./aws_downloader_config.yaml selecting that bucket."""
    blocks = readme_python_blocks()
    assert blocks, (
        "README.md has no ```python block under a heading containing 'Python', 'Programmatic' or 'Integration'"
    )
    buckets = {README_BUCKET}
    for _, code in blocks:
        for listed in re.findall(r"[\"']?buckets[\"']?\s*[:=]\s*\[([^\]]*)\]", code):
            buckets.update(re.findall(r"[\"']([a-z0-9][a-z0-9.-]{2,62})[\"']", listed))
    for bucket in sorted(buckets):
        seed(s3, bucket)
    for number, (heading, code) in enumerate(blocks):
        workdir = tmp_path / f"block{number}"
        workdir.mkdir()
        (workdir / "aws_downloader_config.yaml").write_text(f"buckets: [{README_BUCKET}]\nprefixes: [coryell/]\n")
        (workdir / "example.py").write_text(code)
        result = subprocess.run(
            [sys.executable, "example.py"],
            cwd=workdir,
            env={**s3.env(), "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (
            f"README block under {heading!r} failed:\n{code}\n{result.stdout}\n{result.stderr}"
        )
        downloaded = {str(p.relative_to(workdir)) for p in workdir.rglob("*.png")}
        assert downloaded, f"README block under {heading!r} downloaded no images"
