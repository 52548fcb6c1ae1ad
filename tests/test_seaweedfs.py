"""SeaweedFS compatibility: the whole tool against a real S3-compatible store that checks SigV4 signatures.

SeaweedFS's Prometheus endpoint counts S3 requests by bucket, type and status code, which lets these tests
assert what went over the wire: HEADs count as type GET, a ranged GET answers 206, listings are type LIST.
State persists across tests (one server per session), so every test uses its own bucket.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import MiB, S3Server, SeaweedFS, multipart_etag_of

import aws_data_downloader as adl

pytestmark = pytest.mark.seaweedfs

_METRIC = re.compile(r'^SeaweedFS_s3_request_total\{bucket="([^"]*)",code="(\d+)",type="(\w+)"\} (\S+)$')
#: Counted only for GETs that send a body (not HEADs, which SeaweedFS also counts as type GET).
_BODY_GETS = re.compile(r'^SeaweedFS_s3_time_to_first_byte_millisecond_count\{bucket="([^"]*)",type="GET"\} (\S+)$')
_SENT_BYTES = re.compile(r'^SeaweedFS_s3_bucket_traffic_sent_bytes_total\{bucket="([^"]*)"\} (\S+)$')


def unique_bucket(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Requests:
    """S3 request counts of one bucket, read from SeaweedFS's metrics: (type, code) -> count, plus
    ("body", "GET"): GETs that sent a body, and ("sent", "bytes"): bytes of response bodies."""

    def __init__(self, weed: SeaweedFS, bucket: str) -> None:
        self.url = f"http://127.0.0.1:{weed.metrics_port}/metrics"
        self.bucket = bucket

    def read(self) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        text = urllib.request.urlopen(self.url, timeout=60).read().decode()
        for line in text.splitlines():
            match = _METRIC.match(line)
            if match and match.group(1) == self.bucket:
                counts[(match.group(3), match.group(2))] += int(float(match.group(4)))
            for pattern, name in ((_BODY_GETS, ("body", "GET")), (_SENT_BYTES, ("sent", "bytes"))):
                match = pattern.match(line)
                if match and match.group(1) == self.bucket:
                    counts[name] += int(float(match.group(2)))
        return counts

    def settled(self) -> Counter[tuple[str, str]]:
        """Counts once two reads agree: a counter may be bumped just after the response was sent."""
        previous = self.read()
        for _ in range(20):
            time.sleep(0.1)
            current = self.read()
            if current == previous:
                return current
            previous = current
        return previous

    def since(self, before: Counter[tuple[str, str]]) -> Counter[tuple[str, str]]:
        after = self.settled()
        return Counter({k: after[k] - before[k] for k in after if after[k] != before[k]})


def by_type(delta: Counter[tuple[str, str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for (kind, _code), count in delta.items():
        total[kind] += count
    return total


def run_json(run_cli, server: S3Server, *argv: str) -> tuple[int, dict, str]:
    code, out, err = run_cli(*argv, "--json", *server.args())
    return code, (json.loads(out) if out.strip() else {}), err


def journal_entries(root: Path, bucket: str) -> dict[str, dict]:
    return json.loads((root / "download_resume.json").read_text())["completed"][bucket]


def seed_mixed(server: S3Server, bucket: str) -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """Small objects, an empty one, and multipart objects of equal, unequal and single parts."""
    rng = random.Random(bucket)
    server.make_bucket(bucket)
    files = {
        "small/a.png": rng.randbytes(70_000),
        "small/b.json": b'{"ok": true}',
        "small/empty.txt": b"",
    }
    for key, body in files.items():
        server.put(bucket, key, body)
    layouts = {"big/equal.bin": [5 * MiB, 5 * MiB, 2 * MiB + 7], "big/single.bin": [3 * MiB]}
    for key, sizes in layouts.items():
        files[key] = rng.randbytes(sum(sizes))
        server.put_multipart(bucket, key, files[key], part_size=sizes[0])
    # Parts of different sizes (S3 allows it): the tool must ask the store for each part's size.
    unequal = [6 * MiB, 5 * MiB, MiB]
    files["big/unequal.bin"] = body = rng.randbytes(sum(unequal))
    upload = server.client.create_multipart_upload(Bucket=bucket, Key="big/unequal.bin")
    parts, start = [], 0
    for number, size in enumerate(unequal, 1):
        etag = server.client.upload_part(
            Bucket=bucket,
            Key="big/unequal.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body[start : start + size],
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
        start += size
    server.client.complete_multipart_upload(
        Bucket=bucket, Key="big/unequal.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    layouts["big/unequal.bin"] = unequal
    return files, layouts


def test_listing_paginates_past_1000_keys_with_prefixes(
    seaweed: S3Server, seaweed_process: SeaweedFS, tmp_path: Path, run_cli
) -> None:
    bucket = unique_bucket("many")
    seaweed.make_bucket(bucket)
    keys = [f"many/{n:05d}.txt" for n in range(1050)] + [f"also/{n}.txt" for n in range(30)]
    keys += [f"not-this/{n}.txt" for n in range(10)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: seaweed.put(bucket, key, key.encode()), keys))
    requests = Requests(seaweed_process, bucket)
    argv = ["--buckets", bucket, "--prefixes", "many/", "also/", "--download-dir", "d"]

    before = requests.settled()
    code, summary, err = run_json(run_cli, seaweed, *argv)
    assert code == 0, (summary, err)
    assert summary["downloaded"] == summary["total_files"] == 1080
    root = tmp_path / "d" / bucket
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.txt")) == sorted(keys[:1080])
    assert (root / "many" / "01049.txt").read_bytes() == b"many/01049.txt"
    assert not (root / "not-this").exists()
    delta = by_type(requests.since(before))
    assert delta["LIST"] >= 3, delta  # 'many/' takes two pages of at most 1,000 keys, 'also/' one

    before = requests.settled()
    code, summary, err = run_json(run_cli, seaweed, *argv)
    assert code == 0, (summary, err)
    assert summary["skipped"] == 1080 and summary["downloaded"] == 0
    delta = requests.since(before)
    assert delta[("body", "GET")] == 0, delta
    assert by_type(delta)["GET"] <= 1, delta  # the bucket probe (HeadBucket counts as GET); no object HEADs


def test_filters(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    bucket = unique_bucket("filters")
    seaweed.make_bucket(bucket)
    sizes = {
        "data/img/keep-1.png": 20_000,
        "data/img/keep-2.PNG": 30_000,
        "data/ann/keep.json": 15_000,
        "data/img/too-small.png": 1_000,
        "data/img/too-big.png": 200_000,
        "data/img/wrong-ext.tif": 20_000,
        "data/tmp/excluded.png": 20_000,
        "other/not-included.png": 20_000,
    }
    for key, size in sizes.items():
        seaweed.put(bucket, key, key.encode().ljust(size, b"."))
    code, summary, err = run_json(
        run_cli, seaweed,
        "--buckets", bucket, "--download-dir", "d", "--extensions", "png", ".json", "--include", "data/*",
        "--exclude", "*/tmp/*", "--min-size-mb", "0.01", "--max-size-mb", "0.1",
    )  # fmt: skip
    assert code == 0, (summary, err)
    kept = {"data/img/keep-1.png", "data/img/keep-2.PNG", "data/ann/keep.json"}
    assert summary["total_files"] == summary["downloaded"] == len(kept)
    root = tmp_path / "d" / bucket
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == kept


def test_small_and_multipart_objects_are_verified(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    bucket = unique_bucket("verify")
    files, layouts = seed_mixed(seaweed, bucket)
    argv = ["--buckets", bucket, "--download-dir", "d", "--manifest", "m.jsonl", "--multipart-threshold-mb", "1"]
    code, summary, err = run_json(run_cli, seaweed, *argv)
    assert code == 0, (summary, err)
    assert summary["downloaded"] == len(files) and summary["failed"] == 0
    for key, body in files.items():
        assert (tmp_path / "d" / bucket / key).read_bytes() == body, key
    entries = journal_entries(tmp_path / "d", bucket)
    for key, sizes in layouts.items():
        etag = multipart_etag_of(files[key], sizes[0]) if key != "big/unequal.bin" else None
        if etag is None:  # unequal parts: rebuild the ETag from the actual part boundaries
            digests, start = [], 0
            for size in sizes:
                digests.append(hashlib.md5(files[key][start : start + size]).digest())
                start += size
            etag = f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(sizes)}"
        assert entries[key]["etag"] == etag
        assert entries[key]["checksum"] == f"md5-multipart:{etag}", key
    for key in ("small/a.png", "small/b.json", "small/empty.txt"):
        assert entries[key]["checksum"] == f"md5:{hashlib.md5(files[key]).hexdigest()}", key
    manifest = {r["key"]: r for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())}
    assert manifest["big/equal.bin"]["checksum"]["algorithm"] == "md5-multipart"
    small_md5 = hashlib.md5(files["small/a.png"]).hexdigest()
    assert manifest["small/a.png"]["checksum"] == {"algorithm": "md5", "value": small_md5}


def test_second_run_skips_everything_without_a_get(
    seaweed: S3Server, seaweed_process: SeaweedFS, tmp_path: Path, run_cli
) -> None:
    bucket = unique_bucket("rerun")
    files, _ = seed_mixed(seaweed, bucket)
    requests = Requests(seaweed_process, bucket)
    before = requests.settled()
    code, summary, err = run_json(run_cli, seaweed, "--buckets", bucket, "--download-dir", "d")
    assert code == 0, (summary, err)
    first = requests.since(before)
    assert first[("GET", "206")] >= 7, first  # multipart objects come in ranged parts
    assert first[("sent", "bytes")] >= sum(map(len, files.values()))

    before = requests.settled()
    code, summary, err = run_json(run_cli, seaweed, "--buckets", bucket, "--download-dir", "d")
    assert code == 0, (summary, err)
    assert summary["skipped"] == len(files) and summary["downloaded"] == 0 and summary["downloaded_bytes"] == 0
    assert summary["skipped_reasons"] == {"already downloaded": len(files)}
    second = requests.since(before)
    assert by_type(second)["GET"] <= 1, second  # only the bucket probe: no object GET or HEAD
    assert second[("body", "GET")] == 0 and second[("GET", "206")] == 0, second


def test_interrupted_multipart_object_resumes_from_its_parts(
    seaweed: S3Server, seaweed_process: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = unique_bucket("partial")
    seaweed.make_bucket(bucket)
    body = random.Random(3).randbytes(12 * MiB + 5)
    etag = seaweed.put_multipart(bucket, "huge/video.bin", body, part_size=5 * MiB)
    requests = Requests(seaweed_process, bucket)
    config = {"buckets": [bucket], "download_dir": "d", "endpoint_url": seaweed.endpoint, "parallel_downloads": 1}
    downloader = adl.AWSDataDownloader(config)

    # Stop the run (as Ctrl-C would) once the first part is journaled; the part pool has one worker, so the
    # other parts have not started.
    record_part = adl.ResumeJournal.record_part

    def record_then_stop(self, *args, **kwargs):
        record_part(self, *args, **kwargs)
        downloader.stop()

    monkeypatch.setattr(adl.ResumeJournal, "record_part", record_then_stop)
    before = requests.settled()
    with pytest.raises(adl.DownloadInterrupted) as raised:
        downloader.run_full_download()
    assert raised.value.exit_code == adl.EXIT_INTERRUPTED
    assert raised.value.summary is not None and raised.value.summary.interrupted
    first = requests.since(before)
    assert first[("body", "GET")] == 1, first
    assert 5 * MiB <= first[("sent", "bytes")] < 5 * MiB + 64 * 1024  # one part (and a listing page)
    target = tmp_path / "d" / bucket / "huge" / "video.bin"
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [adl.temp_path_for(target, "huge/video.bin").name]

    monkeypatch.setattr(adl.ResumeJournal, "record_part", record_part)
    before = requests.settled()
    summary = adl.AWSDataDownloader(config).run_full_download()
    assert summary.ok and summary.downloaded == 1
    second = requests.since(before)
    assert second[("body", "GET")] == 2, second  # only the two missing parts
    assert len(body) - 5 * MiB <= second[("sent", "bytes")] < len(body) - 5 * MiB + 64 * 1024
    assert target.read_bytes() == body
    assert journal_entries(tmp_path / "d", bucket)["huge/video.bin"]["checksum"] == f"md5-multipart:{etag}"
    assert list(target.parent.iterdir()) == [target]


def test_cli_summary_and_exit_codes(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    bucket = unique_bucket("summary")
    files, _ = seed_mixed(seaweed, bucket)
    code, out, err = run_cli("--buckets", bucket, "--download-dir", "d", *seaweed.args())
    assert code == adl.EXIT_OK, (out, err)
    assert "DOWNLOAD SUMMARY" in out
    assert f"Total files:      {len(files)}" in out and f"Downloaded:       {len(files)}" in out
    assert "Failed:           0" in out and "Success rate:     100.0%" in out

    missing = unique_bucket("missing")
    code, out, err = run_cli("--buckets", bucket, missing, "--download-dir", "d", *seaweed.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)  # a named bucket that does not exist makes the run incomplete
    assert f"Skipped:          {len(files)}" in out
    assert f"Bucket not downloaded: bucket '{missing}' does not exist" in out

    code, out, err = run_cli("--buckets", missing, "--download-dir", "d", *seaweed.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert f"Error: bucket '{missing}' does not exist" in err


@pytest.mark.parametrize("named", [True, False], ids=["named-bucket", "all-buckets"])
def test_rejected_credentials_exit_3(
    seaweed: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, named: bool
) -> None:
    bucket = unique_bucket("creds")
    seaweed.make_bucket(bucket)
    seaweed.put(bucket, "k.txt", b"secret data")
    wrong_secret = "definitely-not-the-secret-key-1234"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    argv = ["--buckets", bucket] if named else []
    code, out, err = run_cli(*argv, "--download-dir", "d", "--retry-attempts", "0", *seaweed.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert "credentials rejected" in errors[0], errors
    assert wrong_secret not in out + err and "Traceback" not in err
    assert not (tmp_path / "d" / bucket).exists()
