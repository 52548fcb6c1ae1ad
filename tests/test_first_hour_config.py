"""The first hour with the tool (issue 12): errors that name what the user typed, a usable --help, and a README
that says how to import the module, see its log and read the lock file. Each test runs the tool as a user would:
the CLI (main(argv), or the installed command in a subprocess) or the Python API."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, S3Server

import aws_data_downloader as adl

KNOWN_KEYS = ", ".join(sorted(adl.OPTIONS_BY_KEY))


def error_line(code: int, out: str, err: str) -> str:
    """The one stderr line of a usage error (exit 2, nothing on stdout, no traceback)."""
    assert code == adl.EXIT_USAGE, (out, err)
    assert "Traceback" not in err
    assert out == ""
    lines = [line for line in err.strip().splitlines() if " - INFO - " not in line]  # the run's header line
    assert len(lines) == 1, err
    return lines[0]


def config_error(*args: object, **kwargs: object) -> str:
    """The message of the ConfigError that AWSDataDownloader(*args, **kwargs) raises."""
    with pytest.raises(adl.ConfigError) as raised:
        adl.AWSDataDownloader(*args, **kwargs)  # type: ignore[arg-type]
    assert raised.value.exit_code == adl.EXIT_USAGE
    return str(raised.value)


# -- point 1: an endpoint botocore refuses is a usage error, not a traceback ----------------------------------


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5123", "localhost:5123"])
def test_endpoint_without_a_scheme_is_a_usage_error_suggesting_http(run_cli, endpoint: str) -> None:
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "d", "--endpoint-url", endpoint)
    assert error_line(code, out, err) == (
        f"Error: --endpoint-url must be a URL starting with http:// or https://, got '{endpoint}'; "
        f"did you mean 'http://{endpoint}'?"
    )


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("s3.example.com", "must be a URL starting with http:// or https://, got 's3.example.com'; "
         "did you mean 'https://s3.example.com'?"),
        ("ftp://127.0.0.1:5123", "must be a URL starting with http:// or https://, got 'ftp://127.0.0.1:5123'"),
        ("http://bad_host:5123", "must name a valid host, got 'http://bad_host:5123'"),
        ("http://127.0.0.1:port", "must have a port from 0 to 65535, got 'http://127.0.0.1:port'"),
        ("http://127.0.0.1:99999", "must have a port from 0 to 65535, got 'http://127.0.0.1:99999'"),
    ],
)  # fmt: skip
def test_any_endpoint_botocore_refuses_is_a_usage_error(run_cli, endpoint: str, message: str) -> None:
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "d", "--endpoint-url", endpoint)
    assert error_line(code, out, err) == f"Error: --endpoint-url {message}"


def test_endpoint_in_a_config_file_names_the_key_and_the_file(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.yaml").write_text("buckets: [road-data]\nendpoint_url: localhost:5123\n")
    code, out, err = run_cli("--config", "config.yaml")
    assert error_line(code, out, err) == (
        "Error: endpoint_url in config.yaml must be a URL starting with http:// or https://, "
        "got 'localhost:5123'; did you mean 'http://localhost:5123'?"
    )


def test_endpoint_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:5123")
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "d", "--log-file", "")
    assert error_line(code, out, err) == (
        "Error: AWS_ENDPOINT_URL must be a URL starting with http:// or https://, got 'localhost:5123'; "
        "did you mean 'http://localhost:5123'?"
    )


def test_python_api_raises_the_same_config_error_for_an_endpoint(tmp_path: Path) -> None:
    assert config_error({"endpoint_url": "127.0.0.1:5123"}) == (
        "config key 'endpoint_url' must be a URL starting with http:// or https://, got '127.0.0.1:5123'; "
        "did you mean 'http://127.0.0.1:5123'?"
    )
    downloader = adl.AWSDataDownloader({"download_dir": str(tmp_path / "d")})
    with pytest.raises(adl.ConfigError, match=r"^config key 'endpoint_url' must be a URL"):
        downloader.run_full_download(endpoint_url="localhost:5123")
    for good in ("http://127.0.0.1:5123", "https://s3.example.com", "http://[::1]:9000", "http://minio.lan"):
        assert adl.AWSDataDownloader({"endpoint_url": good}).config.endpoint_url == good


def test_a_good_endpoint_still_downloads(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("road-data")
    s3.put("road-data", "img/a.png", b"png")
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "d", "--endpoint-url", s3.endpoint)
    assert code == 0, (out, err)
    assert (tmp_path / "d" / "road-data" / "img" / "a.png").read_bytes() == b"png"


# -- point 12: a bad value is named as the user gave it --------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--parallel", "0"], "Error: --parallel must be an integer from 1 to 512, got 0"),
        (["--retry-attempts", "51"], "Error: --retry-attempts must be an integer from 0 to 50, got 51"),
        (["--min-size-mb", "-2"], "Error: --min-size-mb must be a number >= 0, got -2.0"),
        (["--min-size-mb", "5", "--max-size-mb", "1"], "Error: --max-size-mb (1) must not be smaller than --min-size-mb (5)"),
        (["--shard", "3/2"], "Error: --shard must have 0 <= I < N, got '3/2'"),
        (["--shard", "1of2"], "Error: --shard must look like 'I/N' or 'auto/N' with N >= 1, got '1of2'"),
    ],
)  # fmt: skip
def test_a_bad_flag_value_names_the_flag(run_cli, argv: list[str], line: str) -> None:
    assert error_line(*run_cli(*argv, "--dry-run")) == line


def test_a_bad_value_in_a_config_file_names_the_key_and_the_file(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.yaml").write_text("parallel_downloads: 0\n")
    assert error_line(*run_cli("--config", "config.yaml", "--dry-run")) == (
        "Error: parallel_downloads in config.yaml must be an integer from 1 to 512, got 0"
    )
    (tmp_path / "aws_downloader_config.yaml").write_text("verify_checksums: maybe\n")
    assert error_line(*run_cli("--dry-run")) == (
        "Error: verify_checksums in aws_downloader_config.yaml must be true or false, got 'maybe'"
    )


def test_a_flag_and_a_file_value_that_clash_are_each_named(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.yaml").write_text("min_file_size_mb: 5\n")
    assert error_line(*run_cli("--config", "config.yaml", "--max-size-mb", "1", "--dry-run")) == (
        "Error: --max-size-mb (1) must not be smaller than min_file_size_mb in config.yaml (5)"
    )


def test_a_good_flag_overrides_a_file_value(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("road-data")
    s3.put("road-data", "a.bin", b"a")
    (tmp_path / "config.yaml").write_text("parallel_downloads: 8\nbuckets: [road-data]\n")
    code, out, err = run_cli("--config", "config.yaml", "--parallel", "2", "--endpoint-url", s3.endpoint)
    assert code == 0, (out, err)


def test_python_api_names_the_key_or_the_file(tmp_path: Path) -> None:
    assert config_error({"parallel_downloads": 0}) == (
        "config key 'parallel_downloads' must be an integer from 1 to 512, got 0"
    )
    (tmp_path / "c.yaml").write_text("parallel_downloads: 0\n")
    assert config_error(str(tmp_path / "c.yaml")) == (
        f"parallel_downloads in {tmp_path / 'c.yaml'} must be an integer from 1 to 512, got 0"
    )
    assert (
        config_error(None, retry_attempts=-1) == "config key 'retry_attempts' must be an integer from 0 to 50, got -1"
    )


# -- point 13: an unknown key suggests the one meant ---------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "meant"),
    [("paralel_downloads", "parallel_downloads"), ("max_size_mb", "max_file_size_mb"), ("parallel", "parallel_downloads"),
     ("Verify_Checksums", "verify_checksums"), ("extensions", "file_extensions")],
)  # fmt: skip
def test_unknown_key_in_a_file_suggests_the_closest(tmp_path: Path, run_cli, typed: str, meant: str) -> None:
    (tmp_path / "config.yaml").write_text(f"{typed}: 4\n")
    assert error_line(*run_cli("--config", "config.yaml", "--dry-run")) == (
        f"Error: unknown config key '{typed}' in config.yaml; did you mean '{meant}'?"
    )


def test_unknown_key_with_nothing_close_lists_the_keys(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.json").write_text('{"retries": 3}')
    assert error_line(*run_cli("--config", "config.json", "--dry-run")) == (
        f"Error: unknown config key 'retries' in config.json; known keys: {KNOWN_KEYS}"
    )


def test_unknown_key_from_python_suggests_the_closest() -> None:
    assert config_error({"paralel_downloads": 4}) == (
        "unknown config key 'paralel_downloads'; did you mean 'parallel_downloads'?"
    )
    assert config_error(None, max_size_mb=3) == "unknown config key 'max_size_mb'; did you mean 'max_file_size_mb'?"


# -- point 14: YAML errors say YAML, with line and column ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("region: 2001-13-01\n",
         "line 1, column 9: 2001-13-01 is not a valid date (month must be in 1..12); quote it to keep it text"),
        ("download_dir: d\nbuckets: [a]\nregion: 2001-02-30\n",
         "line 3, column 9: 2001-02-30 is not a valid date (day is out of range for month); quote it to keep it text"),
        ("buckets: [road-data\nregion: us-east-1\n",
         "line 2, column 7: expected ',' or ']', but got ':' (while parsing a flow sequence at line 1, column 10)"),
        ("buckets: road-data\n  region: us-east-1\n", "line 2, column 9: mapping values are not allowed here"),
        ("download_dir: 'data\n", "line 2, column 1: found unexpected end of stream "
         "(while scanning a quoted scalar at line 1, column 15)"),
    ],
)  # fmt: skip
def test_yaml_errors_keep_line_and_column(tmp_path: Path, run_cli, text: str, message: str) -> None:
    (tmp_path / "config.yaml").write_text(text)
    assert error_line(*run_cli("--config", "config.yaml", "--dry-run")) == (
        f"Error: config file config.yaml is not valid YAML: {message}"
    )
    assert config_error(str(tmp_path / "config.yaml")) == (
        f"config file {tmp_path / 'config.yaml'} is not valid YAML: {message}"
    )


def test_json_errors_still_say_json(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.json").write_text('{"buckets": ["a",]}')
    assert error_line(*run_cli("--config", "config.json", "--dry-run")) == (
        "Error: config file config.json is not valid JSON: Expecting value: line 1 column 18 (char 17)"
    )


def test_a_config_file_that_is_not_utf8_is_a_usage_error(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.yaml").write_bytes(b"region: \xff\xfe\n")
    assert error_line(*run_cli("--config", "config.yaml", "--dry-run")) == (
        "Error: config file config.yaml is not UTF-8 text (byte 8)"
    )


# -- point 17: --help and --version, as the installed command ----------------------------------------------------


def installed_command(tmp_path: Path) -> Path:
    """A console script as pip writes one for the [project.scripts] entry point (pyproject.toml)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "aws-data-downloader"
    script.write_text(
        f"#!{sys.executable}\n"
        "import re\nimport sys\nfrom aws_data_downloader import console_main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(console_main())\n"
    )
    script.chmod(0o755)
    return script


