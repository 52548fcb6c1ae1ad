"""What the run does with a listing page once it has arrived, made cheap for buckets of millions of keys (issue 13):
a dry run logs a page's "Would download" lines as one record yet prints one prefixed line per key (console and
log file, secrets still masked), and the planner places keys as strings with the same decisions as before.
The cost itself is measured by benchmarks/listing_cpu.py, not here.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from conftest import S3Server

import aws_data_downloader as adl

BUCKET = "dry-lines"
#: The console's prefix (LOG_FORMAT) and the log file's, which also names the logger.
CONSOLE_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - INFO - Would download (.+)$")
FILE_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - INFO - aws_data_downloader - Would download (.+)$")


def seed(server: S3Server, keys: list[str]) -> None:
    server.make_bucket(BUCKET)
    for n, key in enumerate(keys):
        server.put(BUCKET, key, b"x" * (n + 1))


def would_download(text: str, line: re.Pattern[str]) -> list[str]:
    return [m.group(1) for m in map(line.match, text.splitlines()) if m]


def test_a_dry_run_prints_one_prefixed_line_per_key_on_the_console_and_in_the_log_file(
    s3: S3Server, tmp_path: Path, run_cli
) -> None:
    keys = ["a/1.bin", "a/2.bin", "b/odd\u2028name.bin", "c/3.bin"]
    seed(s3, keys)
    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", "data", "--dry-run", "--log-file", "run.log", *s3.args()
    )  # fmt: skip
    assert code == adl.EXIT_OK, (out, err)
    expected = [f"{BUCKET}/{adl.display_key(key)} ({n + 1} B)" for n, key in enumerate(sorted(keys))]
    assert would_download(err, CONSOLE_LINE) == expected, err
    assert would_download((tmp_path / "run.log").read_text(), FILE_LINE) == expected
    assert len([line for line in err.splitlines() if "Would download " in line]) == len(keys)
    assert "Would download:   4 (10 B)" in out
    assert not (tmp_path / "data").exists()


def test_a_page_of_keys_is_one_log_record_and_a_secret_in_a_key_is_still_masked(
    s3: S3Server, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that holds the secret key (keys are untrusted: anyone who can upload names them) is masked in the
    page's record as in a record of its own."""
    secret = "dryRunSecretKey0123456789abcdefghijklmn"
    keys = ["k1.bin", f"leak-{secret}.bin", "k3.bin"]
    seed(s3, keys)
    caplog.set_level(logging.INFO, logger="aws_data_downloader")
    code, out, err = run_cli(
        "--buckets", BUCKET, "--download-dir", "data", "--dry-run", "--log-file", "run.log",
        "--access-key", "AKIADRYRUNEXAMPLE123", "--secret-key", secret, *s3.args(),
    )  # fmt: skip
    assert code == adl.EXIT_OK, (out, err)
    [record] = [r for r in caplog.records if "Would download" in r.getMessage()]
    assert record.getMessage().count("\n") == len(keys) - 1
    log_text = (tmp_path / "run.log").read_text()
    for text in (err, log_text, record.getMessage()):
        assert secret not in text
    assert f"Would download {BUCKET}/leak-****.bin (2 B)" in err
    assert len(would_download(log_text, FILE_LINE)) == len(keys)


@pytest.mark.parametrize(
    "key", ["a", "a/b/c.txt", "Co Rd 4235/img/000_31.7.png", "x" * 255, "é" * 127, "deep/" * 40 + "f"]
)
def test_the_planner_places_a_key_where_local_path_for_does(tmp_path: Path, key: str) -> None:
    name = adl.local_name_for(str(tmp_path), "b", key)
    assert name == str(tmp_path.joinpath("b", *key.split("/")))
    assert Path(name) == adl.local_path_for(tmp_path, "b", key)


def test_the_planner_under_the_filesystem_root_makes_no_double_slash() -> None:
    assert adl.local_name_for("/", "b", "k/v") == f"{os.sep}b{os.sep}k{os.sep}v"


