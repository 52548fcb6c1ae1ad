"""Objects as S3 stores them today, with full-object checksums, against SeaweedFS (which stores and returns
them: ../shared/SERVERS.md): verified by the cheapest checksum they carry, large ones in parallel ranges whose
CRCs combine, multipart ones without needing their own part boundaries; a flipped byte never reaches the final
file; a re-run after an interruption fetches only the missing ranges."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, S3Server
from faultproxy import FaultProxy

import aws_data_downloader as adl

pytestmark = pytest.mark.seaweedfs

FAST = {"retry_backoff_s": 0.01, "retry_attempts": 2, "log_file": ""}
#: Small objects count as large here, so the parts path runs on a few MiB (SeaweedFS keeps them in memory).
LARGE = {"multipart_threshold_mb": 2, "multipart_chunksize_mb": 1}


def crc64(body: bytes) -> str:
    return adl.crc_base64("crc64nvme", adl.crc_function("crc64nvme")(body, 0))


def crc32(body: bytes) -> str:
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()


@pytest.fixture
def store(seaweed: S3Server, request: pytest.FixtureRequest) -> Iterator[tuple[S3Server, str, object]]:
    """SeaweedFS, a fresh bucket, and a client that uploads with checksums as boto3 >= 1.36 does by default."""
    bucket = f"crc-{request.node.name.split('[')[0][-30:].replace('_', '-').strip('-')}-{random.randrange(10**6)}"
    client = seaweed.uploading_client()
    client.create_bucket(Bucket=bucket)
    yield seaweed, bucket, client
    client.close()


def put_full_object_multipart(client, bucket: str, key: str, body: bytes, part_size: int) -> str:
    """A multipart upload with ChecksumType FULL_OBJECT CRC64NVME, as S3 stores multipart uploads today."""
    upload = client.create_multipart_upload(
        Bucket=bucket, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
    )
    parts = []
    for number, start in enumerate(range(0, len(body), part_size), 1):
        answer = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body[start : start + part_size],
            ChecksumAlgorithm="CRC64NVME",
        )
        parts.append({"ETag": answer["ETag"], "PartNumber": number, "ChecksumCRC64NVME": answer["ChecksumCRC64NVME"]})
    done = client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
        ChecksumType="FULL_OBJECT",
    )
    return done["ETag"].strip('"')


def download(endpoint: str, bucket: str, tmp_path: Path, **config: object) -> adl.DownloadSummary:
    settings = {**FAST, "buckets": [bucket], "download_dir": str(tmp_path / "d"), "endpoint_url": endpoint}
    return adl.AWSDataDownloader({**settings, **config}).run_full_download()


def flipped_download(seaweed: S3Server, bucket: str, tmp_path: Path, body: bytes, at: int, start: int, times: int):
    """Download flip.bin with a byte flipped at ``at`` of the range starting at ``start``, ``times`` times;
    returns the summary and how many GETs it made. A flip once is refetched; every time, it fails."""
    with FaultProxy(seaweed.endpoint) as proxy:
        proxy.flip(key="flip.bin", at=at, times=times, where=lambda r: r.range is not None and r.range[0] == start)
        summary = download(proxy.url, bucket, tmp_path, **LARGE)
        gets = len(proxy.requests("GET", key="flip.bin"))
    target = tmp_path / "d" / bucket / "flip.bin"
    if times == 1:
        assert summary.ok and target.read_bytes() == body
    else:
        assert [(f.key, f.reason) for f in summary.failures] == [("flip.bin", "checksum mismatch")]
        assert not target.exists() and not list(target.parent.glob(".adl-*"))
    return summary, gets


def stopped_then_resumed(seaweed: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: int):
    """Download resume.bin, stopping the run once ``parts`` parts are journaled, then run again; returns the
    re-run's summary, the bytes each run fetched and the ranges the re-run asked for."""
    settings = {**FAST, **LARGE, "buckets": [bucket], "download_dir": str(tmp_path / "d"), "parallel_downloads": 1}
    record_part = adl.ResumeJournal.record_part
    recorded: list[int] = []

    with FaultProxy(seaweed.endpoint) as proxy:
        downloader = adl.AWSDataDownloader({**settings, "endpoint_url": proxy.url})

        def record_then_stop(self, obj, layout, index, digest):
            record_part(self, obj, layout, index, digest)
            recorded.append(index)
            if len(recorded) == parts:
                downloader.stop()

        monkeypatch.setattr(adl.ResumeJournal, "record_part", record_then_stop)
        with pytest.raises(adl.DownloadInterrupted):
            downloader.run_full_download()
        monkeypatch.setattr(adl.ResumeJournal, "record_part", record_part)
        first = proxy.bytes_sent("GET", key="resume.bin")
        proxy.reset_stats()
        summary = adl.AWSDataDownloader({**settings, "endpoint_url": proxy.url}).run_full_download()
        second = proxy.bytes_sent("GET", key="resume.bin")
        ranges = sorted(r.range for r in proxy.requests("GET", key="resume.bin"))
    return summary, first, second, ranges


