"""--as-of: a versioned bucket's keys as they stood at a moment, against moto's versioned buckets.

moto dates versions to the second when it lists them, and a test cannot wait hours between uploads, so each
version's LastModified is set in moto's own (in-process) state after it is uploaded: the server then lists,
dates and serves the versions exactly as S3 would have with those dates.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import urllib.parse
from collections import Counter
from pathlib import Path

import pytest
from conftest import cli_json, write_config

import aws_data_downloader as adl
from aws_data_downloader import AWSDataDownloader, ObjectVersion, S3Object

BUCKET = "history"
#: The moment asked for in most tests, and the dates of the versions around it.
AS_OF = "2026-01-01T02:00:00Z"


def at(hhmm: str) -> datetime.datetime:
    """2026-01-01 at ``hhmm`` ('HH:MM' or 'HH:MM:SS'), UTC, naive as moto keeps its dates."""
    return datetime.datetime.fromisoformat(f"2026-01-01T{hhmm}")


def epoch(hhmm: str) -> float:
    return at(hhmm).replace(tzinfo=datetime.timezone.utc).timestamp()


def backdate(bucket: str, key: str, dates: list[datetime.datetime]) -> None:
    """Give the key's versions and delete markers, oldest first, these LastModified dates."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    entries = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].keys.getlist(key)
    assert len(entries) == len(dates), [type(entry).__name__ for entry in entries]
    for entry, date in zip(entries, dates, strict=True):
        entry.last_modified = date


def versioned(s3, bucket: str = BUCKET) -> None:
    s3.make_bucket(bucket)
    s3.client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def history(s3, key: str, steps: list[tuple[str, bytes | None]], bucket: str = BUCKET) -> list[str]:
    """Write the key's history: (HH:MM, body) puts a version, (HH:MM, None) deletes; returns the version ids."""
    ids = []
    for _, body in steps:
        if body is None:
            ids.append(s3.client.delete_object(Bucket=bucket, Key=key)["VersionId"])
        else:
            ids.append(s3.client.put_object(Bucket=bucket, Key=key, Body=body)["VersionId"])
    backdate(bucket, key, [at(when) for when, _ in steps])
    return ids


@pytest.fixture
def dataset(s3) -> dict[str, list[str]]:
    """Keys whose histories put each case around 02:00; returns key -> version ids, oldest first."""
    versioned(s3)
    return {
        # two versions of the same size, 02:00 between them: the first
        "keep.txt": history(s3, "keep.txt", [("01:00", b"keep-1"), ("03:00", b"keep-2")]),
        # deleted before 02:00 and never back: absent
        "gone.txt": history(s3, "gone.txt", [("01:00", b"gone"), ("01:30", None)]),
        # deleted, re-created before 02:00, deleted again after: the re-created version
        "back.txt": history(
            s3, "back.txt", [("01:00", b"back-1"), ("01:20", None), ("01:40", b"back-again"), ("03:00", None)]
        ),
        # created after 02:00: absent
        "new.txt": history(s3, "new.txt", [("03:00", b"new")]),
        # written at 02:00 exactly (the moment is inclusive), replaced a second later
        "exact.txt": history(s3, "exact.txt", [("02:00:00", b"exact-1"), ("02:00:01", b"exact-2")]),
        # deleted after 02:00: there again
        "late-delete.txt": history(s3, "late-delete.txt", [("01:00", b"late"), ("03:00", None)]),
    }


#: What lands on disk for AS_OF.
AS_OF_FILES = {
    "keep.txt": b"keep-1",
    "back.txt": b"back-again",
    "exact.txt": b"exact-1",
    "late-delete.txt": b"late",
}
#: The version of each selected key, as an index into dataset()'s ids.
AS_OF_VERSIONS = {"keep.txt": 0, "back.txt": 2, "exact.txt": 0, "late-delete.txt": 0}


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- from the CLI and Python --------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", [AS_OF, "2026-01-01T04:00:00+02:00"])
def test_cli_downloads_each_key_as_it_stood(s3, run_cli, tmp_path: Path, dataset, moment: str) -> None:
    code, summary = cli_json(run_cli, s3.endpoint, tmp_path, BUCKET, {}, extra=("--as-of", moment))
    assert code == 0
    assert files_under(tmp_path / "data" / BUCKET) == AS_OF_FILES
    assert summary["downloaded"] == 4 and summary["failed"] == 0
    assert summary["filtered_out_by_rule"] == {"deleted at --as-of": 1, "created after --as-of": 1}


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_python_api_as_of_with_each_engine(s3, tmp_path: Path, dataset, engine: str) -> None:
    summary = AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint, "engine": engine},
        as_of=AS_OF,
    ).run_full_download()
    assert files_under(tmp_path / "out" / BUCKET) == AS_OF_FILES
    assert summary.downloaded == 4 and summary.exit_code == 0


