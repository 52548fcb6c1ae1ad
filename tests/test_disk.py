"""Disk space and the download directory: the free-space pre-check, the disk filling mid-run (ENOSPC), and a
download directory that cannot be used. Runs are in-process (main()) so the disk can be faked by patching
shutil.disk_usage and os.pwrite as the module sees them; the S3 side is moto's real server.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
from conftest import MiB, S3Server

import aws_data_downloader as adl

KiB = 1024
BUCKET = "disk-data"


def seed(server: S3Server) -> dict[str, bytes]:
    """Three single-GET objects, a two-part multipart object (fetched in ranged parts), three more small ones."""
    rng = random.Random(5)
    server.make_bucket(BUCKET)
    files = {f"a{i}.bin": rng.randbytes(100 * KiB) for i in range(1, 4)}
    files.update({f"z{i}.bin": rng.randbytes(100 * KiB) for i in range(1, 4)})
    for key, body in files.items():
        server.put(BUCKET, key, body)
    big = rng.randbytes(6 * MiB + 5)
    server.put_multipart(BUCKET, "m/big.bin", big, part_size=5 * MiB)
    files["m/big.bin"] = big
    return files


def fake_free_space(monkeypatch: pytest.MonkeyPatch, free: int, total: int | None = None) -> None:
    """The download directory's filesystem reports ``free`` bytes free (of ``total``, default: the real size)."""
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        size = usage.total if total is None else total
        return type(usage)(size, size - free, free)

    monkeypatch.setattr(adl.shutil, "disk_usage", disk_usage)


def objects_on_disk(download_dir: Path) -> dict[str, bytes]:
    bucket_dir = download_dir / BUCKET
    if not bucket_dir.exists():
        return {}
    return {
        p.relative_to(bucket_dir).as_posix(): p.read_bytes()
        for p in bucket_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".adl-")
    }


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


# -- the pre-check --------------------------------------------------------------------------------------------


