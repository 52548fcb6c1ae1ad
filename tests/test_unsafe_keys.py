"""Object keys are untrusted: nothing is written outside the download directory or through a symlink that leaves
it, unsafe keys fail with their reason (one log line each), the rest of the run still downloads, and control
characters in keys never forge a line in the log or the summary.

Which keys a server can hold was checked against moto 5.2 (the ``s3`` fixture) by PUT, ListObjectsV2 and GET:
it stores and lists back faithfully ``../x``, ``a/../../x``, ``/abs/x``, ``..``, ``.``, ``a//b``, ``a/./b``,
``dir/`` with data, ``a`` next to ``a/b``, 300-byte components, 1,024-byte keys, backslashes, C0/C1 control
characters, NFC and NFD spellings as two keys. Only a key with a newline cannot be PUT through moto's HTTP
router (404: its URL pattern does not match ``%0A``), so that key is planted straight into moto's in-process
backend and still reaches the tool through a real ListObjectsV2 round trip. Keys no server can hold at all
(an empty key, NUL) are tested on the planner (local_path_for) directly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import S3Server

import aws_data_downloader as adl

BUCKET = "hostile-keys"

FORGED = "2026-01-01 00:00:00 - ERROR - aws_data_downloader - FORGED all objects deleted"

#: Keys that must fail, each with (part of) the reason the tool gives.
UNSAFE = {
    "../x": "path component '..'",
    "a/../../x": "path component '..'",
    "/abs/x": "absolute path",
    "..": "path component '..'",
    ".": "path component '.'",
    "a//b": "path component '(empty)'",
    "a/./b": "path component '.'",
    "dir/": "folder marker with data",
    "p/" + "c" * 300: "longer than 255 bytes",
    "q/" + "z" * 1022: "longer than 255 bytes",  # 1,024 bytes, one component too long for a file name
    "ctl\x01x": "control character",
    "cr\rx": "control character",
    "tab\tx": "control character",
    "del\x7fx": "control character",
    "c1\x85x": "control character",
    "esc\x1b[2Jx": "control character",
    "evil/x": "symlink",
}

#: A 1,024-byte key (S3's maximum) made of components a file system accepts.
LONG_KEY = "long/" + "/".join(["y" * 200] * 5)
LONG_KEY += "w" * (1024 - len(LONG_KEY.encode()))

#: Keys that are safe on POSIX and must download byte for byte.
SAFE = [
    "good/one.bin",
    "good/two.bin",
    "back\\slash",
    "..\\..\\win-style",
    "caf\u00e9.txt",  # NFC
    "cafe\u0301.txt",  # NFD: another key, another file on Linux
    "sp ace/~tilde/#hash%25?q=1",
    "...",
    "..x/.hidden",
    LONG_KEY,
    "n/" + "n" * 255,  # exactly NAME_MAX
    "linkfile",  # its local path is a planted symlink: replaced, never followed
]


def body_of(key: str) -> bytes:
    return b"body of " + key.encode("utf-8", "surrogatepass") * 3


def plant_newline_key(bucket: str, key: str, body: bytes) -> None:
    """moto's HTTP router cannot take a key with a newline; its in-process backend (same process) can."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_object(bucket, key, body)


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.exists() else set()


