"""The request seam and the retry policy, without a server: how a request is built, how an answer is read, how a
response head and a chunked body are parsed, which failures are retried and how many times.

Every engine and the small-object loop go through these functions, so a rule tested here holds for all of them;
the server-backed tests (test_retries.py, test_small_loop.py, test_endpoints.py) show the same rules end to end.
"""

from __future__ import annotations

import http.client
import io
import logging
import threading

import pytest

import aws_data_downloader as adl

OBJ = adl.S3Object("bkt", "dir/a b.png", 10, "0123456789abcdef0123456789abcdef", 0.0)


# -- building a request ---------------------------------------------------------------------------------------


def test_object_request_carries_every_condition_once() -> None:
    versioned = adl.S3Object("bkt", "k", 10, "e" * 32, 0.0, version_id="v1")
    request = adl.object_request(
        versioned, byte_range=(5, 9), if_match="e" * 32, checksum_mode=True, part_number=2, request_payer="requester"
    )
    assert request.query == (("partNumber", "2"), ("versionId", "v1"))
    assert dict(request.headers) == {
        "range": "bytes=5-9",
        "if-match": f'"{"e" * 32}"',
        "x-amz-checksum-mode": "ENABLED",
        "x-amz-request-payer": "requester",
    }


def test_a_plain_request_has_no_conditions() -> None:
    request = adl.object_request(OBJ)
    assert request.query == () and dict(request.headers) == {}


def test_boto3_params_name_the_same_request_as_botocore_does() -> None:
    versioned = adl.S3Object("bkt", "k", 10, "e" * 32, 0.0, version_id="v1")
    request = adl.object_request(versioned, byte_range=(0, 4), if_match="e" * 32, checksum_mode=True, part_number=3)
    assert adl.boto3_params(versioned, request) == {
        "Bucket": "bkt",
        "Key": "k",
        "PartNumber": 3,
        "VersionId": "v1",
        "Range": "bytes=0-4",
        "IfMatch": f'"{"e" * 32}"',
        "ChecksumMode": "ENABLED",
    }