def test_without_as_of_the_same_bucket_gives_the_latest(s3, tmp_path: Path, dataset) -> None:
    """The control for the tests above: the latest state differs from the one at 02:00 in every key."""
    AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint}
    ).run_full_download()
    assert files_under(tmp_path / "out" / BUCKET) == {"keep.txt": b"keep-2", "new.txt": b"new", "exact.txt": b"exact-2"}


def test_a_moment_before_everything_lists_nothing(s3, run_cli, tmp_path: Path, dataset) -> None:
    code, summary = cli_json(run_cli, s3.endpoint, tmp_path, BUCKET, {}, extra=("--as-of", "2025-12-31T23:59:59Z"))
    assert code == adl.EXIT_NOTHING_LISTED  # nothing existed then: like an empty bucket
    assert summary["filtered_out_by_rule"] == {"created after --as-of": 6}
    assert not (tmp_path / "data" / BUCKET).exists()


def test_a_moment_in_the_future_is_the_latest_state(s3, tmp_path: Path, dataset) -> None:
    AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint},
        as_of="2099-01-01T00:00:00Z",
    ).run_full_download()
    assert files_under(tmp_path / "out" / BUCKET) == {"keep.txt": b"keep-2", "new.txt": b"new", "exact.txt": b"exact-2"}


def test_filters_and_prefixes_apply_to_the_selection(s3, run_cli, tmp_path: Path, dataset) -> None:
    history(s3, "sub/deep.bin", [("01:00", b"deep-1"), ("03:00", b"deep-2")])
    code, summary = cli_json(
        run_cli, s3.endpoint, tmp_path, BUCKET, {"exclude": ["keep*"]},
        extra=("--as-of", AS_OF, "--prefixes", "sub/", "b", "k"),
    )  # fmt: skip
    assert code == 0
    assert files_under(tmp_path / "data" / BUCKET) == {"back.txt": b"back-again", "sub/deep.bin": b"deep-1"}
    assert summary["filtered_out_by_rule"] == {"exclude": 1}  # keep.txt


def test_a_key_whose_versions_span_pages(s3, tmp_path: Path, dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry per page: every key's versions and delete markers are cut across pages."""
    monkeypatch.setenv("MOTO_S3_DEFAULT_MAX_KEYS", "1")  # moto's server is in this process
    seen: list[int] = []
    real = adl.HttpEngine.list_versions_page

    def counted(self, *args, **kwargs):
        entries, marker = real(self, *args, **kwargs)
        seen.append(len(entries))
        return entries, marker

    monkeypatch.setattr(adl.HttpEngine, "list_versions_page", counted)
    summary = AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint, "engine": "http"},
        as_of=AS_OF,
    ).run_full_download()
    assert seen == [1] * 13  # every version and delete marker of dataset(), one a page
    assert files_under(tmp_path / "out" / BUCKET) == AS_OF_FILES
    assert summary.filtered == {"deleted at --as-of": 1, "created after --as-of": 1}


# -- dry run, manifest, resume ------------------------------------------------------------------------------


def test_dry_run_shows_the_selection_with_version_ids(s3, run_cli, tmp_path: Path, dataset) -> None:
    code, _out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", s3.endpoint,
        "--as-of", AS_OF, "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    for key, index in AS_OF_VERSIONS.items():
        size = len(AS_OF_FILES[key])
        assert f"Would download {BUCKET}/{key} ({size} B, version {dataset[key][index]})" in err
    assert "gone.txt" not in err and "new.txt" not in err
    assert not (tmp_path / "data").exists()


