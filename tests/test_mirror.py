"""Mirrors with --delete (issue 14, part 3): local files the listing no longer has are removed, within the
selection's local roots only, never the tool's own files, and never after a failed, cut-short or stopped run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import S3Server, cli_json, write_config
from faultproxy import FaultProxy

import aws_data_downloader as adl


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def seed(s3: S3Server, bucket: str, keys: list[str]) -> None:
    s3.make_bucket(bucket)
    for key in keys:
        s3.put(bucket, key, key.encode())


def local(tmp_path: Path, bucket: str, key: str, body: bytes = b"stale") -> Path:
    """A file the bucket no longer has (deleted there since an earlier run, or put there by hand)."""
    path = tmp_path / "data" / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def mirror(run_cli, s3: S3Server, bucket: str, *extra: str) -> tuple[int, dict, str]:
    code, out, err = run_cli("--buckets", bucket, "--download-dir", "data", *s3.args(), "--json", *extra)
    assert out.strip(), err
    return code, json.loads(out), err


# -- what goes ------------------------------------------------------------------------------------------------


def test_delete_removes_files_the_bucket_no_longer_has(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-bkt", ["a/1.txt", "a/2.txt", "b/3.txt"])
    code, first, _ = mirror(run_cli, s3, "mir-bkt")
    assert code == 0 and first["downloaded"] == 3 and first["deleted"] is None  # no --delete: not counted
    s3.client.delete_object(Bucket="mir-bkt", Key="a/2.txt")
    s3.client.delete_object(Bucket="mir-bkt", Key="b/3.txt")

    code, again, _ = mirror(run_cli, s3, "mir-bkt")  # without --delete nothing goes
    assert code == 0 and again["deleted"] is None
    assert files_under(tmp_path / "data" / "mir-bkt") == {"a/1.txt", "a/2.txt", "b/3.txt"}

    code, summary, _ = mirror(run_cli, s3, "mir-bkt", "--delete")
    assert code == 0, summary
    assert summary["deleted"] == 2 and summary["delete_refused"] is None and summary["skipped"] == 1
    assert files_under(tmp_path / "data" / "mir-bkt") == {"a/1.txt"}
    assert (tmp_path / "data" / "mir-bkt" / "a" / "1.txt").read_bytes() == b"a/1.txt"
    assert not (tmp_path / "data" / "mir-bkt" / "b").exists()  # emptied by the deletion: removed
    log = (tmp_path / "aws_downloader.log").read_text()
    assert f"Deleted {tmp_path / 'data' / 'mir-bkt' / 'a' / '2.txt'} (no longer listed)" in log
    assert f"Deleted {tmp_path / 'data' / 'mir-bkt' / 'b' / '3.txt'} (no longer listed)" in log
    assert "Deleted 2 local files no longer listed, and 1 emptied directory" in log
    assert "2 deleted" in log.splitlines()[-1]  # the run's outcome line


def test_summary_block_has_a_deleted_line(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-text", ["keep.txt"])
    local(tmp_path, "mir-text", "gone.txt")
    code, out, _ = run_cli("--buckets", "mir-text", *s3.args(), "--delete")
    assert code == 0
    assert "Deleted:          1" in out
    assert not (tmp_path / "data" / "mir-text" / "gone.txt").exists()


def test_python_api_deletes_with_the_same_keys(s3: S3Server, tmp_path: Path) -> None:
    seed(s3, "mir-api", ["keep.txt"])
    stale = local(tmp_path, "mir-api", "old/stale.bin")
    downloader = adl.AWSDataDownloader(
        {"buckets": ["mir-api"], "download_dir": str(tmp_path / "data"), "endpoint_url": s3.endpoint}
    )
    summary = downloader.run_full_download(delete=True, max_delete=5)
    assert summary.deleted == 1 and summary.ok and summary.exit_code == 0
    assert summary.to_dict()["deleted"] == 1
    assert not stale.exists() and not stale.parent.exists()
    assert (tmp_path / "data" / "mir-api" / "keep.txt").read_bytes() == b"keep.txt"


def test_delete_from_the_config_file(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-cfg", ["keep.txt"])
    stale = local(tmp_path, "mir-cfg", "stale.txt")
    code, summary = cli_json(run_cli, s3.endpoint, tmp_path, "mir-cfg", {"delete": True, "max_delete": 1})
    assert code == 0 and summary["deleted"] == 1 and not stale.exists()


# -- the selection's local roots --------------------------------------------------------------------------------


def test_a_partial_prefix_scopes_deletion_to_keys_starting_with_it(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-pre", ["coryell/image1.png", "coryell/other.txt", "travis/t.png"])
    bucket = tmp_path / "data" / "mir-pre"
    local(tmp_path, "mir-pre", "coryell/image_old.png")  # in scope, not listed: goes
    local(tmp_path, "mir-pre", "coryell/images/deep.png")  # in scope (coryell/images/...), goes, and its dir
    local(tmp_path, "mir-pre", "coryell/notes.txt")  # under coryell/ but not coryell/ima...: stays
    local(tmp_path, "mir-pre", "travis/old.png")  # another prefix: stays
    local(tmp_path, "mir-pre", "top.txt")  # the bucket's root: stays
    (bucket / "coryell" / "imagery-empty").mkdir()  # an empty directory the user made: stays
    code, summary, _ = mirror(run_cli, s3, "mir-pre", "--prefixes", "coryell/ima", "--delete")
    assert code == 0 and summary["downloaded"] == 1 and summary["deleted"] == 2
    assert files_under(bucket) == {"coryell/image1.png", "coryell/notes.txt", "travis/old.png", "top.txt"}
    assert not (bucket / "coryell" / "images").exists()
    assert (bucket / "coryell" / "imagery-empty").is_dir()


def test_other_buckets_directories_are_not_touched(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-one", ["a.txt"])
    seed(s3, "mir-two", ["b.txt"])
    other = local(tmp_path, "mir-two", "old.txt")
    user = tmp_path / "data" / "my-notes.txt"
    user.write_text("mine")
    code, summary, _ = mirror(run_cli, s3, "mir-one", "--delete")
    assert code == 0 and summary["deleted"] == 0
    assert other.exists() and user.exists()


def test_files_excluded_by_a_filter_are_neither_fetched_nor_deleted(s3: S3Server, tmp_path: Path, run_cli) -> None:
    """rclone's and aws-cli's rule: a filter excludes a file from deletion as it does from copying."""
    seed(s3, "mir-flt", ["img/a.png", "img/b.png", "img/huge.png"])
    s3.put("mir-flt", "img/huge.png", b"x" * 3 * 1024 * 1024)
    bucket = tmp_path / "data" / "mir-flt"
    local(tmp_path, "mir-flt", "img/notes.txt")  # --extensions leaves .txt out: stays
    local(tmp_path, "mir-flt", "img/b_tmp.png")  # --exclude: stays
    local(tmp_path, "mir-flt", "img/big_old.png", b"y" * 2 * 1024 * 1024)  # over --max-size-mb: stays
    local(tmp_path, "mir-flt", "img/old.png")  # selected by every filter, not listed: goes
    code, summary, _ = mirror(
        run_cli, s3, "mir-flt", "--extensions", ".png", "--exclude", "*_tmp.png", "--max-size-mb", "1", "--delete"
    )
    assert code == 0 and summary["deleted"] == 1, summary
    assert files_under(bucket) == {"img/a.png", "img/b.png", "img/notes.txt", "img/b_tmp.png", "img/big_old.png"}


def test_a_shard_never_deletes_another_shards_files(s3: S3Server, tmp_path: Path, run_cli) -> None:
    keys = [f"k/{n:03}.txt" for n in range(40)]
    seed(s3, "mir-shard", keys)
    for shard in ("0/2", "1/2"):
        code, _, _ = mirror(run_cli, s3, "mir-shard", "--shard", shard)
        assert code == 0
    mine = [key for key in keys if adl.shard_of("mir-shard", key, 2) == 0]
    theirs = [key for key in keys if adl.shard_of("mir-shard", key, 2) == 1]
    s3.client.delete_object(Bucket="mir-shard", Key=mine[0])
    s3.client.delete_object(Bucket="mir-shard", Key=theirs[0])
    code, summary, _ = mirror(run_cli, s3, "mir-shard", "--shard", "0/2", "--delete")
    assert code == 0 and summary["deleted"] == 1
    assert files_under(tmp_path / "data" / "mir-shard") == set(keys) - {mine[0]}  # shard 1's stale file stays


def test_archived_objects_are_listed_so_their_files_stay(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("mir-cold")
    s3.put("mir-cold", "cold.txt", b"cold", StorageClass="GLACIER")
    kept = local(tmp_path, "mir-cold", "cold.txt", b"restored earlier")
    local(tmp_path, "mir-cold", "gone.txt")
    code, summary, _ = mirror(run_cli, s3, "mir-cold", "--delete")
    assert code == 0 and summary["skipped"] == 1 and summary["deleted"] == 1
    assert kept.read_bytes() == b"restored earlier"


# -- the tool's own files and symlinks -------------------------------------------------------------------------


def test_the_tools_own_files_are_never_deleted(s3: S3Server, tmp_path: Path, run_cli) -> None:
    """Journal, its siblings, temp files of unfinished downloads, log, manifest and config file, even when they
    live inside the bucket's directory."""
    seed(s3, "mir-own", ["keep.txt"])
    bucket = tmp_path / "data" / "mir-own"
    bucket.mkdir(parents=True)
    config = write_config(bucket, {"delete": True})
    partial = local(tmp_path, "mir-own", "big/.adl-0123456789abcdef0123.part", b"resumable bytes")
    corrupt = local(tmp_path, "mir-own", "state.json.corrupt", b"{")
    stale = local(tmp_path, "mir-own", "stale.txt")
    code, out, err = run_cli(
        "--buckets", "mir-own", *s3.args(), "--config", config, "--resume-file", "mir-own/state.json",
        "--log-file", str(bucket / "run.log"), "--manifest", str(bucket / "manifest.jsonl"), "--json",
    )  # fmt: skip
    summary = json.loads(out)
    assert code == 0 and summary["deleted"] == 1, err
    assert not stale.exists()
    assert partial.read_bytes() == b"resumable bytes" and corrupt.exists()
    assert {"state.json", "run.log", "manifest.jsonl", "config.json"} <= set(os.listdir(bucket))


