"""The session: when a run's keys and region are known without botocore (known_session), the run never imports
boto3 or botocore on its way to the first file; when a profile or shared file could change the answer, botocore's
chain decides, as before.

The start-up tests run the script as a user would, with ``python -X importtime``, and read the modules it imported
from that output; the equivalence tests ask boto3 itself for the answer known_session gave without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, S3Server, free_port

import aws_data_downloader as adl

FILES = {"a/one.bin": b"first file", "a/b/two.bin": b"second file" * 100}


def seed(server: S3Server, bucket: str, **extra: str) -> None:
    server.make_bucket(bucket)
    for key, body in FILES.items():
        server.put(bucket, key, body, **extra)


def run_script(tmp_path: Path, env: dict[str, str], *argv: str) -> tuple[int, str, set[str]]:
    """Run the script under ``-X importtime``: (exit code, stderr without the import lines, modules imported)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "aws_data_downloader.py"), *argv],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported, other = set(), []
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[1].strip())
        else:
            other.append(line)
    assert "import time:" in result.stderr, result.stderr  # -X importtime worked, so an absence means something
    return result.returncode, "\n".join(other), imported


def botocore_modules(imported: set[str]) -> set[str]:
    return {name for name in imported if name.split(".")[0] in ("boto3", "botocore", "s3transfer", "urllib3")}


def downloaded(root: Path, bucket: str) -> dict[str, bytes]:
    base = root / bucket
    return {path.relative_to(base).as_posix(): path.read_bytes() for path in base.rglob("*") if path.is_file()}


def test_environment_keys_sign_a_whole_run_without_importing_boto3(seaweed: S3Server, tmp_path: Path) -> None:
    """SeaweedFS checks every signature, so the files arriving proves the keys read without botocore sign right."""
    bucket = f"known-env-{os.getpid()}"
    seed(seaweed, bucket)
    code, err, imported = run_script(
        tmp_path, dict(os.environ), "--buckets", bucket, "--download-dir", "data", *seaweed.args()
    )
    assert code == adl.EXIT_OK, err
    assert downloaded(tmp_path / "data", bucket) == FILES
    assert botocore_modules(imported) == set(), sorted(botocore_modules(imported))


