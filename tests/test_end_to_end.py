"""The whole path, as a user runs it: CLI against a real S3 server, bytes on disk equal the objects' bytes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from conftest import REPO, MiB, S3Server

import aws_data_downloader as adl


def seed_dataset(server: S3Server, bucket: str) -> dict[str, bytes]:
    rng = random.Random(1)
    server.make_bucket(bucket)
    files = {
        "coryell/Co Rd 4235/img/000_31.708136_-97.693460.png": rng.randbytes(30_000),
        "coryell/Co Rd 4235/img/001_31.708228_-97.693279.png": rng.randbytes(40_000),
        "coryell/Co Rd 4235/ann/annotations.json": b'{"images": 2}',
        "coryell/Co Rd 360/img/empty.png": b"",
        "other-data/notes.txt": rng.randbytes(1000),
    }
    for key, body in files.items():
        server.put(bucket, key, body)
    big = rng.randbytes(12 * MiB + 3)
    server.put_multipart(bucket, "coryell/Co Rd 360/big.bin", big, part_size=5 * MiB)
    files["coryell/Co Rd 360/big.bin"] = big
    server.put(bucket, "coryell/folder-marker/", b"")
    return files


def assert_on_disk(root: Path, bucket: str, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        path = root / bucket / key
        assert path.read_bytes() == body, key


def test_cli_downloads_every_object_byte_for_byte(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed_dataset(s3, "road-data")
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", str(tmp_path / "data"), *s3.args())
    assert code == adl.EXIT_OK, (out, err)
    assert_on_disk(tmp_path / "data", "road-data", files)
    assert "DOWNLOAD SUMMARY" in out
    assert f"Total files:      {len(files)}" in out
    assert not (tmp_path / "data" / "road-data" / "coryell" / "folder-marker").exists(), "a folder marker is no file"
    leftovers = list((tmp_path / "data").rglob(".adl-*"))
    assert leftovers == []

    code, out, err = run_cli("--buckets", "road-data", "--download-dir", str(tmp_path / "data"), "--json", *s3.args())
    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["skipped"] == len(files) and summary["downloaded"] == 0
    assert summary["skipped_reasons"] == {"already downloaded": len(files)}


def test_seaweedfs_download_verifies_multipart(seaweed: S3Server, tmp_path: Path, run_cli) -> None:
    bucket = f"compat-{random.randrange(10**9)}"
    files = seed_dataset(seaweed, bucket)
    code, out, err = run_cli("--buckets", bucket, "--download-dir", str(tmp_path / "d"), "--json", *seaweed.args())
    assert code == 0, (out, err)
    assert_on_disk(tmp_path / "d", bucket, files)
    journal = json.loads((tmp_path / "d" / "download_resume.json").read_text())
    entry = journal["completed"][bucket]["coryell/Co Rd 360/big.bin"]
    assert entry["checksum"].startswith("md5-multipart:")


def test_script_runs_as_a_subprocess(s3: S3Server, tmp_path: Path) -> None:
    files = seed_dataset(s3, "sub")
    result = subprocess.run(
        [sys.executable, str(REPO / "aws_data_downloader.py"), "--buckets", "sub", "--download-dir", "out", "--quiet"],
        cwd=tmp_path,
        env=s3.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert_on_disk(tmp_path / "out", "sub", files)
    assert "\r" not in result.stderr and "Downloading" not in result.stderr
    assert (tmp_path / "aws_downloader.log").exists()
