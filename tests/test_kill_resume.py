"""A kill -9 costs only the bytes that were not yet on disk: a re-run continues every part, range and stream
from its last write (the journal's progress slots), and the file is byte-identical.

The CLI runs as a subprocess against SeaweedFS behind the fault proxy, which caps each connection's throughput
so the kill lands where the test wants it (10%, 50%, 90% of the bytes served); the re-run goes through the same
proxy, which counts what it sends. What is missing is read from the disk after the kill, not taken from the proxy's
count: on a loaded machine a starved client leaves megabytes the proxy sent unread in its socket buffers. Allowed
beyond the missing bytes: one read buffer (chunk_size) and one proxy chunk per connection.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, MiB, S3Server, write_config
from faultproxy import FaultProxy, KiB
from test_checksums import put_full_object_multipart

import aws_data_downloader as adl

pytestmark = pytest.mark.seaweedfs

SIZE = 12 * MiB + 4321
CONNECTIONS = 3
CHUNK = 256 * KiB
#: The proxy sends each connection 32 KiB every 20 ms (~1.6 MiB/s), so a run takes a few seconds.
SLOW = {"chunk": 32 * KiB, "interval_s": 0.02}
SETTINGS = {
    "parallel_downloads": CONNECTIONS,
    "multipart_threshold_mb": 4,
    "multipart_chunksize_mb": 4,
    "chunk_size": CHUNK,
    "retry_backoff_s": 0.01,
    "log_file": "",
}


def seed(seaweed: S3Server, kind: str, bucket: str) -> dict[str, bytes]:
    """Two objects of one kind: legacy multipart (part MD5s), legacy single-part (one MD5 stream), or as S3
    stores them today (CRC64NVME: single-part, and multipart FULL_OBJECT)."""
    rng = random.Random(hash(kind) & 0xFFFF)
    files = {f"{kind}/{n}.bin": rng.randbytes(SIZE) for n in range(2)}
    client = seaweed.uploading_client()
    client.create_bucket(Bucket=bucket)
    for number, (key, body) in enumerate(files.items()):
        if kind == "md5-multipart":
            seaweed.put_multipart(bucket, key, body, part_size=5 * MiB)
        elif kind in ("md5-stream", "no-verify"):
            seaweed.put(bucket, key, body)
        elif number == 0:
            client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC64NVME")
        else:
            put_full_object_multipart(client, bucket, key, body, 5 * MiB)
    client.close()
    return files


def settings_for(kind: str) -> dict[str, object]:
    """Unverified objects are fetched in parallel ranges that carry no digest at all."""
    return {**SETTINGS, "verify_checksums": kind != "no-verify"}


def start(proxy: FaultProxy, bucket: str, tmp_path: Path, kind: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(REPO / "aws_data_downloader.py"), "--buckets", bucket, "--quiet"]
    argv += ["--download-dir", str(tmp_path / "data"), "--endpoint-url", proxy.url]
    argv += ["--config", write_config(tmp_path, settings_for(kind))]
    return subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
        start_new_session=True,
    )


def matching_prefix(disk: bytes, body: bytes) -> int:
    """How many leading bytes of ``disk`` equal ``body``'s."""
    size, step = min(len(disk), len(body)), 64 * KiB
    for start in range(0, size, step):
        ours, theirs = disk[start : min(size, start + step)], body[start : min(size, start + step)]
        if ours != theirs:
            return start + next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    return size


