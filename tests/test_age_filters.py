"""--max-age / --min-age: the parser (pure, ``now`` injected), filter_reason, config errors, and runs against
moto whose objects really have different LastModified times."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
from conftest import S3Server

import aws_data_downloader as adl

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
DAY = 86400


def obj(key: str, modified: float) -> adl.S3Object:
    return adl.S3Object(bucket="bkt", key=key, size=100, etag="0" * 32, last_modified=modified)


# -- age_cutoff: pure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * DAY),
        ("36h", 36 * 3600),
        ("90m", 90 * 60),
        ("45s", 45),
        ("1500ms", 1.5),
        ("2w", 14 * DAY),
        ("1M", 30 * DAY),  # rclone's month and year
        ("1y", 365 * DAY),
        ("1h30m", 5400),
        ("1d12h", 36 * 3600),
        ("1.5d", 36 * 3600),
        ("3600", 3600),  # a bare number is seconds, as in rclone
    ],
)
def test_durations_count_back_from_now(text: str, seconds: float) -> None:
    assert adl.age_cutoff(text, NOW) == pytest.approx(NOW - seconds)


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-01-31", "2026-01-31T00:00:00"),  # no zone: UTC
        ("2026-01-31T10:20:30", "2026-01-31T10:20:30"),
        ("2026-01-31 10:20:30", "2026-01-31T10:20:30"),
        ("2026-01-31T10:20:30Z", "2026-01-31T10:20:30"),
        ("2026-01-31T12:20:30+02:00", "2026-01-31T10:20:30"),
        ("2026-01-31T10:20:30.250Z", "2026-01-31T10:20:30.250000"),
    ],
)
def test_iso_times_are_absolute_and_utc_without_a_zone(text: str, utc: str) -> None:
    expected = datetime.datetime.fromisoformat(utc).replace(tzinfo=datetime.timezone.utc).timestamp()
    assert adl.age_cutoff(text, NOW) == expected
    assert adl.age_cutoff(text, NOW + 5 * DAY) == expected  # not relative to now


@pytest.mark.parametrize(
    "text",
    ["", "7 d", "7days", "7D", "-7d", "d", "1h 30m", "2026-13-01", "2026/01/31", "soon", "9" * 400 + "d", "1001y"],
)
def test_malformed_ages_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        adl.age_cutoff(text, NOW)


# -- Filters and filter_reason --------------------------------------------------------------------------------


def test_max_age_keeps_objects_modified_since_the_cutoff() -> None:
    rules = adl.Filters.from_config(adl.build_config({"max_age": "7d"}), now=NOW)
    assert rules.modified_since == NOW - 7 * DAY and rules.modified_before is None
    assert adl.filter_reason(obj("new", NOW - 6 * DAY), rules) is None
    assert adl.filter_reason(obj("edge", NOW - 7 * DAY), rules) is None  # at the cut-off: kept
    assert adl.filter_reason(obj("old", NOW - 8 * DAY), rules) == "age > max"


def test_min_age_keeps_objects_modified_before_the_cutoff() -> None:
    rules = adl.Filters.from_config(adl.build_config({"min_age": "1d"}), now=NOW)
    assert rules.modified_before == NOW - DAY and rules.modified_since is None
    assert adl.filter_reason(obj("old", NOW - 2 * DAY), rules) is None
    assert adl.filter_reason(obj("edge", NOW - DAY), rules) == "age < min"  # at the cut-off: too new
    assert adl.filter_reason(obj("new", NOW - 60), rules) == "age < min"


def test_both_ages_make_a_window() -> None:
    rules = adl.Filters.from_config(adl.build_config({"max_age": "30d", "min_age": "2026-12-25"}), now=NOW)
    christmas = datetime.datetime(2026, 12, 25, tzinfo=datetime.timezone.utc).timestamp()
    assert rules.modified_before == christmas
    assert adl.filter_reason(obj("in", christmas - DAY), rules) is None
    assert adl.filter_reason(obj("after", christmas + DAY), rules) == "age < min"
    assert adl.filter_reason(obj("before", NOW - 31 * DAY), rules) == "age > max"


def test_no_age_filter_keeps_every_date() -> None:
    rules = adl.Filters.from_config(adl.build_config({}), now=NOW)
    assert adl.filter_reason(obj("epoch", 0.0), rules) is None
    assert adl.filter_reason(obj("future", NOW + DAY), rules) is None


def test_durations_are_anchored_when_the_filters_are_built() -> None:
    config = adl.build_config({"max_age": "1h"})
    assert adl.Filters.from_config(config, now=NOW).modified_since == NOW - 3600
    assert adl.Filters.from_config(config, now=NOW + 60).modified_since == NOW - 3540
    before = time.time()
    since = adl.Filters.from_config(config).modified_since
    assert since is not None and before - 3600 <= since <= time.time() - 3600


# -- config values and errors ---------------------------------------------------------------------------------


def test_yaml_dates_and_numbers_are_read_as_they_would_be_as_text(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("max_age: 2026-01-31\nmin_age: 3600\n")
    config = adl.build_config(adl.ConfigLayer(adl.load_config_file(path), "file", str(path)))
    assert config.max_age == "2026-01-31" and config.min_age == "3600"
    path.write_text("max_age: 2026-01-31T10:00:00Z\n")
    config = adl.build_config(adl.ConfigLayer(adl.load_config_file(path), "file", str(path)))
    rules = adl.Filters.from_config(config, now=NOW)
    assert rules.modified_since == datetime.datetime(2026, 1, 31, 10, tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--max-age", "7days"], ["--max-age must be a duration", "'7days'"]),
        (["--min-age", "yesterday"], ["--min-age must be a duration", "'yesterday'"]),
        (["--max-age", "1d", "--min-age", "7d"], ["--max-age (1d) must reach further back than --min-age (7d)"]),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(run_cli, argv: list[str], needles: list[str]) -> None:
    code, out, err = run_cli("--buckets", "b", *argv)
    assert code == adl.EXIT_USAGE, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_bad_key_in_a_config_file_names_the_key_and_the_file(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("min_age: 3 weeks\n")
    code, _out, err = run_cli("--buckets", "b", "--config", str(path))
    assert code == adl.EXIT_USAGE
    assert err.strip().splitlines() == [
        f"Error: min_age in {path} must be a duration ('7d', '36h', '90m', '1h30m'; units ms s m h d w M y) or an "
        "ISO 8601 time, or null, got '3 weeks'"
    ]


# -- against moto: objects uploaded on either side of a second boundary ---------------------------------------


def listed_times(s3: S3Server, bucket: str, prefix: str) -> dict[str, datetime.datetime]:
    listing = s3.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {entry["Key"]: entry["LastModified"] for entry in listing.get("Contents", [])}


@pytest.fixture
def old_and_new(s3: S3Server) -> tuple[str, datetime.datetime]:
    """Bucket 'age-bkt' with data/old-*.txt and data/new-*.txt, every new object listed as modified later than
    every old one (S3 dates have one-second steps: the probe is uploaded until the server's clock has moved on).
    Returns the bucket and the new objects' earliest LastModified, as the listing gives it."""
    bucket = s3.make_bucket("age-bkt")
    for index in range(3):
        s3.put(bucket, f"data/old-{index}.txt", b"old %d" % index)
    newest_old = max(listed_times(s3, bucket, "data/").values())
    for _attempt in range(200):  # bounded: a few seconds of the server's clock at most
        s3.put(bucket, "probe/tick", b"")
        if listed_times(s3, bucket, "probe/")["probe/tick"] > newest_old:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server's LastModified never moved past the old objects'")
    for index in range(2):
        s3.put(bucket, f"data/new-{index}.txt", b"new %d" % index)
    times = listed_times(s3, bucket, "data/")
    cutoff = min(value for key, value in times.items() if "/new-" in key)
    assert cutoff > newest_old
    return bucket, cutoff


def run_json(run_cli, s3: S3Server, bucket: str, *argv: str) -> dict:
    code, out, err = run_cli("--buckets", bucket, "--prefixes", "data/", "--download-dir", "data", "--json",
                             *s3.args(), *argv)  # fmt: skip
    assert code == 0, (out, err)
    return json.loads(out)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_max_age_at_a_listed_time_downloads_only_what_changed_since(
    s3: S3Server, tmp_path: Path, run_cli, old_and_new: tuple[str, datetime.datetime]
) -> None:
    bucket, cutoff = old_and_new
    summary = run_json(run_cli, s3, bucket, "--max-age", cutoff.isoformat())
    assert summary["downloaded"] == 2 and summary["failed"] == 0
    assert summary["filtered_out_by_rule"] == {"age > max": 3}
    root = tmp_path / "data" / bucket
    assert files_under(root) == {"data/new-0.txt", "data/new-1.txt"}
    assert (root / "data" / "new-1.txt").read_bytes() == b"new 1"


def test_min_age_at_a_listed_time_downloads_only_what_is_older(
    s3: S3Server, tmp_path: Path, run_cli, old_and_new: tuple[str, datetime.datetime]
) -> None:
    bucket, cutoff = old_and_new
    code, out, err = run_cli("--buckets", bucket, "--prefixes", "data/", "--download-dir", "data", *s3.args(),
                             "--min-age", cutoff.isoformat(), "--log-file", "run.log")  # fmt: skip
    assert code == 0, (out, err)
    assert "Filtered out:     2 (age < min 2)" in out, out
    assert files_under(tmp_path / "data" / bucket) == {f"data/old-{i}.txt" for i in range(3)}
    log_text = (tmp_path / "run.log").read_text()
    stamp = cutoff.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f"Keeping objects modified before {stamp} (min age {cutoff.isoformat()})" in log_text


def test_durations_against_the_server_clock(
    s3: S3Server, tmp_path: Path, run_cli, old_and_new: tuple[str, datetime.datetime]
) -> None:
    bucket, _cutoff = old_and_new
    summary = run_json(run_cli, s3, bucket, "--max-age", "1h")
    assert summary["downloaded"] == 5 and summary["filtered_out"] == 0
    code, out, err = run_cli("--buckets", bucket, "--prefixes", "data/", "--download-dir", "data2", *s3.args(),
                             "--min-age", "1h", "--json")  # fmt: skip
    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["filtered_out_by_rule"] == {"age < min": 5} and summary["downloaded"] == 0
    assert "The filters left out every object listed: 5 (age < min 5)" in err
    assert not (tmp_path / "data2" / bucket).exists()


def test_age_filters_from_the_python_api(
    s3: S3Server, tmp_path: Path, old_and_new: tuple[str, datetime.datetime]
) -> None:
    bucket, cutoff = old_and_new
    downloader = adl.AWSDataDownloader(
        {
            "buckets": [bucket],
            "prefixes": ["data/"],
            "download_dir": str(tmp_path / "api"),
            "endpoint_url": s3.endpoint,
            "min_age": cutoff.isoformat(),
            "max_age": "1d",
        }
    )
    summary = downloader.run_full_download()
    assert summary.downloaded == 3 and summary.filtered == {"age < min": 2}
    assert files_under(tmp_path / "api" / bucket) == {f"data/old-{i}.txt" for i in range(3)}
