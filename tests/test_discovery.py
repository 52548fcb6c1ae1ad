"""Bucket discovery: every bucket of the account, named buckets that are missing or denied, rejected keys."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import S3Server, SeaweedFS

import aws_data_downloader as adl


def unique(prefix: str) -> str:
    """A bucket name no other test uses (SeaweedFS keeps its buckets for the whole session)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def restricted_bucket(admin: S3Server) -> str:
    """The one bucket SeaweedFS's restricted identity may read, with one object; created once per session."""
    bucket = SeaweedFS.RESTRICTED_BUCKET
    try:
        admin.make_bucket(bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
            raise
    admin.put(bucket, "allowed/readable.txt", b"readable by the restricted identity")
    return bucket


def test_without_buckets_every_bucket_of_the_account_is_downloaded(s3: S3Server, tmp_path: Path, run_cli) -> None:
    for bucket in ("first-bkt", "second-bkt", "third-bkt"):
        s3.make_bucket(bucket)
        s3.put(bucket, f"{bucket}/data.txt", bucket.encode())
    code, out, err = run_cli("--download-dir", "data", *s3.args())
    assert code == 0, (out, err)
    assert "AWS credentials validated successfully" in err
    assert "Discovered 3 accessible buckets" in err
    for bucket in ("first-bkt", "second-bkt", "third-bkt"):
        assert (tmp_path / "data" / bucket / bucket / "data.txt").read_bytes() == bucket.encode()
    assert "Total files:      3" in out


def test_an_account_without_buckets_exits_3(s3: S3Server, run_cli) -> None:
    code, out, err = run_cli("--download-dir", "data", *s3.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert "Error: no accessible buckets found for these credentials" in err
    assert out == ""


def test_the_only_named_bucket_missing_exits_6_naming_it_once(s3: S3Server, tmp_path: Path, run_cli) -> None:
    """A typo, not a permission problem: exit 6 (as for a prefix that lists nothing), and said once."""
    code, out, err = run_cli("--buckets", "no-such-bucket", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert "Error: bucket 'no-such-bucket' does not exist" in err
    assert err.count("does not exist") == 1, err
    assert "Traceback" not in err and out == ""


def test_a_missing_bucket_beside_a_good_one_exits_6_after_downloading(s3: S3Server, tmp_path: Path, run_cli) -> None:
    s3.make_bucket("good-bkt")
    s3.put("good-bkt", "g.txt", b"good")
    code, out, err = run_cli("--buckets", "good-bkt", "gone-bkt", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    assert (tmp_path / "data" / "good-bkt" / "g.txt").read_bytes() == b"good"
    assert "WARNING - bucket 'gone-bkt' does not exist" in err
    assert "Discovered 1 accessible bucket\n" in err
    assert "Bucket not downloaded: bucket 'gone-bkt' does not exist" in out

    code, out, err = run_cli("--buckets", "good-bkt", "gone-bkt", "--download-dir", "data", "--json", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, (out, err)
    summary = json.loads(out)
    assert summary["bucket_problems"] == [
        {"bucket": "gone-bkt", "reason": "bucket 'gone-bkt' does not exist", "missing": True}
    ]
    assert summary["buckets"] == ["good-bkt"]


def test_the_api_raises_the_same_error_instead_of_exiting(s3: S3Server) -> None:
    downloader = adl.AWSDataDownloader({"buckets": ["no-such-bucket"], "endpoint_url": s3.endpoint})
    with pytest.raises(adl.NothingAccessibleError, match=r"^bucket 'no-such-bucket' does not exist$") as caught:
        downloader.run_full_download()
    assert isinstance(caught.value, adl.DownloaderError)
    assert caught.value.exit_code == adl.EXIT_NOTHING_LISTED


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_discover_buckets_against_the_server(s3: S3Server, engine: str) -> None:
    s3.make_bucket("here-bkt")
    config = adl.build_config({"endpoint_url": s3.endpoint, "engine": engine})
    session = adl.make_session(config, adl.Credentials(), adl.SecretRedactingFilter())
    clients = adl.SharedClient(session, config)
    requests = adl.make_engine(session, clients, config)

    def attempts(what: str) -> adl.Attempts:
        return adl.Attempts(what, config)

    accessible, problems = adl.discover_buckets(requests, ["here-bkt", "here-bkt", "away-bkt"], attempts)
    assert accessible == ["here-bkt"]
    assert problems == [adl.BucketProblem("away-bkt", "bucket 'away-bkt' does not exist", missing=True)]
    assert adl.account_buckets(clients.get(), attempts) == ["here-bkt"]


# -- SeaweedFS checks signatures and permissions -------------------------------------------------------------


@pytest.mark.seaweedfs
def test_wrong_secret_key_flag_is_rejected_with_exit_3(seaweed: S3Server, run_cli) -> None:
    code, out, err = run_cli("--access-key", seaweed.access_key, "--secret-key", "wrong-secret", *seaweed.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: AWS credentials rejected: the secret key does not match the access key id; "
        "check --access-key/--secret-key, the environment, or --profile"
    ]
    assert "wrong-secret" not in err and "Traceback" not in err and out == ""


@pytest.mark.seaweedfs
def test_unknown_access_key_in_the_environment_is_rejected(seaweed: S3Server, monkeypatch, run_cli) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDOESNOTEXIST")
    code, out, err = run_cli("--download-dir", "data", *seaweed.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert "Error: AWS credentials rejected: " in err


@pytest.mark.seaweedfs
def test_wrong_secret_with_named_buckets_is_rejected_not_denied(seaweed: S3Server, monkeypatch, run_cli) -> None:
    bucket = unique("named")
    seaweed.make_bucket(bucket)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    code, out, err = run_cli("--buckets", bucket, "--download-dir", "data", *seaweed.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert "Error: AWS credentials rejected: the secret key does not match the access key id" in err
    assert "Access Denied" not in err


@pytest.mark.seaweedfs
def test_denied_bucket_beside_a_readable_one(
    seaweed: S3Server, seaweed_process: SeaweedFS, tmp_path: Path, monkeypatch, run_cli
) -> None:
    readable = restricted_bucket(seaweed)
    denied = unique("denied")
    seaweed.make_bucket(denied)
    seaweed.put(denied, "secret.txt", b"not for the restricted identity")
    restricted = seaweed_process.restricted_server()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", restricted.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", restricted.secret_key)

    code, out, err = run_cli("--buckets", readable, denied, "--download-dir", "data", *restricted.args())
    assert code == adl.EXIT_FAILED, (out, err)
    assert (tmp_path / "data" / readable / "allowed" / "readable.txt").read_bytes() == (
        b"readable by the restricted identity"
    )
    assert not (tmp_path / "data" / denied).exists()
    assert f"Access Denied for bucket '{denied}'" in err
    assert f"Bucket not downloaded: Access Denied for bucket '{denied}'" in out

    code, out, err = run_cli("--buckets", denied, "--download-dir", "data", *restricted.args())
    assert code == adl.EXIT_CREDENTIALS, (out, err)
    assert f"Error: Access Denied for bucket '{denied}'" in err and out == ""


@pytest.mark.seaweedfs
def test_discovery_downloads_only_what_the_identity_can_read(
    seaweed: S3Server, seaweed_process: SeaweedFS, tmp_path: Path, monkeypatch, run_cli
) -> None:
    readable = restricted_bucket(seaweed)
    seaweed.make_bucket(unique("hidden"))
    restricted = seaweed_process.restricted_server()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", restricted.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", restricted.secret_key)
    code, out, err = run_cli("--download-dir", "data", "--json", *restricted.args())
    assert code == 0, (out, err)
    assert json.loads(out)["buckets"] == [readable]
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")) == [
        "download_resume.json",
        readable,
    ]
