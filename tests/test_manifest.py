"""Manifest: --manifest records what a run selected; --from-manifest fetches exactly those bytes elsewhere."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path

import pytest
from conftest import MiB, S3Server, multipart_etag_of

import aws_data_downloader as adl


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_key(records: list[dict]) -> dict[str, dict]:
    return {record["key"]: record for record in records}


def seed(server: S3Server, bucket: str, versioned: bool = False) -> dict[str, bytes]:
    rng = random.Random(bucket)
    server.make_bucket(bucket)
    if versioned:
        server.client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    files = {
        "img/a.png": rng.randbytes(20_000),
        "img/b.png": rng.randbytes(30_000),
        "ann/labels.json": b'{"labels": 2}',
        "empty.txt": b"",
    }
    for key, body in files.items():
        server.put(bucket, key, body)
    files["big.bin"] = rng.randbytes(11 * MiB)
    server.put_multipart(bucket, "big.bin", files["big.bin"], part_size=5 * MiB)
    return files


def test_manifest_has_one_line_per_selected_object(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3, "mfst")
    s3.put("mfst", "notes/skip-me.tmp", b"filtered out")
    s3.put("mfst", "bad//key.png", b"unsafe")
    manifest = tmp_path / "run1.jsonl"
    code, out, err = run_cli(
        "--buckets",
        "mfst",
        "--download-dir",
        "d",
        "--exclude",
        "*.tmp",
        "--manifest",
        str(manifest),
        "--json",
        *s3.args(),
    )
    assert code == adl.EXIT_FAILED, (out, err)  # the unsafe key fails; everything else is on disk
    assert json.loads(out)["manifest"] == str(manifest)
    records = by_key(read_lines(manifest))
    assert set(records) == {*files, "bad//key.png"}  # filtered-out objects are not in the selection
    for key, body in files.items():
        record = records[key]
        assert set(record) >= {"bucket", "key", "version_id", "etag", "size", "checksum", "path", "status", "reason"}
        assert record["bucket"] == "mfst" and record["size"] == len(body)
        assert record["status"] == "downloaded" and record["reason"] is None
        assert Path(record["path"]).read_bytes() == body
        assert Path(record["path"]) == (tmp_path / "d" / "mfst" / key).absolute()
    assert records["img/a.png"]["etag"] == hashlib.md5(files["img/a.png"]).hexdigest()
    # Uploaded without an additional checksum: the single-part ETag (the body's MD5) verifies it.
    assert records["img/a.png"]["checksum"] == {
        "algorithm": "md5",
        "value": hashlib.md5(files["img/a.png"]).hexdigest(),
    }
    assert records["big.bin"]["etag"] == multipart_etag_of(files["big.bin"], 5 * MiB)
    assert records["big.bin"]["checksum"] == {"algorithm": "md5-multipart", "value": records["big.bin"]["etag"]}
    failed = records["bad//key.png"]
    assert failed["status"] == "failed" and failed["reason"].startswith("unsafe key") and failed["path"] is None

    # A second run records the skips, with the reason, and keeps the verified checksum from the journal.
    code, out, err = run_cli(
        "--buckets", "mfst", "--download-dir", "d", "--exclude", "*.tmp", "--manifest", str(manifest), *s3.args()
    )
    assert code == adl.EXIT_FAILED, (out, err)  # the unsafe key fails again
    records = by_key(read_lines(manifest))
    assert {records[key]["status"] for key in files} == {"skipped"}
    assert {records[key]["reason"] for key in files} == {"already downloaded"}
    assert records["big.bin"]["checksum"]["algorithm"] == "md5-multipart"


def test_from_manifest_rebuilds_exactly_the_recorded_objects(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3, "rebuild")
    manifest = tmp_path / "train-v1.jsonl"
    code, out, err = run_cli(
        "--buckets", "rebuild", "--download-dir", "machine-a", "--manifest", str(manifest), *s3.args()
    )
    assert code == 0, (out, err)
    s3.put("rebuild", "img/new-after-manifest.png", b"not part of the training set")

    code, out, err = run_cli("--from-manifest", str(manifest), "--download-dir", "machine-b", "--json", *s3.args())
    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["downloaded"] == len(files) and summary["failed"] == 0
    on_disk = {
        str(path.relative_to(tmp_path / "machine-b" / "rebuild")): path.read_bytes()
        for path in (tmp_path / "machine-b" / "rebuild").rglob("*")
        if path.is_file()
    }
    assert on_disk == files


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_from_manifest_fetches_the_recorded_versions_after_an_overwrite(
    s3: S3Server, tmp_path: Path, run_cli, engine: str
) -> None:
    (tmp_path / "aws_downloader_config.yaml").write_text(f"engine: {engine}\n")  # both GET engines pin versions
    files = seed(s3, "versioned", versioned=True)
    manifest = tmp_path / "m.jsonl"
    code, out, err = run_cli("--buckets", "versioned", "--download-dir", "a", "--manifest", str(manifest), *s3.args())
    assert code == 0, (out, err)
    records = by_key(read_lines(manifest))
    assert all(records[key]["version_id"] for key in files), records  # a versioned bucket's GETs name the version
    code, out, err = run_cli("--buckets", "versioned", "--download-dir", "a", "--manifest", "again.jsonl", *s3.args())
    assert code == 0, (out, err)
    again = by_key(read_lines(tmp_path / "again.jsonl"))  # skipped objects keep the version the journal recorded
    assert {key: r["version_id"] for key, r in again.items()} == {key: records[key]["version_id"] for key in files}
    assert {r["status"] for r in again.values()} == {"skipped"}

    s3.put("versioned", "img/a.png", b"overwritten after training")
    s3.put_multipart("versioned", "big.bin", random.randbytes(6 * MiB), part_size=5 * MiB)
    s3.client.delete_object(Bucket="versioned", Key="ann/labels.json")  # a delete marker hides it from listings

    code, out, err = run_cli("--from-manifest", str(manifest), "--download-dir", "b", "--json", *s3.args())
    assert code == 0, (out, err)
    assert json.loads(out)["downloaded"] == len(files)
    for key, body in files.items():
        assert (tmp_path / "b" / "versioned" / key).read_bytes() == body, key


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_from_manifest_fails_an_object_whose_etag_changed(s3: S3Server, tmp_path: Path, run_cli, engine: str) -> None:
    (tmp_path / "aws_downloader_config.yaml").write_text(f"engine: {engine}\n")
    files = seed(s3, "unversioned")
    manifest = tmp_path / "m.jsonl"
    code, out, err = run_cli("--buckets", "unversioned", "--download-dir", "a", "--manifest", str(manifest), *s3.args())
    assert code == 0, (out, err)
    assert all(record["version_id"] is None for record in read_lines(manifest))
    s3.put("unversioned", "img/b.png", b"different bytes now")
    # Same size and part count, other bytes: only the ETag tells them apart. (moto answers a HEAD for a part
    # number the new object lacks with a 500, which would test moto, not the manifest rule.)
    s3.put_multipart("unversioned", "big.bin", random.randbytes(11 * MiB), part_size=5 * MiB)

    code, out, err = run_cli("--from-manifest", str(manifest), "--download-dir", "b", "--json", *s3.args())
    assert code == adl.EXIT_FAILED, (out, err)
    summary = json.loads(out)
    assert summary["failed"] == 2 and summary["downloaded"] == len(files) - 2
    assert {(f["key"], f["reason"]) for f in summary["failures"]} == {
        ("img/b.png", "etag no longer matches the manifest"),
        ("big.bin", "etag no longer matches the manifest"),
    }
    assert not (tmp_path / "b" / "unversioned" / "img/b.png").exists()  # never the new bytes
    assert not (tmp_path / "b" / "unversioned" / "big.bin").exists()
    assert (tmp_path / "b" / "unversioned" / "img/a.png").read_bytes() == files["img/a.png"]

    code, out, err = run_cli("--from-manifest", str(manifest), "--download-dir", "b", *s3.args())
    assert code == adl.EXIT_FAILED, (out, err)
    assert "etag no longer matches the manifest (2)" in out


class _ChangingEngine:
    """An engine whose object changes once between listing and the first GET (If-Match fails)."""

    def __init__(self, new_body: bytes) -> None:
        self.new_body = new_body
        self.changed = False

    def get(self, obj, request):
        if not self.changed:
            self.changed = True
            raise adl.ObjectChanged(obj.key)
        assert request.headers["if-match"] == f'"{hashlib.md5(self.new_body).hexdigest()}"'

        body = self.new_body

        class Body:
            headers: dict[str, str] = {}

            def __init__(self) -> None:
                self.offset = 0

            def read(self, amount: int) -> bytes:
                chunk = body[self.offset : self.offset + amount]
                self.offset += len(chunk)
                return chunk

            def close(self) -> None:
                pass

        return Body()

    def head(self, obj, request):
        return {
            "content-length": str(len(self.new_body)),
            "etag": f'"{hashlib.md5(self.new_body).hexdigest()}"',
            "last-modified": "Wed, 02 Dec 2026 10:00:00 GMT",
        }


@pytest.mark.parametrize("pinned", [False, True])
def test_a_changed_object_is_refetched_in_normal_runs_and_fails_in_manifest_runs(tmp_path: Path, pinned: bool) -> None:
    old, new = b"old bytes", b"new bytes, longer"
    obj = adl.S3Object("b", "k.txt", len(old), hashlib.md5(old).hexdigest(), 0.0)
    journal = adl.ResumeJournal(tmp_path / "download_resume.json")
    transfer = adl.Transfer(
        _ChangingEngine(new), adl.Config(), journal, None, threading.Event(), root=tmp_path, pinned=pinned
    )
    result = transfer.download(obj, tmp_path / "b" / "k.txt")
    if pinned:
        assert (result.status, result.reason) == ("failed", "etag no longer matches the manifest")
        assert not (tmp_path / "b" / "k.txt").exists()
    else:
        assert result.status == "downloaded"
        assert (tmp_path / "b" / "k.txt").read_bytes() == new


def test_bad_manifests_exit_2_with_one_line(s3: S3Server, tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("--from-manifest", "missing.jsonl", "--download-dir", "d", *s3.args())
    assert code == adl.EXIT_USAGE, (out, err)
    assert err.strip().splitlines()[-1].startswith("Error: cannot read manifest missing.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"bucket": "b", "key": "k", "size": 1, "etag": "e"}\n{"bucket": "b"}\n')
    code, out, err = run_cli("--from-manifest", "broken.jsonl", "--download-dir", "d", *s3.args())
    assert code == adl.EXIT_USAGE, (out, err)
    assert "Error: manifest broken.jsonl line 2 is not a manifest record" in err