def bytes_on_disk(data: Path, bucket: str, files: dict[str, bytes]) -> int:
    """The bytes of ``files`` the killed run had written, read from the disk itself: an object at its final path
    whole; of an object in flight, in each part of its layout (the journal's begin record; one stream without
    one), the leading bytes that equal the object's. (A zero byte of the object just past a part's written end
    counts as written: that only makes the missing bytes a little fewer.)"""
    journal = data / "download_resume.json.journal"
    lines = journal.read_text().splitlines() if journal.exists() else []
    layouts = {}
    for record in map(json.loads, lines):
        if record["op"] == "begin":
            layouts[record["key"]] = record["layout"]
    written = 0
    for key, body in files.items():
        target = data / bucket / key
        if target.exists():
            assert target.read_bytes() == body, key
            written += len(body)
            continue
        temp = adl.temp_path_for(target, key)
        if not temp.exists():
            continue
        disk = temp.read_bytes()
        layout = layouts.get(key, [len(body)])
        for start, size in zip(itertools.accumulate(layout, initial=0), layout, strict=False):
            written += matching_prefix(disk[start : start + size], body[start : start + size])
    return written


def kill_at(proxy: FaultProxy, bucket: str, tmp_path: Path, served: float, kind: str) -> int:
    """Start the CLI, kill -9 its process group once the proxy has sent ``served`` bytes; returns the bytes sent.
    The proxy is left without rules and with its counts at zero, for the re-run."""
    proxy.slow(method="GET", where=lambda r: r.range is not None or "/kill-" in r.path, **SLOW)
    process = start(proxy, bucket, tmp_path, kind)
    deadline = time.monotonic() + 120
    while proxy.bytes_sent("GET") < served:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not get that far"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(60)
    assert process.returncode == -signal.SIGKILL, process.communicate()
    proxy.wait_idle()  # every connection of the dead run is closed: nothing more is counted as served
    sent = proxy.bytes_sent("GET")
    proxy.clear_rules()
    proxy.reset_stats()
    return sent


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["md5-multipart", "md5-stream", "crc64nvme", "no-verify"])
def test_a_kill_costs_only_the_bytes_not_yet_on_disk(
    seaweed: S3Server, tmp_path: Path, kind: str, fraction: float
) -> None:
    bucket = f"kill-{kind}-{int(fraction * 100)}-{random.randrange(10**6)}"
    files = seed(seaweed, kind, bucket)
    total = sum(map(len, files.values()))
    with FaultProxy(seaweed.endpoint) as proxy:
        served = kill_at(proxy, bucket, tmp_path, fraction * total, kind)
        missing = total - bytes_on_disk(tmp_path / "data", bucket, files)

        summary = adl.AWSDataDownloader(
            {
                **settings_for(kind),
                "buckets": [bucket],
                "download_dir": str(tmp_path / "data"),
                "endpoint_url": proxy.url,
            }
        ).run_full_download()
        refetched = proxy.bytes_sent("GET")

    assert summary.ok and summary.downloaded + summary.skipped == len(files), summary
    for key, body in files.items():
        assert (tmp_path / "data" / bucket / key).read_bytes() == body, key
    in_flight = CONNECTIONS * 2 * (CHUNK + SLOW["chunk"])  # object threads and part threads alike
    assert refetched >= missing, "a re-run cannot fetch less than what never arrived"
    assert refetched <= missing + in_flight, (
        f"served {served / MiB:.2f} MiB of {total / MiB:.2f} before the kill; the re-run fetched "
        f"{refetched / MiB:.2f} MiB, more than the missing {missing / MiB:.2f} MiB plus {in_flight / MiB:.2f} MiB"
    )
    assert not list((tmp_path / "data").rglob(".adl-*"))
    assert not (tmp_path / "data" / "download_resume.json.progress").exists(), "a finished run leaves no progress"


