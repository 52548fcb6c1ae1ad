"""--max-bandwidth: the rate syntax, the token bucket on a fake clock (no wall-clock assertions), and capped
runs against moto whose bytes, progress lines and limiter use are checked.

The timing goals (within 10% of the cap over 30 s, no one-second window 25% above it) are measured by
benchmarks/bandwidth.py, not here."""

from __future__ import annotations

import heapq
import random
import threading
from pathlib import Path

import pytest
from conftest import MiB, S3Server, run_on_terminal

import aws_data_downloader as adl

KiB = 1024

# -- parse_rate -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "rate"),
    [
        ("50MB/s", 50 * MiB),  # aws-cli's units are 1024-based
        ("1.5GB/s", int(1.5 * 1024 * MiB)),
        ("512KB/s", 512 * KiB),
        ("10MiB/s", 10 * MiB),
        ("1048576", MiB),  # a bare number is bytes per second, as in aws-cli
        ("1048576B/s", MiB),
        (2097152, 2 * MiB),  # an integer in a config file
        ("400Mbit/s", 50_000_000),  # bits are 1000-based, as links are sold
        ("1Gbit/s", 125_000_000),
        ("80Kbit/s", 10_000),
        ("50mb/s", 50 * MiB),
        (" 2 MB/s ", 2 * MiB),
    ],
)
def test_rates_in_aws_cli_syntax_and_bits(given: object, rate: int) -> None:
    assert adl.parse_rate(given) == rate


@pytest.mark.parametrize("given", ["10M", "fast", "50 MB", "MB/s", "-5MB/s", "100B/s", "8Kbit/s", 0, 1000, True, [1]])
def test_bad_rates_are_refused(given: object) -> None:
    with pytest.raises(ValueError):
        adl.parse_rate(given)


def test_a_bad_rate_is_a_one_line_error_naming_the_flag(run_cli) -> None:
    code, _out, err = run_cli("--buckets", "b", "--max-bandwidth", "10M")
    assert code == adl.EXIT_USAGE
    assert err.strip().splitlines() == [
        "Error: --max-bandwidth must be a rate such as '50MB/s' or '400Mbit/s' (at least 1KB/s), bytes per "
        "second, or null, got '10M'"
    ]


