"""--checksum and --verify-local: local files compared with the object's checksum, not trusted by size and date.

Without --checksum a local file the journal does not vouch for (another tool's, a restored backup) is taken as
current when its size matches and it is not older than the object (aws s3 sync's rule: same-size changes are
never fetched). With --checksum such a file is hashed (the listing's MD5 ETag, else the full-object CRC a HEAD
with checksum mode names, else the multipart ETag on the object's own parts) and downloaded only if it differs;
a match is journaled so the next run trusts it. --verify-local hashes every local file, downloads nothing and
exits 1 naming what differs or is missing. Requests are counted by the fault proxy (tests/faultproxy.py).
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from pathlib import Path

import boto3
import pytest
from conftest import MiB, S3Server, write_config
from faultproxy import FaultProxy, KiB

import aws_data_downloader as adl

FAST = {"retry_backoff_s": 0.01, "retry_attempts": 2, "parallel_downloads": 4}
BUCKET = "compare-data"


def cli(run_cli, proxy: FaultProxy, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    """The CLI with --json against BUCKET through the proxy; returns (exit code, summary, stderr)."""
    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url,
        "--config", write_config(tmp_path, FAST), "--log-file", str(tmp_path / "run.log"), "--json", *extra,
    )  # fmt: skip
    assert out.strip(), err
    return code, json.loads(out), err


def local(tmp_path: Path, key: str) -> Path:
    return tmp_path / "data" / BUCKET / key


def place(tmp_path: Path, key: str, body: bytes, newer: bool = True) -> Path:
    """A local file as another tool would leave it: no journal entry, dated after (or before) the upload."""
    path = local(tmp_path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    stamp = time.time() + (3600 if newer else -10 * 86400)
    os.utime(path, (stamp, stamp))
    return path


def flipped(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]


def completed(tmp_path: Path) -> dict[str, dict]:
    snapshot = json.loads((tmp_path / "data" / "download_resume.json").read_text())
    return snapshot["completed"].get(BUCKET, {})


# -- --checksum ------------------------------------------------------------------------------------------------


def test_a_same_size_newer_file_with_other_bytes_is_kept_without_checksum_and_replaced_with_it(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    body = random.Random(1).randbytes(300 * KiB)
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "same-size.bin", body)
    stale = flipped(body, 1234)
    path = place(tmp_path, "same-size.bin", stale)

    code, summary, err = cli(run_cli, proxy, tmp_path)
    assert code == adl.EXIT_OK, err
    assert path.read_bytes() == stale  # aws s3 sync's rule: same size, not older, so never fetched
    assert summary["skipped_reasons"] == {"exists locally (same size, not older)": 1}
    assert (summary["checked"], summary["checksum"]) == (0, False)
    assert proxy.count("GET", key="same-size.bin") == 0

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")
    assert code == adl.EXIT_OK, err
    assert path.read_bytes() == body
    assert (summary["checked"], summary["matched"], summary["replaced"], summary["unverifiable"]) == (1, 0, 1, 0)
    assert summary["downloaded"] == 1 and summary["checksum"] is True
    assert proxy.count("GET", key="same-size.bin") == 1
    assert completed(tmp_path)["same-size.bin"]["checksum"].startswith("md5:")
    assert "Checked:" not in err  # the text summary goes to stdout; the log says why it was fetched
    assert "same-size.bin: the local file differs (md5 " in (tmp_path / "run.log").read_text()


def test_a_correct_file_is_hashed_not_fetched_and_journaled(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    body = random.Random(2).randbytes(200 * KiB)
    s3.make_bucket(BUCKET)
    etag = s3.put(BUCKET, "good.bin", body)
    path = place(tmp_path, "good.bin", body, newer=False)  # older: without --checksum it would be fetched again

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")

    assert code == adl.EXIT_OK, err
    assert path.read_bytes() == body
    assert (summary["checked"], summary["matched"], summary["replaced"]) == (1, 1, 0)
    assert summary["skipped_reasons"] == {"checksum matches": 1}
    assert proxy.count("GET", key="good.bin") == 0
    assert proxy.count("HEAD", key="good.bin") == 0  # an MD5 ETag from the listing needs no request
    entry = completed(tmp_path)["good.bin"]
    assert entry["etag"] == etag and entry["checksum"] == f"md5:{etag}"
    listed = s3.client.head_object(Bucket=BUCKET, Key="good.bin")["LastModified"].timestamp()
    assert abs(path.stat().st_mtime - listed) < 1e-3  # dated as a download would have dated it

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")  # the journal vouches for it now
    assert code == adl.EXIT_OK, err
    assert summary["checked"] == 0 and summary["skipped_reasons"] == {"already downloaded": 1}


def test_the_text_summary_counts_checked_matched_replaced(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    s3.make_bucket(BUCKET)
    bodies = {f"f{i}.bin": random.Random(i).randbytes(10 * KiB) for i in range(3)}
    for key, body in bodies.items():
        s3.put(BUCKET, key, body)
    place(tmp_path, "f0.bin", bodies["f0.bin"])
    place(tmp_path, "f1.bin", flipped(bodies["f1.bin"], 0))

    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url, "--checksum",
        "--log-file", "",
    )  # fmt: skip

    assert code == adl.EXIT_OK, err
    assert "Checked:          2 (matched 1, replaced 1, unverifiable 0)" in out
    assert "Downloaded:       2" in out  # f1 replaced, f2 absent
    assert all(local(tmp_path, key).read_bytes() == body for key, body in bodies.items())


def test_a_crc64nvme_object_is_compared_by_its_crc_after_an_md5_mismatch(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    """The MD5 ETag is tried first (no request); when it does not match, a HEAD with checksum mode is asked
    before the file is called different, and the object's CRC64NVME decides."""
    body = random.Random(3).randbytes(256 * KiB)
    s3.make_bucket(BUCKET)
    client = s3.uploading_client()
    try:
        client.put_object(Bucket=BUCKET, Key="crc.bin", Body=body, ChecksumAlgorithm="CRC64NVME")
    finally:
        client.close()
    place(tmp_path, "crc.bin", flipped(body, 100))

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local")

    assert code == adl.EXIT_FAILED, err
    assert summary["differ"] == 1
    [problem] = summary["differ_files"]
    assert problem["key"] == "crc.bin" and problem["reason"].startswith("crc64nvme ")
    assert summary["failures_by_reason"] == {"differs from S3 (crc64nvme)": 1}
    [head] = proxy.requests("HEAD", key="crc.bin")
    assert head.headers.get("x-amz-checksum-mode") == "ENABLED"

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")
    assert code == adl.EXIT_OK, err
    assert local(tmp_path, "crc.bin").read_bytes() == body
    assert summary["replaced"] == 1
    assert completed(tmp_path)["crc.bin"]["checksum"].startswith("crc64nvme:")


