"""The hand-written SigV4 signer must produce the same Authorization header as botocore's own S3 signer."""

from __future__ import annotations

import datetime
import random
import urllib.parse
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

import aws_data_downloader as adl

ALPHABET = "abcXYZ019 -_.~!$&'()*+,;=:@/%?#[]äöü日本語🚀\\\"<>{}|^`"


def random_key(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))).lstrip("/") or "k"


def botocore_authorization(
    credentials: Credentials, region: str, url: str, headers: dict[str, str], when: datetime.datetime
) -> tuple[str, dict[str, str]]:
    request = AWSRequest(method="GET", url=url, headers=dict(headers))
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return request.headers["Authorization"], {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize("seed", range(300))
def test_signature_matches_botocore(seed: int) -> None:
    rng = random.Random(seed)
    token = rng.choice([None, "FwoGZXIvYXdzE" + "x" * rng.randint(10, 300)])
    credentials = Credentials("AKIDEXAMPLE" + str(seed), f"secret/{seed}+key", token)
    region = rng.choice(["us-east-1", "eu-west-1", "ap-southeast-2"])
    host = rng.choice(["127.0.0.1:9000", "my-bucket.s3.amazonaws.com", "s3.eu-west-1.amazonaws.com"])
    prefix = "" if host.startswith("my-bucket") else "/my-bucket"
    key = random_key(rng)
    path = prefix + "/" + urllib.parse.quote(key.encode("utf-8"), safe="/~")
    query = [("versionId", "3/L4kqtJl40Nr8X8gdRQBpUMLUo+ " + str(seed))] if rng.random() < 0.4 else []
    if rng.random() < 0.2:
        query.append(("partNumber", str(rng.randint(1, 10000))))
    headers: dict[str, str] = {}
    if rng.random() < 0.7:
        start = rng.randint(0, 10**9)
        headers["range"] = f"bytes={start}-{start + rng.randint(0, 10**8)}"
    if rng.random() < 0.7:
        headers["if-match"] = '"' + f"{rng.getrandbits(128):032x}" + ("-12" if rng.random() < 0.5 else "") + '"'
    if rng.random() < 0.3:
        headers["x-amz-checksum-mode"] = "ENABLED"
    if rng.random() < 0.2:
        headers["x-amz-request-payer"] = "requester"
    when = datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=rng.randint(0, 10**8))

    signer = adl.SigV4Signer(credentials, region)
    now = when.replace(tzinfo=datetime.timezone.utc).timestamp()  # botocore takes naive UTC, we take epoch seconds
    ours = signer.sign("GET", host, path, query, dict(headers), region, now=now)

    query_string = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    url = f"http://{host}{path}" + (f"?{query_string}" if query_string else "")
    expected_auth, expected_headers = botocore_authorization(credentials, region, url, headers, when)
    assert ours["authorization"] == expected_auth
    for name in ("x-amz-date", "x-amz-content-sha256", "x-amz-security-token"):
        assert ours.get(name) == expected_headers.get(name)


def test_signing_key_is_cached_per_day_and_region() -> None:
    signer = adl.SigV4Signer(Credentials("AKID", "secret"), "us-east-1")
    for _ in range(5):
        signer.sign("GET", "h", "/b/k", [], {}, now=1_800_000_000)
    assert len(signer._keys) == 1
    signer.sign("GET", "h", "/b/k", [], {}, region="eu-west-1", now=1_800_000_000)
    signer.sign("GET", "h", "/b/k", [], {}, now=1_800_000_000 + 86_400)
    assert len(signer._keys) == 3


def test_anonymous_requests_are_not_signed() -> None:
    headers = adl.SigV4Signer(None, "us-east-1").sign("GET", "h", "/b/k", [], {"range": "bytes=0-1"})
    assert headers == {"range": "bytes=0-1"}