def test_a_bad_rate_in_a_config_file_names_the_key_and_file(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("max_bandwidth: 50 megabytes\n")
    code, _out, err = run_cli("--buckets", "b", "--config", str(path))
    assert code == adl.EXIT_USAGE
    assert err.startswith(f"Error: max_bandwidth in {path} must be a rate such as '50MB/s'")
    assert len(err.strip().splitlines()) == 1


def test_config_keeps_bytes_per_second() -> None:
    assert adl.build_config({"max_bandwidth": "400Mbit/s"}).max_bandwidth == 50_000_000
    assert adl.build_config({}).max_bandwidth is None
    assert adl.Config().replace(max_bandwidth="1MB/s").replace(parallel_downloads=4).max_bandwidth == MiB


# -- BandwidthLimiter on a fake clock -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(limiter: adl.BandwidthLimiter, clock: FakeClock, readers: int, seconds: float, seed: int = 1):
    """Readers that each reserve a quantum, wait what the limiter says, read it, and ask again (a short read now
    and then gives bytes back). Returns (time read, bytes) events in time order."""
    rng = random.Random(seed)
    start = clock.now
    ready = [(start, index) for index in range(readers)]
    events: list[tuple[float, int]] = []
    while ready:
        at, index = heapq.heappop(ready)
        if at - start >= seconds:
            continue
        clock.now = max(clock.now, at)
        want = limiter.quantum
        wait = limiter.reserve(want)
        got = want if rng.random() > 0.2 else rng.randrange(1, want)
        if got < want:
            limiter.refund(want - got)
        events.append((clock.now + wait, got))
        heapq.heappush(ready, (clock.now + wait + rng.uniform(0, 0.002), index))
    events.sort()
    return events


def windows(events: list[tuple[float, int]], width: float, step: float = 0.05) -> list[int]:
    start, end = events[0][0], events[-1][0]
    sums = []
    at = start
    while at + width <= end:
        sums.append(sum(size for when, size in events if at <= when < at + width))
        at += step
    return sums


@pytest.mark.parametrize("readers", [1, 4, 32])
def test_the_rate_over_time_is_the_cap_and_no_second_exceeds_it_by_more_than_the_burst(readers: int) -> None:
    clock = FakeClock()
    rate = 2 * MiB
    limiter = adl.BandwidthLimiter(rate, clock=clock)
    events = simulate(limiter, clock, readers, seconds=30)
    total = sum(size for _, size in events)
    elapsed = events[-1][0] - events[0][0]
    assert total / elapsed == pytest.approx(rate, rel=0.02)
    per_second = windows(events, 1.0)
    assert max(per_second) <= rate * (1 + adl.BandwidthLimiter.BURST_S) + limiter.quantum
    assert min(per_second) >= rate * 0.9


def test_an_idle_limiter_lets_through_only_one_burst() -> None:
    clock = FakeClock()
    limiter = adl.BandwidthLimiter(MiB, clock=clock)
    clock.now += 3600  # idle for an hour: the bucket still holds only BURST_S of the rate
    assert limiter.burst == pytest.approx(MiB * adl.BandwidthLimiter.BURST_S)
    free = 0
    while limiter.reserve(1024) == 0.0:
        free += 1024
    assert limiter.burst - 1024 < free <= limiter.burst
    assert limiter.reserve(0) == pytest.approx((free + 1024 - limiter.burst) / MiB)  # the overdraft, at the rate


def test_reservations_queue_and_a_refund_shortens_the_queue() -> None:
    clock = FakeClock()
    limiter = adl.BandwidthLimiter(200 * KiB, clock=clock)  # burst and quantum: 10 KiB
    assert limiter.quantum == 10 * KiB
    assert limiter.reserve(10 * KiB) == 0.0
    assert limiter.reserve(10 * KiB) == pytest.approx(0.05)
    assert limiter.reserve(10 * KiB) == pytest.approx(0.1)
    limiter.refund(10 * KiB)
    assert limiter.reserve(0) == pytest.approx(0.05)
    clock.now += 0.05
    assert limiter.reserve(0) == pytest.approx(0.0, abs=1e-9)


def test_many_threads_lose_no_reservation() -> None:
    clock = FakeClock()  # frozen: every byte reserved is still owed at the end
    limiter = adl.BandwidthLimiter(MiB, clock=clock)
    barrier = threading.Barrier(16)

    def reader() -> None:
        barrier.wait()
        for _ in range(2000):
            limiter.reserve(100)
            limiter.refund(30)

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owed = 16 * 2000 * 70 - limiter.burst
    assert limiter.reserve(0) == pytest.approx(owed / MiB)


def test_the_smallest_cap_still_reads_at_least_a_byte() -> None:
    limiter = adl.BandwidthLimiter(adl.MIN_RATE, clock=FakeClock())
    assert limiter.quantum == int(adl.MIN_RATE * adl.BandwidthLimiter.BURST_S) >= 1


def test_receive_buffers_hold_a_tenth_of_a_second_of_the_cap_between_them() -> None:
    assert adl.capped_receive_buffer(adl.build_config({})) is None
    config = adl.build_config({"max_bandwidth": "32MB/s", "parallel_downloads": 32})
    assert adl.capped_receive_buffer(config.replace(max_bandwidth="1GB/s")) == int(
        1024 * MiB * adl.RECEIVE_BUFFER_S / 32
    )
    assert adl.capped_receive_buffer(config.replace(max_bandwidth="8MB/s")) == 64 * KiB  # the floor
    assert adl.capped_receive_buffer(config.replace(max_bandwidth="100GB/s", parallel_downloads=1)) == 4 * MiB


@pytest.mark.parametrize(
    ("rate", "parallel", "connections"),
    [("2MB/s", 32, 1), ("8MB/s", 32, 6), ("8MB/s", 4, 4), ("400Mbit/s", 32, 32), ("100KB/s", 32, 1), (None, 32, 32)],
)
def test_a_low_cap_opens_fewer_connections(rate: str | None, parallel: int, connections: int) -> None:
    """Each connection's buffers fill once at the start, before the limiter holds anyone back: under a low cap,
    as few connections as leave each a buffer of twice the 64 KiB floor within a tenth of a second of the cap."""
    config = adl.build_config({"max_bandwidth": rate, "parallel_downloads": parallel})
    assert adl.capped_connections(config) == connections
    if rate is not None:
        capped = config.replace(parallel_downloads=connections)
        buffers = connections * (adl.capped_receive_buffer(capped) or 0)
        assert buffers <= max(config.max_bandwidth * adl.RECEIVE_BUFFER_S, 2 * adl.MIN_RECEIVE_BUFFER) + 1


# -- capped runs against moto ---------------------------------------------------------------------------------


def seed_mixed(s3: S3Server, bucket: str) -> dict[str, bytes]:
    """Small objects (the event loop's) and one of 600 KiB (the worker threads')."""
    rng = random.Random(14)
    files = {f"small/{index}.bin": rng.randbytes(40 * KiB + index) for index in range(4)}
    files["large/whole.bin"] = rng.randbytes(600 * KiB)
    s3.make_bucket(bucket)
    for key, body in files.items():
        s3.put(bucket, key, body)
    return files


def test_a_capped_run_reads_every_body_through_the_one_limiter(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    files = seed_mixed(s3, "cap-bkt")
    limiters: list[adl.BandwidthLimiter] = []
    net: dict[str, int] = {}
    lock = threading.Lock()
    original_init, original_reserve, original_refund = (
        adl.BandwidthLimiter.__init__,
        adl.BandwidthLimiter.reserve,
        adl.BandwidthLimiter.refund,
    )

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        limiters.append(self)

    def account(amount: int) -> None:
        name = "loop" if threading.current_thread().name == "adl-small" else "threads"
        with lock:
            net[name] = net.get(name, 0) + amount

    def reserve(self, amount):
        account(amount)
        return original_reserve(self, amount)

    def refund(self, amount):
        account(-amount)
        return original_refund(self, amount)

    monkeypatch.setattr(adl.BandwidthLimiter, "__init__", init)
    monkeypatch.setattr(adl.BandwidthLimiter, "reserve", reserve)
    monkeypatch.setattr(adl.BandwidthLimiter, "refund", refund)
    (tmp_path / "cap.yaml").write_text("progress_interval_s: 0.2\nmax_bandwidth: 400KB/s\n")
    code, out, err = run_cli("--config", "cap.yaml", "--buckets", "cap-bkt", "--download-dir", "data",
                             "--log-file", "run.log", *s3.args())  # fmt: skip
    assert code == 0, (out, err)
    root = tmp_path / "data" / "cap-bkt"
    for key, body in files.items():
        assert (root / key).read_bytes() == body, key
    assert len(limiters) == 1 and limiters[0].rate == 400 * KiB
    # The worker threads reserved exactly the large body; the loop at least the small bodies (and their heads).
    assert net["threads"] == len(files["large/whole.bin"])
    assert net["loop"] >= sum(len(body) for key, body in files.items() if key.startswith("small/"))
    log_text = (tmp_path / "run.log").read_text()
    assert "Download rate capped at 400.0 KB/s for the whole run" in log_text
    progress = [line for line in log_text.splitlines() if " - INFO - aws_data_downloader - Progress: " in line]
    assert progress and all(line.endswith(" MB/s (cap 400.0 KB/s)") for line in progress), progress


def test_without_a_cap_there_is_no_limiter(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli):
    files = seed_mixed(s3, "nocap-bkt")

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a limiter was made without --max-bandwidth")

    monkeypatch.setattr(adl.BandwidthLimiter, "__init__", forbidden)
    code, out, err = run_cli("--buckets", "nocap-bkt", "--download-dir", "data", "--log-file", "run.log", *s3.args())
    assert code == 0, (out, err)
    assert (tmp_path / "data" / "nocap-bkt" / "large" / "whole.bin").read_bytes() == files["large/whole.bin"]
    assert "capped" not in (tmp_path / "run.log").read_text()


def test_the_progress_bar_shows_the_cap(s3: S3Server, tmp_path: Path) -> None:
    files = seed_mixed(s3, "capbar-bkt")
    argv = ["--buckets", "capbar-bkt", "--download-dir", "data", "--max-bandwidth", "2MB/s"]
    text, out, code = run_on_terminal(argv, tmp_path, s3.env())
    assert code == 0, (out, text)
    final_frame = text.replace("\r\n", "\n").split("\r")[-1]
    # the terminal is 100 columns: tqdm cuts the frame after "Cap=2.0 MB"
    assert "Success=5, Failed=0" in final_frame and "Speed=" in final_frame and "Cap=2.0 MB" in final_frame
    assert (tmp_path / "data" / "capbar-bkt" / "small" / "3.bin").read_bytes() == files["small/3.bin"]


def test_a_capped_run_from_python_with_the_boto3_engine(s3: S3Server, tmp_path: Path) -> None:
    files = seed_mixed(s3, "capapi-bkt")
    downloader = adl.AWSDataDownloader(
        {"buckets": ["capapi-bkt"], "download_dir": str(tmp_path / "api"), "endpoint_url": s3.endpoint},
        max_bandwidth="4Mbit/s",
        engine="boto3",
    )
    assert downloader.config.max_bandwidth == 500_000
    summary = downloader.run_full_download()
    assert summary.downloaded == 5 and summary.failed == 0
    for key, body in files.items():
        assert (tmp_path / "api" / "capapi-bkt" / key).read_bytes() == body


def test_a_run_under_a_low_cap_keeps_few_connections_open(
    s3: S3Server, proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Measured at the proxy, over real sockets: 16 small objects under a 400KB/s cap with --parallel 32 go
    through one object connection (plus the listing's), not one per object as an uncapped run would open."""
    rng = random.Random(15)
    files = {f"s/{index:02d}.bin": rng.randbytes(8 * KiB + index) for index in range(16)}
    s3.make_bucket("few-conns")
    for key, body in files.items():
        s3.put("few-conns", key, body)
    seen: list[int] = []
    proxy.on_request(lambda request: seen.append(proxy.open_connections()), key="few-conns/s/")
    caplog.set_level("INFO", logger="aws_data_downloader")
    settings = {"buckets": ["few-conns"], "download_dir": str(tmp_path / "data"), "endpoint_url": proxy.url}
    summary = adl.AWSDataDownloader(
        {**settings, "max_bandwidth": "400KB/s", "parallel_downloads": 32}
    ).run_full_download()

    assert summary.ok and summary.downloaded == len(files)
    for key, body in files.items():
        assert (tmp_path / "data" / "few-conns" / key).read_bytes() == body
    assert len(seen) == len(files) and max(seen) <= 3, seen
    assert "1 connections instead of 32 under the 400.0 KB/s cap" in caplog.text