def test_rejected_environment_keys_are_the_same_error_without_boto3(seaweed: S3Server, tmp_path: Path) -> None:
    bucket = f"known-bad-{os.getpid()}"
    seed(seaweed, bucket)
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="not-the-secret")
    code, err, imported = run_script(tmp_path, env, "--buckets", bucket, "--download-dir", "data", *seaweed.args())
    assert code == adl.EXIT_CREDENTIALS, err
    [error] = [line for line in err.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: AWS credentials rejected: the secret key does not match the access key id"), err
    assert "not-the-secret" not in err
    assert botocore_modules(imported) == set(), sorted(botocore_modules(imported))


@pytest.mark.parametrize("how", ["flags", "anonymous", "no region anywhere"])
def test_flag_keys_anonymous_runs_and_the_default_region_skip_boto3(s3: S3Server, tmp_path: Path, how: str) -> None:
    bucket = f"known-{how.replace(' ', '-')}"
    seed(s3, bucket, ACL="public-read")
    env = dict(os.environ)
    argv = ["--buckets", bucket, "--download-dir", "data", *s3.args()]
    if how == "flags":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        argv += ["--access-key", "flag-key", "--secret-key", "flag-secret"]
    elif how == "anonymous":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        argv.append("--no-sign-request")
    else:  # no AWS_DEFAULT_REGION and neither shared file exists: botocore has no region, make_client us-east-1
        del env["AWS_DEFAULT_REGION"]
        assert not any(Path(env[name]).exists() for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"))
    code, err, imported = run_script(tmp_path, env, *argv)
    assert code == adl.EXIT_OK, err
    assert downloaded(tmp_path / "data", bucket) == FILES
    assert botocore_modules(imported) == set(), sorted(botocore_modules(imported))


def test_missing_bucket_and_nothing_listening_are_the_same_errors_without_boto3(s3: S3Server, tmp_path: Path) -> None:
    env = dict(os.environ)
    code, err, imported = run_script(tmp_path, env, "--buckets", "no-such-bkt", "--download-dir", "data", *s3.args())
    assert code == adl.EXIT_NOTHING_LISTED, err
    assert "Error: bucket 'no-such-bkt' does not exist" in err.splitlines(), err
    assert botocore_modules(imported) == set(), sorted(botocore_modules(imported))

    endpoint = f"http://127.0.0.1:{free_port()}"
    argv = ["--buckets", "road-data", "--download-dir", "data", "--endpoint-url", endpoint, "--retry-attempts", "0"]
    code, err, imported = run_script(tmp_path, env, *argv)
    assert code == adl.EXIT_FAILED, err
    assert (
        f"Error: cannot reach S3 at {endpoint}: connection refused (is the server running, and is --endpoint-url right?)"
        in err.splitlines()
    ), err
    assert botocore_modules(imported) == set(), sorted(botocore_modules(imported))


def test_a_shared_credentials_file_goes_to_botocore_and_its_keys_sign(seaweed: S3Server, tmp_path: Path) -> None:
    """No keys in the environment, a ~/.aws/credentials in a temporary HOME: botocore's chain finds them."""
    bucket = f"shared-file-{os.getpid()}"
    seed(seaweed, bucket)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {seaweed.access_key}\naws_secret_access_key = {seaweed.secret_key}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true")
    code, err, imported = run_script(tmp_path, env, "--buckets", bucket, "--download-dir", "data", *seaweed.args())
    assert code == adl.EXIT_OK, err
    assert downloaded(tmp_path / "data", bucket) == FILES
    assert {"boto3", "botocore"} <= imported


def test_a_profile_variable_naming_no_profile_is_the_profile_error(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "nope")
    code, out, err = run_cli("--buckets", "any-bkt", "--endpoint-url", "http://127.0.0.1:9")
    assert code == adl.EXIT_USAGE, (out, err)
    assert "Error: AWS profile 'nope' not found in ~/.aws/config or ~/.aws/credentials" in err.splitlines(), err


# -- known_session against botocore's own answer ----------------------------------------------------------------

ENV_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAENVIRONMENT01", "AWS_SECRET_ACCESS_KEY": "env-secret"}
PROFILE_FILE = "[default]\nregion = eu-west-1\naws_access_key_id = AKIAFROMFILE0001\naws_secret_access_key = file\n"

#: (case, environment, config, explicit keys, what to write to the config and credentials files, expected:
#: "known" for a KnownSession, None for botocore's chain).
CASES = [
    ("env keys and region", {**ENV_KEYS, "AWS_DEFAULT_REGION": "eu-north-1"}, {}, None, {}, "known"),
    ("session token", {**ENV_KEYS, "AWS_SESSION_TOKEN": "tok-session"}, {}, None, {}, "known"),
    (
        "security token wins",
        {**ENV_KEYS, "AWS_SECURITY_TOKEN": "tok-security", "AWS_SESSION_TOKEN": "tok-session"},
        {},
        None,
        {},
        "known",
    ),
    ("flags win over env", ENV_KEYS, {}, ("AKIAFLAGS0000001", "flag-secret", "tok-flag"), {}, "known"),
    (
        "env keys win over the credentials file",
        ENV_KEYS,
        {"region": "us-west-2"},
        None,
        {"credentials": PROFILE_FILE},
        "known",
    ),
    ("config region over the file's", ENV_KEYS, {"region": "ap-south-1"}, None, {"config": PROFILE_FILE}, "known"),
    ("no region, no files", ENV_KEYS, {}, None, {}, "known"),
    ("anonymous", {}, {"no_sign_request": True, "region": "us-east-2"}, None, {}, "known"),
    ("region from the config file", ENV_KEYS, {}, None, {"config": PROFILE_FILE}, None),
    ("region from the credentials file", ENV_KEYS, {}, None, {"credentials": PROFILE_FILE}, None),
    ("AWS_PROFILE", {**ENV_KEYS, "AWS_PROFILE": "default", "AWS_DEFAULT_REGION": "eu-north-1"}, {}, None, {}, None),
    ("AWS_DEFAULT_PROFILE", {**ENV_KEYS, "AWS_DEFAULT_PROFILE": "default"}, {"region": "us-west-2"}, None, {}, None),
    ("profile flag", ENV_KEYS, {"profile": "default", "region": "us-west-2"}, None, {"config": PROFILE_FILE}, None),
    (
        "expiring env keys",
        {**ENV_KEYS, "AWS_CREDENTIAL_EXPIRATION": "2099-01-01T00:00:00Z"},
        {"region": "us-west-2"},
        None,
        {},
        None,
    ),
    ("only an access key", {"AWS_ACCESS_KEY_ID": "AKIAONLY00000001"}, {"region": "us-west-2"}, None, {}, None),
    ("keys from the file only", {}, {"region": "us-west-2"}, None, {"credentials": PROFILE_FILE}, None),
    ("empty region flag", ENV_KEYS, {"region": ""}, None, {}, None),
]


@pytest.mark.parametrize(
    ("environ", "settings", "explicit", "files", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_known_session_gives_botocores_answer_or_defers_to_it(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    environ: dict[str, str],
    settings: dict[str, object],
    explicit: tuple[str, str, str] | None,
    files: dict[str, str],
    expected: str | None,
) -> None:
    for name in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(name)
    paths = {"config": tmp_path / "config", "credentials": tmp_path / "credentials"}
    monkeypatch.setenv("AWS_CONFIG_FILE", str(paths["config"]))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(paths["credentials"]))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    for which, text in files.items():
        paths[which].write_text(text)
    config = adl.build_config(settings)
    credentials = adl.Credentials(*explicit) if explicit else adl.Credentials()

    known = adl.known_session(config, credentials, os.environ)
    assert ("known" if known is not None else None) == expected
    if known is None:
        return
    boto = adl.boto3_session(config, credentials)
    assert adl.default_region(known, config) == adl.default_region(boto, config)
    assert known.region_name == boto.region_name
    if config.no_sign_request:
        assert known.get_credentials() is None
        return
    theirs = boto.get_credentials().get_frozen_credentials()
    ours = known.get_credentials().get_frozen_credentials()
    assert (ours.access_key, ours.secret_key, ours.token) == (theirs.access_key, theirs.secret_key, theirs.token)
    # A botocore client asked of the KnownSession is built on boto3's session with the same keys.
    assert known.boto3().get_credentials().get_frozen_credentials().access_key == theirs.access_key


def test_make_session_registers_environment_secrets_with_the_redactor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "environment-token-value")
    redactor = adl.SecretRedactingFilter()
    session = adl.make_session(adl.Config(), adl.Credentials(), redactor)
    assert isinstance(session, adl.KnownSession)
    text = redactor.redact("environment-secret-value environment-token-value testing")
    assert "environment-secret-value" not in text and "environment-token-value" not in text


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000",
        "https://s3.eu-west-1.amazonaws.com",
        "https://s3.example.com.",
        "http://localhost",
        "http://minio",
        "http://my_host:9000",
        "http://-bad.example.com",
        "http://bad-.example.com",
        "http://a..b",
        "http://" + "a" * 64 + ".com",
        "http://" + ".".join(["abcdefgh"] * 29) + ".com",
        "http://[::1]:9000",
        "http://[fe80::1%25eth0]:9000",
        "http://host\n.com",
        "http://exa mple.com",
    ],
)
def test_the_copied_endpoint_check_agrees_with_botocores(url: str) -> None:
    from botocore.utils import is_valid_endpoint_url

    assert adl._plain_endpoint_host(url) == bool(is_valid_endpoint_url(url))


def test_the_default_ca_bundle_is_botocores() -> None:
    from botocore.httpsession import get_cert_path

    assert adl.default_ca_bundle() == get_cert_path(True)