def test_version_and_help_name_the_command_the_user_ran(tmp_path: Path) -> None:
    script = installed_command(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    version = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, (version.stdout, version.stderr)
    assert version.stdout == f"aws-data-downloader {adl.__version__}\n"
    shown = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, (shown.stdout, shown.stderr)
    assert shown.stdout.startswith("usage: aws-data-downloader [-h] ")
    assert "aws_data_downloader.py" not in shown.stdout
    script_run = subprocess.run(
        [sys.executable, str(REPO / "aws_data_downloader.py"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert script_run.stdout == f"aws_data_downloader.py {adl.__version__}\n"


def help_entries(text: str) -> dict[str, str]:
    """{first flag: its help, joined onto one line} for every option in argparse's --help output."""
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    flag = ""
    for line in options.splitlines():
        if line.startswith("  -"):
            invocation, _, help_text = line.strip().partition("  ")
            flag = invocation.split()[0].rstrip(",")
            entries[flag] = help_text.strip()
        else:
            entries[flag] = f"{entries[flag]} {line.strip()}".strip()
    return entries


def test_help_shows_defaults_in_one_style_without_null(monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    code, out, err = run_cli("--help")
    assert code == 0, (out, err)
    entries = help_entries(out)
    assert {"-h", "--version", *(option.flag for option in adl.OPTIONS if option.flag)} <= set(entries)
    assert entries["--parallel"].endswith("(default: 32).")
    assert entries["--download-dir"].endswith("(default: data).")
    assert entries["--retry-attempts"].endswith("(default: 5).")
    assert entries["--min-size-mb"].endswith("(default: 0).")
    assert entries["--log-file"].endswith("(default: aws_downloader.log).")
    assert entries["--max-size-mb"] == "Skip objects larger than this (MiB); no limit unless given."
    for flag, help_text in entries.items():
        assert help_text[:1].isupper() and help_text.endswith("."), (flag, help_text)
        assert not re.search(r"\b(null|None)\b", help_text), (flag, help_text)


# -- point 18: the README says how to import the module and see its log lines ------------------------------------


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n### {title}")
    return text[start : text.index("\n### ", start + 1)]


def test_readme_python_section_imports_from_the_checkout_and_shows_log_lines(s3: S3Server, tmp_path: Path) -> None:
    section = readme_section("From Python")
    assert "pip install ." in section
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "logging.basicConfig" in b]
    assert blocks, "the README's Python section has no example that configures logging"
    s3.make_bucket("my-road-data-bucket")
    s3.put("my-road-data-bucket", "coryell/Co Rd 4235/img/000.png", b"\x89PNG" + b"x" * 100)
    checkout = tmp_path / "checkout"  # a notebook started in the checkout: its directory is on sys.path
    checkout.mkdir()
    shutil.copy(REPO / "aws_data_downloader.py", checkout)
    (checkout / "cell.py").write_text(blocks[0])
    env = {k: v for k, v in s3.env().items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "cell.py"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "INFO:aws_data_downloader:" in result.stderr
    assert (checkout / "data" / "my-road-data-bucket" / "coryell" / "Co Rd 4235" / "img" / "000.png").exists()


# -- point 19: the lock file stays after a run; the flock on it is what a second run meets -----------------------


def test_lock_file_stays_after_a_run_unlocked_as_the_readme_says(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("road-data")
    s3.put("road-data", "a.bin", b"a")
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "d", "--endpoint-url", s3.endpoint)
    assert code == 0, (out, err)
    lock = tmp_path / "d" / ".aws_downloader.lock"
    assert lock.is_file()
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run had left it locked
    [line] = [line for line in (REPO / "README.md").read_text().splitlines() if ".aws_downloader.lock  " in line]
    comment = line.split("#", 1)[1]
    assert "stays" in comment and "flock" in comment
    assert "held while a run is active" not in comment