def test_precheck_refuses_before_writing_and_ignore_disk_space_goes_on(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = seed(s3)
    total = sum(len(body) for body in files.values())
    fake_free_space(monkeypatch, adl.DiskBudget.MARGIN + 1 * MiB)
    download_dir = tmp_path / "data"
    args = ["--buckets", BUCKET, "--download-dir", str(download_dir), *s3.args()]

    code, out, err = run_cli(*args)
    assert code == adl.EXIT_NO_SPACE, (out, err)
    [line] = error_lines(err)
    free, kept = adl.format_size(adl.DiskBudget.MARGIN + 1 * MiB), adl.format_size(adl.DiskBudget.MARGIN)
    assert f"needs {adl.format_size(total)}, {free} is free and {kept} of it is kept free" in line, line
    assert "--ignore-disk-space" in line
    assert "Stopped: not enough disk space" in out
    assert objects_on_disk(download_dir) == {} and not list(download_dir.rglob(".adl-*"))

    code, out, err = run_cli(*args, "--ignore-disk-space", "--json")
    assert code == adl.EXIT_OK, (out, err)
    assert json.loads(out)["downloaded"] == len(files)
    assert objects_on_disk(download_dir) == files


def test_precheck_counts_only_what_is_left_to_fetch(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = seed(s3)
    download_dir = tmp_path / "data"
    args = ["--buckets", BUCKET, "--download-dir", str(download_dir), *s3.args()]
    code, out, err = run_cli(*args)
    assert code == adl.EXIT_OK, (out, err)
    fake_free_space(monkeypatch, adl.DiskBudget.MARGIN + 1)  # nothing left to fetch: any free space will do
    code, out, err = run_cli(*args)
    assert code == adl.EXIT_OK, (out, err)
    assert objects_on_disk(download_dir) == files


def test_a_listing_of_many_pages_writes_the_pages_that_fit_then_stops_and_a_rerun_completes(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each prefix is listed as its own page, and each page is reserved as it arrives (the first download waits
    for one page, not for the listing): the pages that fit are downloaded, the first that does not fit stops
    the dispatching, the rest are only counted so the error names what the whole selection needs (exit 5).
    With the space freed, a re-run fetches only the rest."""
    s3.make_bucket(BUCKET)
    files = {f"p{n}/{n}.bin": bytes([n]) * (200 * KiB) for n in range(8)}
    for key, body in files.items():
        s3.put(BUCKET, key, body)
    fake_free_space(monkeypatch, adl.DiskBudget.MARGIN + 1 * MiB)  # room for five of the 200 KiB pages
    download_dir = tmp_path / "data"
    prefixes = [f"p{n}/" for n in range(8)]
    args = ["--buckets", BUCKET, "--prefixes", *prefixes, "--download-dir", str(download_dir), *s3.args()]

    code, out, err = run_cli(*args)
    assert code == adl.EXIT_NO_SPACE, (out, err)
    assert objects_on_disk(download_dir) == {key: files[key] for key in sorted(files)[:5]}
    assert not list(download_dir.rglob(".adl-*.part"))
    [line] = error_lines(err)
    assert f"needs {adl.format_size(sum(map(len, files.values())))}" in line, line
    assert "Stopped: not enough disk space" in out

    fake_free_space(monkeypatch, adl.DiskBudget.MARGIN + 1 * MiB - 5 * 200 * KiB + 3 * 200 * KiB)
    code, out, err = run_cli(*args, "--json")
    assert code == adl.EXIT_OK, (out, err)
    assert (json.loads(out)["downloaded"], json.loads(out)["skipped"]) == (3, 5)
    assert objects_on_disk(download_dir) == files


def test_a_selection_of_one_page_that_does_not_fit_writes_nothing_from_python(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check stays exact for a selection of one listing page (up to 1,000 objects): nothing is fetched, and
    the Python API raises DiskSpaceError carrying the summary so far."""
    files = seed(s3)
    fake_free_space(monkeypatch, adl.DiskBudget.MARGIN + 1 * MiB)
    download_dir = tmp_path / "data"
    downloader = adl.AWSDataDownloader(
        {"buckets": [BUCKET], "download_dir": str(download_dir), "endpoint_url": s3.endpoint}
    )
    with pytest.raises(adl.DiskSpaceError, match="needs " + adl.format_size(sum(map(len, files.values())))) as caught:
        downloader.run_full_download()
    summary = caught.value.summary
    assert summary is not None and (summary.downloaded, summary.total_files) == (0, len(files))
    assert summary.stopped_reason == "not enough disk space"
    assert objects_on_disk(download_dir) == {}


def test_the_first_page_is_downloading_before_the_second_is_listed(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, fake_engine
) -> None:
    """Time to the first file is one listing page: the second page's request waits until the first page's
    object has been asked for (under the old ten-page plan it waited for nothing and the GET came last)."""
    files = {f"img/{n:02d}.bin": bytes([n]) * (200 * KiB) for n in range(3)}
    engine = fake_engine({BUCKET: files}, page_size=1)
    first_get = threading.Event()
    order: list[str] = []
    real_get, real_list = engine.get, engine.list_page

    def get(obj, request):
        first_get.set()
        return real_get(obj, request)

    def list_page(bucket, prefix, token, max_keys=None):
        if token == "1":  # the second page: asked for only once the first page is being fetched
            order.append("GET before page 2" if first_get.wait(timeout=30) else "page 2 before any GET")
        return real_list(bucket, prefix, token, max_keys)

    monkeypatch.setattr(engine, "get", get)
    monkeypatch.setattr(engine, "list_page", list_page)
    download_dir = tmp_path / "data"
    # Page after page (list_page): the parallel listing's pages also go to the downloads one by one as they come.
    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", str(download_dir), "--log-file", "", "--list-concurrency", "1"
    )  # fmt: skip
    assert code == adl.EXIT_OK, (out, err)
    assert order == ["GET before page 2"]
    assert objects_on_disk(download_dir) == files


# -- the disk fills mid-run -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "in_flight", "partial_kept", "settings"),
    [
        # A single GET in a worker thread: its temp file is removed.
        (250 * KiB, "a3.bin", False, ["small_object_kb: 0"]),
        # Ranged parts: the temp file and part 1 are kept.
        (300 * KiB + 5 * MiB + 1 * MiB, "m/big.bin", True, ["small_object_kb: 0"]),
        # The small-object loop (every object is small enough, one connection): its temp file is removed.
        (250 * KiB, "a3.bin", False, ["small_object_kb: 8192", "verify_checksums: false"]),
    ],
    ids=["single-get", "ranged-parts", "small-object-loop"],
)
def test_disk_full_mid_run_stops_keeps_completed_files_and_a_rerun_completes(
    s3: S3Server,
    tmp_path: Path,
    run_cli,
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
    in_flight: str,
    partial_kept: bool,
    settings: list[str],
) -> None:
    files = seed(s3)
    download_dir = tmp_path / "data"
    # One download at a time, in key order: which file the disk fills on is known.
    (tmp_path / "one-path.yaml").write_text("\n".join(settings) + "\n")
    args = ["--buckets", BUCKET, "--download-dir", str(download_dir), "--parallel", "1", "--config", "one-path.yaml"]
    args += s3.args()
    real_pwrite = os.pwrite
    written = 0

    def pwrite(fd: int, data, offset: int) -> int:
        nonlocal written
        if written + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        count = real_pwrite(fd, data, offset)
        written += count
        return count

    monkeypatch.setattr(adl.os, "pwrite", pwrite)
    code, out, err = run_cli(*args, "--log-file", "full.log")
    monkeypatch.setattr(adl.os, "pwrite", real_pwrite)  # space is freed

    assert code == adl.EXIT_NO_SPACE, (out, err)
    [line] = error_lines(err)
    assert "no space left on device" in line and "completed files are kept" in line
    assert "Traceback" not in err
    assert "Stopped: disk full" in out
    # Every completed file is intact; the object in flight and the ones after it are not at a final path.
    on_disk = objects_on_disk(download_dir)
    completed = {key for key in sorted(files) if key < in_flight}
    assert set(on_disk) == completed
    assert all(on_disk[key] == files[key] for key in on_disk)
    temps = list(download_dir.rglob(".adl-*.part"))
    resume = json.loads((download_dir / "download_resume.json").read_text())
    if partial_kept:
        assert [p.name for p in temps] == [adl.temp_path_for(download_dir / BUCKET / in_flight, in_flight).name]
        assert list(resume["partial"][BUCKET][in_flight]["done"]) == ["0"]
    else:
        assert temps == [] and resume["partial"] == {}
    log_text = (tmp_path / "full.log").read_text()
    assert log_text.count("no space left on device") >= 1
    assert "Retrying" not in log_text

    code, out, err = run_cli(*args, "--log-file", "rerun.log", "--json")
    assert code == adl.EXIT_OK, (out, err)
    summary = json.loads(out)
    assert summary["skipped"] == len(completed) and summary["downloaded"] == len(files) - len(completed)
    assert objects_on_disk(download_dir) == files
    assert not list(download_dir.rglob(".adl-*"))
    if partial_kept:
        assert "Resuming disk-data/m/big.bin: 1 of 2 parts already on disk" in (tmp_path / "rerun.log").read_text()


# -- a download directory that cannot be used -----------------------------------------------------------------


def unusable_dirs(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "a-file").write_bytes(b"x")
    return [
        (str(tmp_path / "a-file" / "data"), "a component of the path is a file"),
        (str(tmp_path / "a-file"), "exists and is not a directory"),
        ("/proc/adl-no-such-dir/data", "cannot be created"),
        ("/sys/kernel/adl-download", "cannot be created: permission denied"),
        ("/sys/kernel", "is not writable: permission denied"),
    ]


def unusable(path: str) -> bool:
    """Tests run as root, so chmod blocks nothing: check that the kernel really refuses this directory."""
    probe = Path(path) / ".adl-probe"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("case", range(5), ids=["component-is-file", "is-a-file", "proc", "sys-mkdir", "sys-dir"])
def test_unusable_download_dir_is_one_clear_error(s3: S3Server, tmp_path: Path, run_cli, case: int) -> None:
    path, message = unusable_dirs(tmp_path)[case]
    if path.startswith(("/sys", "/proc")) and not unusable(path):
        pytest.skip(f"{path} is usable on this machine")
    s3.make_bucket(BUCKET)
    s3.put(BUCKET, "k", b"v")
    code, out, err = run_cli("--buckets", BUCKET, "--download-dir", path, *s3.args())
    assert code == adl.EXIT_USAGE, (out, err)
    [line] = error_lines(err)
    assert message in line and path in line, line
    assert out == ""
    assert "Traceback" not in err
    assert (tmp_path / "a-file").read_bytes() == b"x"


def test_a_small_volume_keeps_a_small_share_free_not_64_mib(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64 MiB volume (a USB stick, a small tmpfs) with 60 MiB free takes a selection that fits: the space kept
    free scales with the volume (5% of it), and a selection too big says free and kept-free apart."""
    files = seed(s3)
    total = sum(len(body) for body in files.values())
    download_dir = tmp_path / "data"
    args = ["--buckets", BUCKET, "--download-dir", str(download_dir), *s3.args()]

    fake_free_space(monkeypatch, total + 4 * MiB, total=64 * MiB)  # 5% of 64 MiB is 3.2 MiB
    code, out, err = run_cli(*args)
    assert code == 0, (out, err)
    assert objects_on_disk(download_dir) == files

    fake_free_space(monkeypatch, total + 2 * MiB, total=64 * MiB)
    code, out, err = run_cli(*args, "--overwrite")
    assert code == adl.EXIT_NO_SPACE, (out, err)
    [line] = error_lines(err)
    free, kept = adl.format_size(total + 2 * MiB), adl.format_size(64 * MiB // 20)
    assert f"{free} is free and {kept} of it is kept free" in line, line
