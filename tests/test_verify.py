"""Verification: every object is checked against its ETag or S3 checksum while it streams, and recorded.

The resume journal records how each object was verified: "md5:<hex>" (single-part ETag), "md5-multipart:<etag>"
(rebuilt from per-part MD5s), "<algorithm>:<base64>" (an S3 additional checksum, preferred when stored), or
"unverifiable: <why>" (SSE-KMS objects, whose ETag is no MD5 of the content). Corruption is injected by the
fault proxy (tests/faultproxy.py) flipping one byte of a response body.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import zlib
from pathlib import Path

import boto3
import pytest
from conftest import MiB, S3Server, multipart_etag_of
from faultproxy import FaultProxy, KiB

import aws_data_downloader as adl

FAST = {"retry_backoff_s": 0.01, "retry_attempts": 2, "parallel_downloads": 4, "log_file": ""}
BUCKET = "verify-data"


def download(proxy: FaultProxy, tmp_path: Path, **config: object) -> adl.DownloadSummary:
    settings = {**FAST, "buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}
    return adl.AWSDataDownloader({**settings, **config}).run_full_download()


def completed(tmp_path: Path) -> dict[str, dict]:
    """The snapshot's completed entries of BUCKET (a finished run folds the journal into the snapshot)."""
    snapshot = json.loads((tmp_path / "data" / "download_resume.json").read_text())
    assert snapshot["format"] == adl.RESUME_FORMAT
    assert not (tmp_path / "data" / "download_resume.json.journal").exists()
    return snapshot["completed"][BUCKET]


def put_parts(s3: S3Server, key: str, body: bytes, sizes: list[int]) -> str:
    """A multipart upload with the given part sizes (S3 and moto allow uneven parts of at least 5 MiB)."""
    upload = s3.client.create_multipart_upload(Bucket=BUCKET, Key=key)
    parts, start = [], 0
    for number, size in enumerate(sizes, 1):
        etag = s3.client.upload_part(
            Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body[start : start + size]
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
        start += size
    assert start == len(body)
    response = s3.client.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    return response["ETag"].strip('"')


def test_single_part_objects_are_verified_by_md5(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    rng = random.Random(1)
    s3.make_bucket(BUCKET)
    files = {"a.bin": rng.randbytes(300 * KiB), "b/c.txt": b"hello", "empty": b""}
    for key, body in files.items():
        s3.put(BUCKET, key, body)

    summary = download(proxy, tmp_path)

    assert summary.ok and summary.downloaded == 3
    entries = completed(tmp_path)
    for key, body in files.items():
        assert (tmp_path / "data" / BUCKET / key).read_bytes() == body
        md5 = hashlib.md5(body).hexdigest()
        assert entries[key] == {
            "etag": md5,
            "size": len(body),
            "checksum": f"md5:{md5}",
            "path": str(tmp_path / "data" / BUCKET / key),
        }


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([5 * MiB, 5 * MiB, 1 * MiB + 3], id="even-5MiB-parts"),
        pytest.param([6 * MiB, 5 * MiB, 1 * MiB + 7], id="uneven-parts"),
        # Count, first and last part look like equal parts: the first attempt mismatches, then exact sizes win.
        pytest.param([6 * MiB, 5 * MiB, 7 * MiB, 1 * MiB], id="uneven-middle-parts"),
    ],
)
def test_multipart_objects_are_verified_by_rebuilding_the_etag(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, sizes: list[int]
) -> None:
    body = random.Random(2).randbytes(sum(sizes))
    s3.make_bucket(BUCKET)
    if len(set(sizes[:-1])) == 1:
        etag = s3.put_multipart(BUCKET, "mp.bin", body, part_size=sizes[0])
        assert etag == multipart_etag_of(body, sizes[0])
    else:
        etag = put_parts(s3, "mp.bin", body, sizes)

    summary = download(proxy, tmp_path)

    assert summary.ok and summary.downloaded == 1
    assert (tmp_path / "data" / BUCKET / "mp.bin").read_bytes() == body
    assert completed(tmp_path)["mp.bin"]["checksum"] == f"md5-multipart:{etag}"
    # The successful attempt's ranged GETs (the last ones) are exactly the upload parts: their MD5s rebuild the ETag.
    ranges = sorted(r.range for r in proxy.requests("GET", key="mp.bin")[-len(sizes) :])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert ranges == [(start, start + size - 1) for start, size in zip(starts, sizes, strict=True)]


