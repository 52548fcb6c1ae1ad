"""S3 Inventory as the listing source (--inventory): manifest.json and its data files, laid out in a real bucket as
the S3 user guide documents them, read instead of ListObjectsV2."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import urllib.parse
from pathlib import Path

import pytest
from conftest import S3Server, write_config

import aws_data_downloader as adl

CURRENT_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass, IsMultipartUploaded"
VERSIONED_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"


def iso(when) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def inventory_rows(server: S3Server, bucket: str, versioned: bool) -> list[list[str]]:
    """The bucket as an inventory lists it now: every version and delete marker when ``versioned``."""
    client = server.client
    if not versioned:
        listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return [
            [bucket, o["Key"], str(o["Size"]), iso(o["LastModified"]), o["ETag"].strip('"'), "STANDARD", "FALSE"]
            for o in listing
        ]
    answer = client.list_object_versions(Bucket=bucket)
    rows = [
        [bucket, v["Key"], v["VersionId"], str(v["IsLatest"]).lower(), "false", str(v["Size"]),
         iso(v["LastModified"]), v["ETag"].strip('"'), "STANDARD"]
        for v in answer.get("Versions", [])
    ]  # fmt: skip
    rows += [
        [bucket, m["Key"], m["VersionId"], str(m["IsLatest"]).lower(), "true", "", iso(m["LastModified"]), "", ""]
        for m in answer.get("DeleteMarkers", [])
    ]
    return rows


def csv_gzip(rows: list[list[str]]) -> bytes:
    """A data file as S3 writes one: no header, every field quoted, keys URL-encoded."""
    lines = []
    for row in rows:
        row = [row[0], urllib.parse.quote(row[1], safe="/"), *row[2:]]
        lines.append(",".join('"' + field.replace('"', '""') + '"' for field in row))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def publish(
    server: S3Server,
    source: str,
    rows: list[list[str]],
    *,
    schema: str = CURRENT_SCHEMA,
    destination: str = "inventories",
    files: int = 1,
    bodies: list[bytes] | None = None,
    file_format: str = "CSV",
    suffix: str = ".csv.gz",
    spoil_md5: bool = False,
    checksum: str | None = None,
) -> str:
    """Write manifest.json, manifest.checksum and the data files into ``destination``; returns the manifest URL."""
    try:
        server.make_bucket(destination)
    except (server.client.exceptions.BucketAlreadyOwnedByYou, server.client.exceptions.BucketAlreadyExists):
        pass  # several tests publish into one destination bucket
    base = f"reports/{source}/daily"
    if bodies is None:
        bodies = [csv_gzip(rows[index::files]) for index in range(files)]
    entries = []
    for number, body in enumerate(bodies):
        key = f"{base}/data/part-{number}{suffix}"
        server.put(destination, key, body)
        md5 = hashlib.md5(body).hexdigest()
        entries.append({"key": key, "size": len(body), "MD5checksum": "0" * 32 if spoil_md5 else md5})
    manifest = {
        "sourceBucket": source,
        "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30",
        "creationTimestamp": "1764547200000",
        "fileFormat": file_format,
        "fileSchema": schema,
        "files": entries,
    }
    text = json.dumps(manifest).encode()
    folder = f"{base}/2026-12-01T00-00Z"
    server.put(destination, f"{folder}/manifest.json", text)
    server.put(destination, f"{folder}/manifest.checksum", (checksum or hashlib.md5(text).hexdigest()).encode())
    return f"s3://{destination}/{folder}/manifest.json"


def run_json(run_cli, server: S3Server, tmp_path: Path, *argv: str) -> tuple[int, dict, str]:
    code, out, err = run_cli("--download-dir", str(tmp_path / "data"), *server.args(), "--json", *argv)
    assert out.strip(), err
    return code, json.loads(out), err


def on_disk(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the manifest and the rows, without a server ------------------------------------------------------------


def test_csv_rows_become_objects_with_decoded_keys_and_versions_and_leave_out_markers_and_old_versions() -> None:
    manifest = adl.parse_inventory_manifest(
        json.dumps({
            "sourceBucket": "src", "destinationBucket": "arn:aws:s3:::dst", "fileFormat": "CSV",
            "fileSchema": VERSIONED_SCHEMA, "files": [{"key": "d/1.csv.gz", "size": 1, "MD5checksum": "AB"}],
        }).encode(),
        "s3://dst/m/manifest.json",
    )  # fmt: skip
    assert (manifest.source_bucket, manifest.destination_bucket, manifest.file_format) == ("src", "dst", "CSV")
    assert manifest.files == (adl.InventoryFile("d/1.csv.gz", 1, "ab"),)
    text = "".join(  # as S3 writes them: every field quoted; a space may come as '+' or '%20', a '+' as '%2B'
        line + "\n"
        for line in (
            '"src","dir/with+space/%C3%BC%20x%2By.txt","v2","true","false","5","2026-11-30T10:00:00.000Z","e2",""',
            '"src","dir/with+space/%C3%BC%20x%2By.txt","v1","false","false","4","2026-11-29T10:00:00.000Z","e1",""',
            '"src","gone.txt","v9","true","true","","2026-11-30T10:00:00.000Z","",""',
            '"src","folder/","null","true","false","0","2026-11-30T10:00:00.000Z","d41d","STANDARD"',
            '"src","plain.txt","null","true","false","7","2026-11-30T10:00:00.000Z","e3","GLACIER"',
        )
    )
    left_out: adl.Counter[str] = adl.Counter()
    objects = list(adl.inventory_objects_csv(io.StringIO(text), manifest, left_out))
    assert [(o.bucket, o.key, o.size, o.etag, o.version_id, o.storage_class) for o in objects] == [
        ("src", "dir/with space/ü x+y.txt", 5, "e2", "v2", "STANDARD"),
        ("src", "plain.txt", 7, "e3", None, "GLACIER"),
    ]
    assert objects[0].last_modified == adl.parse_s3_timestamp("2026-11-30T10:00:00Z")
    assert left_out == {"delete marker": 1, "noncurrent version": 1}


def test_each_row_keeps_its_own_date_when_rows_share_dates_and_when_they_do_not() -> None:
    """Consecutive rows with the same date reuse its parse: every row must still get its own date, an empty one
    included (0, as before)."""
    manifest = adl.parse_inventory_manifest(
        json.dumps({
            "sourceBucket": "src", "destinationBucket": "dst", "fileFormat": "CSV", "fileSchema": CURRENT_SCHEMA,
            "files": [],
        }).encode(),
        "s3://dst/manifest.json",
    )  # fmt: skip
    assert manifest.fields[:5] == ("bucket", "key", "size", "lastmodifieddate", "etag")
    dates = ["2026-11-30T10:00:00.000Z", "2026-11-30T10:00:00.000Z", "2026-11-30T10:00:01.000Z", "", "",
             "2026-11-30T10:00:00.000Z", "2025-01-02T03:04:05.000Z"]  # fmt: skip
    text = "".join(f'"src","k{n}","1","{date}","e{n}","STANDARD","FALSE"\n' for n, date in enumerate(dates))
    objects = list(adl.inventory_objects_csv(io.StringIO(text), manifest, adl.Counter()))
    assert [o.key for o in objects] == [f"k{n}" for n in range(len(dates))]
    assert [o.last_modified for o in objects] == [adl.parse_s3_timestamp(d) if d else 0.0 for d in dates]
    assert objects[2].last_modified - objects[1].last_modified == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fileFormat": "ORC"}, "ORC inventories are not supported; configure the inventory as CSV or Parquet"),
        ({"fileFormat": "JSON"}, "unknown fileFormat 'JSON'"),
        ({"fileSchema": "Bucket, Key, Size"}, "has no ETag, LastModifiedDate field; add them"),
        ({"files": None}, "not an S3 Inventory manifest.json"),
    ],
)
def test_a_manifest_this_run_cannot_use_is_one_clear_line(change: dict, message: str) -> None:
    data = {"sourceBucket": "s", "destinationBucket": "d", "fileFormat": "CSV", "fileSchema": CURRENT_SCHEMA,
            "files": []}  # fmt: skip
    data.update(change)
    with pytest.raises(adl.ConfigError, match=r"^inventory s3://d/manifest\.json: ") as caught:
        adl.parse_inventory_manifest(json.dumps(data).encode(), "s3://d/manifest.json")
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- runs against moto --------------------------------------------------------------------------------------


def seed_bucket(server: S3Server, bucket: str) -> dict[str, bytes]:
    server.make_bucket(bucket)
    files = {
        "img/a.png": b"A" * 3000,
        "img/dir with space/ü b+c.png": b"unicode and spaces",
        "ann/labels.json": b'{"labels": 2}',
        "empty.txt": b"",
    }
    for key, body in files.items():
        server.put(bucket, key, body)
    return files


def test_an_inventory_run_downloads_what_the_inventory_lists_not_what_a_listing_would(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    files = seed_bucket(s3, "inv-src")
    files["big.bin"] = bytes(range(256)) * (6 * 4096)  # 6 MiB in two parts: fetched by parts, ETag '-2'
    s3.put_multipart("inv-src", "big.bin", files["big.bin"])
    s3.put("inv-src", "ann/folder/", b"")  # a console folder: no file
    url = publish(s3, "inv-src", inventory_rows(s3, "inv-src", versioned=False), files=2)
    s3.put("inv-src", "img/added-later.png", b"after the inventory")  # a listing would fetch it

    code, summary, err = run_json(run_cli, s3, tmp_path, "--inventory", url)
    assert code == adl.EXIT_OK, err
    assert on_disk(tmp_path / "data" / "inv-src") == files
    assert not (tmp_path / "data" / "inventories").exists()  # the report itself is not part of the dataset
    assert summary["downloaded"] == len(files) and summary["buckets"] == ["inv-src"]
    assert summary["inventory"] == url
    assert (summary["changed_since_inventory"], summary["missing_since_inventory"]) == (0, 0)

    code, summary, err = run_json(run_cli, s3, tmp_path, "--inventory", url)  # resume: nothing fetched again
    assert code == adl.EXIT_OK, err
    assert (summary["downloaded"], summary["skipped"]) == (0, len(files))


def test_a_versioned_inventory_fetches_each_latest_version_it_lists_by_version_id(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    s3.make_bucket("inv-ver")
    s3.client.put_bucket_versioning(Bucket="inv-ver", VersioningConfiguration={"Status": "Enabled"})
    s3.put("inv-ver", "a.txt", b"a, first version")
    s3.put("inv-ver", "a.txt", b"a, second version")
    s3.put("inv-ver", "deleted.txt", b"deleted before the inventory")
    s3.client.delete_object(Bucket="inv-ver", Key="deleted.txt")  # its latest row is a delete marker
    s3.put("inv-ver", "kept.txt", b"kept, as the inventory saw it")
    rows = inventory_rows(s3, "inv-ver", versioned=True)
    assert len(rows) == 5
    url = publish(s3, "inv-ver", rows, schema=VERSIONED_SCHEMA)
    s3.put("inv-ver", "kept.txt", b"kept, replaced after the inventory")
    manifest = tmp_path / "run.jsonl"

    code, summary, err = run_json(run_cli, s3, tmp_path, "--inventory", url, "--manifest", str(manifest))
    assert code == adl.EXIT_OK, err
    assert on_disk(tmp_path / "data" / "inv-ver") == {
        "a.txt": b"a, second version",
        "kept.txt": b"kept, as the inventory saw it",  # the inventory's version: a snapshot stays a snapshot
    }
    assert summary["filtered_out_by_rule"] == {"delete marker": 1, "noncurrent version": 2}
    latest = {row[1]: row[2] for row in rows if row[3] == "true" and row[4] == "false"}
    recorded = {json.loads(line)["key"]: json.loads(line)["version_id"] for line in manifest.read_text().splitlines()}
    assert recorded == latest


@pytest.mark.parametrize("small_object_kb", [256, 0], ids=["event-loop", "threads"])
def test_objects_changed_or_gone_since_the_inventory_are_reported_and_changed_ones_fetched_only_when_asked(
    s3: S3Server, tmp_path: Path, run_cli, small_object_kb: int
) -> None:
    files = seed_bucket(s3, "inv-chg")
    url = publish(s3, "inv-chg", inventory_rows(s3, "inv-chg", versioned=False))
    s3.put("inv-chg", "img/a.png", b"replaced after the inventory")
    s3.client.delete_object(Bucket="inv-chg", Key="ann/labels.json")
    config = write_config(tmp_path, {"small_object_kb": small_object_kb})
    root = tmp_path / "data" / "inv-chg"

    code, summary, err = run_json(run_cli, s3, tmp_path, "--inventory", url, "--config", config)
    assert code == adl.EXIT_FAILED, err
    assert (summary["changed_since_inventory"], summary["changed_since_inventory_fetched"]) == (1, 0)
    assert summary["missing_since_inventory"] == 1
    assert summary["failures_by_reason"] == {"changed since the inventory": 1, "missing since the inventory": 1}
    assert {f["key"]: f["reason"] for f in summary["failures"]} == {
        "img/a.png": "changed since the inventory",
        "ann/labels.json": "missing since the inventory",
    }
    assert not (root / "img" / "a.png").exists()  # never silently mixed in
    assert (root / "empty.txt").exists() and (root / "img/dir with space/ü b+c.png").read_bytes() == files[
        "img/dir with space/ü b+c.png"
    ]

    code, out, err = run_cli("--download-dir", str(tmp_path / "data"), *s3.args(), "--inventory", url,
                             "--config", config, "--inventory-fetch-changed")  # fmt: skip
    assert code == adl.EXIT_FAILED, err  # the missing object is still missing
    assert (root / "img" / "a.png").read_bytes() == b"replaced after the inventory"
    assert "Changed since the inventory: 1 (1 fetched as they are now)" in out
    assert "Missing since the inventory: 1" in out


def test_changed_objects_fetched_as_asked_leave_a_run_that_succeeds(s3: S3Server, tmp_path: Path) -> None:
    seed_bucket(s3, "inv-chg2")
    url = publish(s3, "inv-chg2", inventory_rows(s3, "inv-chg2", versioned=False))
    s3.put("inv-chg2", "img/a.png", b"new bytes")
    downloader = adl.AWSDataDownloader(
        {"inventory": url, "inventory_fetch_changed": True, "download_dir": str(tmp_path / "d")},
        endpoint_url=s3.endpoint,
    )
    summary = downloader.run_full_download()
    assert summary.exit_code == adl.EXIT_OK and summary.ok
    assert (summary.changed_since_inventory, summary.changed_fetched, summary.downloaded) == (1, 1, 4)
    assert (tmp_path / "d" / "inv-chg2" / "img" / "a.png").read_bytes() == b"new bytes"


def test_prefixes_filters_and_shards_apply_to_inventory_rows(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("inv-flt")
    keys = [f"{top}/{n:02d}.{ext}" for top in ("train", "test") for n in range(8) for ext in ("png", "txt")]
    for key in keys:
        s3.put("inv-flt", key, key.encode())
    url = publish(s3, "inv-flt", inventory_rows(s3, "inv-flt", versioned=False), files=3)

    code, summary, err = run_json(
        run_cli, s3, tmp_path, "--inventory", url, "--prefixes", "train/", "nowhere/", "--extensions", "png",
        "--shard", "1/2",
    )  # fmt: skip
    train = [key for key in keys if key.startswith("train/")]  # the other prefix is not "listed" at all
    in_shard = [key for key in train if adl.shard_of("inv-flt", key, 2) == 1]
    expected = {key for key in in_shard if key.endswith(".png")}
    assert 0 < len(expected) < 8
    assert set(on_disk(tmp_path / "data" / "inv-flt")) == expected
    assert summary["filtered_out_by_rule"] == {  # the shard is decided first, then the extension
        "shard": len(train) - len(in_shard),
        "extension": len(in_shard) - len(expected),
    }
    assert summary["nothing_under"] == ["s3://inv-flt/nowhere/"]
    assert code == adl.EXIT_NOTHING_LISTED, err


def test_a_dry_run_plans_every_page_of_a_large_inventory_and_writes_nothing(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    s3.make_bucket("inv-dry")
    rows = [["inv-dry", f"shard-{n % 7}/{n:05d}.bin", "10", "2026-11-30T10:00:00.000Z", "e" * 32, "STANDARD", "FALSE"]
            for n in range(2500)]  # fmt: skip
    url = publish(s3, "inv-dry", rows, files=3)
    code, summary, err = run_json(run_cli, s3, tmp_path, "--inventory", url, "--dry-run", "--prefixes", "shard-3/")
    assert code == adl.EXIT_OK, err
    expected = sum(1 for n in range(2500) if n % 7 == 3)
    assert (summary["total_files"], summary["would_download"], summary["would_download_bytes"]) == (
        expected,
        expected,
        10 * expected,
    )
    assert not (tmp_path / "data").exists()


def test_a_data_file_whose_md5_does_not_match_the_manifest_stops_the_run_before_its_rows_are_used(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    seed_bucket(s3, "inv-md5")
    url = publish(s3, "inv-md5", inventory_rows(s3, "inv-md5", versioned=False), spoil_md5=True)
    code, _out, err = run_cli("--download-dir", str(tmp_path / "data"), *s3.args(), "--inventory", url)
    assert code == adl.EXIT_USAGE
    line = err.strip().splitlines()[-1]
    assert "data file s3://inventories/reports/inv-md5/daily/data/part-0.csv.gz has MD5 " in line
    assert "the manifest says 00000000000000000000000000000000" in line and "none of that file's rows" in line
    assert not (tmp_path / "data" / "inv-md5").exists()


def test_a_manifest_that_does_not_match_its_checksum_is_refused(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed_bucket(s3, "inv-sum")
    url = publish(s3, "inv-sum", inventory_rows(s3, "inv-sum", versioned=False), checksum="1" * 32)
    code, _out, err = run_cli("--download-dir", str(tmp_path / "data"), *s3.args(), "--inventory", url)
    assert code == adl.EXIT_USAGE
    assert "manifest.json does not match manifest.checksum" in err and "expected 111111" in err


def test_the_inventory_is_read_from_another_bucket_than_the_one_it_lists_and_must_agree_with_buckets(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    files = seed_bucket(s3, "inv-src2")
    url = publish(s3, "inv-src2", inventory_rows(s3, "inv-src2", versioned=False), destination="inv-reports")
    code, _out, err = run_cli("--download-dir", str(tmp_path / "data"), *s3.args(), "--inventory", url,
                             "--buckets", "other-bucket")  # fmt: skip
    assert code == adl.EXIT_USAGE
    assert "lists bucket 'inv-src2' only, and the buckets given name 'other-bucket'; drop --buckets" in err
    code, _out, err = run_cli("--download-dir", str(tmp_path / "data"), *s3.args(), "--inventory", url,
                             "--buckets", "inv-src2", "inv-src")  # fmt: skip
    assert code == adl.EXIT_USAGE and "name 'inv-src'; drop --buckets or name just that bucket" in err
    code, _out, err = run_cli("--download-dir", str(tmp_path / "data"), *s3.args(), "--inventory", url,
                             "--buckets", "inv-src2")  # fmt: skip
    assert code == adl.EXIT_OK, err
    assert on_disk(tmp_path / "data" / "inv-src2") == files


def test_bad_inventory_urls_and_missing_manifests_are_usage_errors_in_the_users_words(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    code, _out, err = run_cli("--inventory", "inventories/manifest.json", *s3.args())
    assert code == adl.EXIT_USAGE
    assert "--inventory must be the s3:// URL of an inventory's manifest.json" in err
    config = write_config(tmp_path, {"inventory": "s3://bucket-only/"})
    code, _out, err = run_cli("--config", config, *s3.args())
    assert code == adl.EXIT_USAGE and f"inventory in {config} must be the s3:// URL" in err

    s3.make_bucket("inv-empty")
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory",
                             "s3://inv-empty/x/manifest.json")  # fmt: skip
    assert code == adl.EXIT_USAGE
    assert "inventory s3://inv-empty/x/manifest.json: no such object (check the manifest's URL)" in err
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory",
                             "s3://no-such-inv-bucket/manifest.json")  # fmt: skip
    assert code == adl.EXIT_NOTHING_LISTED and "bucket 'no-such-inv-bucket' does not exist" in err

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory",
                             "s3://inv-empty/x/manifest.json", "--from-manifest", str(manifest))  # fmt: skip
    assert code == adl.EXIT_USAGE and "--from-manifest and --inventory" in err
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory",
                             "s3://inv-empty/x/manifest.json", "--as-of", "2026-01-01T00:00:00Z")  # fmt: skip
    assert code == adl.EXIT_USAGE and "--as-of and --inventory both say which versions" in err


def test_an_orc_inventory_is_refused_in_one_line(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("inv-orc")
    url = publish(s3, "inv-orc", [], bodies=[b"ORC"], file_format="ORC", suffix=".orc")
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory", url)
    assert code == adl.EXIT_USAGE
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("ORC inventories are not supported; configure the inventory as CSV or Parquet")
    )


PARQUET_SCHEMA = (
    "message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
    "optional binary version_id (STRING); optional boolean is_latest; optional boolean is_delete_marker; "
    "optional int64 size; optional int64 last_modified_date (TIMESTAMP(MILLIS,true)); optional binary e_tag "
    "(STRING); optional binary storage_class (STRING);}"
)


def parquet_file(rows: list[list[str]]) -> bytes:
    """A Parquet data file with the inventory's snake_case columns; keys as they are (no URL-encoding)."""
    import datetime

    import pyarrow
    import pyarrow.parquet

    def when(text: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))

    columns = {
        "bucket": [r[0] for r in rows],
        "key": [r[1] for r in rows],
        "version_id": [r[2] for r in rows],
        "is_latest": [r[3] == "true" for r in rows],
        "is_delete_marker": [r[4] == "true" for r in rows],
        "size": [int(r[5]) if r[5] else None for r in rows],
        "last_modified_date": [when(r[6]) for r in rows],
        "e_tag": [r[7] or None for r in rows],
        "storage_class": [r[8] or None for r in rows],
    }
    table = pyarrow.table(columns).cast(
        pyarrow.schema([(name, pyarrow.timestamp("ms", tz="UTC") if name == "last_modified_date" else
                         pyarrow.table(columns).schema.field(name).type) for name in columns])
    )  # fmt: skip
    sink = io.BytesIO()
    pyarrow.parquet.write_table(table, sink)
    return sink.getvalue()


