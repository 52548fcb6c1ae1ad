"""The command line, run as a user runs it (main(argv)) against a real S3 server: flags, output, exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import S3Server

import aws_data_downloader as adl

FILES = {
    "coryell/Co Rd 4235/img/000_31.708136_-97.693460.png": b"\x89PNG" + b"a" * 3000,
    "coryell/Co Rd 4235/img/001_31.708228_-97.693279.PNG": b"\x89PNG" + b"b" * 5000,
    "coryell/Co Rd 4235/ann/annotations.json": b'{"images": 2}',
    "other-data/notes.txt": b"n" * 700,
}


def seed(server: S3Server, bucket: str = "road-data", files: dict[str, bytes] = FILES) -> dict[str, bytes]:
    server.make_bucket(bucket)
    for key, body in files.items():
        server.put(bucket, key, body)
    return dict(files)


def on_disk(root: Path) -> dict[str, bytes]:
    """Every object file under root (bucket/key -> bytes): not the journal, the lock or temporary files."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.parent != root and not path.name.startswith(".")
    }


def expected(bucket: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{bucket}/{key}": body for key, body in files.items()}


# -- the basics: help, version, usage errors ----------------------------------------------------------------

ISSUE_FLAGS = [
    "--config",
    "--create-config",
    "--access-key",
    "--secret-key",
    "--session-token",
    "--profile",
    "--region",
    "--endpoint-url",
    "--no-sign-request",
    "--buckets",
    "--prefixes",
    "--download-dir",
    "--parallel",
    "--extensions",
    "--include",
    "--exclude",
    "--min-size-mb",
    "--max-size-mb",
    "--overwrite",
    "--no-verify",
    "--retry-attempts",
    "--dry-run",
    "--log-file",
    "--quiet",
    "--verbose",
    "--json",
    "--demo",
    "--version",
]


def test_help_lists_every_flag_of_the_issue(run_cli) -> None:
    code, out, err = run_cli("--help")
    assert code == 0, (out, err)
    for flag in ISSUE_FLAGS:
        assert flag in out, flag
    assert "Exit codes:" in out


def test_version(run_cli) -> None:
    code, out, err = run_cli("--version")
    assert code == 0, (out, err)
    assert out.strip() == f"{Path(sys.argv[0]).name} {adl.__version__}"  # the name this process was run as


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--parallel", "abc"], "--parallel: invalid int value: 'abc'"),
        (["--min-size-mb", "big"], "--min-size-mb: invalid float value: 'big'"),
        (["--buckets"], "--buckets: expected at least one argument"),
    ],
)
def test_usage_errors_exit_2(run_cli, argv: list[str], needle: str) -> None:
    code, out, err = run_cli(*argv)
    assert code == adl.EXIT_USAGE, (out, err)
    assert needle in err
    assert "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--parallel", "0"], "--parallel"),
        (["--retry-attempts", "-1"], "--retry-attempts"),
        (["--retry-attempts", "51"], "--retry-attempts"),
        (["--min-size-mb", "-2"], "--min-size-mb"),
        (["--min-size-mb", "5", "--max-size-mb", "1"], "--max-size-mb"),
    ],
)
def test_out_of_range_flag_values_exit_2_naming_the_flag(run_cli, argv: list[str], flag: str) -> None:
    code, out, err = run_cli(*argv, "--dry-run")
    assert code == adl.EXIT_USAGE, (out, err)
    assert err.startswith(f"Error: {flag} ") and len(err.strip().splitlines()) == 1
    assert out == ""


# -- downloading ---------------------------------------------------------------------------------------------


def test_full_run_lands_every_object_with_its_mtime(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3)
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "data", "--parallel", "3", *s3.args())
    assert code == adl.EXIT_OK, (out, err)
    assert on_disk(tmp_path / "data") == expected("road-data", files)
    assert "DOWNLOAD SUMMARY" in out and "Downloaded:       4" in out
    assert (tmp_path / "data" / "download_resume.json").is_file()
    for key in files:
        modified = s3.client.head_object(Bucket="road-data", Key=key)["LastModified"].timestamp()
        assert os.stat(tmp_path / "data" / "road-data" / key).st_mtime == pytest.approx(modified, abs=1e-3)


def test_second_run_skips_and_overwrite_downloads_again(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3)
    argv = ["--buckets", "road-data", "--download-dir", "data", "--json", *s3.args()]
    code, out, err = run_cli(*argv)
    assert code == 0, (out, err)
    assert json.loads(out)["downloaded"] == 4

    # A local edit that keeps the size is not noticed without --overwrite (the journal vouches for the file)...
    target = tmp_path / "data" / "road-data" / "other-data" / "notes.txt"
    target.write_bytes(b"X" * 700)
    code, out, err = run_cli(*argv)
    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["downloaded"] == 0 and summary["skipped_reasons"] == {"already downloaded": 4}
    assert target.read_bytes() == b"X" * 700

    # ... and --overwrite fetches everything again.
    code, out, err = run_cli(*argv, "--overwrite")
    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["downloaded"] == 4 and summary["skipped"] == 0
    assert on_disk(tmp_path / "data") == expected("road-data", files)