def test_manifest_records_the_chosen_versions_and_from_manifest_fetches_them(
    s3, run_cli, tmp_path: Path, dataset
) -> None:
    manifest = tmp_path / "m.jsonl"
    code, _ = cli_json(run_cli, s3.endpoint, tmp_path, BUCKET, {"manifest": str(manifest)}, extra=("--as-of", AS_OF))
    assert code == 0
    records = {r["key"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    assert {key: r["version_id"] for key, r in records.items()} == {
        key: dataset[key][index] for key, index in AS_OF_VERSIONS.items()
    }
    assert records["keep.txt"]["last_modified"] == epoch("01:00")
    # the manifest alone reproduces the moment, in another directory
    code, _out, err = run_cli(
        "--from-manifest", str(manifest), "--download-dir", str(tmp_path / "again"), "--endpoint-url", s3.endpoint
    )
    assert code == 0, err
    assert files_under(tmp_path / "again" / BUCKET) == AS_OF_FILES


def test_journal_records_version_ids_and_a_rerun_skips(s3, tmp_path: Path, dataset) -> None:
    settings = {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint}
    AWSDataDownloader(settings, as_of=AS_OF).run_full_download()
    journal = adl.ResumeJournal(tmp_path / "out" / "download_resume.json").load()
    assert journal.completed(BUCKET, "keep.txt").version_id == dataset["keep.txt"][0]
    again = AWSDataDownloader(settings, as_of=AS_OF).run_full_download()
    assert again.downloaded == 0 and again.skipped_reasons == {"already downloaded": 4}


def test_as_of_replaces_a_local_copy_of_the_newer_version(s3, tmp_path: Path, dataset) -> None:
    """A same-size copy of a later version, dated as `aws s3 sync` dates it, with no journal: not that version."""
    settings = {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint}
    local = tmp_path / "out" / BUCKET / "keep.txt"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"keep-2")
    os.utime(local, (epoch("03:00"), epoch("03:00")))
    summary = AWSDataDownloader(settings, as_of=AS_OF, include=["keep.txt"]).run_full_download()
    assert local.read_bytes() == b"keep-1"
    assert summary.downloaded == 1 and summary.skipped == 0
    assert local.stat().st_mtime == epoch("01:00")


def test_a_local_copy_dated_as_the_chosen_version_is_kept(s3, tmp_path: Path, dataset) -> None:
    settings = {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint}
    local = tmp_path / "out" / BUCKET / "keep.txt"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"KEEP-1")  # not the bytes: only size and date are compared without a journal
    os.utime(local, (epoch("01:00"), epoch("01:00")))
    summary = AWSDataDownloader(settings, as_of=AS_OF, include=["keep.txt"]).run_full_download()
    assert summary.skipped_reasons == {"exists locally (same size and date)": 1}
    assert local.read_bytes() == b"KEEP-1"


def test_after_a_plain_run_as_of_fetches_the_older_version(s3, tmp_path: Path, dataset) -> None:
    """The journal remembers the latest version (same size): --as-of must not take it for the older one."""
    settings = {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint}
    AWSDataDownloader(settings).run_full_download()
    summary = AWSDataDownloader(settings, as_of=AS_OF).run_full_download()
    assert (tmp_path / "out" / BUCKET / "keep.txt").read_bytes() == b"keep-1"
    assert (tmp_path / "out" / BUCKET / "exact.txt").read_bytes() == b"exact-1"
    assert summary.downloaded == 4


def query_of(request) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(request.query, keep_blank_values=True)


def test_every_get_names_its_version_and_a_failed_page_is_retried(proxy, tmp_path: Path, dataset) -> None:
    """Through the fault proxy: the version listing's first page answers 503 twice, then the real page."""
    proxy.error(status=503, times=2, where=lambda request: "versions" in query_of(request))
    summary = AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": proxy.url, "retry_backoff_s": 0},
        as_of=AS_OF,
    ).run_full_download()
    assert files_under(tmp_path / "out" / BUCKET) == AS_OF_FILES and summary.exit_code == 0
    listings = [r for r in proxy.requests("GET", key=BUCKET) if "versions" in query_of(r)]
    assert [r.status for r in listings] == [503, 503, 200]
    for key, index in AS_OF_VERSIONS.items():
        (get,) = proxy.requests("GET", key=f"/{BUCKET}/{key}")
        assert query_of(get)["versionId"] == [dataset[key][index]]