def test_a_parquet_inventory_is_read_with_pyarrow(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("inv-pq")
    s3.client.put_bucket_versioning(Bucket="inv-pq", VersioningConfiguration={"Status": "Enabled"})
    s3.put("inv-pq", "dir with space/ü.txt", b"old")
    s3.put("inv-pq", "dir with space/ü.txt", b"new")
    s3.put("inv-pq", "gone.txt", b"x")
    s3.client.delete_object(Bucket="inv-pq", Key="gone.txt")
    rows = inventory_rows(s3, "inv-pq", versioned=True)
    url = publish(s3, "inv-pq", rows, bodies=[parquet_file(rows)], file_format="Parquet", schema=PARQUET_SCHEMA,
                  suffix=".parquet")  # fmt: skip
    code, summary, err = run_json(run_cli, s3, tmp_path, "--inventory", url)
    assert code == adl.EXIT_OK, err
    assert on_disk(tmp_path / "data" / "inv-pq") == {"dir with space/ü.txt": b"new"}
    assert summary["filtered_out_by_rule"] == {"delete marker": 1, "noncurrent version": 2}
    mtime = (tmp_path / "data" / "inv-pq" / "dir with space" / "ü.txt").stat().st_mtime
    latest = next(r for r in rows if r[3] == "true" and r[4] == "false")
    assert mtime == adl.parse_s3_timestamp(latest[6])


def test_a_parquet_inventory_without_pyarrow_names_it(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.make_bucket("inv-nopq")
    url = publish(s3, "inv-nopq", [], bodies=[b"PAR1"], file_format="Parquet", schema=PARQUET_SCHEMA,
                  suffix=".parquet")  # fmt: skip
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory", url)
    assert code == adl.EXIT_USAGE
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            f"inventory {url} is in Parquet, which needs pyarrow: pip install pyarrow (or configure the inventory as CSV)"
        )
    )