def spoil_kept_bytes(data: Path) -> set[str]:
    """Flip the first byte of every part the killed run's journal or progress slots say is (partly) on disk, as a
    power loss might have left it; returns the keys spoiled."""
    journal = [json.loads(line) for line in (data / "download_resume.json.journal").read_text().splitlines()]
    slots = adl.ProgressSlots(data / "download_resume.json.progress")
    slots.load()
    spoiled = set()
    for begin in (r for r in journal if r["op"] == "begin"):
        obj = adl.S3Object(begin["bucket"], begin["key"], begin["size"], begin["etag"], 0.0)
        layout, starts = begin["layout"], [0, *itertools.accumulate(begin["layout"])]
        kept = {r["part"] for r in journal if r["op"] == "part" and r["key"] == obj.key}
        for index in range(len(layout)):
            for kind in ("md5", "crc64nvme", "stream"):
                if (slot := slots.kept(adl.part_ident(obj, layout, index, kind))) and slot[0]:
                    kept.add(index)
        temp = adl.temp_path_for(data / obj.bucket / obj.key, obj.key)
        for index in kept if temp.exists() else ():
            with open(temp, "r+b") as handle:
                handle.seek(starts[index])
                first = handle.read(1)
                handle.seek(starts[index])
                handle.write(bytes([first[0] ^ 0xFF]))
            spoiled.add(obj.key)
    return spoiled


SPOILED = ("did not verify; fetching it whole", "does not match its journaled checksum")


@pytest.mark.parametrize("kind", ["md5-multipart", "md5-stream", "crc64nvme"])
def test_after_a_reboot_kept_bytes_that_went_bad_are_caught_and_fetched_again(
    seaweed: S3Server, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What a power loss can do: the journal says bytes are on disk that are not what was received. A run of
    another boot (here: the journal's boot id rewritten) checks the kept bytes against their journaled checksums
    (a spoiled part is fetched again) or the object's checksum catches them (it is fetched again whole); either
    way the run says so and the file is right."""
    bucket = f"kill-bad-{kind}-{random.randrange(10**6)}"
    files = seed(seaweed, kind, bucket)
    total = sum(map(len, files.values()))
    data = tmp_path / "data"
    with FaultProxy(seaweed.endpoint) as proxy:
        served = kill_at(proxy, bucket, tmp_path, 0.75 * total, kind)  # the second object has begun, whatever the order
        spoiled = spoil_kept_bytes(data)
        assert spoiled, "the killed run kept bytes of some object"
        journal = data / "download_resume.json.journal"
        journal.write_text(journal.read_text().replace(f'"boot":"{adl.boot_id()}"', '"boot":"an-earlier-boot"'))
        with caplog.at_level("INFO", logger="aws_data_downloader"):
            summary = adl.AWSDataDownloader(
                {**settings_for(kind), "buckets": [bucket], "download_dir": str(data), "endpoint_url": proxy.url}
            ).run_full_download()
        refetched = proxy.bytes_sent("GET")

    assert summary.ok and summary.downloaded + summary.skipped == len(files), summary
    for key, body in files.items():
        assert (data / bucket / key).read_bytes() == body, key
    said = {m.split(" ")[0].rstrip(":") for r in caplog.records if any(s in (m := r.getMessage()) for s in SPOILED)}
    assert said == {f"{bucket}/{key}" for key in spoiled}, caplog.text
    assert refetched > total - served, "the spoiled bytes were fetched again"


@pytest.mark.parametrize("kind", ["md5-multipart", "crc64nvme"])
def test_in_the_same_boot_kept_parts_are_trusted_without_reading_them_back(
    seaweed: S3Server, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a kill -9 the page cache holds exactly what was written: the re-run reads nothing back to check
    finished parts, so a byte changed behind the tool's back (not something a crash can do) goes unnoticed."""
    bucket = f"kill-same-{kind}-{random.randrange(10**6)}"
    files = seed(seaweed, kind, bucket)
    total = sum(map(len, files.values()))
    data = tmp_path / "data"
    with FaultProxy(seaweed.endpoint) as proxy:
        kill_at(proxy, bucket, tmp_path, 0.9 * total, kind)
        with caplog.at_level("INFO", logger="aws_data_downloader"):
            summary = adl.AWSDataDownloader(
                {**settings_for(kind), "buckets": [bucket], "download_dir": str(data), "endpoint_url": proxy.url}
            ).run_full_download()
    assert summary.ok, summary
    assert not [r for r in caplog.records if any(s in r.getMessage() for s in SPOILED)], caplog.text
    for key, body in files.items():
        assert (data / bucket / key).read_bytes() == body, key
