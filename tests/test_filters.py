"""Filters, prefixes, folder markers, archived storage classes, key-to-path and skip decisions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import MiB, S3Server

import aws_data_downloader as adl


def obj(key: str, size: int = 100, bucket: str = "bkt", modified: float = 1_700_000_000.0) -> adl.S3Object:
    return adl.S3Object(bucket=bucket, key=key, size=size, etag="0" * 32, last_modified=modified)


def filters(**values) -> adl.Filters:
    return adl.Filters.from_config(adl.build_config(values))


# -- filter_reason: pure --------------------------------------------------------------------------------------


def test_no_filters_keep_everything() -> None:
    assert filter_reason_of("any/key.bin", filters()) is None
    assert filter_reason_of("empty", filters(), size=0) is None


def filter_reason_of(key: str, rules: adl.Filters, size: int = 100) -> str | None:
    return adl.filter_reason(obj(key, size), rules)


@pytest.mark.parametrize("extensions", [[".png"], [".PNG"], ["png"], ["PNG"]])
def test_extensions_are_case_insensitive_with_or_without_dot(extensions: list[str]) -> None:
    rules = filters(file_extensions=extensions)
    assert filter_reason_of("img/a.png", rules) is None
    assert filter_reason_of("img/B.PNG", rules) is None
    assert filter_reason_of("img/c.Png", rules) is None
    assert filter_reason_of("img/a.jpg", rules) == "extension"
    assert filter_reason_of("img/apng", rules) == "extension"


def test_several_extensions() -> None:
    rules = filters(file_extensions=[".png", ".json"])
    assert filter_reason_of("a.json", rules) is None
    assert filter_reason_of("a.png", rules) is None
    assert filter_reason_of("a.txt", rules) == "extension"


def test_include_keeps_keys_matching_any_pattern() -> None:
    rules = filters(include=["coryell/*/img/*", "*.json"])
    assert filter_reason_of("coryell/Co Rd 4235/img/000.png", rules) is None
    assert filter_reason_of("other/ann.json", rules) is None
    assert filter_reason_of("other/readme.txt", rules) == "include"


def test_exclude_drops_keys_matching_any_pattern_even_when_included() -> None:
    rules = filters(include=["*.png"], exclude=["*/thumbs/*", "*_tmp.png"])
    assert filter_reason_of("a/img/1.png", rules) is None
    assert filter_reason_of("a/thumbs/1.png", rules) == "exclude"
    assert filter_reason_of("a/img/1_tmp.png", rules) == "exclude"
    assert filter_reason_of("a/img/1.txt", rules) == "include"


def test_globs_are_case_sensitive_like_keys() -> None:
    rules = filters(exclude=["*.TMP"])
    assert filter_reason_of("a.tmp", rules) is None
    assert filter_reason_of("a.TMP", rules) == "exclude"


def test_size_limits_are_inclusive_in_mib() -> None:
    rules = filters(min_file_size_mb=1, max_file_size_mb=2)
    assert filter_reason_of("a", rules, size=MiB - 1) == "size < min"
    assert filter_reason_of("a", rules, size=MiB) is None
    assert filter_reason_of("a", rules, size=2 * MiB) is None
    assert filter_reason_of("a", rules, size=2 * MiB + 1) == "size > max"
    assert filter_reason_of("a", filters(max_file_size_mb=0), size=0) is None


def test_from_config_normalises_once() -> None:
    rules = filters(file_extensions=["PNG", ".Json", "."], min_file_size_mb=0.5, include="a*")
    assert rules.extensions == (".png", ".json")
    assert rules.min_size == MiB // 2
    assert rules.max_size is None
    assert rules.include == ("a*",)


# -- prefixes: pure -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ([], [""]),
        (["a/"], ["a/"]),
        (["a/", "a/b/"], ["a/"]),
        (["a/b/", "a/"], ["a/"]),
        (["a/", "a/"], ["a/"]),
        (["a/", "ab/"], ["a/", "ab/"]),
        (["a", "ab/"], ["a"]),
        (["", "x/"], [""]),
        (["coryell/", "road-distress/", "coryell/Co Rd 360/"], ["coryell/", "road-distress/"]),
    ],
)
def test_collapse_prefixes(given: list[str], kept: list[str]) -> None:
    assert adl.collapse_prefixes(given) == kept


# -- local_path_for and skip_reason: pure ---------------------------------------------------------------------


def test_local_path_keeps_the_key_layout(tmp_path: Path) -> None:
    key = "coryell/Co Rd 4235/img/000_31.708136_-97.693460.png"
    assert adl.local_path_for(tmp_path, "bkt", key) == tmp_path / "bkt" / "coryell" / "Co Rd 4235" / "img" / (
        "000_31.708136_-97.693460.png"
    )


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("../escape.txt", "path component '..'"),
        ("a/../../etc/passwd", "path component '..'"),
        ("/abs/path", "absolute path"),
        ("a//b", "path component '(empty)'"),
        ("a/./b", "path component '.'"),
        ("line\nbreak", "control character in key"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_unsafe_keys_are_refused(tmp_path: Path, key: str, reason: str) -> None:
    with pytest.raises(adl.UnsafeKeyError, match="unsafe key") as caught:
        adl.local_path_for(tmp_path, "bkt", key)
    assert reason in str(caught.value)


def test_skip_reason_decisions(tmp_path: Path) -> None:
    item = obj("k", size=5, modified=1_700_000_000.0)
    path = tmp_path / "k"
    path.write_bytes(b"12345")
    os.utime(path, (item.last_modified, item.last_modified))
    same = os.stat(path)
    done = adl.CompletedEntry(etag=item.etag, size=5)
    assert adl.skip_reason(item, None, None, False) is None
    assert adl.skip_reason(item, same, None, False) == "exists locally (same size, not older)"
    assert adl.skip_reason(item, same, done, False) == "already downloaded"
    assert adl.skip_reason(item, same, done, True) is None
    assert adl.skip_reason(item, same, adl.CompletedEntry(etag="f" * 32, size=5), False) is None
    os.utime(path, (item.last_modified - 10, item.last_modified - 10))
    assert adl.skip_reason(item, os.stat(path), None, False) is None
    path.write_bytes(b"123456")
    assert adl.skip_reason(item, os.stat(path), done, False) is None
    assert adl.skip_reason(item, os.stat(tmp_path), None, False) is None  # a directory is never "the file"


# -- through the server --------------------------------------------------------------------------------------


def run_json(run_cli, *argv: str) -> dict:
    code, out, err = run_cli("--download-dir", "data", "--json", *argv)
    assert code == 0, (out, err)
    return json.loads(out)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_extension_filter_end_to_end(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("ext-bkt")
    for key in ("a.png", "b.PNG", "c.Png", "d.jpg", "e.json"):
        s3.put("ext-bkt", key, key.encode())
    summary = run_json(run_cli, "--buckets", "ext-bkt", "--extensions", ".PNG", *s3.args())
    assert summary["total_files"] == summary["downloaded"] == 3
    assert files_under(tmp_path / "data" / "ext-bkt") == {"a.png", "b.PNG", "c.Png"}
    assert (tmp_path / "data" / "ext-bkt" / "b.PNG").read_bytes() == b"b.PNG"


def test_overlapping_prefixes_download_each_object_once(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("pre-bkt")
    for key in ("a/1.txt", "a/b/2.txt", "a/b/c/3.txt", "z/4.txt"):
        s3.put("pre-bkt", key, key.encode())
    summary = run_json(run_cli, "--buckets", "pre-bkt", "--prefixes", "a/b/", "a/", "a/b/c/", *s3.args())
    assert summary["total_files"] == 3 and summary["downloaded"] == 3
    assert summary["total_bytes"] == len(b"a/1.txt") + len(b"a/b/2.txt") + len(b"a/b/c/3.txt")
    assert files_under(tmp_path / "data" / "pre-bkt") == {"a/1.txt", "a/b/2.txt", "a/b/c/3.txt"}


def test_folder_markers_are_not_files(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("marker-bkt")
    s3.put("marker-bkt", "images/", b"")
    s3.put("marker-bkt", "images/sub/", b"")
    s3.put("marker-bkt", "images/a.png", b"png")
    s3.put("marker-bkt", "empty.txt", b"")
    summary = run_json(run_cli, "--buckets", "marker-bkt", *s3.args())
    assert summary["total_files"] == 2 and summary["downloaded"] == 2 and summary["failed"] == 0
    root = tmp_path / "data" / "marker-bkt"
    assert files_under(root) == {"images/a.png", "empty.txt"}
    assert (root / "empty.txt").read_bytes() == b""
    assert not (root / "images" / "sub").is_file()


def test_archived_storage_classes_are_skipped_with_the_reason(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("cold-bkt")
    s3.put("cold-bkt", "hot.txt", b"hot")
    s3.put("cold-bkt", "glacier.txt", b"glacier", StorageClass="GLACIER")
    s3.put("cold-bkt", "deep.txt", b"deep", StorageClass="DEEP_ARCHIVE")
    s3.put("cold-bkt", "ia.txt", b"ia", StorageClass="STANDARD_IA")
    summary = run_json(run_cli, "--buckets", "cold-bkt", *s3.args())
    assert summary["downloaded"] == 2 and summary["failed"] == 0
    assert summary["skipped_reasons"] == {
        "archived storage class (GLACIER)": 1,
        "archived storage class (DEEP_ARCHIVE)": 1,
    }
    assert files_under(tmp_path / "data" / "cold-bkt") == {"hot.txt", "ia.txt"}

    code, out, err = run_cli("--buckets", "cold-bkt", "--download-dir", "data2", *s3.args())
    assert code == 0, (out, err)
    assert "  archived storage class (GLACIER): 1" in out


def test_size_include_exclude_end_to_end(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("size-bkt")
    s3.put("size-bkt", "small.bin", b"s" * 1000)
    s3.put("size-bkt", "medium.bin", b"m" * 300_000)
    s3.put("size-bkt", "medium.tmp.bin", b"t" * 300_000)
    s3.put("size-bkt", "large.bin", b"l" * 700_000)
    summary = run_json(
        run_cli,
        "--buckets",
        "size-bkt",
        "--min-size-mb",
        "0.1",
        "--max-size-mb",
        "0.5",
        "--exclude",
        "*.tmp.*",
        "--include",
        "*.bin",
        *s3.args(),
    )
    assert summary["total_files"] == 1
    assert files_under(tmp_path / "data" / "size-bkt") == {"medium.bin"}
    assert (tmp_path / "data" / "size-bkt" / "medium.bin").read_bytes() == b"m" * 300_000