@pytest.mark.parametrize("verify", [True, False])
def test_a_large_object_is_fetched_in_parts_of_its_old_version(proxy, s3, tmp_path: Path, verify: bool) -> None:
    """Ranged GETs (and the HEAD before them) of a large object all name the chosen version."""
    import random

    versioned(s3)
    rng = random.Random(14)
    old, new = rng.randbytes(3 * 1024 * 1024 + 5), rng.randbytes(3 * 1024 * 1024 + 5)
    ids = history(s3, "big.bin", [("01:00", old), ("03:00", new)])
    summary = AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": proxy.url},
        as_of=AS_OF,
        multipart_threshold_mb=1,
        multipart_chunksize_mb=1,
        verify_checksums=verify,
    ).run_full_download()
    assert (tmp_path / "out" / BUCKET / "big.bin").read_bytes() == old and summary.downloaded == 1
    requests = proxy.requests(key="/big.bin")
    assert requests and all(query_of(r)["versionId"] == [ids[0]] for r in requests)
    if not verify:
        assert len([r for r in requests if r.range]) == 4  # 1 MiB ranges


def test_versioning_status_denied_lists_the_versions_anyway(proxy, tmp_path: Path, dataset, caplog) -> None:
    proxy.error(status=403, where=lambda request: "versioning" in query_of(request))
    AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(tmp_path / "out"), "endpoint_url": proxy.url}, as_of=AS_OF
    ).run_full_download()
    assert files_under(tmp_path / "out" / BUCKET) == AS_OF_FILES
    assert f"Cannot read whether bucket '{BUCKET}' is versioned (access denied); listing its versions" in caplog.text


# -- buckets without versioning, suspended versioning -------------------------------------------------------


def test_a_bucket_without_versioning_is_a_usage_error(s3, run_cli, tmp_path: Path) -> None:
    s3.seed_random("plain", {"a.bin": 10}, seed=1)
    code, _out, err = run_cli(
        "--buckets", "plain", "--download-dir", str(tmp_path / "data"), "--endpoint-url", s3.endpoint, "--as-of", AS_OF
    )  # fmt: skip
    assert code == adl.EXIT_USAGE
    lines = [line for line in err.splitlines() if line.startswith("Error")]
    assert lines == [
        "Error: bucket 'plain' is not versioned, so --as-of has no past to read: leave out --as-of, or enable "
        "versioning on it (only later changes are kept)"
    ]
    assert not (tmp_path / "data" / "plain").exists()


@pytest.mark.parametrize("page_size", ["1000", "1"])
def test_a_suspended_bucket_serves_its_null_version(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page_size: str
) -> None:
    """Written before versioning (version id "null"), replaced while versioned, then versioning suspended; with
    one entry a page, the "null" version is also a page's version-id-marker."""
    monkeypatch.setenv("MOTO_S3_DEFAULT_MAX_KEYS", page_size)
    s3.make_bucket("paused")
    s3.client.put_object(Bucket="paused", Key="k.txt", Body=b"before")
    s3.client.put_bucket_versioning(Bucket="paused", VersioningConfiguration={"Status": "Enabled"})
    s3.client.put_object(Bucket="paused", Key="k.txt", Body=b"during")
    s3.client.put_bucket_versioning(Bucket="paused", VersioningConfiguration={"Status": "Suspended"})
    s3.client.put_object(Bucket="paused", Key="z.txt", Body=b"suspended")  # a "null" version too
    backdate("paused", "k.txt", [at("01:00"), at("03:00")])
    backdate("paused", "z.txt", [at("01:30")])
    manifest = tmp_path / "m.jsonl"
    AWSDataDownloader(
        {"buckets": ["paused"], "download_dir": str(tmp_path / "out"), "endpoint_url": s3.endpoint},
        as_of=AS_OF,
        manifest=str(manifest),
    ).run_full_download()
    assert files_under(tmp_path / "out" / "paused") == {"k.txt": b"before", "z.txt": b"suspended"}
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted((r["key"], r["version_id"]) for r in records) == [("k.txt", "null"), ("z.txt", "null")]


# -- the moment itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["2026-01-01T02:00:00", "2026-01-01"])
def test_a_moment_without_a_zone_is_refused(run_cli, tmp_path: Path, given: str) -> None:
    code, _out, err = run_cli("--buckets", "b", "--download-dir", str(tmp_path), "--as-of", given)
    assert code == adl.EXIT_USAGE
    assert f"Error: --as-of needs a zone: '{given}' has none (add Z for UTC, or an offset like +02:00)" in err


