"""Secrets never reach a log line, the console, the summary, the resume files or the manifest, whether they
came on the command line or from the environment; the access key id shows only masked (first and last 4).

moto accepts any credentials, so the runs are real: botocore's own DEBUG output (request headers with
X-Amz-Security-Token, canonical requests, presigned URLs) passes through the CLI's handlers. Each test makes
its own random secrets, so no value an earlier test used can make a leak look masked.
"""

from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
import urllib.parse
from pathlib import Path

from conftest import REPO, S3Server

import aws_data_downloader as adl

BUCKET = "secret-data"


def make_secrets() -> tuple[str, str, str]:
    """An access key id, a secret key and a session token shaped like AWS's ('/', '+' and '=' included)."""
    access_key = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    # A first '-' would read as a flag (argparse); AWS secrets are base64, which has no '-'.
    secret_key = "w" + secrets.token_urlsafe(22)[:27] + "/Ab+cD/" + secrets.token_hex(3)[:5]
    token = "FwoGZXIvYXdzE" + secrets.token_urlsafe(60) + "/+/" + secrets.token_hex(20) + "=="
    return access_key, secret_key, token


def forms_of(secret: str) -> set[str]:
    """A secret as it may be written: raw, URL-encoded (presigned URLs, canonical queries), JSON-escaped."""
    return {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret, safe="-_.~"),
        json.dumps(secret)[1:-1],
    }


def seed(server: S3Server) -> None:
    server.make_bucket(BUCKET)
    server.put(BUCKET, "a.txt", b"a")
    server.put(BUCKET, "dir/b.bin", b"b" * 5000)
    server.put(BUCKET, "bad\x01key", b"c")  # one failed object, so the failure paths log too


def outputs(tmp_path: Path, download_dir: Path, *texts: str) -> dict[str, str]:
    """Every text a run leaves behind: the given streams and each file it wrote (log, manifest, resume)."""
    found = {f"stream {i}": text for i, text in enumerate(texts)}
    for path in [*tmp_path.glob("*.log"), *tmp_path.glob("*.jsonl"), *download_dir.glob("download_resume.json*")]:
        found[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    return found


def assert_no_secret(found: dict[str, str], access_key: str, *hidden: str) -> None:
    for where, text in found.items():
        for secret in hidden:
            for form in forms_of(secret):
                assert form not in text, f"a secret ({form[:6]}...) leaked into {where}"
        assert access_key not in text, f"the full access key id leaked into {where}"
        assert access_key[4:-4] not in text, f"the middle of the access key id leaked into {where}"


def test_command_line_secrets_never_leak(s3: S3Server, tmp_path: Path, run_cli) -> None:
    seed(s3)
    access_key, secret_key, token = make_secrets()
    download_dir = tmp_path / "data"
    credentials = ["--access-key", access_key, "--secret-key", secret_key, "--session-token", token]
    common = ["--download-dir", str(download_dir), "--verbose", *credentials, *s3.args()]

    # The boto3 engine sends every request through botocore, whose debug output prints the token header.
    (tmp_path / "boto3.yaml").write_text("engine: boto3\n")
    code, out, err = run_cli(
        "--buckets", BUCKET, *common, "--log-file", "run.log", "--manifest", str(tmp_path / "m.jsonl"), "--json",
        "--config", "boto3.yaml",
    )  # fmt: skip
    assert code == adl.EXIT_FAILED, (out, err)
    summary = json.loads(out)
    assert summary["downloaded"] == 2 and summary["failed"] == 1
    log_text = (tmp_path / "run.log").read_text()
    assert "x-amz-security-token" in log_text.lower(), "botocore's debug output (with the token header) is logged"
    assert " - DEBUG - botocore." in log_text
    assert adl.mask_access_key(access_key) in log_text  # "Using access key AKIA************WXYZ"
    assert (download_dir / "download_resume.json").is_file()

    # A failing run: the error message and the summary of a run that stops.
    code2, out2, err2 = run_cli("--buckets", "no-such-bucket", *common, "--log-file", "fail.log")
    assert code2 == adl.EXIT_NOTHING_LISTED, (out2, err2)
    assert "Error: " in err2

    found = outputs(tmp_path, download_dir, out, err, out2, err2)
    assert_no_secret(found, access_key, secret_key, token)


def test_credentials_repr_and_errors_hide_secrets() -> None:
    access_key, secret_key, token = make_secrets()
    shown = repr(adl.Credentials(access_key, secret_key, token)) + str(adl.Credentials(access_key, secret_key, token))
    assert_no_secret({"repr": shown}, access_key, secret_key, token)
    try:
        adl.make_session(adl.Config(), adl.Credentials(None, secret_key, token), adl.SecretRedactingFilter())
    except adl.CredentialsError as exc:
        assert_no_secret({"error": str(exc)}, access_key, secret_key, token)
    else:
        raise AssertionError("a secret key without an access key id must be refused")


def test_redactor_masks_url_encoded_and_json_escaped_forms() -> None:
    _access_key, secret_key, token = make_secrets()
    redactor = adl.SecretRedactingFilter()
    redactor.add(secret_key)
    redactor.add(token)
    for secret in (secret_key, token):
        for form in forms_of(secret):
            assert form not in redactor.redact(f"before {form} after"), form


def test_environment_secrets_never_leak_in_debug_output(s3: S3Server, tmp_path: Path) -> None:
    """Secrets the tool did not receive explicitly (environment) are still masked in botocore's debug lines.

    A subprocess, so nothing an earlier test set up in this process can hide a leak.
    """
    seed(s3)
    access_key, secret_key, token = make_secrets()
    env = s3.env()
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, AWS_SESSION_TOKEN=token)
    download_dir = tmp_path / "data"
    # The boto3 engine sends every request through botocore, whose debug output prints the token header.
    (tmp_path / "boto3.yaml").write_text("engine: boto3\n")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "aws_data_downloader.py"),
            "--buckets",
            BUCKET,
            "--download-dir",
            str(download_dir),
            "--verbose",
            "--log-file",
            "run.log",
            "--manifest",
            "m.jsonl",
            "--json",
            "--config",
            "boto3.yaml",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == adl.EXIT_FAILED, (result.stdout, result.stderr)
    log_text = (tmp_path / "run.log").read_text()
    assert "x-amz-security-token" in log_text.lower()
    assert (download_dir / BUCKET / "dir" / "b.bin").read_bytes() == b"b" * 5000
    found = outputs(tmp_path, download_dir, result.stdout, result.stderr)
    assert_no_secret(found, access_key, secret_key, token)
    assert adl.mask_access_key(access_key) in log_text