@pytest.mark.parametrize("algorithm", ["CRC32", "SHA256", "SHA1"])
def test_s3_additional_checksums_are_preferred(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, algorithm: str
) -> None:
    body = random.Random(3).randbytes(400 * KiB)
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "summed.bin", body, ChecksumAlgorithm=algorithm)
    expected = {
        "CRC32": base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode(),
        "SHA256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
        "SHA1": base64.b64encode(hashlib.sha1(body).digest()).decode(),
    }[algorithm]

    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url, "--quiet"
    )

    assert code == adl.EXIT_OK, (out, err)
    assert (tmp_path / "data" / BUCKET / "summed.bin").read_bytes() == body
    assert completed(tmp_path)["summed.bin"]["checksum"] == f"{algorithm.lower()}:{expected}"
    [request] = proxy.requests("GET", key="summed.bin")
    assert request.headers.get("x-amz-checksum-mode") == "ENABLED"


def test_a_byte_flipped_once_is_caught_and_fetched_again(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rng = random.Random(4)
    s3.make_bucket(BUCKET)
    small, large = rng.randbytes(200 * KiB), rng.randbytes(11 * MiB)
    s3.put(BUCKET, "small.bin", small)
    etag = s3.put_multipart(BUCKET, "large.bin", large, part_size=5 * MiB)
    proxy.flip(key="small.bin", times=1)
    proxy.flip(key="large.bin", at=1000, times=1, where=lambda r: r.range is not None and r.range[0] == 5 * MiB)

    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url, "--json"
    )

    assert code == adl.EXIT_OK, (out, err)
    assert json.loads(out)["downloaded"] == 2
    assert (tmp_path / "data" / BUCKET / "small.bin").read_bytes() == small
    assert (tmp_path / "data" / BUCKET / "large.bin").read_bytes() == large
    entries = completed(tmp_path)
    assert entries["small.bin"]["checksum"] == f"md5:{hashlib.md5(small).hexdigest()}"
    assert entries["large.bin"]["checksum"] == f"md5-multipart:{etag}"
    assert proxy.count("GET", key="small.bin") == 2
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Retrying")]
    assert any("small.bin" in line and "checksum mismatch" in line for line in retries)
    assert any("large.bin" in line and "checksum mismatch" in line for line in retries)


