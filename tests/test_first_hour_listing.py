"""What a new user trips on, in discovery and the listing: a selection that matches nothing is said by name and
exits 6 (a typo'd prefix in a cron job must not "succeed" for ever), the objects the filters leave out are
counted by rule in the summary, the JSON and the log, and an endpoint with nothing listening is one message.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, S3Server, cli_json, write_config

import aws_data_downloader as adl

SETTINGS = {"log_file": "run.log"}


def seed_roads(s3: S3Server, bucket: str) -> dict[str, bytes]:
    return s3.seed_random(
        bucket,
        {
            "coryell/Co Rd 4235/img/000.png": 2000,
            "coryell/Co Rd 4235/img/001.png": 3000,
            "coryell/Co Rd 4235/ann/annotations.json": 500,
            "coryell/big.tif": 3 * MiB,
        },
        seed=12,
    )


def test_a_typo_in_the_prefix_is_named_and_exits_6(s3: S3Server, run_cli, tmp_path: Path) -> None:
    seed_roads(s3, "road-data")
    code, out, err = run_cli(
        "--buckets", "road-data", "--prefixes", "coryel/", "--download-dir", str(tmp_path / "data"),
        "--endpoint-url", s3.endpoint, "--config", write_config(tmp_path, SETTINGS),
    )  # fmt: skip
    assert code == adl.EXIT_NOTHING_LISTED == 6, (out, err)
    assert "No objects under s3://road-data/coryel/" in out, out
    log = (tmp_path / "run.log").read_text()
    assert "No objects under s3://road-data/coryel/: check the bucket and prefix" in log, log
    assert "Traceback" not in err


def test_one_empty_prefix_among_good_ones_still_exits_6_and_the_rest_is_downloaded(
    s3: S3Server, run_cli, tmp_path: Path
) -> None:
    files = seed_roads(s3, "road-data")
    code, summary = cli_json(
        run_cli, s3.endpoint, tmp_path, "road-data", SETTINGS, extra=("--prefixes", "coryell/", "bell/")
    )
    assert code == 6, summary
    assert summary["nothing_under"] == ["s3://road-data/bell/"]
    assert summary["downloaded"] == len(files)
    for key, body in files.items():
        assert (tmp_path / "data" / "road-data" / key).read_bytes() == body


def test_an_empty_bucket_named_alone_exits_6(s3: S3Server, run_cli, tmp_path: Path) -> None:
    s3.make_bucket("empty-bucket")
    code, summary = cli_json(run_cli, s3.endpoint, tmp_path, "empty-bucket", SETTINGS)
    assert code == 6, summary
    assert summary["nothing_under"] == ["s3://empty-bucket/"]
    assert summary["total_files"] == 0


@pytest.mark.parametrize(
    ("prefix", "code", "nothing_under"),
    [("coryel/", 6, ["s3://*/coryel/ (in any of 2 buckets)"]), ("coryell/", 0, [])],
    ids=["in-no-bucket", "in-one-bucket"],
)
def test_without_buckets_a_prefix_is_empty_only_if_no_bucket_has_it(
    s3: S3Server, run_cli, tmp_path: Path, prefix: str, code: int, nothing_under: list[str]
) -> None:
    seed_roads(s3, "road-data")
    s3.make_bucket("second-bucket")
    exit_code, out, err = run_cli(
        "--prefixes", prefix, "--download-dir", str(tmp_path / "data"), "--endpoint-url", s3.endpoint,
        "--config", write_config(tmp_path, SETTINGS), "--json",
    )  # fmt: skip
    assert exit_code == code, (out, err)
    assert json.loads(out)["nothing_under"] == nothing_under


def test_objects_the_filters_leave_out_are_counted_by_rule(s3: S3Server, run_cli, tmp_path: Path) -> None:
    seed_roads(s3, "road-data")
    settings = {**SETTINGS, "file_extensions": [".png", ".tif"], "max_file_size_mb": 2}
    code, out, err = run_cli(
        "--buckets", "road-data", "--download-dir", str(tmp_path / "data"), "--endpoint-url", s3.endpoint,
        "--config", write_config(tmp_path, settings),
    )  # fmt: skip
    assert code == 0, (out, err)
    assert "Filtered out:     2 (extension 1, size > max 1)" in out, out  # ties in listing order
    code, summary = cli_json(run_cli, s3.endpoint, tmp_path, "road-data", settings, out_dir="data2")
    assert summary["filtered_out"] == 2
    assert summary["filtered_out_by_rule"] == {"extension": 1, "size > max": 1}
    assert summary["downloaded"] == 2


def test_when_the_filters_leave_out_everything_the_run_warns_with_the_counts(
    s3: S3Server, run_cli, tmp_path: Path
) -> None:
    seed_roads(s3, "road-data")
    settings = {**SETTINGS, "file_extensions": [".jpg"]}
    code, out, err = run_cli(
        "--buckets", "road-data", "--download-dir", str(tmp_path / "data"), "--endpoint-url", s3.endpoint,
        "--config", write_config(tmp_path, settings),
    )  # fmt: skip
    assert code == 0, (out, err)  # the bucket has objects: the selection is the user's choice, not a typo
    assert "The filters left out every object listed: 4 (extension 4)" in err, err
    assert "Filtered out:     4 (extension 4)" in out, out
    assert "The filters left out every object listed: 4 (extension 4)" in (tmp_path / "run.log").read_text()


def test_the_python_api_reports_the_same(s3: S3Server, tmp_path: Path) -> None:
    seed_roads(s3, "road-data")
    summary = adl.AWSDataDownloader(
        buckets=["road-data"],
        prefixes=["coryel/"],
        download_dir=str(tmp_path / "data"),
        endpoint_url=s3.endpoint,
        log_file="",
    ).run_full_download()
    assert not summary.ok
    assert summary.exit_code == 6
    assert summary.nothing_under == ("s3://road-data/coryel/",)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused, and no other server can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("named", [True, False], ids=["--buckets", "all-buckets"])
def test_nothing_listening_at_the_endpoint_is_one_message_naming_it(
    run_cli, tmp_path: Path, named: bool, refusing_port: int
) -> None:
    """The same error with and without --buckets, naming the endpoint and what to check, after a few seconds of
    retries at most (the waits the retry lines announce add up to no more than CONNECT_WAIT_S)."""
    endpoint = f"http://127.0.0.1:{refusing_port}"
    argv = ["--buckets", "road-data"] if named else []
    code, out, err = run_cli(*argv, "--download-dir", str(tmp_path / "data"), "--endpoint-url", endpoint)
    assert code == adl.EXIT_FAILED, (out, err)
    [error] = [line for line in err.splitlines() if line.startswith("Error:")]
    assert error == (
        f"Error: cannot reach S3 at {endpoint}: connection refused "
        "(is the server running, and is --endpoint-url right?)"
    )
    waits = [float(m) for m in re.findall(r"waiting ([0-9.]+)s", err)]
    assert waits, err  # it did retry
    assert sum(waits) <= adl._Run.CONNECT_WAIT_S + 0.005 * len(waits), err  # each shown rounded to 0.01
    assert "Traceback" not in err and out == ""


def test_help_lists_exit_code_6(run_cli) -> None:
    code, out, err = run_cli("--help")
    assert code == 0, (out, err)
    assert "6 a named bucket does not exist, or a bucket or prefix lists nothing" in " ".join(out.split())