def test_a_moment_that_is_no_timestamp_names_the_flag(run_cli, tmp_path: Path) -> None:
    code, _out, err = run_cli("--buckets", "b", "--download-dir", str(tmp_path), "--as-of", "yesterday")
    assert code == adl.EXIT_USAGE
    assert "Error: --as-of must be an ISO 8601 timestamp with a zone" in err and "got 'yesterday'" in err


def test_yaml_timestamps_quoted_or_not(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("as_of: 2026-01-01T04:00:00+02:00\n")  # YAML makes it a datetime
    assert adl.build_config(adl.load_config_file(path)).as_of == "2026-01-01T04:00:00+02:00"
    path.write_text("as_of: '2026-01-01T02:00:00Z'\n")
    assert adl.build_config(adl.load_config_file(path)).as_of == "2026-01-01T02:00:00+00:00"
    path.write_text("as_of: 2026-01-01 02:00:00\n")  # a datetime without a zone
    layer = adl.ConfigLayer(adl.load_config_file(path), "file", str(path))
    with pytest.raises(adl.ConfigError, match=rf"^as_of in {path} needs a zone: '2026-01-01T02:00:00' has none"):
        adl.build_config(layer)


def test_as_of_in_a_json_config(s3, run_cli, tmp_path: Path, dataset) -> None:
    code, _out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", s3.endpoint,
        "--config", write_config(tmp_path, {"as_of": AS_OF}),
    )  # fmt: skip
    assert code == 0, err
    assert files_under(tmp_path / "data" / BUCKET) == AS_OF_FILES


# -- the selection, without a server ------------------------------------------------------------------------


def entry(key: str, when: float, version: str, deleted: bool = False) -> ObjectVersion:
    return ObjectVersion(
        S3Object("b", key, 0 if deleted else 5, "" if deleted else "e", when, version_id=version), deleted
    )


def chosen(pages: list[list[ObjectVersion]], moment: float) -> tuple[list[tuple[str, str]], Counter]:
    absent: Counter = Counter()
    objects = [(obj.key, obj.version_id) for page in adl.versions_as_of(pages, moment, absent) for obj in page]
    return objects, absent


def test_versions_as_of_newest_entry_not_after_the_moment() -> None:
    page = [
        entry("a", 30.0, "a3"), entry("a", 20.0, "a2", deleted=True), entry("a", 10.0, "a1"),
        entry("b", 25.0, "b2", deleted=True), entry("b", 15.0, "b1"),
        entry("c", 21.0, "c1"),
        entry("d", 19.999, "d1", deleted=True), entry("d", 5.0, "d0"),
        entry("e", 20.0, "e1"),
    ]  # fmt: skip
    assert chosen([page], 20.0) == ([("b", "b1"), ("e", "e1")], Counter({adl.DELETED_AT: 2, adl.CREATED_AFTER: 1}))
    # cut after every entry: the same answer
    assert chosen([[item] for item in page], 20.0) == chosen([page], 20.0)


def test_versions_as_of_milliseconds_and_ties() -> None:
    # S3 dates have milliseconds: one a millisecond after the moment is not yet there
    assert chosen([[entry("k", 100.001, "new"), entry("k", 100.0, "old")]], 100.0)[0] == [("k", "old")]
    # two entries in the same millisecond: the one listed first (S3 lists it as the newer) wins
    assert chosen([[entry("k", 100.0, "later"), entry("k", 100.0, "earlier")]], 100.0)[0] == [("k", "later")]
    # ... unless the other is the key's latest (SeaweedFS lists a "null" version last; botocore splits off the
    # delete markers): a put and a delete in the same second of a store with whole-second dates
    latest_marker = dataclasses.replace(entry("k", 100.0, "dm", deleted=True), latest=True)
    assert chosen([[entry("k", 100.0, "v"), latest_marker]], 100.0) == ([], Counter({adl.DELETED_AT: 1}))


def test_versions_as_of_drops_folder_markers() -> None:
    marker = ObjectVersion(S3Object("b", "dir/", 0, "e", 1.0, version_id="v"), False)
    assert chosen([[marker, entry("dir/x", 1.0, "x")]], 2.0)[0] == [("dir/x", "x")]