def journal(tmp_path: Path, bucket: str) -> dict[str, dict]:
    state = adl.ResumeJournal(tmp_path / "d" / "download_resume.json").load()
    return {key: {"checksum": entry.checksum} for (b, key), entry in state._completed.items() if b == bucket}


def test_each_object_is_verified_by_the_cheapest_checksum_it_carries(store, tmp_path: Path) -> None:
    seaweed, bucket, client = store
    rng = random.Random(1)
    files = {
        "plain-put.bin": rng.randbytes(300_000),  # boto3's default upload: CRC32
        "crc64.bin": rng.randbytes(200_000),
        "crc32c.bin": rng.randbytes(100_000),
        "large-crc64.bin": rng.randbytes(5 * MiB + 123),
        "multipart-crc64.bin": rng.randbytes(12 * MiB + 7),
    }
    client.put_object(Bucket=bucket, Key="plain-put.bin", Body=files["plain-put.bin"])
    client.put_object(Bucket=bucket, Key="crc64.bin", Body=files["crc64.bin"], ChecksumAlgorithm="CRC64NVME")
    client.put_object(Bucket=bucket, Key="crc32c.bin", Body=files["crc32c.bin"], ChecksumAlgorithm="CRC32C")
    client.put_object(
        Bucket=bucket, Key="large-crc64.bin", Body=files["large-crc64.bin"], ChecksumAlgorithm="CRC64NVME"
    )
    etag = put_full_object_multipart(client, bucket, "multipart-crc64.bin", files["multipart-crc64.bin"], 5 * MiB)
    assert etag.endswith("-3")
    algorithms = {
        "plain-put.bin": "crc32",
        "crc64.bin": "crc64nvme",
        "crc32c.bin": "crc32c",
        "large-crc64.bin": "crc64nvme",
        "multipart-crc64.bin": "crc64nvme",
    }
    stored = {
        key: client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")[f"Checksum{algorithm.upper()}"]
        for key, algorithm in algorithms.items()
    }

    with FaultProxy(seaweed.endpoint) as proxy:
        summary = download(proxy.url, bucket, tmp_path, manifest=str(tmp_path / "m.jsonl"), **LARGE)
        requests = proxy.requests()

    assert summary.ok and summary.downloaded == len(files)
    for key, body in files.items():
        assert (tmp_path / "d" / bucket / key).read_bytes() == body, key
    checksums = {key: entry["checksum"] for key, entry in journal(tmp_path, bucket).items()}
    assert checksums == {
        "plain-put.bin": f"crc32:{crc32(files['plain-put.bin'])}",
        "crc64.bin": f"crc64nvme:{crc64(files['crc64.bin'])}",
        "crc32c.bin": f"crc32c:{stored['crc32c.bin']}",
        "large-crc64.bin": f"crc64nvme:{crc64(files['large-crc64.bin'])}",
        "multipart-crc64.bin": f"crc64nvme:{crc64(files['multipart-crc64.bin'])}",
    }
    # The values the store holds, as botocore computed them on upload (not the module's own CRC code).
    assert checksums == {key: f"{algorithm}:{stored[key]}" for key, algorithm in algorithms.items()}
    manifest = {r["key"]: r for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())}
    assert manifest["multipart-crc64.bin"]["checksum"] == {
        "algorithm": "crc64nvme",
        "value": crc64(files["multipart-crc64.bin"]),
    }
    # The large ones came in 1 MiB ranges (not the 5 MiB upload parts), each with If-Match; no part-size HEADs.
    multipart_gets = [r for r in requests if r.method == "GET" and r.path.endswith("/multipart-crc64.bin")]
    assert sorted(r.range for r in multipart_gets) == [
        (start, min(start + MiB, len(files["multipart-crc64.bin"])) - 1)
        for start in range(0, len(files["multipart-crc64.bin"]), MiB)
    ]
    assert all(r.headers.get("if-match", "").strip('"') == etag for r in multipart_gets)
    heads = [r for r in requests if r.method == "HEAD" and r.path.endswith("/multipart-crc64.bin")]
    assert [r.query for r in heads] == [""], "one HEAD for its checksum, none for part sizes"