def test_persistent_corruption_fails_and_keeps_the_previous_good_file(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    rng = random.Random(5)
    s3.make_bucket(BUCKET)
    bodies = {"corrupt.bin": rng.randbytes(300 * KiB), "fine.bin": rng.randbytes(10 * KiB)}
    for key, body in bodies.items():
        s3.put(BUCKET, key, body)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAST))
    argv = ["--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url]
    argv += ["--config", str(config), "--json"]
    code, out, err = run_cli(*argv)
    assert code == adl.EXIT_OK, (out, err)
    good = tmp_path / "data" / BUCKET / "corrupt.bin"
    good_stat = good.stat()
    proxy.flip(key="corrupt.bin")  # every attempt

    code, out, err = run_cli(*argv, "--overwrite")

    assert code == adl.EXIT_FAILED, (out, err)
    summary = json.loads(out)
    assert (summary["downloaded"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [{"bucket": BUCKET, "key": "corrupt.bin", "reason": "checksum mismatch"}]
    assert proxy.count("GET", key="corrupt.bin") == 1 + 3  # the good first run, then 1 attempt + 2 retries
    assert good.read_bytes() == bodies["corrupt.bin"]
    assert (good.stat().st_mtime_ns, good.stat().st_ino) == (good_stat.st_mtime_ns, good_stat.st_ino)
    assert list((tmp_path / "data").rglob(".adl-*")) == []


def test_no_verify_downloads_without_checksums(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> None:
    rng = random.Random(6)
    s3.make_bucket(BUCKET)
    files = {"small.bin": rng.randbytes(100 * KiB), "large.bin": rng.randbytes(3 * MiB + 5)}
    s3.put(BUCKET, "small.bin", files["small.bin"], ChecksumAlgorithm="SHA256")
    s3.put_multipart(BUCKET, "large.bin", files["large.bin"], part_size=5 * MiB)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**FAST, "multipart_chunksize_mb": 1}))

    code, out, err = run_cli(
        "--buckets",
        BUCKET,
        "--download-dir",
        str(tmp_path / "data"),
        "--endpoint-url",
        proxy.url,
        "--config",
        str(config),
        "--no-verify",
        "--multipart-threshold-mb",
        "1",
        "--quiet",
    )

    assert code == adl.EXIT_OK, (out, err)
    entries = completed(tmp_path)
    for key, body in files.items():
        assert (tmp_path / "data" / BUCKET / key).read_bytes() == body
        assert entries[key]["checksum"] is None
    assert all("x-amz-checksum-mode" not in r.headers for r in proxy.requests("GET"))
    assert proxy.count("HEAD", key="large.bin") == 0  # no part sizes needed when nothing is verified
    assert len(proxy.requests("GET", key="large.bin")) == 4  # 1 MiB ranges


def test_sse_kms_objects_are_recorded_unverifiable_not_failed(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    kms = boto3.client("kms", endpoint_url=s3.endpoint, region_name="us-east-1")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    s3.make_bucket(BUCKET)
    body = random.Random(7).randbytes(50 * KiB)
    s3.put(BUCKET, "kms.bin", body, ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id)
    s3.put(BUCKET, "plain.bin", b"plain")
    head = s3.client.head_object(Bucket=BUCKET, Key="kms.bin")
    assert head["ServerSideEncryption"] == "aws:kms"  # what moto stores; its ETag stays the MD5

    summary = download(proxy, tmp_path)

    assert summary.ok and (summary.downloaded, summary.failed) == (2, 0)
    assert (tmp_path / "data" / BUCKET / "kms.bin").read_bytes() == body
    entries = completed(tmp_path)
    assert entries["kms.bin"]["checksum"].startswith("unverifiable: SSE-KMS")
    assert entries["plain.bin"]["checksum"] == f"md5:{hashlib.md5(b'plain').hexdigest()}"


def test_a_vanished_part_number_is_treated_as_a_changed_object(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    """HEAD ?partNumber=N answers 400 InvalidPartNumber when the object was replaced by one with fewer parts: the
    object is re-read (HEAD) and fetched as it is now, never retried as a server fault or left failed."""
    body = random.Random(5).randbytes(11 * MiB)
    s3.make_bucket(BUCKET)
    etag = s3.put_multipart(BUCKET, "mp.bin", body, part_size=5 * MiB)
    proxy.error(key="mp.bin", status=400, times=1, method="HEAD", where=lambda r: "partNumber" in r.query)

    summary = download(proxy, tmp_path)

    assert summary.ok and summary.downloaded == 1
    assert (tmp_path / "data" / BUCKET / "mp.bin").read_bytes() == body
    assert completed(tmp_path)["mp.bin"]["checksum"] == f"md5-multipart:{etag}"
    heads = proxy.requests("HEAD", key="mp.bin")
    assert heads[0].query == "" and heads[0].headers.get("x-amz-checksum-mode") == "ENABLED"  # its checksum first
    assert heads[1].status == 400 and heads[1].query == "partNumber=1"


def test_multipart_sse_kms_objects_are_recorded_unverifiable_not_failed(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    """On AWS the ETag of an SSE-KMS multipart object is no MD5 of part MD5s: rebuilding it would fail every
    time. The parts' GET headers say SSE-KMS, so the object is recorded as unverifiable instead."""
    kms = boto3.client("kms", endpoint_url=s3.endpoint, region_name="us-east-1")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    s3.make_bucket(BUCKET)
    body = random.Random(8).randbytes(11 * MiB)
    upload = s3.client.create_multipart_upload(
        Bucket=BUCKET, Key="kms-mp.bin", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id
    )
    parts = []
    for number, start in enumerate(range(0, len(body), 5 * MiB), 1):
        etag = s3.client.upload_part(
            Bucket=BUCKET,
            Key="kms-mp.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body[start : start + 5 * MiB],
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    s3.client.complete_multipart_upload(
        Bucket=BUCKET, Key="kms-mp.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert s3.client.head_object(Bucket=BUCKET, Key="kms-mp.bin")["ServerSideEncryption"] == "aws:kms"

    summary = download(proxy, tmp_path)

    assert summary.ok and summary.downloaded == 1
    assert (tmp_path / "data" / BUCKET / "kms-mp.bin").read_bytes() == body
    assert completed(tmp_path)["kms-mp.bin"]["checksum"].startswith("unverifiable: SSE-KMS")