def test_parse_list_object_versions_interleaved_and_url_encoded() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <NextKeyMarker>caf%C3%A9+2.txt</NextKeyMarker><NextVersionIdMarker>v9</NextVersionIdMarker>
  <Version><Key>caf%C3%A9+1.txt</Key><VersionId>v3</VersionId><IsLatest>true</IsLatest>
    <LastModified>2026-01-01T03:00:00.250Z</LastModified><ETag>"aa"</ETag><Size>3</Size>
    <StorageClass>STANDARD</StorageClass></Version>
  <DeleteMarker><Key>caf%C3%A9+1.txt</Key><VersionId>v2</VersionId><IsLatest>false</IsLatest>
    <LastModified>2026-01-01T02:00:00.000Z</LastModified></DeleteMarker>
  <Version><Key>caf%C3%A9+1.txt</Key><VersionId>null</VersionId><IsLatest>false</IsLatest>
    <LastModified>2026-01-01T01:00:00.000Z</LastModified><ETag>"bb"</ETag><Size>4</Size>
    <StorageClass>GLACIER</StorageClass></Version>
</ListVersionsResult>"""
    entries, marker = adl.parse_list_object_versions("b", body)
    assert [(e.obj.key, e.obj.version_id, e.deleted, e.obj.size) for e in entries] == [
        ("café 1.txt", "v3", False, 3),
        ("café 1.txt", "v2", True, 0),
        ("café 1.txt", "null", False, 4),
    ]
    assert entries[0].obj.last_modified == epoch("03:00") + 0.25
    assert entries[2].obj.storage_class == "GLACIER" and entries[0].obj.etag == "aa"
    assert marker == ("café 2.txt", "v9")


# -- SeaweedFS -----------------------------------------------------------------------------------------------


@pytest.mark.seaweedfs
def test_seaweedfs_versioned_bucket_as_of(seaweed, tmp_path: Path) -> None:
    """SeaweedFS 4.48 keeps versions and delete markers, dated to the second: a batch of writes, a moment
    after it, a second's wait (dates cannot be set there), and a batch of later changes the moment must not see.
    """
    import time
    import uuid

    bucket = f"as-of-{uuid.uuid4().hex[:10]}"
    client = seaweed.client
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=bucket, Key="keep.txt", Body=b"keep-1")
    client.put_object(Bucket=bucket, Key="late-delete.txt", Body=b"late")
    client.put_object(Bucket=bucket, Key="dead.txt", Body=b"dead")
    client.delete_object(Bucket=bucket, Key="dead.txt")  # most likely in the same second: a tie IsLatest breaks
    listed = client.list_object_versions(Bucket=bucket)
    moment = max(e["LastModified"] for e in listed["Versions"] + listed["DeleteMarkers"])
    time.sleep(1.1)  # the later batch is dated at least a second after the moment
    client.put_object(Bucket=bucket, Key="keep.txt", Body=b"keep-2")
    client.delete_object(Bucket=bucket, Key="late-delete.txt")
    client.put_object(Bucket=bucket, Key="new.txt", Body=b"new")
    for engine in ("http", "boto3"):
        out = tmp_path / engine
        summary = AWSDataDownloader(
            {"buckets": [bucket], "download_dir": str(out), "endpoint_url": seaweed.endpoint, "engine": engine},
            as_of=moment.isoformat(),
            manifest=str(tmp_path / f"{engine}.jsonl"),
        ).run_full_download()
        assert files_under(out / bucket) == {"keep.txt": b"keep-1", "late-delete.txt": b"late"}, engine
        assert summary.filtered == {"deleted at --as-of": 1, "created after --as-of": 1}, engine
        records = [json.loads(line) for line in (tmp_path / f"{engine}.jsonl").read_text().splitlines()]
        assert all(r["version_id"] and r["version_id"] != "null" for r in records), records


@pytest.mark.seaweedfs
def test_seaweedfs_bucket_without_versioning_is_refused(seaweed, run_cli, tmp_path: Path) -> None:
    import uuid

    bucket = f"plain-{uuid.uuid4().hex[:10]}"
    seaweed.make_bucket(bucket)
    seaweed.put(bucket, "a.txt", b"a")
    code, _out, err = run_cli(
        "--buckets", bucket, "--download-dir", str(tmp_path), "--endpoint-url", seaweed.endpoint, "--as-of", AS_OF
    )  # fmt: skip
    assert code == adl.EXIT_USAGE
    assert f"Error: bucket '{bucket}' is not versioned, so --as-of has no past to read" in err