@pytest.mark.parametrize(
    ("key", "reason"),
    [("é" * 128, "longer than 255 bytes"), ("ok/" + "x" * 256, "longer than 255 bytes"), ("a/../b", "'..'")],
)
def test_a_long_or_unsafe_component_is_still_refused_with_its_reason(tmp_path: Path, key: str, reason: str) -> None:
    with pytest.raises(adl.UnsafeKeyError, match=re.escape(reason)):
        adl.local_name_for(str(tmp_path), "b", key)


def test_plan_object_skips_a_present_file_and_gives_its_path_as_text(tmp_path: Path) -> None:
    obj = adl.S3Object("b", "d/k.bin", 3, "e", 1_000.0)
    fetch = adl.plan_object(obj, tmp_path, False, adl.NullJournal())
    assert (fetch.target, fetch.result) == (str(tmp_path / "b" / "d" / "k.bin"), None)
    (tmp_path / "b" / "d").mkdir(parents=True)
    (tmp_path / "b" / "d" / "k.bin").write_bytes(b"abc")
    skip = adl.plan_object(obj, tmp_path, False, adl.NullJournal())
    assert skip.result is not None and skip.result.status == "skipped"
    assert skip.result.path == str(tmp_path / "b" / "d" / "k.bin")


def placed(tree: adl.LocalTree, root: str, key: str) -> str:
    try:
        return tree.place(root, "b", key)
    except adl.UnsafeKeyError as exc:
        return f"refused: {exc}"


def test_the_run_s_local_tree_places_every_key_as_local_name_for_does_folder_after_folder(tmp_path: Path) -> None:
    """The tree checks a folder once and then only each name in it: hostile names in a known-good folder, and
    good names in a bad one, must still be refused with local_name_for's own reasons."""
    import random

    rng = random.Random(13)
    parts = ["a", "b c", ".", "..", "", "x\x00", "é" * 64, "y" * 256, "\u2028", "ok.bin", "a+b%2F"]
    tree, root = adl.LocalTree(), str(tmp_path)
    for _ in range(20_000):
        key = "/".join(rng.choice(parts) for _ in range(rng.randint(1, 4)))
        try:
            expected = adl.local_name_for(root, "b", key)
        except adl.UnsafeKeyError as exc:
            expected = f"refused: {exc}"
        assert placed(tree, root, key) == expected, key
    assert tree.folders  # the good folders were remembered


def test_the_run_s_local_tree_remembers_a_missing_folder_and_sees_files_in_a_present_one(tmp_path: Path) -> None:
    """A folder found missing is not looked at again (nothing but the run writes there, and only keys it has not
    planned yet); a folder that exists is, so a file in it is always seen."""
    tree = adl.LocalTree()
    missing = tree.place(str(tmp_path), "b", "new/k1.bin")
    assert tree.lstat(missing) is None
    (tmp_path / "b" / "new").mkdir(parents=True)
    (tmp_path / "b" / "new" / "k1.bin").write_bytes(b"1")
    assert tree.lstat(missing) is None  # remembered: the planner has passed this folder's keys
    assert adl.LocalTree().lstat(missing) is not None  # a new run looks again
    (tmp_path / "b" / "old").mkdir()
    present = tree.place(str(tmp_path), "b", "old/k2.bin")
    assert tree.lstat(present) is None
    (tmp_path / "b" / "old" / "k2.bin").write_bytes(b"22")
    found = tree.lstat(present)
    assert found is not None and found.st_size == 2


def test_a_run_s_plan_skips_present_files_beside_missing_folders(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    (root / "b" / "have").mkdir(parents=True)
    (root / "b" / "have" / "k.bin").write_bytes(b"abc")
    tree, journal = adl.LocalTree(), adl.NullJournal()
    objects = [adl.S3Object("b", key, 3, "e", 1_000.0) for key in ("gone/a.bin", "gone/b.bin", "have/k.bin")]
    plans = [adl.plan_object(obj, root, False, journal, files=tree) for obj in objects]
    assert [plan.result.status if plan.result else "fetch" for plan in plans] == ["fetch", "fetch", "skipped"]
    assert tree.missing == {str(root / "b" / "gone")}