def test_hostile_keys_round_trip(s3: S3Server, tmp_path: Path, run_cli) -> None:
    assert len(LONG_KEY.encode()) == 1024 and len(next(k for k in UNSAFE if k.startswith("q/")).encode()) == 1024
    s3.make_bucket(BUCKET)
    for key in [*UNSAFE, *SAFE, "a", "a/b"]:
        s3.put(BUCKET, key, body_of(key))
    newline_key = "nl\n" + FORGED
    plant_newline_key(BUCKET, newline_key, body_of(newline_key))
    listed = {
        o["Key"]
        for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    }
    assert listed == {*UNSAFE, *SAFE, "a", "a/b", newline_key}, "the server must hold every key faithfully"

    download_dir = tmp_path / "dl" / "data"
    bucket_dir = download_dir / BUCKET
    bucket_dir.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"do not touch")
    (bucket_dir / "evil").symlink_to(outside)  # <download_dir>/<bucket>/evil -> outside the download dir
    (bucket_dir / "linkfile").symlink_to(outside / "victim")
    before = files_under(tmp_path) - files_under(download_dir)

    log_file = tmp_path / "run.log"
    code, out, err = run_cli(
        "--buckets",
        BUCKET,
        "--download-dir",
        str(download_dir),
        "--log-file",
        str(log_file),
        "--manifest",
        str(tmp_path / "manifest.jsonl"),
        "--parallel",
        "4",
        *s3.args(),
    )
    assert code == adl.EXIT_FAILED, (out, err)

    # Nothing appeared or changed outside the download directory, nor through the symlinks.
    after = files_under(tmp_path) - files_under(download_dir)
    assert after - before == {log_file, tmp_path / "manifest.jsonl"}
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"do not touch"
    assert not Path("/abs").exists()
    for escaped in (tmp_path / "dl" / "x", download_dir / "x", tmp_path / "x"):
        assert not escaped.exists()

    # Every safe key is on disk, byte for byte; the planted symlink at a final path was replaced, not followed.
    for key in SAFE:
        path = download_dir / BUCKET / key
        assert path.is_file() and not path.is_symlink(), key
        assert path.read_bytes() == body_of(key), key
    nfc, nfd = bucket_dir / "caf\u00e9.txt", bucket_dir / "cafe\u0301.txt"
    assert nfc.read_bytes() != nfd.read_bytes()
    # 'a' and 'a/b' cannot both exist: one is stored, the other fails as a path conflict.
    stored = [key for key in ("a", "a/b") if (bucket_dir / key).is_file()]
    assert len(stored) == 1 and (bucket_dir / stored[0]).read_bytes() == body_of(stored[0])
    conflicting = "a/b" if stored == ["a"] else "a"

    summary_failures = {}
    for line in (tmp_path / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["status"] == "failed":
            summary_failures[record["key"]] = record["reason"]
    expected_failed = {*UNSAFE, conflicting, newline_key}
    assert set(summary_failures) == expected_failed
    for key, reason in UNSAFE.items():
        assert reason in summary_failures[key], (key, summary_failures[key])
    assert "path conflict" in summary_failures[conflicting]
    assert "control character" in summary_failures[newline_key]
    assert not list(download_dir.rglob(".adl-*")), "no temporary file is left behind"

    # One log line per failed key, the key shown with its control characters escaped.
    log_text = log_file.read_text(encoding="utf-8")
    assert "Retrying" not in log_text, "a local path conflict or an unsafe key is not worth another attempt"
    failed_lines = [line for line in log_text.splitlines() if " - Failed " in line]
    assert len(failed_lines) == len(expected_failed)
    for key in expected_failed:
        shown = f"Failed {BUCKET}/{adl.display_key(key)}: "
        assert sum(shown in line for line in failed_lines) == 1, shown

    # No forged lines: every line of the log and of stdout starts as the tool formats it, and no raw
    # control character (other than the newline ending each line) reaches either.
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ")
    for line in log_text.splitlines():
        assert stamp.match(line), repr(line)
        assert "FORGED" not in line or "\\x0a" in line
    for text in (log_text, out, err):
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), "raw control character in output"
        assert not any(line.startswith(FORGED[:19]) for line in text.splitlines())
    assert "DOWNLOAD SUMMARY" in out
    assert f"Failed:           {len(expected_failed)}" in out
    assert not any(line.startswith("2026-01-01") for line in out.splitlines())

    # A re-run changes nothing and still writes nowhere else.
    code, out, err = run_cli("--buckets", BUCKET, "--download-dir", str(download_dir), "--json", *s3.args())
    assert code == adl.EXIT_FAILED, (out, err)
    summary = json.loads(out)
    assert summary["failed"] == len(expected_failed)
    assert summary["skipped"] == len(SAFE) + 1
    assert (outside / "victim").read_bytes() == b"do not touch"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_symlinked_bucket_directory_and_temp_file_are_not_followed(s3: S3Server, tmp_path: Path, run_cli) -> None:
    """A bucket directory that is a symlink, and a planted temp-file symlink, never lead a write outside."""
    s3.make_bucket("linked-bucket")
    s3.make_bucket("plain-bucket")
    s3.put("linked-bucket", "f.bin", b"linked")
    s3.put("plain-bucket", "g.bin", b"plain")
    download_dir = tmp_path / "data"
    download_dir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep")
    (download_dir / "linked-bucket").symlink_to(outside, target_is_directory=True)
    (download_dir / "plain-bucket").mkdir()
    temp = adl.temp_path_for(download_dir / "plain-bucket" / "g.bin", "g.bin")
    temp.symlink_to(outside / "victim")

    code, out, err = run_cli(
        "--buckets", "linked-bucket", "plain-bucket", "--download-dir", str(download_dir), "--json", *s3.args()
    )
    assert code == adl.EXIT_FAILED, (out, err)
    summary = json.loads(out)
    assert summary["downloaded"] == 1 and summary["failed"] == 1
    assert summary["failures"] == [
        {"bucket": "linked-bucket", "key": "f.bin", "reason": "unsafe key: path goes through a symlink"}
    ]
    assert (download_dir / "plain-bucket" / "g.bin").read_bytes() == b"plain"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"keep"


# Keys no S3 server can hold (S3 keys are 1 to 1,024 bytes of UTF-8; NUL is refused by every store we know),
# and names of other operating systems: the planner alone decides about them.
@pytest.mark.parametrize(
    ("bucket", "key", "reason"),
    [
        ("b", "", "empty key"),
        ("", "k", "empty bucket"),
        ("b", "nul\x00x", "control character"),
        ("b", "line\nbreak", "control character"),
        ("..", "k", "bucket name"),
        ("a/b", "k", "bucket name"),
        ("b", "x/", "component '(empty)'"),
        ("b", "/", "absolute path"),
        ("b", "a/" + "\u00e9" * 128, "longer than 255 bytes"),  # 256 bytes of UTF-8 in 128 characters
    ],
)
def test_planner_refuses_keys_no_server_can_hold(tmp_path: Path, bucket: str, key: str, reason: str) -> None:
    with pytest.raises(adl.UnsafeKeyError, match=re.escape(reason)):
        adl.local_path_for(tmp_path, bucket, key)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs/x", "..", ".", "a//b", "a/./b", "x\x85y"])
def test_planner_result_never_leaves_the_download_dir(tmp_path: Path, key: str) -> None:
    with pytest.raises(adl.UnsafeKeyError):
        adl.local_path_for(tmp_path, "b", key)


@pytest.mark.parametrize("key", [*SAFE, "a", "a/b", "x" * 255])
def test_planner_places_safe_keys_under_the_bucket(tmp_path: Path, key: str) -> None:
    path = adl.local_path_for(tmp_path, "b", key)
    assert path.is_relative_to(tmp_path / "b")
    assert os.path.normpath(path) == str(path)
    assert str(path.relative_to(tmp_path / "b")) == key


def test_display_key_escapes_every_line_breaker() -> None:
    shown = adl.display_key("a\nb\rc\x0bd\x0ce\x1cf\x1dg\x1eh\x85i\u2028j\u2029k")
    assert shown.splitlines() == [shown], shown
