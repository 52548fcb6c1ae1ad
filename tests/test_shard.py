"""Sharding: --shard I/N splits a selection across machines (or runs) by a stable hash of bucket/key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import S3Server

import aws_data_downloader as adl

KEYS = [f"part-{n:03d}/sample-{n}.{'png' if n % 4 else 'json'}" for n in range(60)]


def seed(server: S3Server, bucket: str) -> dict[str, bytes]:
    server.make_bucket(bucket)
    files = {key: f"body of {key}".encode() * (1 + n % 3) for n, key in enumerate(KEYS)}
    for key, body in files.items():
        server.put(bucket, key, body)
    return files


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()} if root.exists() else set()


# -- pure functions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("0/1", (0, 1)), ("0/3", (0, 3)), ("2/3", (2, 3)), ("41/64", (41, 64))])
def test_parse_shard_accepts_i_of_n(text: str, expected: tuple[int, int]) -> None:
    assert adl.parse_shard(text, {"PATH": "/bin"}) == expected


@pytest.mark.parametrize(
    "text", ["3/3", "4/3", "-1/3", "x/3", "1/0", "1/-2", "1", "1/", "/3", "", "1/2/3", " 1/3", "1 /3", "²/3", "auto/0"]
)
def test_parse_shard_rejects_malformed_values(text: str) -> None:
    with pytest.raises(adl.ConfigError) as raised:
        adl.parse_shard(text, {"PATH": "/bin"})
    assert raised.value.exit_code == adl.EXIT_USAGE
    assert "\n" not in str(raised.value) and "shard" in str(raised.value)


def test_auto_reads_the_index_from_kubernetes_or_aws_batch() -> None:
    assert adl.parse_shard("auto/4", {"JOB_COMPLETION_INDEX": "3"}) == (3, 4)
    assert adl.parse_shard("auto/4", {"AWS_BATCH_JOB_ARRAY_INDEX": "2"}) == (2, 4)
    assert adl.parse_shard("auto/4", {"JOB_COMPLETION_INDEX": "1", "AWS_BATCH_JOB_ARRAY_INDEX": "2"}) == (1, 4)
    with pytest.raises(adl.ConfigError, match=r"JOB_COMPLETION_INDEX.*AWS_BATCH_JOB_ARRAY_INDEX"):
        adl.parse_shard("auto/4", {"PATH": "/bin"})
    with pytest.raises(adl.ConfigError):
        adl.parse_shard("auto/4", {"JOB_COMPLETION_INDEX": "4"})  # index out of range for N


def test_shard_of_is_stable_and_spreads_keys() -> None:
    # Pinned values: blake2b of "bucket/key", the same on every machine and Python version (unlike hash()),
    # so N machines agree on the split. Changing them would reshuffle every running sharded job.
    assert [adl.shard_of("bucket", f"key-{n}", 7) for n in range(8)] == [5, 2, 6, 2, 6, 5, 3, 5]
    assert adl.shard_of("road-data", "coryell/img/000.png", 1000) == 170
    counts = [0] * 4
    for n in range(4000):
        counts[adl.shard_of("bucket", f"images/{n:05d}.png", 4)] += 1
    assert min(counts) > 800, counts  # ~1000 each


def test_filters_keep_only_the_objects_of_one_shard() -> None:
    config = adl.build_config({"shard": "1/3"})
    filters = adl.Filters.from_config(config, {"PATH": "/bin"})
    assert filters.shard == (1, 3)
    for key in KEYS:
        obj = adl.S3Object("b", key, 10, "e", 0.0)
        kept = adl.filter_reason(obj, filters) is None
        assert kept == (adl.shard_of("b", key, 3) == 1)
        if not kept:
            assert adl.filter_reason(obj, filters) == "shard"


# -- through the CLI -------------------------------------------------------------------------------------------


def test_n_shards_in_their_own_dirs_are_disjoint_and_cover_the_selection(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3, "sharded")
    selected = {key for key in files if key.endswith(".png")}
    seen: list[set[str]] = []
    for index in range(3):
        code, out, err = run_cli(
            "--buckets", "sharded", "--extensions", ".png", "--download-dir", f"m{index}", "--shard", f"{index}/3",
            "--json", *s3.args(),
        )  # fmt: skip
        assert code == 0, (out, err)
        got = files_under(tmp_path / f"m{index}" / "sharded")
        assert json.loads(out)["downloaded"] == len(got)
        assert got == {key for key in selected if adl.shard_of("sharded", key, 3) == index}
        seen.append(got)
    assert all(seen), "every shard of 40 keys should get some"
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == selected
    for index, keys in enumerate(seen):
        for key in keys:
            assert (tmp_path / f"m{index}" / "sharded" / key).read_bytes() == files[key]


def test_shards_run_one_after_another_into_the_same_dir(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3, "sequential")
    totals = []
    for index in range(4):
        code, out, err = run_cli(
            "--buckets", "sequential", "--download-dir", "d", "--shard", f"{index}/4", "--json", *s3.args()
        )
        assert code == 0, (out, err)
        summary = json.loads(out)
        assert summary["skipped"] == 0  # other shards' files are outside this shard's selection, not skips
        totals.append(summary["downloaded"])
    assert sum(totals) == len(files)
    for key, body in files.items():
        assert (tmp_path / "d" / "sequential" / key).read_bytes() == body


def test_shard_from_the_config_file(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3, "cfgshard")
    (tmp_path / "cfg.yaml").write_text("buckets: [cfgshard]\nshard: '2/5'\ndownload_dir: out\n")
    code, out, err = run_cli("--config", "cfg.yaml", "--json", *s3.args())
    assert code == 0, (out, err)
    expected = {key for key in files if adl.shard_of("cfgshard", key, 5) == 2}
    assert json.loads(out)["downloaded"] == len(expected)
    for key in files:
        assert (tmp_path / "out" / "cfgshard" / key).exists() == (key in expected)


@pytest.mark.parametrize("variable", ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"])
def test_shard_auto_takes_the_index_from_the_job(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    files = seed(s3, "autoshard")
    monkeypatch.setenv(variable, "1")
    code, out, err = run_cli("--buckets", "autoshard", "--download-dir", "d", "--shard", "auto/2", "--json", *s3.args())
    assert code == 0, (out, err)
    expected = {key for key in files if adl.shard_of("autoshard", key, 2) == 1}
    assert 0 < len(expected) < len(files)
    assert json.loads(out)["downloaded"] == len(expected)
    assert files_under(tmp_path / "d" / "autoshard") == expected


def test_shard_auto_without_a_job_index_exits_2(s3: S3Server, run_cli) -> None:
    s3.make_bucket("noindex")
    code, out, err = run_cli("--buckets", "noindex", "--download-dir", "d", "--shard", "auto/3", *s3.args())
    assert code == adl.EXIT_USAGE, (out, err)
    error_lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1
    assert "JOB_COMPLETION_INDEX" in error_lines[0] and "AWS_BATCH_JOB_ARRAY_INDEX" in error_lines[0]
    assert "Traceback" not in err and "DOWNLOAD SUMMARY" not in out


@pytest.mark.parametrize("value", ["3/3", "x/2", "1/0", "1", "²/3", "auto"])
def test_malformed_shard_flag_exits_2_with_one_line(s3: S3Server, run_cli, value: str) -> None:
    code, out, err = run_cli("--buckets", "any", "--download-dir", "d", "--shard", value, *s3.args())
    assert code == adl.EXIT_USAGE, (out, err)
    assert err.strip().count("\n") == 0, err
    assert err.startswith("Error: --shard must "), err  # the flag the user typed, not the config key
    assert out == ""


def test_malformed_shard_in_config_exits_2(tmp_path: Path, run_cli) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"shard": "5/2"}))
    code, out, err = run_cli("--config", "cfg.json")
    assert code == adl.EXIT_USAGE, (out, err)
    assert err.strip() == "Error: shard in cfg.json must have 0 <= I < N, got '5/2'"