def test_existing_file_same_size_not_older_is_skipped_older_is_fetched(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "local-bkt", {"new.bin": b"n" * 100, "old.bin": b"o" * 100})
    folder = tmp_path / "data" / "local-bkt"
    folder.mkdir(parents=True)
    (folder / "new.bin").write_bytes(b"L" * 100)  # same size, written after the upload: current
    (folder / "old.bin").write_bytes(b"L" * 100)
    modified = s3.client.head_object(Bucket="local-bkt", Key="old.bin")["LastModified"].timestamp()
    os.utime(folder / "old.bin", (modified - 3600, modified - 3600))
    code, out, err = run_cli("--buckets", "local-bkt", "--download-dir", "data", "--json", *s3.args())
    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["downloaded"] == 1
    assert summary["skipped_reasons"] == {"exists locally (same size, not older)": 1}
    assert (folder / "new.bin").read_bytes() == b"L" * 100
    assert (folder / "old.bin").read_bytes() == b"o" * 100


def test_exit_1_when_some_objects_fail(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "mixed-bkt", {"good.txt": b"good", "bad//key.txt": b"bad"})
    code, out, err = run_cli("--buckets", "mixed-bkt", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_FAILED, (out, err)
    assert (tmp_path / "data" / "mixed-bkt" / "good.txt").read_bytes() == b"good"
    assert "Failed:           1" in out
    assert "Failures by reason:" in out and "mixed-bkt/bad//key.txt" in out
    assert "Failed mixed-bkt/bad//key.txt: unsafe key" in err


def test_dry_run_lists_and_writes_nothing(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3)
    code, out, err = run_cli(
        "--buckets", "road-data", "--download-dir", "data", "--dry-run", "--extensions", ".png", *s3.args()
    )
    assert code == 0, (out, err)
    assert not (tmp_path / "data").exists()
    assert "Would download road-data/coryell/Co Rd 4235/img/000_31.708136_-97.693460.png (2.9 KB)" in err
    assert "Would download road-data/coryell/Co Rd 4235/img/001_31.708228_-97.693279.PNG (4.9 KB)" in err
    assert "annotations.json" not in err and "notes.txt" not in err
    assert "DRY RUN SUMMARY" in out
    assert "Total files:      2" in out
    assert "Would download:   2" in out
    assert "Total size:       7.8 KB" in out


def test_json_prints_exactly_one_object(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = seed(s3)
    code, out, err = run_cli("--buckets", "road-data", "--download-dir", "data", "--json", *s3.args())
    assert code == 0, (out, err)
    assert out.endswith("}\n") and out.count("\n") == 1
    summary = json.loads(out)
    assert summary["total_files"] == summary["downloaded"] == 4
    assert summary["total_bytes"] == sum(len(body) for body in files.values())
    assert summary["buckets"] == ["road-data"]
    assert summary["download_dir"] == str(tmp_path / "data")


def test_access_key_flag_warns_and_never_logs_the_secret(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3)
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    token = "FQoGZXIvYXdzEXAMPLESESSIONTOKEN"
    code, out, err = run_cli(
        "--buckets",
        "road-data",
        "--download-dir",
        "data",
        "--access-key",
        "AKIAIOSFODNN7EXAMPLE",
        "--secret-key",
        secret,
        "--session-token",
        token,
        "--verbose",
        "--log-file",
        "debug.log",
        *s3.args(),
    )
    assert code == 0, (out, err)
    assert "visible to other users" in err
    assert "Using access key AKIA************MPLE" in err
    log_text = (tmp_path / "debug.log").read_text()
    assert " - DEBUG - " in log_text
    for text in (err, log_text):
        assert secret not in text
        assert token not in text
        assert "AKIAIOSFODNN7EXAMPLE" not in text
    assert on_disk(tmp_path / "data") == expected("road-data", FILES)


def test_half_a_key_pair_is_a_credentials_error(s3: S3Server, run_cli) -> None:
    code, out, err = run_cli("--buckets", "road-data", "--access-key", "AKIAONLY", *s3.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert "Error: give both an access key and a secret key, or neither" in err


def test_profile_flag_uses_the_profile(seaweed: S3Server, tmp_path: Path, monkeypatch, run_cli) -> None:
    bucket = f"profile-{os.getpid()}-{tmp_path.name[-12:]}".lower().replace("_", "-")
    seed(seaweed, bucket, {"p.txt": b"profile-bytes"})
    # The environment holds wrong keys; only the profile's keys are accepted by SeaweedFS.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        f"[lab]\naws_access_key_id = {seaweed.access_key}\naws_secret_access_key = {seaweed.secret_key}\n"
    )
    code, out, err = run_cli("--buckets", bucket, "--profile", "lab", "--download-dir", "data", *seaweed.args())
    assert code == 0, (out, err)
    assert (tmp_path / "data" / bucket / "p.txt").read_bytes() == b"profile-bytes"

    code, out, err = run_cli("--buckets", bucket, "--profile", "nope", *seaweed.args())
    assert code == adl.EXIT_USAGE, (out, err)
    assert "Error: AWS profile 'nope' not found" in err and out == ""


def test_no_sign_request_reads_public_objects_without_credentials(
    s3: S3Server, tmp_path: Path, monkeypatch, run_cli
) -> None:
    s3.make_bucket("public-bkt")
    s3.put("public-bkt", "open/data.csv", b"a,b\n1,2\n", ACL="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    code, out, err = run_cli("--buckets", "public-bkt", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert "Error: AWS credentials not found" in err and out == ""

    code, out, err = run_cli(
        "--buckets", "public-bkt", "--download-dir", "data", "--no-sign-request", "--region", "us-east-1", *s3.args()
    )
    assert code == 0, (out, err)
    assert (tmp_path / "data" / "public-bkt" / "open" / "data.csv").read_bytes() == b"a,b\n1,2\n"


def test_endpoint_from_the_environment(s3: S3Server, tmp_path: Path, monkeypatch, run_cli) -> None:
    seed(s3, "env-bkt", {"e.txt": b"env"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    code, out, err = run_cli("--buckets", "env-bkt", "--download-dir", "data", "--region", "eu-west-1")
    assert code == 0, (out, err)
    assert (tmp_path / "data" / "env-bkt" / "e.txt").read_bytes() == b"env"


def test_no_verify_and_retry_attempts(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3, "verify-bkt", {"v.bin": b"v" * 1234})
    code, out, err = run_cli(
        "--buckets", "verify-bkt", "--download-dir", "checked", "--retry-attempts", "0", *s3.args()
    )
    assert code == 0, (out, err)
    journal = json.loads((tmp_path / "checked" / "download_resume.json").read_text())
    assert journal["completed"]["verify-bkt"]["v.bin"]["checksum"].startswith("md5:")

    code, out, err = run_cli("--buckets", "verify-bkt", "--download-dir", "unchecked", "--no-verify", *s3.args())
    assert code == 0, (out, err)
    assert (tmp_path / "unchecked" / "verify-bkt" / "v.bin").read_bytes() == b"v" * 1234
    journal = json.loads((tmp_path / "unchecked" / "download_resume.json").read_text())
    assert journal["completed"]["verify-bkt"]["v.bin"]["checksum"] is None


def test_prefixes_include_exclude_and_sizes_from_flags(s3: S3Server, tmp_path: Path, run_cli) -> None:
    files = {
        "coryell/img/a.png": b"a" * 2000,
        "coryell/img/tiny.png": b"t" * 10,
        "coryell/img/skip-me.png": b"s" * 2000,
        "coryell/ann/a.json": b"j" * 2000,
        "other/b.png": b"b" * 2000,
    }
    seed(s3, "flags-bkt", files)
    code, out, err = run_cli(
        "--buckets",
        "flags-bkt",
        "--download-dir",
        "data",
        "--prefixes",
        "coryell/",
        "--include",
        "*/img/*",
        "*.json",
        "--exclude",
        "*skip*",
        "--min-size-mb",
        "0.001",
        "--max-size-mb",
        "1",
        "--json",
        *s3.args(),
    )
    assert code == 0, (out, err)
    assert on_disk(tmp_path / "data") == {
        "flags-bkt/coryell/img/a.png": files["coryell/img/a.png"],
        "flags-bkt/coryell/ann/a.json": files["coryell/ann/a.json"],
    }
    assert json.loads(out)["total_files"] == 2


def test_demo_downloads_the_sample_dataset(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("--demo", "--parallel", "4", "--quiet")
    assert code == 0, (out, err)
    root = tmp_path / "demo_data" / adl.DEMO_BUCKET
    key = "coryell/Co Rd 4235/img/000_31.708136_-97.693460.png"
    objects = adl.demo_objects()
    assert (root / key).read_bytes() == objects[key]
    assert on_disk(tmp_path / "demo_data") == expected(adl.DEMO_BUCKET, objects)
    assert f"Downloaded:       {len(objects)}" in out