def test_symlinks_are_neither_followed_nor_deleted(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-link", ["keep.txt"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("not ours")
    bucket = tmp_path / "data" / "mir-link"
    bucket.mkdir(parents=True)
    (bucket / "linked-dir").symlink_to(outside, target_is_directory=True)
    (bucket / "linked-file.txt").symlink_to(outside / "precious.txt")
    code, summary, _ = mirror(run_cli, s3, "mir-link", "--delete")
    assert code == 0 and summary["deleted"] == 0
    assert (outside / "precious.txt").read_text() == "not ours"
    assert (bucket / "linked-dir").is_symlink() and (bucket / "linked-file.txt").is_symlink()


def test_a_prefix_reached_through_a_symlink_is_left_alone(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-via", ["sub/keep.txt"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("not ours")
    bucket = tmp_path / "data" / "mir-via"
    bucket.mkdir(parents=True)
    (bucket / "sub").symlink_to(outside, target_is_directory=True)
    code, summary, _ = mirror(run_cli, s3, "mir-via", "--prefixes", "sub/", "--delete")
    assert code == 1 and summary["failed"] == 1  # the download refuses the symlink too
    assert summary["deleted"] == 0
    assert (outside / "precious.txt").read_text() == "not ours"


# -- dry run and --max-delete ---------------------------------------------------------------------------------


def test_dry_run_lists_what_would_be_deleted_and_deletes_nothing(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-dry", ["keep.txt"])
    stale = [local(tmp_path, "mir-dry", key) for key in ("x.txt", "d/y.txt")]
    code, out, err = run_cli("--buckets", "mir-dry", *s3.args(), "--delete", "--dry-run")
    assert code == 0, err
    assert "Would delete:     2" in out
    for path in stale:
        assert path.exists()
        assert f"Would delete {path} (no longer listed)" in err
    code, summary, _ = mirror(run_cli, s3, "mir-dry", "--delete", "--dry-run")
    assert summary["would_delete"] == 2 and "deleted" not in summary
    assert all(path.exists() for path in stale)


def test_max_delete_refuses_to_delete_any_when_more_would_go(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-max", ["keep.txt"])
    stale = [local(tmp_path, "mir-max", f"old/{n}.txt") for n in range(3)]
    code, out, err = run_cli("--buckets", "mir-max", *s3.args(), "--delete", "--max-delete", "2")
    assert code == 1
    assert all(path.exists() for path in stale)
    message = "3 local files would be deleted, more than --max-delete 2: none was deleted"
    assert f"Not deleted: {message}" in out and message in err
    code, summary, _ = mirror(run_cli, s3, "mir-max", "--delete", "--max-delete", "2", "--dry-run")
    assert code == 1 and summary["would_delete"] == 3 and "none would be deleted" in summary["delete_refused"]
    code, summary, _ = mirror(run_cli, s3, "mir-max", "--delete", "--max-delete", "3")
    assert code == 0 and summary["deleted"] == 3
    assert not any(path.exists() for path in stale)


# -- never after a failed or cut-short run ----------------------------------------------------------------------


def test_no_deletion_when_a_download_failed(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-fail", ["good.txt", "bad.txt"])
    stale = local(tmp_path, "mir-fail", "stale.txt")
    with FaultProxy(s3.endpoint) as proxy:
        proxy.error(key="bad.txt", status=500, method="GET")
        code, out, _ = run_cli(
            "--buckets", "mir-fail", "--endpoint-url", proxy.url, "--retry-attempts", "0", "--delete", "--json"
        )
    summary = json.loads(out)
    assert code == 1 and summary["failed"] == 1 and summary["deleted"] == 0
    assert summary["delete_refused"] == "1 object failed; run again when they download"
    assert stale.exists()


def test_no_deletion_when_a_listing_was_denied(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-ok", ["a.txt"])
    seed(s3, "mir-denied", ["b.txt"])
    stale = local(tmp_path, "mir-ok", "stale.txt")
    with FaultProxy(s3.endpoint) as proxy:
        proxy.error(status=403, method="GET", path="/mir-denied")
        code, out, _ = run_cli(
            "--buckets", "mir-ok", "mir-denied", "--endpoint-url", proxy.url, "--delete", "--json"
        )  # fmt: skip
    summary = json.loads(out)
    assert code == 1 and summary["deleted"] == 0
    assert summary["delete_refused"].startswith("a listing failed (Access Denied for listing bucket 'mir-denied'")
    assert stale.exists()


def test_no_deletion_when_a_prefix_lists_nothing(s3: S3Server, tmp_path: Path, run_cli) -> None:
    """A typo'd (or emptied) prefix must not wipe the local copy under it."""
    seed(s3, "mir-typo", ["coryell/a.txt"])
    kept = local(tmp_path, "mir-typo", "coryel/a.txt")
    code, summary, _ = mirror(run_cli, s3, "mir-typo", "--prefixes", "coryel/", "--delete")
    assert code == 6 and summary["deleted"] == 0 and "lists no objects" in summary["delete_refused"]
    assert kept.exists()


def test_no_deletion_when_the_run_is_stopped(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(s3, "mir-stop", ["a.txt", "b.txt"])
    stale = local(tmp_path, "mir-stop", "stale.txt")
    dispatch = adl._Run.dispatch

    def stop_after_first_page(run: adl._Run, plans, workers) -> None:
        dispatch(run, plans, workers)
        run.halt("interrupted")  # what Ctrl-C or SIGTERM does

    monkeypatch.setattr(adl._Run, "dispatch", stop_after_first_page)
    downloader = adl.AWSDataDownloader(
        {"buckets": ["mir-stop"], "download_dir": str(tmp_path / "data"), "endpoint_url": s3.endpoint, "delete": True}
    )
    with pytest.raises(adl.DownloadInterrupted) as caught:
        downloader.run_full_download()
    assert caught.value.summary.deleted == 0
    assert caught.value.summary.delete_refused == "the run stopped before its end"
    assert stale.exists()


def test_no_deletion_when_the_listing_fails(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mir-list", ["a.txt"])
    stale = local(tmp_path, "mir-list", "stale.txt")
    with FaultProxy(s3.endpoint) as proxy:
        proxy.error(status=503, method="GET", path="/mir-list")
        code, _, err = run_cli(
            "--buckets", "mir-list", "--endpoint-url", proxy.url, "--retry-attempts", "0", "--delete"
        )
    assert code == 1 and "listing bucket 'mir-list' failed" in err
    assert stale.exists()


def test_a_bucket_discovery_could_not_read_does_not_block_the_others(s3: S3Server, tmp_path: Path, run_cli) -> None:
    """Without --buckets, an unreadable bucket is only warned of; it is not read, so its directory is out of
    scope, and the readable buckets' listings are complete."""
    seed(s3, "mir-open", ["a.txt"])
    seed(s3, "mir-closed", ["b.txt"])
    stale = local(tmp_path, "mir-open", "stale.txt")
    theirs = local(tmp_path, "mir-closed", "old.txt")
    with FaultProxy(s3.endpoint) as proxy:
        proxy.error("/mir-closed", status=403, method=None)  # the HEAD and the listings
        code, out, err = run_cli("--download-dir", "data", "--endpoint-url", proxy.url, "--delete", "--json")
    summary = json.loads(out)
    assert code == 0, err
    assert summary["buckets"] == ["mir-open"] and summary["deleted"] == 1
    assert not stale.exists() and theirs.exists()


def test_a_file_that_cannot_be_deleted_is_reported_and_fails_the_run(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(s3, "mir-perm", ["keep.txt"])
    stuck = local(tmp_path, "mir-perm", "stuck.txt")
    gone = local(tmp_path, "mir-perm", "gone.txt")
    unlink = os.unlink

    def refuse_stuck(path, *args, **kwargs) -> None:
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(adl.os, "unlink", refuse_stuck)
    code, out, err = run_cli("--buckets", "mir-perm", *s3.args(), "--delete")
    assert code == 1
    assert "Deleted:          1 (1 could not be deleted)" in out
    assert f"Could not delete {stuck}: Permission denied" in err
    assert stuck.exists() and not gone.exists()


# -- bad input ------------------------------------------------------------------------------------------------


def test_bad_max_delete_is_a_usage_error_naming_what_was_typed(tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("--buckets", "b", "--delete", "--max-delete", "-1")
    assert code == 2 and "--max-delete must be an integer >= 0" in err
    config = write_config(tmp_path, {"buckets": ["b"], "max_delete": "ten"})
    code, _, err = run_cli("--config", config)
    assert code == 2 and "max_delete" in err and "config.json" in err and "'ten'" in err


def test_delete_with_from_manifest_is_refused(s3: S3Server, tmp_path: Path, run_cli) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    code, _, err = run_cli("--from-manifest", str(manifest), *s3.args(), "--delete")
    assert code == 2 and "--delete cannot be used with --from-manifest" in err


# -- pure parts -----------------------------------------------------------------------------------------------


def test_delete_base_is_the_prefixs_directory(tmp_path: Path) -> None:
    assert adl.delete_base(tmp_path, "b", "") == tmp_path / "b"
    assert adl.delete_base(tmp_path, "b", "coryell/ima") == tmp_path / "b" / "coryell"
    assert adl.delete_base(tmp_path, "b", "a/b/") == tmp_path / "b" / "a" / "b"
    assert adl.delete_base(tmp_path, "b", "../x/") is None  # no key under it can be stored


def test_remove_emptied_dirs_stops_at_scope_and_at_non_empty(tmp_path: Path) -> None:
    bucket = tmp_path / "b"
    (bucket / "keep" / "x" / "y").mkdir(parents=True)
    (bucket / "keep" / "file").write_text("1")
    gone = bucket / "keep" / "x" / "y" / "gone.txt"
    assert adl.remove_emptied_dirs(bucket, [""], [gone]) == 2  # y and x; keep still holds a file
    assert (bucket / "keep").is_dir() and not (bucket / "keep" / "x").exists()
    (bucket / "c" / "d").mkdir(parents=True)
    assert adl.remove_emptied_dirs(bucket, ["c/d/"], [bucket / "c" / "d" / "f"]) == 1  # c/ is not in scope
    assert (bucket / "c").is_dir()