def test_boto3_params_are_accepted_by_botocores_own_validation() -> None:
    """Every name boto3_params produces is a real get_object/head_object parameter (botocore validates them)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("s3")
    request = adl.object_request(
        OBJ, byte_range=(0, 4), if_match=OBJ.etag, checksum_mode=True, request_payer="requester"
    )
    for operation, params in (
        ("GetObject", adl.boto3_params(OBJ, request)),
        ("HeadObject", adl.boto3_params(OBJ, adl.object_request(OBJ, part_number=1, request_payer="requester"))),
    ):
        report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
        assert not report.has_errors(), report.generate_report()


# -- reading an answer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "code", "kind", "error"),
    [
        (200, {}, "", "ok", None),
        (206, {}, "", "ok", None),
        (412, {}, "PreconditionFailed", "changed", adl.ObjectChanged),
        (412, {}, "", "changed", adl.ObjectChanged),
        (403, {}, "", "denied", adl.S3Error),
        (403, {}, "AccessDenied", "denied", adl.S3Error),
        (400, {}, "AccessDenied", "denied", adl.S3Error),
        (404, {}, "NoSuchKey", "missing", adl.S3Error),
        (404, {}, "", "missing", adl.S3Error),
        (400, {}, "NoSuchVersion", "missing", adl.S3Error),
        (500, {}, "InternalError", "retry", adl.S3Error),
        (503, {}, "SlowDown", "retry", adl.S3Error),
        (429, {}, "", "retry", adl.S3Error),
        (400, {}, "RequestTimeout", "retry", adl.S3Error),
        (403, {}, "RequestTimeTooSkewed", "retry", adl.S3Error),
        (403, {}, "InvalidObjectState", "error", adl.S3Error),
        (400, {}, "InvalidArgument", "error", adl.S3Error),
        (416, {}, "InvalidRange", "error", adl.S3Error),
    ],
)
def test_classify_response(status: int, headers: dict[str, str], code: str, kind: str, error: type | None) -> None:
    answer = adl.classify_response(status, headers, code, "a message", what="k")
    assert answer.kind == kind
    if error is None:
        assert answer.error is None
    else:
        assert isinstance(answer.error, error)
    if isinstance(answer.error, adl.S3Error):
        assert (answer.error.status, answer.error.code) == (status, code or str(status))


def test_a_region_redirect_names_the_region_from_the_header_or_the_body() -> None:
    by_header = adl.classify_response(301, {"x-amz-bucket-region": "eu-west-1"})
    assert (by_header.kind, by_header.region) == ("redirect", "eu-west-1")
    by_body = adl.classify_response(400, {}, "AuthorizationHeaderMalformed", "", "ap-south-1")
    assert (by_body.kind, by_body.region) == ("redirect", "ap-south-1")
    assert isinstance(by_body.error, adl.S3Error) and by_body.error.region == "ap-south-1"


def test_a_temporary_redirect_names_where_to_ask() -> None:
    answer = adl.classify_response(307, {"location": "https://bkt.s3-eu-west-1.amazonaws.com/k"}, "TemporaryRedirect")
    assert (answer.kind, answer.location, answer.region) == ("redirect", "https://bkt.s3-eu-west-1.amazonaws.com/k", "")


def test_parse_s3_error() -> None:
    body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message><Region>us-west-2</Region></Error>"
    assert adl.parse_s3_error(body) == ("SlowDown", "Reduce your rate", "us-west-2")
    assert adl.parse_s3_error(b"") == ("", "", "")
    assert adl.parse_s3_error(b"<html>not xml") == ("", "", "")


# -- HTTP/1.1 parsing -----------------------------------------------------------------------------------------


def test_parse_response_head_lower_cases_and_joins_repeated_headers() -> None:
    head = b'HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nX-Amz-Meta-A: 1\r\nx-amz-meta-a: 2\r\nETag: "e"'
    assert adl.parse_response_head(head) == (
        "HTTP/1.1",
        206,
        {"content-length": "5", "x-amz-meta-a": "1, 2", "etag": '"e"'},
    )


@pytest.mark.parametrize("line", [b"garbage\r\n", b"HTTP/1.1 abc OK\r\n", b"\r\n"])
def test_a_status_line_that_is_not_one_is_refused(line: bytes) -> None:
    with pytest.raises(http.client.BadStatusLine):
        adl.parse_status_line(line)


def test_interim_answers() -> None:
    assert adl.is_interim(100) and adl.is_interim(103)
    assert not adl.is_interim(101) and not adl.is_interim(200)


def _response(raw: bytes, headers: dict[str, str], status: int = 200) -> adl._Http11Response:
    return adl._Http11Response(io.BufferedReader(io.BytesIO(raw)), status, headers, will_close=False)


def test_a_chunked_body_is_decoded_across_chunk_boundaries_with_extensions_and_trailers() -> None:
    raw = b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"
    response = _response(raw, {"transfer-encoding": "chunked"})
    assert response.read(3) == b"Wik"
    assert response.read(4) == b"iped"
    assert response.read(100) == b"ia in\r\n\r\nchunks."
    assert response.isclosed() and response.read(10) == b""


def test_a_chunked_body_read_whole() -> None:
    response = _response(b"3\r\nabc\r\n0\r\n\r\n", {"transfer-encoding": "chunked"})
    assert response.read() == b"abc" and response.isclosed()


@pytest.mark.parametrize(
    "raw", [b"5\r\nab", b"5\r\nabcde\r\n", b"5\r\nabcde\r\n3\r\nxy"], ids=["inside-chunk", "no-last", "short"]
)
def test_a_chunked_body_cut_short_is_an_incomplete_body(raw: bytes) -> None:
    response = _response(raw, {"transfer-encoding": "chunked"})
    with pytest.raises(adl.IncompleteBody):
        response.read(100)


def test_a_content_length_body_cut_short_is_an_incomplete_body() -> None:
    response = _response(b"abc", {"content-length": "10"})
    with pytest.raises(adl.IncompleteBody):
        response.read(10)


def test_a_body_without_length_reads_until_the_server_closes() -> None:
    response = _response(b"all of it", {})
    assert response.will_close and response.read(100) == b"all of it" and response.read(100) == b""


def test_head_and_no_content_answers_have_no_body() -> None:
    assert _response(b"", {"content-length": "10"}, status=204).isclosed()
    head = adl._Http11Response(io.BufferedReader(io.BytesIO(b"")), 200, {"content-length": "10"}, False, False)
    assert head.isclosed() and head.read(10) == b""


# -- which failures are retried -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retryable", "reason"),
    [
        (ConnectionResetError(), True, "network error: ConnectionResetError"),
        (TimeoutError(), True, "network error: TimeoutError"),
        (http.client.RemoteDisconnected(), True, "network error: RemoteDisconnected"),
        (adl.IncompleteBody("cut"), True, "network error: IncompleteBody"),
        (adl.ChecksumMismatch("x"), True, "checksum mismatch"),
        (adl.S3Error(503, "SlowDown"), True, "S3 error SlowDown"),
        (adl.S3Error(500, "InternalError"), True, "S3 error InternalError"),
        (adl.S3Error(400, "RequestTimeout"), True, "S3 error RequestTimeout"),
        (adl.S3Error(403, "AccessDenied"), False, "access denied"),
        (adl.S3Error(404, "NoSuchKey"), False, "not found (deleted since listing)"),
        (adl.S3Error(403, "InvalidObjectState"), False, "archived (restore it first)"),
        (adl.S3Error(403, "RequestTimeTooSkewed"), True, "S3 error RequestTimeTooSkewed"),
        (adl.S3Error(400, "InvalidObjectState"), False, "archived (restore it first)"),
        (adl.ObjectChanged("k"), False, "object kept changing during download"),
        (adl.DiskFull("full"), False, "no space left on device"),
        (adl.Interrupted(), False, "Interrupted: "),
        (adl.UnsafeKeyError("unsafe key: absolute path"), False, "unsafe key: absolute path"),
        (NotADirectoryError(None, "x"), False, "path conflict: a file and a directory share this path"),
        (PermissionError(None, "x"), False, "permission denied writing the file"),
        (ValueError("a bug"), False, "ValueError: a bug"),
    ],
)
def test_is_retryable_and_failure_reason(exc: BaseException, retryable: bool, reason: str) -> None:
    assert adl.is_retryable(exc) is retryable
    assert adl.failure_reason(exc) == reason


def test_backoff_is_full_jitter_below_the_cap() -> None:
    import random

    rng = random.Random(1)
    delays = [adl.backoff_delay(attempt, 0.5, cap=3.0, rng=rng) for attempt in range(10) for _ in range(50)]
    assert all(0 <= delay <= 3.0 for delay in delays)
    assert max(adl.backoff_delay(0, 0.5, rng=rng) for _ in range(200)) <= 0.5


def _config(retries: int) -> adl.Config:
    return adl.build_config({"retry_attempts": retries, "retry_backoff_s": 0.0})


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_a_request_is_tried_retry_attempts_plus_one_times(retries: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    calls: list[int] = []

    def request() -> str:
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        adl.Attempts("bkt/k", _config(retries)).call(request)
    assert len(calls) == retries + 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Retrying")]
    assert [line.split(" after ")[0] for line in lines] == [
        f"Retrying bkt/k (attempt {n} of {retries + 1})" for n in range(2, retries + 2)
    ]


def test_a_request_that_heals_returns_its_answer() -> None:
    answers = iter([adl.S3Error(503, "SlowDown"), TimeoutError(), "body"])

    def request() -> str:
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    attempts = adl.Attempts("bkt/k", _config(5))
    assert attempts.call(request) == "body" and attempts.failures == 2


@pytest.mark.parametrize("exc", [adl.S3Error(404, "NoSuchKey"), adl.ObjectChanged("k"), adl.DiskFull("x")])
def test_a_final_answer_is_not_retried(exc: BaseException) -> None:
    calls: list[int] = []

    def request() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        adl.Attempts("bkt/k", _config(5)).call(request)
    assert calls == [1]


def test_a_stop_during_the_backoff_ends_the_request_as_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backoff waits on the stop event: a stop set while it waits raises Interrupted (a backoff that slept
    instead would return after the delay, and failed() would return normally)."""
    monkeypatch.setattr(adl, "backoff_delay", lambda attempt, base: 20.0)  # the cap: jitter cannot make it ~0
    waits: list[float | None] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            self.set()  # the stop comes while the backoff waits
            return super().wait(timeout)

    stop = Stop()
    attempts = adl.Attempts("bkt/k", adl.build_config({"retry_attempts": 5, "retry_backoff_s": 60.0}), stop)
    with pytest.raises(adl.Interrupted):
        attempts.failed(ConnectionResetError())
    assert waits == [20.0], "the backoff waits on the stop event, for the backoff delay"
    assert attempts.failures == 1


def test_botocore_retries_nothing_itself() -> None:
    """The run's Attempts are the only retries: one botocore client call is one request."""
    session = adl.make_session(adl.Config(), adl.Credentials(), adl.SecretRedactingFilter())
    client = adl.make_client(session, adl.Config(endpoint_url="http://127.0.0.1:9"))
    assert client.meta.config.retries["total_max_attempts"] == 1