@pytest.mark.parametrize("times", [1, 10], ids=["once", "every-time"])
def test_a_byte_flipped_in_one_range_never_reaches_the_final_file(store, tmp_path: Path, times: int) -> None:
    """A combined CRC cannot say which range was bad: the object is fetched again (up to retry_attempts
    times); if every fetch is bad it fails with "checksum mismatch" and nothing is renamed into place."""
    seaweed, bucket, client = store
    body = random.Random(2).randbytes(5 * MiB)
    client.put_object(Bucket=bucket, Key="flip.bin", Body=body, ChecksumAlgorithm="CRC64NVME")

    _, gets = flipped_download(seaweed, bucket, tmp_path, body, at=1000, start=2 * MiB, times=times)
    if times == 1:
        assert gets == 2 * 5, "the whole object once more: every range"
    else:
        assert gets == 3 * 5, "the first fetch and retry_attempts (2) more"


def test_an_interrupted_crc_object_resumes_only_its_missing_ranges(
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each finished range's CRC is journaled, so the re-run combines them without reading them back."""
    seaweed, bucket, client = store
    body = random.Random(3).randbytes(6 * MiB + 99)
    client.put_object(Bucket=bucket, Key="resume.bin", Body=body, ChecksumAlgorithm="CRC64NVME")
    summary, first, second, second_ranges = stopped_then_resumed(seaweed, bucket, tmp_path, monkeypatch, parts=3)

    assert summary.ok and (tmp_path / "d" / bucket / "resume.bin").read_bytes() == body
    assert first == 3 * MiB, "stopped after three ranges"
    assert second_ranges == [(n * MiB, min((n + 1) * MiB, len(body)) - 1) for n in range(3, 7)]
    assert second == len(body) - 3 * MiB, "only the missing ranges"
    [entry] = journal(tmp_path, bucket).values()
    assert entry["checksum"] == f"crc64nvme:{crc64(body)}"


def put_composite_multipart(client, bucket: str, key: str, body: bytes, algorithm: str, part_size: int = 5 * MiB):
    """A multipart upload with CRC32/CRC32C part checksums and no ChecksumType: S3 gives it a COMPOSITE
    checksum (the CRC of the parts' CRCs, "-N"); returns (ETag, that checksum as HEAD shows it)."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm=algorithm)
    field = f"Checksum{algorithm}"
    parts = []
    for number, start in enumerate(range(0, len(body), part_size), 1):
        answer = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body[start : start + part_size],
            ChecksumAlgorithm=algorithm,
        )
        parts.append({"ETag": answer["ETag"], "PartNumber": number, field: answer[field]})
    etag = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )["ETag"].strip('"')
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head.get("ChecksumType") == "COMPOSITE" and head[field].endswith(f"-{len(parts)}")
    return etag, head[field]


def composite_of(body: bytes, part_size: int, crc) -> str:
    """What S3 computes: the CRC of the big-endian part CRCs, concatenated, and the part count."""
    pieces = [body[start : start + part_size] for start in range(0, len(body), part_size)]
    joined = b"".join(crc(piece, 0).to_bytes(4, "big") for piece in pieces)
    return f"{base64.b64encode(crc(joined, 0).to_bytes(4, 'big')).decode()}-{len(pieces)}"


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C"])
def test_a_composite_checksum_is_rebuilt_from_the_crcs_of_the_object_s_own_parts(
    store, tmp_path: Path, algorithm: str
) -> None:
    """A COMPOSITE checksum is a checksum of the parts' checksums, not of the bytes: fetched on its own upload
    parts (partNumber HEADs find them), each part's CRC is taken as it streams and the composite rebuilt from
    them, so the object is verified by its CRC and not by MD5s of its parts (nor left unverified when its ETag
    is no MD5, as an SSE-KMS one's is)."""
    seaweed, bucket, client = store
    body = random.Random(4).randbytes(11 * MiB)
    etag, composite = put_composite_multipart(client, bucket, "composite.bin", body, algorithm)
    crc = zlib.crc32 if algorithm == "CRC32" else adl.crc_function("crc32c")
    assert composite == composite_of(body, 5 * MiB, crc)

    with FaultProxy(seaweed.endpoint) as proxy:
        summary = download(proxy.url, bucket, tmp_path, **LARGE)
        ranges = sorted(r.range for r in proxy.requests("GET", key="composite.bin"))

    assert summary.ok and (tmp_path / "d" / bucket / "composite.bin").read_bytes() == body
    assert journal(tmp_path, bucket)["composite.bin"]["checksum"] == f"{algorithm.lower()}:{composite}"
    assert ranges == [(0, 5 * MiB - 1), (5 * MiB, 10 * MiB - 1), (10 * MiB, 11 * MiB - 1)], "its own parts"
    assert hashlib.md5(body).hexdigest() != etag


@pytest.mark.parametrize("times", [1, 10], ids=["once", "every-time"])
def test_a_byte_flipped_in_one_part_of_a_composite_object_never_reaches_the_final_file(
    store, tmp_path: Path, times: int
) -> None:
    """The rebuilt composite cannot say which part was bad either: the object is fetched again, and after
    retry_attempts bad fetches it fails with "checksum mismatch", nothing renamed into place."""
    seaweed, bucket, client = store
    body = random.Random(5).randbytes(11 * MiB)
    put_composite_multipart(client, bucket, "flip.bin", body, "CRC32")

    _, gets = flipped_download(seaweed, bucket, tmp_path, body, at=77, start=5 * MiB, times=times)
    if times == 1:
        assert gets == 2 * 3, "the whole object once more: every part"
    else:
        assert gets == 3 * 3, "the first fetch and retry_attempts (2) more"


def test_an_interrupted_composite_object_resumes_only_its_missing_parts(
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each finished part's CRC is journaled, so the re-run rebuilds the composite without reading them back."""
    seaweed, bucket, client = store
    body = random.Random(6).randbytes(5 * MiB * 3 + 12345)
    _, composite = put_composite_multipart(client, bucket, "resume.bin", body, "CRC32C")
    summary, _, _, second = stopped_then_resumed(seaweed, bucket, tmp_path, monkeypatch, parts=2)

    assert summary.ok and (tmp_path / "d" / bucket / "resume.bin").read_bytes() == body
    assert second == [(10 * MiB, 15 * MiB - 1), (15 * MiB, len(body) - 1)], "only the two parts not done"
    assert journal(tmp_path, bucket)["resume.bin"]["checksum"] == f"crc32c:{composite}"
