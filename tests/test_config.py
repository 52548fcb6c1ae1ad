"""Config: one table of options, files in YAML or JSON, flags over file over defaults, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, S3Server

import aws_data_downloader as adl


def assert_usage_error(code: int, out: str, err: str, *needles: str) -> None:
    """Exit 2, one 'Error: ...' line on stderr naming what is wrong, no traceback, nothing on stdout."""
    assert code == adl.EXIT_USAGE, (out, err)
    assert "Traceback" not in err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0]


# -- build_config: layers and validation -------------------------------------------------------------------


def test_defaults_come_from_the_options_table() -> None:
    config = adl.build_config()
    for option in adl.OPTIONS:
        expected = tuple(option.default) if option.kind == "list" else option.default
        assert getattr(config, option.key) == expected, option.key
    assert config == adl.Config()


def test_later_layers_win_and_unset_keys_keep_earlier_values() -> None:
    config = adl.build_config({"parallel_downloads": 8, "download_dir": "from-file"}, {"parallel_downloads": 3})
    assert config.parallel_downloads == 3
    assert config.download_dir == "from-file"
    assert config.retry_attempts == 5


def test_a_string_for_a_list_key_is_one_item() -> None:
    config = adl.build_config({"buckets": "only-bucket", "file_extensions": ".png"})
    assert config.buckets == ("only-bucket",)
    assert config.file_extensions == (".png",)


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"parallel_download": 4}, ["unknown config key 'parallel_download'", "parallel_downloads"]),
        ({"parallel_downloads": "20-30"}, ["'parallel_downloads'", "an integer from 1 to 512", "'20-30'"]),
        ({"parallel_downloads": 0}, ["'parallel_downloads'", "an integer from 1 to 512"]),
        ({"parallel_downloads": 513}, ["'parallel_downloads'", "an integer from 1 to 512"]),
        ({"parallel_downloads": 2.5}, ["'parallel_downloads'", "an integer"]),
        ({"parallel_downloads": True}, ["'parallel_downloads'", "an integer"]),
        ({"overwrite_existing": "yes"}, ["'overwrite_existing'", "true or false"]),
        ({"min_file_size_mb": -1}, ["'min_file_size_mb'", "a number >= 0"]),
        ({"max_file_size_mb": "big"}, ["'max_file_size_mb'", "a number >= 0 or null"]),
        ({"retry_attempts": 51}, ["'retry_attempts'", "from 0 to 50"]),
        ({"buckets": [1, 2]}, ["'buckets'", "a list of strings"]),
        ({"buckets": {"a": 1}}, ["'buckets'", "a list of strings"]),
        ({"retry_mode": "legacy"}, ["'retry_mode'", "'standard', 'adaptive'"]),
        ({"download_dir": None}, ["'download_dir'", "a string"]),
        ({"progress_interval_s": 0}, ["'progress_interval_s'", "a number >= 0.1"]),
        ({"min_file_size_mb": 10, "max_file_size_mb": 5}, ["'max_file_size_mb'", "'min_file_size_mb'"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(values: dict, needles: list[str]) -> None:
    with pytest.raises(adl.ConfigError) as caught:
        adl.build_config(values)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert caught.value.exit_code == adl.EXIT_USAGE


@pytest.mark.parametrize("key", ["access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key"])
def test_credentials_in_a_config_file_are_refused_with_a_hint(key: str) -> None:
    with pytest.raises(adl.ConfigError, match=f"'{key}'.*credentials do not belong in a config file"):
        adl.build_config({key: "AKIAEXAMPLE"})


def test_check_value_coerces_each_kind() -> None:
    by_key = adl.OPTIONS_BY_KEY
    assert adl.check_value(by_key["parallel_downloads"], 4.0) == 4
    assert isinstance(adl.check_value(by_key["parallel_downloads"], 4.0), int)
    assert adl.check_value(by_key["min_file_size_mb"], 2) == 2.0
    assert adl.check_value(by_key["max_file_size_mb"], None) is None
    assert adl.check_value(by_key["prefixes"], None) == ()
    assert adl.check_value(by_key["prefixes"], ["a/", "b/"]) == ("a/", "b/")
    assert adl.check_value(by_key["engine"], "boto3") == "boto3"
    with pytest.raises(adl.ConfigError):
        adl.check_value(by_key["min_file_size_mb"], float("inf"))
    with pytest.raises(adl.ConfigError):
        adl.check_value(by_key["prefixes"], [""])


def test_config_replace_validates_like_a_file() -> None:
    config = adl.Config().replace(parallel_downloads=7)
    assert config.parallel_downloads == 7
    with pytest.raises(adl.ConfigError, match="parallel_downloads"):
        config.replace(parallel_downloads=-1)


# -- config files -------------------------------------------------------------------------------------------


def test_yaml_and_json_files_are_read_by_extension(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("parallel_downloads: 4\nfile_extensions: ['.png']\n")
    (tmp_path / "c.yml").write_text("parallel_downloads: 5\n")
    (tmp_path / "c.json").write_text(json.dumps({"parallel_downloads": 6, "buckets": ["b"]}))
    assert adl.load_config_file(tmp_path / "c.yaml") == {"parallel_downloads": 4, "file_extensions": [".png"]}
    assert adl.load_config_file(tmp_path / "c.yml") == {"parallel_downloads": 5}
    assert adl.load_config_file(tmp_path / "c.json") == {"parallel_downloads": 6, "buckets": ["b"]}
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert adl.load_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("bad.json", "{'single': quotes}", "not valid JSON"),
        ("bad.yaml", "key: [unclosed\n", "not valid YAML"),
        ("list.yaml", "- a\n- b\n", "must hold a mapping"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path: Path, run_cli, name: str, text: str, needle: str) -> None:
    (tmp_path / name).write_text(text)
    code, out, err = run_cli("--config", name, "--dry-run")
    assert_usage_error(code, out, err, needle, name)


def test_missing_config_file(run_cli) -> None:
    code, out, err = run_cli("--config", "nowhere.yaml", "--dry-run")
    assert_usage_error(code, out, err, "config file not found: nowhere.yaml")


def test_the_seed_readme_range_value_is_an_error_naming_the_key(tmp_path: Path, run_cli) -> None:
    (tmp_path / "fast.yaml").write_text("parallel_downloads: 20-30\nchunk_size: 16384\nretry_attempts: 5\n")
    code, out, err = run_cli("--config", "fast.yaml", "--dry-run")
    assert_usage_error(code, out, err, "parallel_downloads in fast.yaml", "'20-30'", "an integer from 1 to 512")


def test_unknown_key_in_a_file_exits_2(tmp_path: Path, run_cli) -> None:
    (tmp_path / "c.json").write_text('{"paralel_downloads": 4}')
    code, out, err = run_cli("--config", "c.json", "--dry-run")
    assert_usage_error(code, out, err, "unknown config key 'paralel_downloads'", "did you mean 'parallel_downloads'")


def test_credentials_in_a_file_exit_2_with_a_hint(tmp_path: Path, run_cli) -> None:
    (tmp_path / "c.yaml").write_text("secret_key: hunter22\n")
    code, out, err = run_cli("--config", "c.yaml", "--dry-run")
    assert_usage_error(code, out, err, "'secret_key'", "use environment variables or --profile")
    assert "hunter22" not in err


def test_wrong_type_in_the_default_file_exits_2(tmp_path: Path, run_cli) -> None:
    (tmp_path / "aws_downloader_config.yaml").write_text("verify_checksums: maybe\n")
    code, out, err = run_cli("--dry-run")
    assert_usage_error(code, out, err, "verify_checksums in aws_downloader_config.yaml", "true or false", "'maybe'")


def test_a_bad_flag_value_is_validated_like_a_file_value(run_cli) -> None:
    code, out, err = run_cli("--parallel", "0", "--dry-run")
    assert_usage_error(code, out, err, "--parallel must be", "an integer from 1 to 512")


# -- precedence, through the CLI against a real server ------------------------------------------------------


def test_default_file_in_cwd_is_read_and_flags_override_it(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("cfg")
    s3.put("cfg", "img/a.png", b"png-bytes")
    s3.put("cfg", "ann/a.json", b"{}")
    (tmp_path / "aws_downloader_config.yaml").write_text(
        "download_dir: from-file\nbuckets: cfg\nfile_extensions: ['.png']\n"
    )
    code, out, err = run_cli(*s3.args())
    assert code == 0, (out, err)
    assert (tmp_path / "from-file" / "cfg" / "img" / "a.png").read_bytes() == b"png-bytes"
    assert not (tmp_path / "from-file" / "cfg" / "ann").exists()

    code, out, err = run_cli("--download-dir", "from-flag", "--extensions", ".json", *s3.args())
    assert code == 0, (out, err)
    assert (tmp_path / "from-flag" / "cfg" / "ann" / "a.json").read_bytes() == b"{}"
    assert not (tmp_path / "from-flag" / "cfg" / "img").exists()


def test_config_flag_reads_json_instead_of_the_default_file(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("json-bkt")
    s3.put("json-bkt", "x.bin", b"x" * 10)
    (tmp_path / "aws_downloader_config.yaml").write_text("download_dir: not-this-one\n")
    (tmp_path / "mine.json").write_text(json.dumps({"download_dir": "json-dir", "buckets": ["json-bkt"]}))
    code, out, err = run_cli("--config", "mine.json", *s3.args())
    assert code == 0, (out, err)
    assert (tmp_path / "json-dir" / "json-bkt" / "x.bin").read_bytes() == b"x" * 10
    assert not (tmp_path / "not-this-one").exists()


def test_python_api_takes_a_config_path(s3: S3Server, tmp_path: Path) -> None:
    s3.make_bucket("api")
    s3.put("api", "k.txt", b"api-bytes")
    (tmp_path / "c.yaml").write_text(f"download_dir: api-dir\nbuckets: [api]\nendpoint_url: {s3.endpoint}\n")
    downloader = adl.AWSDataDownloader(str(tmp_path / "c.yaml"))
    summary = downloader.run_full_download("cfg-key-id", "cfg-test-secret-0123", region="us-east-1")
    assert isinstance(summary, adl.DownloadSummary)
    assert summary.downloaded == 1 and summary.ok
    assert (tmp_path / "api-dir" / "api" / "k.txt").read_bytes() == b"api-bytes"


# -- the default config file ---------------------------------------------------------------------------------


def test_create_config_writes_the_default_and_it_loads_back(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("--create-config")
    assert code == 0, (out, err)
    written = tmp_path / "aws_downloader_config.yaml"
    assert "aws_downloader_config.yaml" in out
    assert written.read_text() == adl.default_config_text()
    assert adl.build_config(adl.load_config_file(written)) == adl.Config()


def test_create_config_at_a_path_and_refuses_to_overwrite(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("--create-config", "custom.yaml")
    assert code == 0, (out, err)
    (tmp_path / "custom.yaml").write_text("parallel_downloads: 3  # my edit\n")
    code, out, err = run_cli("--create-config", "custom.yaml")
    assert_usage_error(code, out, err, "custom.yaml", "already exists")
    assert (tmp_path / "custom.yaml").read_text() == "parallel_downloads: 3  # my edit\n"


def test_shipped_config_matches_the_generated_default() -> None:
    assert (REPO / "aws_downloader_config.yaml").read_text(encoding="utf-8") == adl.default_config_text()


def test_default_config_text_is_yaml_with_every_key() -> None:
    data = yaml.safe_load(adl.default_config_text())
    assert list(data) == [option.key for option in adl.OPTIONS]


def test_every_key_has_a_flag_in_help_or_is_documented_file_only() -> None:
    help_text = adl.build_parser().format_help()
    lines = adl.default_config_text().splitlines()
    for option in adl.OPTIONS:
        (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{option.key}:")]
        comment = lines[index - 1]
        assert comment.startswith("# "), option.key
        if option.flag is not None:
            assert option.flag in help_text, option.key
            assert f"flag {option.flag}" in comment, option.key
        else:
            assert "file-only" in comment, option.key