def test_a_multipart_object_is_compared_on_its_own_parts(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    body = random.Random(4).randbytes(12 * MiB)
    s3.make_bucket(BUCKET)
    etag = s3.put_multipart(BUCKET, "mp.bin", body, part_size=5 * MiB)
    path = place(tmp_path, "mp.bin", body)

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")

    assert code == adl.EXIT_OK, err
    assert (summary["checked"], summary["matched"]) == (1, 1)
    assert proxy.count("GET", key="mp.bin") == 0
    assert any("partNumber=1" in r.query for r in proxy.requests("HEAD", key="mp.bin"))
    assert completed(tmp_path)["mp.bin"]["checksum"] == f"md5-multipart:{etag}"

    (tmp_path / "data" / "download_resume.json").unlink()  # the journal is gone: nothing vouches for the file
    path.write_bytes(flipped(body, 6 * MiB))
    os.utime(path, (time.time() + 3600,) * 2)
    proxy.reset_stats()

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")

    assert code == adl.EXIT_OK, err
    assert path.read_bytes() == body
    assert (summary["checked"], summary["matched"], summary["replaced"]) == (1, 0, 1)
    assert summary["skipped_reasons"] == {}


def test_a_journaled_file_is_trusted_not_hashed(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> None:
    """--checksum reads only files the journal does not vouch for; --verify-local reads them all (bit rot)."""
    body = random.Random(5).randbytes(64 * KiB)
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "rot.bin", body)
    code, _, err = cli(run_cli, proxy, tmp_path)
    assert code == adl.EXIT_OK, err
    path = local(tmp_path, "rot.bin")
    stamp = path.stat().st_mtime
    path.write_bytes(flipped(body, 10))  # bit rot: same size, and the date put back
    os.utime(path, (stamp, stamp))

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")
    assert code == adl.EXIT_OK, err
    assert summary["checked"] == 0 and summary["skipped_reasons"] == {"already downloaded": 1}

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local")
    assert code == adl.EXIT_FAILED, err
    assert summary["differ"] == 1 and summary["differ_files"][0]["key"] == "rot.bin"


def test_an_unverifiable_object_falls_back_to_size_and_date(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    """An SSE-KMS object's ETag is no MD5 (moto keeps the MD5; a mismatch asks the HEAD, which says SSE-KMS):
    with no CRC either, --checksum cannot compare it, counts it unverifiable and keeps aws s3 sync's rule."""
    kms = boto3.client("kms", endpoint_url=s3.endpoint, region_name="us-east-1")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    s3.make_bucket(BUCKET)
    body = random.Random(6).randbytes(40 * KiB)
    s3.put(BUCKET, "kms.bin", body, ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id)
    other = flipped(body, 5)
    path = place(tmp_path, "kms.bin", other)

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum")
    assert code == adl.EXIT_OK, err
    assert (summary["checked"], summary["unverifiable"], summary["replaced"]) == (1, 1, 0)
    assert summary["skipped_reasons"] == {"exists locally (same size, not older)": 1}
    assert path.read_bytes() == other and proxy.count("GET", key="kms.bin") == 0
    assert "kms.bin" not in completed(tmp_path)  # not verified: not vouched for

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local")
    assert code == adl.EXIT_OK, err  # unknown is not "differs"
    assert (summary["intact"], summary["differ"], summary["unverifiable"]) == (0, 0, 1)
    assert list(summary["skipped_reasons"]) == ["unverifiable: SSE-KMS object: its ETag is not an MD5 of the content"]


def test_checksum_is_a_config_key_and_a_python_setting(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    body = random.Random(7).randbytes(30 * KiB)
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "api.bin", body)
    place(tmp_path, "api.bin", flipped(body, 0))
    settings = {**FAST, "buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}

    summary = adl.AWSDataDownloader({**settings, "checksum": True}).run_full_download()

    assert summary.ok and (summary.checked, summary.replaced) == (1, 1)
    assert summary.to_dict()["replaced"] == 1
    assert local(tmp_path, "api.bin").read_bytes() == body
    assert adl.build_config({"checksum": True}).checksum is True
    with pytest.raises(adl.ConfigError, match="checksum"):
        adl.build_config({"checksum": "yes please"})


def test_a_dry_run_says_which_files_would_be_hashed(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> None:
    body = random.Random(8).randbytes(20 * KiB)
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "maybe.bin", body)
    path = place(tmp_path, "maybe.bin", flipped(body, 3))

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum", "--dry-run")

    assert code == adl.EXIT_OK, err
    assert summary["skipped_reasons"] == {"would be hashed and compared (--checksum)": 1}
    assert path.read_bytes() == flipped(body, 3) and proxy.count("HEAD", key="maybe.bin") == 0


# -- --verify-local --------------------------------------------------------------------------------------------


def seed_and_download(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> dict[str, bytes]:
    s3.make_bucket(BUCKET)
    bodies = {f"dir/f{i}.bin": random.Random(10 + i).randbytes((i + 1) * 16 * KiB) for i in range(4)}
    for key, body in bodies.items():
        s3.put(BUCKET, key, body)
    code, _, err = cli(run_cli, proxy, tmp_path)
    assert code == adl.EXIT_OK, err
    proxy.reset_stats()
    return bodies


def test_verify_local_on_an_intact_copy_exits_0_and_downloads_nothing(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    seed_and_download(s3, proxy, tmp_path, run_cli)
    resume = tmp_path / "data" / "download_resume.json"
    before = resume.read_bytes()

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local")

    assert code == adl.EXIT_OK, err
    assert summary["verify_local"] is True
    assert (summary["intact"], summary["differ"], summary["missing"], summary["unverifiable"]) == (4, 0, 0, 0)
    assert proxy.count("GET", key="/dir/") == 0
    assert resume.read_bytes() == before and not resume.with_name(resume.name + ".journal").exists()


def test_verify_local_deletes_nothing_even_with_delete_on(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    """A config with `delete: true` (a nightly mirror's) must not turn a check of the copy into a deletion."""
    seed_and_download(s3, proxy, tmp_path, run_cli)
    stray = place(tmp_path, "dir/no-longer-listed.bin", b"stray")

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local", "--delete")

    assert code == adl.EXIT_OK, err
    assert stray.read_bytes() == b"stray"
    assert summary["intact"] == 4 and summary["deleted"] is None


def test_verify_local_lists_a_flipped_byte_and_a_missing_file_and_exits_1(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    bodies = seed_and_download(s3, proxy, tmp_path, run_cli)
    rotten = local(tmp_path, "dir/f1.bin")
    stamp = rotten.stat().st_mtime
    rotten.write_bytes(flipped(bodies["dir/f1.bin"], 777))
    os.utime(rotten, (stamp, stamp))
    local(tmp_path, "dir/f2.bin").unlink()
    local(tmp_path, "dir/f3.bin").write_bytes(b"short")
    names_before = sorted(p.name for p in (tmp_path / "data").rglob("*"))

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local")

    assert code == adl.EXIT_FAILED, err
    assert (summary["intact"], summary["differ"], summary["missing"]) == (1, 2, 1)
    assert summary["downloaded"] == 0 and proxy.count("GET", key="/dir/") == 0
    assert sorted(f["key"] for f in summary["differ_files"]) == ["dir/f1.bin", "dir/f3.bin"]
    assert [f["key"] for f in summary["missing_files"]] == ["dir/f2.bin"]
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == names_before  # nothing written
    assert rotten.read_bytes() == flipped(bodies["dir/f1.bin"], 777)
    log_text = (tmp_path / "run.log").read_text()
    assert f"Differs from S3: {BUCKET}/dir/f1.bin (md5 " in log_text
    assert f"Missing locally: {BUCKET}/dir/f2.bin" in log_text
    assert f"Differs from S3: {BUCKET}/dir/f3.bin (local size 5 != 65,536)" in log_text
    assert "Run finished: exit code 1; verify-local, 4 objects: 1 intact, 2 differ, 1 missing" in log_text

    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url,
        "--verify-local", "--log-file", "",
    )  # fmt: skip
    assert code == adl.EXIT_FAILED
    assert "VERIFY-LOCAL SUMMARY (nothing was downloaded)" in out
    assert "Intact:           1" in out and "Missing:          1" in out and "Differ:           2" in out
    assert f"  {BUCKET}/dir/f2.bin: missing locally" in out
    assert f"  {BUCKET}/dir/f3.bin: local size 5 != 65,536" in out
    assert "Skipped by reason" not in out  # the intact files have their own row


def test_verify_local_from_python(s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli) -> None:
    bodies = seed_and_download(s3, proxy, tmp_path, run_cli)
    local(tmp_path, "dir/f0.bin").write_bytes(flipped(bodies["dir/f0.bin"], 0))
    settings = {**FAST, "buckets": [BUCKET], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}

    summary = adl.AWSDataDownloader(settings).run_full_download(verify_local=True)

    assert summary.verify_local and not summary.ok and summary.exit_code == adl.EXIT_FAILED
    assert [(p.key, p.reason.split(" ")[0]) for p in summary.local_problems] == [("dir/f0.bin", "md5")]
    assert summary.local_checks == {"match": 3, "differ": 1}
    with pytest.raises(adl.ConfigError, match="--verify-local and --dry-run"):
        adl.AWSDataDownloader(settings).run_full_download(verify_local=True, dry_run=True)


def test_verify_local_of_a_directory_that_does_not_exist_writes_nothing(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "a.bin", b"abc")

    code, summary, err = cli(run_cli, proxy, tmp_path, "--verify-local")

    assert code == adl.EXIT_FAILED, err
    assert summary["missing"] == 1 and not (tmp_path / "data").exists()


def test_verify_local_with_dry_run_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    code, _out, err = run_cli("--buckets", BUCKET, "--verify-local", "--dry-run", "--log-file", "")
    assert code == adl.EXIT_USAGE
    assert err.strip().splitlines()[-1] == (
        "Error: --verify-local and --dry-run cannot be combined: --verify-local downloads nothing"
    )


def test_local_checks_are_pure_decisions() -> None:
    obj = adl.S3Object("b", "k", 10, "0" * 32, 1000.0)
    same = os.stat_result((0o100644, 0, 0, 1, 0, 0, 10, 0, 2000, 0))
    other = os.stat_result((0o100644, 0, 0, 1, 0, 0, 11, 0, 2000, 0))
    vouched = adl.CompletedEntry("0" * 32, 10)
    stale = adl.CompletedEntry("1" * 32, 10)
    assert adl.needs_local_check(obj, same, None, overwrite=False)
    assert adl.needs_local_check(obj, same, stale, overwrite=False)  # the journal knew an older version
    assert not adl.needs_local_check(obj, same, vouched, overwrite=False)
    assert not adl.needs_local_check(obj, other, None, overwrite=False)
    assert not adl.needs_local_check(obj, None, None, overwrite=False)
    assert not adl.needs_local_check(obj, same, None, overwrite=True)
    assert base64.b64decode(adl.crc_base64("crc64nvme", 1)) == (1).to_bytes(8, "big")


def test_a_large_object_is_compared_by_its_crc_not_its_md5(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    """From multipart_threshold up, one HEAD names the CRC64NVME, which hashes several times faster than MD5."""
    body = random.Random(9).randbytes(2 * MiB)
    s3.make_bucket(BUCKET)
    client = s3.uploading_client()
    try:
        crc = client.put_object(Bucket=BUCKET, Key="big.bin", Body=body, ChecksumAlgorithm="CRC64NVME")
    finally:
        client.close()
    place(tmp_path, "big.bin", body)

    code, summary, err = cli(run_cli, proxy, tmp_path, "--checksum", "--multipart-threshold-mb", "1")

    assert code == adl.EXIT_OK, err
    assert (summary["checked"], summary["matched"]) == (1, 1)
    assert proxy.count("GET", key="big.bin") == 0 and proxy.count("HEAD", key="big.bin") == 1
    assert completed(tmp_path)["big.bin"]["checksum"] == f"crc64nvme:{crc['ChecksumCRC64NVME']}"


@pytest.mark.seaweedfs
def compared_then_flipped(seaweed: S3Server, tmp_path: Path, body: bytes, upload, flip_at: int):
    """mp.bin uploaded by ``upload(client, bucket)`` to a fresh SeaweedFS bucket, a correct local copy compared
    with --checksum, then a byte flipped at ``flip_at`` and the journal gone, and --verify-local. Returns the
    --checksum summary, its HEADs and GET count of mp.bin, the journaled checksum, the --verify-local report and
    what ``upload`` returned."""
    bucket = f"compare-mp-{random.randrange(10**6)}"
    client = seaweed.uploading_client()
    try:
        client.create_bucket(Bucket=bucket)
        uploaded = upload(client, bucket)
    finally:
        client.close()
    path = tmp_path / "data" / bucket / "mp.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(body)
    with FaultProxy(seaweed.endpoint) as proxy:
        settings = {**FAST, "buckets": [bucket], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}
        summary = adl.AWSDataDownloader({**settings, "checksum": True, "log_file": ""}).run_full_download()
        heads = proxy.requests("HEAD", key="mp.bin")
        gets = proxy.count("GET", key="mp.bin")
        entry = json.loads((tmp_path / "data" / "download_resume.json").read_text())["completed"][bucket]["mp.bin"]
        path.write_bytes(flipped(body, flip_at))
        (tmp_path / "data" / "download_resume.json").unlink()
        report = adl.AWSDataDownloader(settings).run_full_download(verify_local=True)
    return summary, heads, gets, entry["checksum"], report, uploaded


def test_a_full_object_crc64nvme_multipart_object_is_compared_by_its_crc(seaweed: S3Server, tmp_path: Path) -> None:
    """moto's multipart full-object CRC64NVME is wrong (../shared/SERVERS.md), SeaweedFS's is right: the HEAD's
    CRC decides, so the file is read once, with no partNumber HEAD for the MD5 parts."""
    from test_checksums import crc64, put_full_object_multipart

    body = random.Random(11).randbytes(11 * MiB)
    summary, heads, gets, checksum, report, _ = compared_then_flipped(
        seaweed,
        tmp_path,
        body,
        lambda client, bucket: put_full_object_multipart(client, bucket, "mp.bin", body, 5 * MiB),
        10 * MiB,
    )

    assert summary.ok and (summary.checked, summary.local_checks) == (1, {"match": 1})
    assert gets == 0 and len(heads) == 1 and "partNumber" not in heads[0].query
    assert checksum == f"crc64nvme:{crc64(body)}"
    assert report.local_checks == {"differ": 1}
    assert report.failures[0].reason == "differs from S3 (crc64nvme)"


def test_a_composite_crc_multipart_object_is_compared_on_its_own_parts_by_its_crc(
    seaweed: S3Server, tmp_path: Path
) -> None:
    """A composite CRC32C is rebuilt from the local file's CRCs cut on the object's own upload parts, so the
    record is the CRC (an SSE-KMS multipart object has nothing else to compare by), and a flipped byte differs."""
    from test_checksums import put_composite_multipart

    body = random.Random(12).randbytes(11 * MiB)
    summary, _, gets, checksum, report, (_, composite) = compared_then_flipped(
        seaweed,
        tmp_path,
        body,
        lambda client, bucket: put_composite_multipart(client, bucket, "mp.bin", body, "CRC32C"),
        6 * MiB,
    )

    assert summary.ok and (summary.checked, summary.local_checks) == (1, {"match": 1})
    assert gets == 0
    assert checksum == f"crc32c:{composite}"
    assert report.local_checks == {"differ": 1}
    assert report.failures[0].reason == "differs from S3 (crc32c)"