def test_an_inventory_run_against_seaweedfs(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed_bucket(seaweed, "inv-weed")
    url = publish(seaweed, "inv-weed", inventory_rows(seaweed, "inv-weed", versioned=False),
                  destination="inv-weed-reports", files=2)  # fmt: skip
    seaweed.put("inv-weed", "img/a.png", b"changed after the inventory")
    code, summary, err = run_json(run_cli, seaweed, tmp_path, "--inventory", url)
    assert code == adl.EXIT_FAILED, err
    expected = {key: body for key, body in files.items() if key != "img/a.png"}
    assert on_disk(tmp_path / "data" / "inv-weed") == expected
    assert summary["failures_by_reason"] == {"changed since the inventory": 1}


def test_the_summary_says_what_differs_from_the_inventory_only_for_an_inventory_run() -> None:
    failures = (
        adl.FailedObject("b", "x.png", adl.CHANGED_SINCE_INVENTORY),
        adl.FailedObject("b", "y.png", adl.MISSING_SINCE_INVENTORY),
    )
    summary = adl.DownloadSummary(
        3, 1, 0, 2, 30, 10, 1.0, failures, inventory="s3://r/manifest.json", changed_since_inventory=1,
        missing_since_inventory=1,
    )  # fmt: skip
    text = summary.format()
    assert "Inventory: s3://r/manifest.json" in text
    assert (
        "Changed since the inventory: 1 (not fetched; --inventory-fetch-changed fetches them as they are now)" in text
    )
    assert "Missing since the inventory: 1" in text
    assert "  changed since the inventory (1): b/x.png" in text and summary.exit_code == adl.EXIT_FAILED
    plain = adl.DownloadSummary(3, 3, 0, 0, 30, 30, 1.0)
    assert "nventory" not in plain.format() and "inventory" not in plain.to_dict()


def test_s3_urls_keep_every_character_of_the_key() -> None:
    assert adl.parse_s3_url("s3://reports/a b/#1?x/manifest.json") == ("reports", "a b/#1?x/manifest.json")
    for bad in ("reports/manifest.json", "s3://reports", "s3://reports/", "s3:///manifest.json", "s3://r/dir/"):
        assert adl.parse_s3_url(bad) is None, bad


@pytest.mark.parametrize(
    ("body", "file_format", "schema", "suffix", "what"),
    [
        (b"not gzip at all", "CSV", CURRENT_SCHEMA, ".csv.gz", "gzip CSV"),
        (gzip.compress(b'"inv-bad","short"\n'), "CSV", CURRENT_SCHEMA, ".csv.gz", "gzip CSV"),
        (b"PAR1 but not parquet", "Parquet", PARQUET_SCHEMA, ".parquet", "Parquet"),
    ],
    ids=["not-gzip", "too-few-columns", "not-parquet"],
)
def test_a_data_file_that_cannot_be_parsed_is_one_line_naming_it(
    s3: S3Server, tmp_path: Path, run_cli, body: bytes, file_format: str, schema: str, suffix: str, what: str
) -> None:
    s3.make_bucket("inv-bad")
    url = publish(s3, "inv-bad", [], bodies=[body], file_format=file_format, schema=schema, suffix=suffix)
    code, _out, err = run_cli("--download-dir", str(tmp_path / "d"), *s3.args(), "--inventory", url)
    assert code == adl.EXIT_USAGE
    line = err.strip().splitlines()[-1]
    assert f"data file reports/inv-bad/daily/data/part-0{suffix} cannot be read as {what} with the manifest" in line


def test_an_inventory_run_needs_only_object_reads_and_retries_a_data_file_cut_midway(
    s3: S3Server, proxy, tmp_path: Path, run_cli
) -> None:
    files = seed_bucket(s3, "inv-getonly")
    rows = inventory_rows(s3, "inv-getonly", versioned=False)
    assert len(csv_gzip(rows)) > 100
    url = publish(s3, "inv-getonly", rows)
    bucket_level = proxy.error(status=403, method=None, where=lambda request: request.path.strip("/").count("/") == 0)
    proxy.reset(key="/data/part-0.csv.gz", after=60, times=1)  # the first GET of the data file dies after 60 B

    code, _out, err = run_cli("--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url,
                              "--inventory", url)  # fmt: skip
    assert code == adl.EXIT_OK, err
    assert on_disk(tmp_path / "data" / "inv-getonly") == files
    assert bucket_level.hits >= 2  # HEAD and listing of both buckets were refused, and did not matter
    assert proxy.count("GET", key="/data/part-0.csv.gz") == 2


def test_a_versioned_inventory_against_seaweedfs(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    seaweed.make_bucket("inv-weed-ver")
    seaweed.client.put_bucket_versioning(Bucket="inv-weed-ver", VersioningConfiguration={"Status": "Enabled"})
    seaweed.put("inv-weed-ver", "a b/ü.txt", b"first")
    seaweed.put("inv-weed-ver", "a b/ü.txt", b"second")
    seaweed.put("inv-weed-ver", "deleted.txt", b"gone")
    seaweed.client.delete_object(Bucket="inv-weed-ver", Key="deleted.txt")
    rows = inventory_rows(seaweed, "inv-weed-ver", versioned=True)
    url = publish(seaweed, "inv-weed-ver", rows, schema=VERSIONED_SCHEMA, destination="inv-weed-reports")
    seaweed.put("inv-weed-ver", "a b/ü.txt", b"third, after the inventory")
    code, summary, err = run_json(run_cli, seaweed, tmp_path, "--inventory", url)
    assert code == adl.EXIT_OK, err
    assert on_disk(tmp_path / "data" / "inv-weed-ver") == {"a b/ü.txt": b"second"}  # the inventory's version
    assert summary["filtered_out_by_rule"] == {"delete marker": 1, "noncurrent version": 2}
