#!/usr/bin/env python3
"""aws_data_downloader: pull whole datasets out of S3, fast, verified and resumable.

Getting started from a shell::

    python aws_data_downloader.py --demo                      # a sample dataset from a local S3
    python aws_data_downloader.py --buckets my-bucket --prefixes coryell/ --download-dir data

From Python (a notebook or a training script)::

    from aws_data_downloader import AWSDataDownloader

    summary = AWSDataDownloader({"buckets": ["my-bucket"], "prefixes": ["coryell/"]}).run_full_download()
    print(summary.downloaded, summary.failed, summary.to_dict())

Every object lands at ``<download_dir>/<bucket>/<key>``: written to a temporary file beside the target,
verified against the object's ETag or S3 checksum while it streams, and renamed into place only when whole.
A resume journal (``download_resume.json``) lets a re-run skip what is done and continue large objects from
the parts already on disk.

The file reads top to bottom in the order data flows: errors -> config -> session/credentials -> S3 requests
(the engines) -> bucket discovery -> streaming listing -> filters -> local-path plan -> transfer -> verification
-> resume journal -> progress/summary -> run guards -> the downloader -> manifest -> demo -> CLI.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import fnmatch
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import stat
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__version__ = "1.0.0"

#: The module's own logger; importing the module configures no handler (the CLI adds them).
log = logging.getLogger("aws_data_downloader")

KiB = 1024
MiB = 1024 * KiB


###############################################################################
# Errors and exit codes
###############################################################################
# Every failure the user can act on is one of these, with a one-line message naming the thing to fix. The CLI
# prints the message and exits with the error's code; the Python API raises it.

EXIT_OK = 0  #: every selected object is on disk and verified (downloaded or skipped)
EXIT_FAILED = 1  #: some objects failed; the rest are done
EXIT_USAGE = 2  #: bad command line, config, or download directory
EXIT_CREDENTIALS = 3  #: credentials rejected, or nothing accessible
EXIT_LOCKED = 4  #: another run holds the download directory's lock
EXIT_NO_SPACE = 5  #: not enough free disk space (before the run, or the disk filled during it)
EXIT_INTERRUPTED = 130  #: stopped by SIGINT/SIGTERM; a re-run continues


class DownloaderError(Exception):
    """Base of every error the tool reports to the user; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, summary: DownloadSummary | None = None) -> None:
        super().__init__(message)
        #: The summary so far, when the error ended a run that had started downloading.
        self.summary = summary


class ConfigError(DownloaderError):
    """A bad flag, config key, value, or download directory."""

    exit_code = EXIT_USAGE


class CredentialsError(DownloaderError):
    """No credentials, or the store rejected them."""

    exit_code = EXIT_CREDENTIALS


class NothingAccessibleError(DownloaderError):
    """No bucket could be read: all named ones are missing or denied, or the account has none."""

    exit_code = EXIT_CREDENTIALS


class LockedError(DownloaderError):
    """Another run is downloading into the same directory."""

    exit_code = EXIT_LOCKED


class DiskSpaceError(DownloaderError):
    """The selection does not fit on the disk, or the disk filled during the run."""

    exit_code = EXIT_NO_SPACE


class DownloadInterrupted(DownloaderError):
    """The run was stopped (Ctrl-C, SIGTERM); completed files and resume state are kept."""

    exit_code = EXIT_INTERRUPTED


###############################################################################
# Config
###############################################################################
# One table describes every setting: its config key, type, default, flag and help. The parser, the default
# config file, validation and the README's tables all come from it, so they cannot drift apart.


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: config key, kind of value, default, and the flag that overrides it (None: file-only)."""

    key: str
    kind: str  # "str", "int", "float", "bool", "list", or "choice"
    default: Any
    help: str
    flag: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    #: For bool flags that turn a default-on setting off (``--no-verify``).
    inverted: bool = False
    #: The flag's own help, where it differs from the key's (inverted flags).
    flag_help: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("download_dir", "str", "data", "Where files go, as <download_dir>/<bucket>/<key>.", "--download-dir"),
    Option("buckets", "list", [], "Buckets to download; empty means every accessible bucket.", "--buckets"),
    Option("prefixes", "list", [], "Key prefixes to download; empty means whole buckets.", "--prefixes"),
    Option(
        "parallel_downloads",
        "int",
        32,
        "Concurrent downloads: worker threads, and small-object loop connections.",
        "--parallel",
        minimum=1,
        maximum=512,
    ),
    Option("overwrite_existing", "bool", False, "Download again even when a good local copy exists.", "--overwrite"),
    Option(
        "file_extensions",
        "list",
        [],
        "Keep only keys ending in these extensions (case-insensitive); empty keeps all.",
        "--extensions",
    ),
    Option("include", "list", [], "Keep only keys matching one of these globs; empty keeps all.", "--include"),
    Option("exclude", "list", [], "Drop keys matching any of these globs.", "--exclude"),
    Option("min_file_size_mb", "float", 0.0, "Skip objects smaller than this (MB).", "--min-size-mb", minimum=0),
    Option(
        "max_file_size_mb",
        "float",
        None,
        "Skip objects larger than this (MB); null means no limit.",
        "--max-size-mb",
        minimum=0,
        nullable=True,
    ),
    Option(
        "verify_checksums",
        "bool",
        True,
        "Verify every byte against the ETag or S3 checksum while it streams.",
        "--no-verify",
        inverted=True,
        flag_help="Do not verify checksums (less CPU; a corrupted byte would go unnoticed).",
    ),
    Option(
        "retry_attempts",
        "int",
        5,
        "Retries per object (and per request) on network faults, 5xx, throttling and checksum mismatch.",
        "--retry-attempts",
        minimum=0,
        maximum=50,
    ),
    Option(
        "retry_mode", "choice", "standard", "botocore's retry mode for API calls.", choices=("standard", "adaptive")
    ),
    Option(
        "retry_backoff_s",
        "float",
        0.5,
        "Base of the exponential backoff (full jitter) between object retries, in seconds.",
        minimum=0,
        maximum=60,
    ),
    Option(
        "chunk_size",
        "int",
        262144,
        "Bytes read from the network per read call.",
        minimum=1024,
        maximum=64 * MiB,
    ),
    Option(
        "multipart_threshold_mb",
        "float",
        16.0,
        "Objects at least this large (MB) resume across runs: streamed with journaled checkpoints (ranged parts with --no-verify; multipart objects always go by parts).",
        "--multipart-threshold-mb",
        minimum=1,
    ),
    Option(
        "multipart_chunksize_mb",
        "float",
        8.0,
        "Part size (MB) for ranged fetches when the object's own part size is unknown or not needed.",
        minimum=1,
    ),
    Option("region", "str", None, "AWS region; default from the environment or profile.", "--region", nullable=True),
    Option(
        "endpoint_url",
        "str",
        None,
        "S3-compatible endpoint (MinIO, Ceph, R2, SeaweedFS); AWS_ENDPOINT_URL[_S3] also works.",
        "--endpoint-url",
        nullable=True,
    ),
    Option("profile", "str", None, "Named profile from ~/.aws/config.", "--profile", nullable=True),
    Option("no_sign_request", "bool", False, "Anonymous requests, for public buckets.", "--no-sign-request"),
    Option(
        "request_payer",
        "choice",
        None,
        "Set to 'requester' for requester-pays buckets.",
        "--request-payer",
        choices=("requester",),
        nullable=True,
    ),
    Option(
        "addressing_style",
        "choice",
        "auto",
        "Bucket addressing: virtual-hosted on AWS, path-style on custom endpoints when 'auto'.",
        choices=("auto", "path", "virtual"),
    ),
    Option(
        "resume_file",
        "str",
        "download_resume.json",
        "Resume journal; a relative path is inside download_dir.",
        "--resume-file",
    ),
    Option("log_file", "str", "aws_downloader.log", "Log file the CLI writes (empty: none).", "--log-file"),
    Option("manifest", "str", None, "Write one JSON line per selected object here.", "--manifest", nullable=True),
    Option(
        "shard",
        "str",
        None,
        "Keep only shard I of N ('I/N', 0-based) by a stable hash of bucket/key; 'auto/N' reads I from the job.",
        "--shard",
        nullable=True,
    ),
    Option(
        "check_disk_space",
        "bool",
        True,
        "Refuse to start when the bytes to fetch exceed the free space.",
        "--ignore-disk-space",
        inverted=True,
        flag_help="Start even when the bytes to fetch exceed the free disk space.",
    ),
    Option(
        "progress_interval_s",
        "float",
        10.0,
        "Seconds between progress log lines when no bar is shown (cron, pipes).",
        minimum=0.1,
    ),
    Option(
        "engine",
        "choice",
        "auto",
        "GET engine: 'http' (fast: own HTTP/1.1 client + cached SigV4), 'boto3', or 'auto' (http unless a proxy is set).",
        choices=("auto", "http", "boto3"),
    ),
    Option(
        "small_object_kb",
        "int",
        256,
        "Objects up to this size (KiB) are fetched by one event-loop thread (http engine), each body held in "
        "memory: far less CPU per object than a thread each; 0 sends every object through the threads.",
        minimum=0,
        maximum=16384,
    ),
    Option("connect_timeout_s", "float", 10.0, "Seconds to wait for a connection.", minimum=0.1),
    Option("read_timeout_s", "float", 60.0, "Seconds to wait for data on an open connection.", minimum=0.1),
    Option("quiet", "bool", False, "Print only errors and the summary.", "--quiet"),
)

OPTIONS_BY_KEY: dict[str, Option] = {option.key: option for option in OPTIONS}


@dataclass(frozen=True, slots=True)
class Config:
    """Validated settings of one run; build it with :func:`build_config`, never by hand."""

    download_dir: str = "data"
    buckets: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    parallel_downloads: int = 32
    overwrite_existing: bool = False
    file_extensions: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_file_size_mb: float = 0.0
    max_file_size_mb: float | None = None
    verify_checksums: bool = True
    retry_attempts: int = 5
    retry_mode: str = "standard"
    retry_backoff_s: float = 0.5
    chunk_size: int = 262144
    multipart_threshold_mb: float = 16.0
    multipart_chunksize_mb: float = 8.0
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    no_sign_request: bool = False
    request_payer: str | None = None
    addressing_style: str = "auto"
    resume_file: str = "download_resume.json"
    log_file: str = "aws_downloader.log"
    manifest: str | None = None
    shard: str | None = None
    check_disk_space: bool = True
    progress_interval_s: float = 10.0
    engine: str = "auto"
    small_object_kb: int = 256
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    quiet: bool = False

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated like a config file's keys."""
        return build_config(dataclasses.asdict(self), changes)

    @property
    def multipart_threshold(self) -> int:
        return int(self.multipart_threshold_mb * MiB)

    @property
    def part_size(self) -> int:
        return int(self.multipart_chunksize_mb * MiB)


def _describe(option: Option) -> str:
    """What values a key takes, for error messages."""
    if option.kind == "int":
        return f"an integer from {option.minimum:g} to {option.maximum:g}"
    if option.kind == "float":
        bound = f"a number >= {option.minimum:g}" if option.minimum is not None else "a number"
        return bound + (" or null" if option.nullable else "")
    if option.kind == "bool":
        return "true or false"
    if option.kind == "list":
        return "a list of strings"
    if option.kind == "choice":
        return "one of " + ", ".join(repr(c) for c in option.choices) + (" or null" if option.nullable else "")
    return "a string" + (" or null" if option.nullable else "")


def check_value(option: Option, value: Any) -> Any:
    """Coerce one config value to its kind, or raise ConfigError naming the key and what it takes."""
    bad = ConfigError(f"config key '{option.key}' must be {_describe(option)}, got {value!r}")
    if value is None:
        if option.nullable or option.kind == "list":
            return None if option.nullable else ()
        raise bad
    if option.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if option.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if option.kind == "int" and not float(value).is_integer():
            raise bad
        number = int(value) if option.kind == "int" else float(value)
        if not math.isfinite(number):
            raise bad
        if (option.minimum is not None and number < option.minimum) or (
            option.maximum is not None and number > option.maximum
        ):
            raise bad
        return number
    if option.kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) and item for item in items):
            raise bad
        return tuple(items)
    if option.kind == "choice":
        if value not in option.choices:
            raise bad
        return value
    if not isinstance(value, str):
        raise bad
    return value


def build_config(*layers: Mapping[str, Any] | None) -> Config:
    """Merge layers (later wins: defaults < file < flags) into a validated Config."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in OPTIONS_BY_KEY:
                hint = ""
                if key in ("access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "session_token"):
                    hint = " (credentials do not belong in a config file: use environment variables or --profile)"
                known = ", ".join(sorted(OPTIONS_BY_KEY))
                raise ConfigError(f"unknown config key '{key}'{hint}; known keys: {known}")
            merged[key] = check_value(OPTIONS_BY_KEY[key], value)
    config = Config(**merged)
    if config.max_file_size_mb is not None and config.max_file_size_mb < config.min_file_size_mb:
        raise ConfigError("config key 'max_file_size_mb' must not be smaller than 'min_file_size_mb'")
    if config.shard is not None:
        parse_shard(config.shard, {})  # fail early on a malformed value; 'auto' is resolved at run time
    return config


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) config file into a dict of keys to validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError (via its __str__) land here
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def default_config_text() -> str:
    """The commented default config file, generated from OPTIONS so it always matches the code."""
    import yaml

    lines = [
        "# aws-data-downloader configuration. Every key is optional; command-line flags override this file.",
        "# Credentials never go here: use environment variables, ~/.aws (with 'profile'), or an IAM role.",
        "",
    ]
    for option in OPTIONS:
        flag = f"flag {option.flag}" if option.flag else "file-only"
        lines.append(f"# {option.help} ({flag}; {_describe(option)})")
        default = list(option.default) if isinstance(option.default, (list, tuple)) else option.default
        dumped = yaml.safe_dump({option.key: default}, default_flow_style=True, sort_keys=False).strip()
        lines.append(dumped.strip("{}") if dumped.startswith("{") else dumped)
        lines.append("")
    return "\n".join(lines)


def write_default_config(path: str | os.PathLike[str]) -> Path:
    """Write the commented default config; refuses to overwrite, since it may hold the user's edits."""
    path = Path(path)
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(default_config_text())
    except FileExistsError:
        raise ConfigError(f"{path} already exists; not overwriting it (remove it or name another path)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return path


###############################################################################
# Session and credentials
###############################################################################
# Credentials come from botocore's session so that profiles, SSO, IAM roles and refreshing temporary
# credentials all work. Secrets never reach a log line: the CLI's handlers carry a filter that masks them.

#: The error codes that mean "these credentials are wrong", as opposed to "not allowed".
CREDENTIAL_ERROR_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
    }
)


def mask_access_key(access_key: str | None) -> str:
    """Show an access key id the way the AWS console does: enough to recognise, not to use."""
    if not access_key:
        return "(none)"
    if len(access_key) <= 8:
        return "*" * len(access_key)
    return f"{access_key[:4]}{'*' * (len(access_key) - 8)}{access_key[-4:]}"


class SecretRedactingFilter(logging.Filter):
    """Replaces secrets in every record a handler emits, botocore's debug output included.

    It sits on handlers, not loggers, because records from botocore's loggers propagate to the root's
    handlers without passing any filter on our logger.
    """

    def __init__(self) -> None:
        super().__init__()
        self._replacements: dict[str, str] = {}

    def add(self, secret: str | None, shown_as: str = "****") -> None:
        if secret and len(secret) >= 4:
            self._replacements[secret] = shown_as
            # Also as presigned URLs and canonical query strings write it (session tokens hold '/', '+', '=').
            for safe in ("", "-_.~"):
                self._replacements[urllib.parse.quote(secret, safe=safe)] = shown_as

    def redact(self, text: str) -> str:
        for secret, shown in self._replacements.items():
            if secret in text:
                text = text.replace(secret, shown)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._replacements:
            return True
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


#: One filter for the process: the CLI installs it on its handlers, runs register their secrets with it.
REDACTOR = SecretRedactingFilter()


@dataclass(frozen=True, slots=True)
class Credentials:
    """Explicit credentials from the caller; all None means boto3's default chain."""

    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # never print a secret, even in a traceback's locals
        return f"Credentials(access_key={mask_access_key(self.access_key)!r})"


def make_session(config: Config, credentials: Credentials) -> Any:
    """A boto3 session: explicit keys, else the profile, else boto3's default chain."""
    import boto3
    import botocore.exceptions

    if bool(credentials.access_key) != bool(credentials.secret_key):
        raise CredentialsError("give both an access key and a secret key, or neither")
    REDACTOR.add(credentials.secret_key)
    REDACTOR.add(credentials.session_token)
    REDACTOR.add(credentials.access_key, mask_access_key(credentials.access_key))
    try:
        if credentials.access_key:
            session = boto3.Session(
                aws_access_key_id=credentials.access_key,
                aws_secret_access_key=credentials.secret_key,
                aws_session_token=credentials.session_token,
                region_name=config.region,
            )
        else:
            session = boto3.Session(profile_name=config.profile, region_name=config.region)
    except botocore.exceptions.ProfileNotFound:
        raise ConfigError(f"AWS profile '{config.profile}' not found in ~/.aws/config or ~/.aws/credentials") from None
    if not config.no_sign_request:  # anonymous runs never resolve credentials (no IMDS wait on a laptop)
        _redact_resolved_credentials(session)
    return session


def _redact_resolved_credentials(session: Any) -> None:
    """Register the credentials boto3 resolved (environment, profile, role) too: botocore's debug log prints them."""
    try:
        resolved = session.get_credentials()
        frozen = resolved.get_frozen_credentials() if resolved is not None else None
    except Exception:  # no or broken credentials: the run reports that when it first needs them
        return
    if frozen is not None:
        REDACTOR.add(frozen.secret_key)
        REDACTOR.add(frozen.token)
        REDACTOR.add(frozen.access_key, mask_access_key(frozen.access_key))


def resolve_endpoint_url(config: Config) -> str | None:
    """The custom endpoint, if any: config/flag first, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL."""
    return config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_client(session: Any, config: Config, region: str | None = None) -> Any:
    """The one S3 client all workers share; its pool holds a connection per worker and per part worker."""
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    endpoint_url = resolve_endpoint_url(config)
    addressing = config.addressing_style
    if addressing == "auto":
        addressing = "path" if endpoint_url else "auto"
    boto_config = BotoConfig(
        max_pool_connections=2 * config.parallel_downloads + 4,
        retries={"mode": config.retry_mode, "max_attempts": config.retry_attempts + 1},
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        s3={"addressing_style": addressing},
        signature_version=UNSIGNED if config.no_sign_request else None,
        # We verify checksums ourselves while streaming; botocore's own validation would hash every byte a
        # second time, and its newer default request checksums are rejected by some S3-compatible stores.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra=f"aws-data-downloader/{__version__}",
    )
    region = region or default_region(session, config)
    return session.client("s3", region_name=region, endpoint_url=endpoint_url, config=boto_config)


class SharedClient:
    """The run's one botocore S3 client, built on first use: building it costs ~0.06 s of a ~0.23 s start-up,
    and a run of named buckets on a path-style endpoint with the http engine never needs it."""

    def __init__(self, session: Any, config: Config) -> None:
        self.session = session
        self.config = config
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_client(self.session, self.config)
            return self._client


def default_region(session: Any, config: Config) -> str:
    """The region requests are signed for unless a bucket says otherwise, as make_client chooses it."""
    return config.region or session.region_name or "us-east-1"


def error_code(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, S3 error code) of a botocore ClientError, or (0, '') for anything else."""
    if isinstance(exc, S3Error):
        return exc.status, exc.code
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0, ""
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(response.get("Error", {}).get("Code") or "")
    return status, code


def credentials_problem(exc: BaseException) -> str | None:
    """A one-line explanation if ``exc`` means the credentials are missing or rejected, else None."""
    import botocore.exceptions

    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return "AWS credentials not found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, use --profile, or run on an instance with an IAM role"
    if isinstance(exc, botocore.exceptions.TokenRetrievalError):
        return f"AWS credentials could not be refreshed ({exc}); log in again (e.g. 'aws sso login')"
    _, code = error_code(exc)
    if code in CREDENTIAL_ERROR_CODES:
        what = {
            "InvalidAccessKeyId": "the access key id does not exist",
            "SignatureDoesNotMatch": "the secret key does not match the access key id",
            "ExpiredToken": "the session token has expired",
            "InvalidToken": "the session token is invalid",
        }.get(code, code)
        return f"AWS credentials rejected: {what}; check --access-key/--secret-key, the environment, or --profile"
    return None


###############################################################################
# S3 requests: the engines
###############################################################################
# Every request after the session is made goes through an Engine: listing pages, GETs (whole, ranged, with
# If-Match) and part sizes. HttpEngine is the default and the fast one: a minimal HTTP/1.1 client with a
# keep-alive connection per worker thread and a SigV4 signer that caches the day's key, while credentials,
# endpoint, addressing style and region still come from botocore. Boto3Engine sends the same requests through
# the shared boto3 client; it is used behind an HTTP proxy, or when the config asks for it.


class S3Error(Exception):
    """An error response from the store for one request."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{code or status}: {message}" if message else (code or str(status)))
        self.status = status
        self.code = code


class ObjectChanged(Exception):
    """If-Match failed: the object was replaced after we listed it."""


def part_number_gone(exc: S3Error) -> bool:
    """A HEAD ?partNumber=N refused because the object now has fewer parts: it was replaced (InvalidPartNumber;
    a HEAD answer has no body, so only its status says so)."""
    return exc.status in (400, 416) or exc.code == "InvalidPartNumber"


class Response(Protocol):
    """What an engine's GET returns: status, lower-cased headers, and a body to read in chunks."""

    headers: Mapping[str, str]

    def read(self, amount: int) -> bytes: ...

    def close(self) -> None: ...


class Engine(Protocol):
    """Makes the data-plane requests for one run; raises S3Error for an error response."""

    def get(
        self,
        obj: S3Object,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
        checksum_mode: bool = False,
    ) -> Response: ...

    def part_size(self, obj: S3Object, part_number: int) -> int: ...

    def head(self, obj: S3Object) -> S3Object: ...

    def set_bucket_region(self, bucket: str, region: str | None) -> None: ...

    def list_pages(self, bucket: str, prefix: str) -> Iterator[list[S3Object]]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class _Boto3Body:
    """A botocore StreamingBody seen through the Response protocol."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.headers = response["ResponseMetadata"]["HTTPHeaders"]
        self._body = response["Body"]

    def read(self, amount: int) -> bytes:
        return self._body.read(amount)

    def close(self) -> None:
        self._body.close()


class Boto3Engine:
    """Data-plane requests through the shared boto3 client: correct everywhere boto3 is, at ~2 ms CPU a GET."""

    def __init__(self, client: Any, request_payer: str | None = None) -> None:
        self.client = client
        self._extra = {"RequestPayer": request_payer} if request_payer else {}

    def _call(self, operation: Callable[..., Any], **params: Any) -> Any:
        import botocore.exceptions

        try:
            return operation(**params, **self._extra)
        except botocore.exceptions.ClientError as exc:
            status, code = error_code(exc)
            if status == 412 or code == "PreconditionFailed":
                raise ObjectChanged(params.get("Key", "")) from None
            message = exc.response.get("Error", {}).get("Message", "")
            raise S3Error(status, code, message) from None

    def get(
        self,
        obj: S3Object,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
        checksum_mode: bool = False,
    ) -> Response:
        params: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
        if byte_range is not None:
            params["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        if if_match:
            params["IfMatch"] = f'"{if_match}"'
        if obj.version_id:
            params["VersionId"] = obj.version_id
        if checksum_mode:
            params["ChecksumMode"] = "ENABLED"
        return _Boto3Body(self._call(self.client.get_object, **params))

    def part_size(self, obj: S3Object, part_number: int) -> int:
        params: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key, "PartNumber": part_number}
        if obj.version_id:
            params["VersionId"] = obj.version_id
        try:
            return int(self._call(self.client.head_object, **params)["ContentLength"])
        except S3Error as exc:
            if part_number_gone(exc):
                raise ObjectChanged(obj.key) from None
            raise

    def head(self, obj: S3Object) -> S3Object:
        params: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
        if obj.version_id:
            params["VersionId"] = obj.version_id
        response = self._call(self.client.head_object, **params)
        return dataclasses.replace(
            obj,
            size=int(response["ContentLength"]),
            etag=str(response.get("ETag", "")).strip('"'),
            last_modified=response["LastModified"].timestamp(),
        )

    def set_bucket_region(self, bucket: str, region: str | None) -> None:
        pass  # botocore follows region redirects itself

    def list_pages(self, bucket: str, prefix: str) -> Iterator[list[S3Object]]:
        return iter_object_pages(self.client, bucket, [prefix], self._extra.get("RequestPayer"))

    def abort(self) -> None:
        pass  # urllib3's sockets are not ours to shut: a stalled read waits for read_timeout_s

    def close(self) -> None:
        pass


#: SHA-256 of an empty body: the payload hash botocore signs for every GET.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class SigV4Signer:
    """AWS Signature Version 4 for S3 GETs, producing the same Authorization header as botocore's S3SigV4Auth.

    botocore derives the signing key (four HMACs) on every request; this caches it per secret, day and region,
    which measured ~0.2 ms of CPU less per GET. Credentials are read from botocore's credential object on each
    request, so refreshing credentials (IAM roles, SSO) keep working.
    """

    def __init__(self, credentials: Any, region: str) -> None:
        #: botocore Credentials (possibly refreshable); None for anonymous requests.
        self.credentials = credentials
        self.region = region
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def _signing_key(self, secret: str, day: str, region: str) -> bytes:
        cache_key = (secret, day, region)
        key = self._keys.get(cache_key)
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            if len(self._keys) > 64:
                self._keys.clear()
            self._keys[cache_key] = key
        return key

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        query: Sequence[tuple[str, str]],
        headers: dict[str, str],
        region: str | None = None,
        now: float | None = None,
    ) -> dict[str, str]:
        """Add x-amz-date, x-amz-content-sha256, the session token and Authorization to ``headers``.

        ``path`` is the already percent-encoded URL path (S3 does not normalise it again); ``query`` holds
        unencoded (name, value) pairs; header names must be lower-case.
        """
        if self.credentials is None:
            return headers
        frozen = self.credentials.get_frozen_credentials()
        region = region or self.region
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        headers["host"] = host
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = EMPTY_SHA256
        if frozen.token:
            headers["x-amz-security-token"] = frozen.token
        names = sorted(name for name in headers if name not in _UNSIGNED_HEADERS)
        canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in names)
        signed_headers = ";".join(names)
        canonical_query = "&".join(
            sorted(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in query)
        )
        canonical_request = "\n".join((method, path, canonical_query, canonical_headers, signed_headers, EMPTY_SHA256))
        scope = f"{day}/{region}/s3/aws4_request"
        string_to_sign = "\n".join(
            ("AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest())
        )
        signature = hmac.new(self._signing_key(frozen.secret_key, day, region), string_to_sign.encode(), hashlib.sha256)
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature.hexdigest()}"
        )
        return headers


#: Headers botocore leaves out of the signature (hop-by-hop ones and the user agent).
_UNSIGNED_HEADERS = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)


@dataclass(frozen=True, slots=True)
class BucketAddress:
    """Where a bucket's objects are requested: scheme, host and path prefix, as botocore would address them."""

    scheme: str
    host: str  #: host[:port], also the Host header
    prefix: str  #: path before the key: "/bucket" (path-style) or "" (virtual-hosted)
    region: str  #: signing region


def request_target(address: BucketAddress, key: str | None, query: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(path, request target) for a key of a bucket, or the bucket itself when key is None."""
    if key is None:
        path = address.prefix or "/"
    else:
        path = address.prefix + "/" + urllib.parse.quote(key.encode("utf-8", "surrogatepass"), safe="/~")
    return path, path + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")


class IncompleteBody(ConnectionError):
    """The connection ended before the body did (a truncated response)."""


class _Http11Response:
    """A response read straight off the socket: status, lower-cased headers, and a Content-Length or chunked
    body. http.client parses headers with the email package, which cost ~0.2 ms of CPU per small GET."""

    __slots__ = ("_chunk_left", "_chunked", "_file", "_remaining", "headers", "status", "will_close")

    def __init__(
        self, file: Any, status: int, headers: dict[str, str], will_close: bool, has_body: bool = True
    ) -> None:
        self._file = file
        self.status = status
        self.headers = headers
        self.will_close = will_close
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._chunk_left = 0
        if not has_body or status in (204, 304) or 100 <= status < 200:  # a HEAD answer has headers only
            self._remaining: int | None = 0
        elif self._chunked:
            self._remaining = None
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
        else:
            self._remaining = None  # read until the server closes
            self.will_close = True

    def getheaders(self) -> list[tuple[str, str]]:
        return list(self.headers.items())

    def isclosed(self) -> bool:
        """True once the whole body has been read."""
        return self._remaining == 0

    def read(self, amount: int | None = None) -> bytes:
        if self._remaining == 0:
            return b""
        if self._chunked:
            return self._read_chunked(amount)
        if self._remaining is None:  # until EOF
            data = self._file.read() if amount is None else self._file.read1(amount)
            if not data:
                self._remaining = 0
            return data
        want = self._remaining if amount is None else min(amount, self._remaining)
        data = self._file.read(want)
        self._remaining -= len(data)
        if len(data) < want:
            raise IncompleteBody(f"connection closed with {self._remaining} bytes of the body missing")
        return data

    def _read_chunked(self, amount: int | None) -> bytes:
        parts: list[bytes] = []
        wanted = amount if amount is not None else -1
        while wanted != 0:
            if self._chunk_left == 0:
                line = self._file.readline(1024)
                if not line:
                    raise IncompleteBody("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self._file.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._remaining = 0
                    break
                self._chunk_left = size
            take = self._chunk_left if wanted < 0 else min(wanted, self._chunk_left)
            data = self._file.read(take)
            if len(data) < take:
                raise IncompleteBody("connection closed inside a chunk")
            parts.append(data)
            self._chunk_left -= take
            if wanted > 0:
                wanted -= take
            if self._chunk_left == 0:
                self._file.readline(8)  # the CRLF after the chunk
        return b"".join(parts)

    def close(self) -> None:
        pass  # the connection decides; a half-read body means the connection is dropped


def parse_status_line(line: bytes) -> tuple[str, int]:
    """(HTTP version, status) of a response's first line; BadStatusLine when it is not one."""
    import http.client

    version, _, rest = line.decode("latin-1").partition(" ")
    code, _, _reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.strip().isdigit():
        raise http.client.BadStatusLine(line.decode("latin-1", "replace").strip())
    return version, int(code)


def is_interim(status: int) -> bool:
    """A 1xx answer (100 Continue, 103 Early Hints, ...) comes before the real one; 101 would switch protocols."""
    return 100 <= status < 200 and status != 101


def add_header(headers: dict[str, str], line: str) -> None:
    """Add one header line under its lower-cased name; a repeated header joins the earlier value with ", "."""
    name, _, value = line.partition(":")
    name = name.strip().lower()
    value = value.strip()
    headers[name] = f"{headers[name]}, {value}" if name in headers else value


def parse_response_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """(version, status, lower-cased headers) of a response head, given without its blank last line."""
    first, _, rest = head.partition(b"\r\n")
    version, status = parse_status_line(first)
    headers: dict[str, str] = {}
    for line in rest.decode("latin-1").split("\r\n"):
        if line:
            add_header(headers, line)
    return version, status, headers


def split_host(host: str, scheme: str) -> tuple[str, int]:
    """(hostname, port) of a Host value such as ``s3.amazonaws.com``, ``127.0.0.1:9000`` or ``[::1]:9000``."""
    if host.rfind(":") > host.rfind("]"):
        hostname, _, port = host.rpartition(":")
    else:
        hostname, port = host, ""
    return hostname.strip("[]"), int(port) if port else (443 if scheme == "https" else 80)


def request_bytes(method: str, target: str, headers: Mapping[str, str]) -> bytes:
    """A whole HTTP/1.1 request head, so it goes out in one write."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Http11Connection:
    """One keep-alive HTTP/1.1 connection (plain or TLS) that sends a whole request in one write."""

    def __init__(self, scheme: str, host: str, connect_timeout: float, read_timeout: float, tls: Any) -> None:
        self.scheme = scheme
        self.host = host
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls
        self._sock: Any = None
        self._file: Any = None

    def _connect(self) -> None:
        import socket

        hostname, port = split_host(self.host, self.scheme)
        sock = socket.create_connection((hostname, port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.scheme == "https":
            sock = self.tls.wrap_socket(sock, server_hostname=hostname)
        sock.settimeout(self.read_timeout)
        self._sock = sock
        self._file = sock.makefile("rb", buffering=256 * 1024)

    def request(self, method: str, target: str, headers: Mapping[str, str]) -> _Http11Response:
        """Send the request and read the status line and headers; the body is left to the caller."""
        import http.client

        if self._sock is None:
            self._connect()
        self._sock.sendall(request_bytes(method, target, headers))
        file = self._file
        while True:
            line = file.readline(65537)
            if not line:
                raise http.client.RemoteDisconnected("the server closed the connection without a response")
            version, status = parse_status_line(line)
            headers_in: dict[str, str] = {}
            while True:
                header = file.readline(65537)
                if header in (b"\r\n", b"\n"):
                    break
                if not header:
                    raise IncompleteBody("connection closed inside the response headers")
                add_header(headers_in, header.decode("latin-1"))
            if not is_interim(status):
                break
        will_close = version == "HTTP/1.0" or headers_in.get("connection", "").lower() == "close"
        return _Http11Response(file, status, headers_in, will_close, has_body=method != "HEAD")

    def shutdown(self) -> None:
        """Make a read blocked in another thread return (close() alone does not wake it on Linux)."""
        import socket

        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _HttpBody:
    """A raw response seen through the Response protocol; leaves its connection open when fully read."""

    def __init__(self, engine: HttpEngine, connection: Any, response: Any) -> None:
        self.headers = response.headers
        self._engine = engine
        self._connection = connection
        self._response = response

    def read(self, amount: int) -> bytes:
        return self._response.read(amount)

    def close(self) -> None:
        response = self._response
        if response.isclosed() and not response.will_close:
            return  # fully read: the connection stays open for the next request
        response.close()
        self._engine.drop_connection(self._connection)


#: Bucket names that stand in a URL path as they are (every valid S3 bucket name does).
_PLAIN_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]*")


class HttpEngine:
    """GETs, listings and HEADs over a minimal HTTP/1.1 client, a keep-alive connection per worker thread, and a
    caching signer (the small-object loop borrows its addressing and signing too).

    Measured on a 2-core box against SeaweedFS: botocore's client machinery costs ~1 ms of CPU per small GET
    and urllib3 ~0.2 ms more than http.client; this engine is what lets a Python process keep up with s5cmd.
    Credentials, endpoint, addressing style and region come from botocore, so profiles, SSO, IAM roles, custom
    endpoints and path-style addressing behave exactly as they do in boto3. The botocore client itself (for
    ListBuckets, discovery and virtual-hosted addresses) is built only when needed: named buckets on a
    path-style custom endpoint are probed and addressed here, saving its ~0.06 s at start-up.
    """

    def __init__(self, session: Any, clients: SharedClient, config: Config) -> None:
        self.session = session
        self.clients = clients
        self.config = config
        self._regional_clients: dict[str, Any] = {}
        credentials = None if config.no_sign_request else session.get_credentials()
        if credentials is None and not config.no_sign_request:  # never fall back to unsigned requests
            import botocore.exceptions

            raise CredentialsError(credentials_problem(botocore.exceptions.NoCredentialsError()) or "")
        self.region = default_region(session, config)
        self.signer = SigV4Signer(credentials, self.region)
        endpoint = resolve_endpoint_url(config)
        parts = urllib.parse.urlsplit(endpoint) if endpoint else None
        #: A custom endpoint addressed path-style (the default for one): bucket addresses need no botocore client.
        self.path_style_endpoint = (
            parts
            if parts is not None and config.addressing_style in ("auto", "path") and parts.path in ("", "/")
            else None
        )
        self._local = threading.local()
        self._addresses: dict[str, BucketAddress] = {}
        self._regions: dict[str, str] = {}
        self._live: set[Any] = set()
        self._lock = threading.Lock()
        self._ssl_context: Any = None
        self._user_agent = f"aws-data-downloader/{__version__} python"

    # -- addressing -----------------------------------------------------------------------------------------

    def set_bucket_region(self, bucket: str, region: str | None) -> None:
        if region:
            with self._lock:
                self._regions[bucket] = region
                self._addresses.pop(bucket, None)

    def address(self, bucket: str) -> BucketAddress:
        """Ask botocore once per bucket how it would address it (a presigned URL costs no request); on a
        path-style custom endpoint the address is simply ``/<bucket>``, as botocore's would be."""
        address = self._addresses.get(bucket)
        if address is not None:
            return address
        with self._lock:
            region = self._regions.get(bucket) or self.region
            endpoint = self.path_style_endpoint
            if endpoint is not None and _PLAIN_BUCKET.fullmatch(bucket):
                address = BucketAddress(endpoint.scheme, endpoint.netloc, "/" + bucket, region)
                self._addresses[bucket] = address
                return address
            client = self.clients.get()
            if region != client.meta.region_name and not resolve_endpoint_url(self.config):
                client = self._regional_client(region)
            url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60)
            parts = urllib.parse.urlsplit(url)
            if not parts.path.endswith("/k"):
                raise DownloaderError(f"cannot work out how to address bucket '{bucket}' (got {parts.path})")
            address = BucketAddress(parts.scheme, parts.netloc, parts.path[: -len("/k")], region)
            self._addresses[bucket] = address
            return address

    def probe_bucket(self, bucket: str) -> tuple[str | None, BucketProblem | None]:
        """probe_bucket's checks through this engine: a HEAD, and after a bare 403 a zero-key listing, whose
        error body tells a wrong key from a denied bucket."""
        import http.client

        anonymous = self.config.no_sign_request
        try:
            try:
                self._read_small(bucket, [], method="HEAD")
            except S3Error as exc:
                if not (exc.status == 403 or exc.code in ("403", "AccessDenied", "Forbidden")):
                    return None, bucket_problem(bucket, exc, anonymous)
                try:
                    self._read_small(bucket, [("list-type", "2"), ("max-keys", "0")])
                except S3Error as list_exc:
                    return None, bucket_problem(bucket, list_exc, anonymous, denied=True)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloaderError(f"cannot reach S3 for bucket '{bucket}': {exc}") from None
        return self._regions.get(bucket), None

    def _regional_client(self, region: str) -> Any:
        client = self._regional_clients.get(region)
        if client is None:
            client = self._regional_clients[region] = make_client(self.session, self.config, region)
        return client

    # -- connections ----------------------------------------------------------------------------------------

    def _connection(self, address: BucketAddress) -> tuple[Any, bool]:
        """This thread's connection to the host, and whether it was used before (it may have gone stale)."""
        connections: dict[tuple[str, str], Any] = self._local.__dict__.setdefault("connections", {})
        key = (address.scheme, address.host)
        connection = connections.get(key)
        if connection is not None:
            return connection, True
        connection = _Http11Connection(
            address.scheme,
            address.host,
            self.config.connect_timeout_s,
            self.config.read_timeout_s,
            self._tls_context() if address.scheme == "https" else None,
        )
        connections[key] = connection
        with self._lock:
            self._live.add(connection)
        return connection, False

    def _tls_context(self) -> Any:
        if self._ssl_context is None:
            import ssl

            from botocore.httpsession import get_cert_path

            bundle = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
            self._ssl_context = ssl.create_default_context(cafile=bundle if isinstance(bundle, str) else None)
        return self._ssl_context

    def drop_connection(self, connection: Any) -> None:
        connection.close()
        with self._lock:
            self._live.discard(connection)
        connections = self._local.__dict__.get("connections", {})
        for key, value in list(connections.items()):
            if value is connection:
                del connections[key]

    def abort(self) -> None:
        """Shut down every open socket from another thread, so reads blocked on a silent server return now."""
        with self._lock:
            live = list(self._live)
        for connection in live:
            connection.shutdown()

    def close(self) -> None:
        """Close every connection the workers opened (call once the pools have shut down)."""
        with self._lock:
            open_connections, self._live = self._live, set()
        for connection in open_connections:
            connection.close()

    # -- requests -------------------------------------------------------------------------------------------

    def get(
        self,
        obj: S3Object,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
        checksum_mode: bool = False,
    ) -> Response:
        headers: dict[str, str] = {}
        if byte_range is not None:
            headers["range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        if if_match:
            headers["if-match"] = f'"{if_match}"'
        if checksum_mode:
            headers["x-amz-checksum-mode"] = "ENABLED"
        query = [("versionId", obj.version_id)] if obj.version_id else []
        connection, response = self._open(obj.bucket, obj.key, query, headers)
        return _HttpBody(self, connection, response)

    def list_pages(self, bucket: str, prefix: str) -> Iterator[list[S3Object]]:
        """ListObjectsV2 pages parsed with ElementTree: ~10x less CPU per key than botocore's parser, whose
        dateutil timestamp parsing alone cost ~0.35 ms per object."""
        token: str | None = None
        while True:
            query = [("list-type", "2"), ("encoding-type", "url")]
            if prefix:
                query.append(("prefix", prefix))
            if token:
                query.append(("continuation-token", token))
            body = self._read_small(bucket, query)
            objects, token = parse_list_objects_v2(bucket, body)
            if objects:
                yield objects
            if not token:
                return

    def _read_small(self, bucket: str, query: list[tuple[str, str]], method: str = "GET") -> bytes:
        """A small GET (a listing page) or HEAD on the bucket, retried like botocore would on transient faults."""
        attempt = 0
        while True:
            try:
                connection, response = self._open(bucket, None, query, {}, method=method)
                try:
                    body = response.read()
                finally:
                    if response.will_close or not response.isclosed():
                        self.drop_connection(connection)
                return body
            except Exception as exc:
                attempt += 1
                if not is_retryable(exc) or attempt > self.config.retry_attempts:
                    raise
                delay = backoff_delay(attempt - 1, self.config.retry_backoff_s)
                what = "listing of" if method == "GET" else "request on"
                log.info("Retrying %s %s (attempt %d) after %s; waiting %.2fs", what, bucket, attempt + 1, exc, delay)
                time.sleep(delay)

    def _open(
        self,
        bucket: str,
        key: str | None,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        method: str = "GET",
    ) -> tuple[Any, Any]:
        """Send a signed GET (or HEAD) for a key, or the bucket itself when key is None; return a 2xx response.

        Follows region redirects (301, or 400 with the right region) and 307s; raises ObjectChanged on 412 and
        S3Error on any other error response.
        """
        import http.client

        for _hop in range(3):  # a region redirect or a 307 costs one more request each
            address = self.address(bucket)
            path, target = request_target(address, key, query)
            connection, reused = self._connection(address)
            try:
                response = self._send(connection, address, path, target, query, headers, method)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                # The server closed an idle keep-alive connection: retry at once on a fresh one (not a fault).
                connection, _ = self._connection(address)
                response = self._send(connection, address, path, target, query, headers, method)
            if response.status in (200, 206):
                return connection, response
            try:
                body = response.read() if response._remaining is not None else response.read(64 * 1024)
            except (OSError, ValueError):
                body = b""
            response_headers = response.headers
            if response.will_close or not response.isclosed():
                self.drop_connection(connection)
            code, message, region = _parse_s3_error(body)
            if response.status == 412:
                raise ObjectChanged(key or bucket)
            new_region = response_headers.get("x-amz-bucket-region") or region
            redirected = response.status == 301 or code in ("PermanentRedirect", "AuthorizationHeaderMalformed")
            if redirected and new_region and new_region != address.region:
                log.debug("Bucket %s is in region %s; re-addressing", bucket, new_region)
                self.set_bucket_region(bucket, new_region)
                continue
            if response.status == 307 and response_headers.get("location"):
                location = urllib.parse.urlsplit(response_headers["location"])
                with self._lock:
                    self._addresses[bucket] = dataclasses.replace(
                        address, scheme=location.scheme or address.scheme, host=location.netloc or address.host
                    )
                continue
            raise S3Error(response.status, code or str(response.status), message)
        raise S3Error(301, "PermanentRedirect", f"bucket '{bucket}' kept redirecting")

    def _send(
        self,
        connection: Any,
        address: BucketAddress,
        path: str,
        target: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        method: str = "GET",
    ) -> Any:
        """Sign and send one request; a connection that fails is dropped so the next request starts clean."""
        request_headers = self.signed_headers(address, method, path, query, headers)
        try:
            return connection.request(method, target, request_headers)
        except BaseException:
            self.drop_connection(connection)
            raise

    def signed_headers(
        self, address: BucketAddress, method: str, path: str, query: list[tuple[str, str]], headers: dict[str, str]
    ) -> dict[str, str]:
        """The request's headers with the signature, Host and User-Agent added (``headers`` is not changed)."""
        if self.config.request_payer:
            headers = {**headers, "x-amz-request-payer": self.config.request_payer}
        request_headers = self.signer.sign(method, address.host, path, query, dict(headers), address.region)
        request_headers["host"] = address.host
        request_headers["user-agent"] = self._user_agent
        return request_headers

    def _head(self, obj: S3Object, query: list[tuple[str, str]]) -> dict[str, str]:
        if obj.version_id:
            query = [*query, ("versionId", obj.version_id)]
        connection, response = self._open(obj.bucket, obj.key, query, {}, method="HEAD")
        if response.will_close:
            self.drop_connection(connection)
        return response.headers

    def part_size(self, obj: S3Object, part_number: int) -> int:
        """Content length of one upload part (HEAD ?partNumber=N), retried by the object's own loop only."""
        try:
            return int(self._head(obj, [("partNumber", str(part_number))])["content-length"])
        except S3Error as exc:
            if part_number_gone(exc):
                raise ObjectChanged(obj.key) from None
            raise

    def head(self, obj: S3Object) -> S3Object:
        headers = self._head(obj, [])
        return dataclasses.replace(
            obj,
            size=int(headers["content-length"]),
            etag=headers.get("etag", "").strip('"'),
            last_modified=email.utils.parsedate_to_datetime(headers["last-modified"]).timestamp(),
        )


def make_engine(session: Any, clients: SharedClient, config: Config) -> Engine:
    """The GET engine for a run: the fast one unless the config or an HTTP proxy asks for boto3's."""
    choice = config.engine
    if choice == "auto":
        proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))
        choice = "boto3" if proxied else "http"
    if choice == "http":
        return HttpEngine(session, clients, config)
    return Boto3Engine(clients.get(), config.request_payer)


def parse_s3_timestamp(text: str) -> float:
    """Seconds since the epoch from S3's ISO 8601 timestamps ('2026-11-26T07:32:03.000Z')."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        from botocore.utils import parse_timestamp

        return parse_timestamp(text).timestamp()


def parse_list_objects_v2(bucket: str, body: bytes) -> tuple[list[S3Object], str | None]:
    """One ListObjectsV2 page -> (objects, continuation token or None). Folder markers are not files.

    Keys are URL-decoded when the server honoured encoding-type=url (as botocore does), which is how keys with
    characters XML 1.0 cannot carry come back intact.
    """
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    decode = root.findtext(f"{ns}EncodingType") == "url"
    objects = []
    for entry in root.iterfind(f"{ns}Contents"):
        key = entry.findtext(f"{ns}Key") or ""
        if decode:
            key = urllib.parse.unquote_plus(key)
        size = int(entry.findtext(f"{ns}Size") or 0)
        if is_folder_marker(key, size):
            continue
        modified = entry.findtext(f"{ns}LastModified")
        objects.append(
            S3Object(
                bucket=bucket,
                key=key,
                size=size,
                etag=(entry.findtext(f"{ns}ETag") or "").strip('"'),
                last_modified=parse_s3_timestamp(modified) if modified else 0.0,
                storage_class=entry.findtext(f"{ns}StorageClass") or "STANDARD",
            )
        )
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    return objects, (root.findtext(f"{ns}NextContinuationToken") or None) if truncated else None


def _parse_s3_error(body: bytes) -> tuple[str, str, str]:
    """(Code, Message, Region) from an S3 XML error body; empty strings where absent (HEAD, empty bodies)."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", "", ""

    def text(tag: str) -> str:
        element = root.find(tag)
        return (element.text or "") if element is not None else ""

    return text("Code"), text("Message"), text("Region")


###############################################################################
# Bucket discovery
###############################################################################
# With no buckets named we list the account's and probe each, so one denied bucket costs a warning, not the run.


@dataclass(frozen=True, slots=True)
class BucketProblem:
    """A bucket we cannot download from, and why, in the user's words."""

    bucket: str
    reason: str


def _is_anonymous(client: Any) -> bool:
    from botocore import UNSIGNED

    return client.meta.config.signature_version is UNSIGNED


def bucket_problem(bucket: str, exc: BaseException, anonymous: bool, denied: bool = False) -> BucketProblem:
    """What a failed request on ``bucket`` means, in the user's words; CredentialsError when the keys are at fault.

    ``denied`` says a bare 403 was already seen (a HEAD has no error body to say more).
    """
    problem = credentials_problem(exc)
    if problem:
        raise CredentialsError(problem) from None
    status, code = error_code(exc)
    if not denied and (status == 404 or code in ("404", "NoSuchBucket", "NotFound")):
        return BucketProblem(bucket, f"bucket '{bucket}' does not exist")
    if denied or status == 403 or code in ("403", "AccessDenied", "Forbidden"):
        reason = f"Access Denied for bucket '{bucket}'"
        if anonymous:
            reason += " (the request was anonymous: the bucket is not public; drop --no-sign-request)"
        return BucketProblem(bucket, reason)
    return BucketProblem(bucket, f"bucket '{bucket}' cannot be read: {code or status}")


def probe_bucket(client: Any, bucket: str) -> tuple[str | None, BucketProblem | None]:
    """Check one bucket is readable; returns (its region, None) or (None, the problem)."""
    import botocore.exceptions

    try:
        response = client.head_bucket(Bucket=bucket)
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return headers.get("x-amz-bucket-region"), None
    except botocore.exceptions.ClientError as exc:
        problem = credentials_problem(exc)
        if problem:
            raise CredentialsError(problem) from None
        status, code = error_code(exc)
        if status == 403 or code in ("403", "AccessDenied", "Forbidden"):
            # A HEAD answer has no body, so a wrong secret key and a denied bucket are the same bare 403 (on AWS
            # and SeaweedFS alike); a one-key listing's error body tells them apart.
            try:
                client.list_objects_v2(Bucket=bucket, MaxKeys=1)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as list_exc:
                return None, bucket_problem(bucket, list_exc, _is_anonymous(client), denied=True)
            return None, None  # listing, which is what a download needs, is allowed
        if status == 301 or code == "PermanentRedirect":
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            return headers.get("x-amz-bucket-region"), None
        return None, bucket_problem(bucket, exc, _is_anonymous(client))
    except botocore.exceptions.BotoCoreError as exc:
        problem = credentials_problem(exc)
        if problem:
            raise CredentialsError(problem) from None
        raise DownloaderError(f"cannot reach S3 for bucket '{bucket}': {exc}") from None


def discover_buckets(
    client: Any,
    named: Sequence[str],
    regions: dict[str, str] | None = None,
    probe: Callable[[str], tuple[str | None, BucketProblem | None]] | None = None,
) -> tuple[list[str], list[BucketProblem]]:
    """The buckets to download from and the ones we cannot read; fills ``regions`` with each bucket's region.

    Named buckets are probed as given (with ``probe`` when one is given, else through ``client``, which may
    then be None); otherwise the account's buckets are listed and each is probed.
    """
    import botocore.exceptions

    names = list(dict.fromkeys(named))
    if not names:
        try:
            names = [entry["Name"] for entry in client.list_buckets().get("Buckets", [])]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            problem = credentials_problem(exc)
            if problem:
                raise CredentialsError(problem) from None
            status, code = error_code(exc)
            if status == 403 or code == "AccessDenied":
                raise NothingAccessibleError(
                    "Access Denied for listing buckets; name the buckets to download with --buckets"
                ) from None
            raise DownloaderError(f"cannot list buckets: {exc}") from None
    accessible: list[str] = []
    problems: list[BucketProblem] = []
    for name in names:
        region, problem = probe(name) if probe is not None else probe_bucket(client, name)
        if problem:
            problems.append(problem)
        else:
            accessible.append(name)
            if region and regions is not None:
                regions[name] = region
    return accessible, problems


###############################################################################
# Streaming listing
###############################################################################
# ListObjectsV2 pages feed the workers as they arrive, so the first download starts after the first page and
# memory stays flat however large the bucket is.


@dataclass(frozen=True, slots=True)
class S3Object:
    """One object as the listing (or a manifest) describes it; everything downstream keys off this."""

    bucket: str
    key: str
    size: int
    etag: str  #: without the surrounding quotes
    last_modified: float  #: seconds since the epoch
    storage_class: str = "STANDARD"
    version_id: str | None = None


def is_folder_marker(key: str, size: int) -> bool:
    """A key ending in '/' with no data is a console-made "folder", not a file (one with data is reported)."""
    return key.endswith("/") and size == 0


def collapse_prefixes(prefixes: Iterable[str]) -> list[str]:
    """Drop prefixes that another given prefix already covers, so no object is listed twice."""
    unique = sorted(set(prefixes))
    kept: list[str] = []
    for prefix in unique:
        if not any(prefix.startswith(outer) for outer in kept):
            kept.append(prefix)
    return kept or [""]


def object_from_listing(bucket: str, entry: Mapping[str, Any]) -> S3Object:
    modified = entry.get("LastModified")
    return S3Object(
        bucket=bucket,
        key=entry["Key"],
        size=int(entry.get("Size", 0)),
        etag=str(entry.get("ETag", "")).strip('"'),
        last_modified=modified.timestamp() if modified is not None else 0.0,
        storage_class=entry.get("StorageClass") or "STANDARD",
    )


def iter_object_pages(
    client: Any, bucket: str, prefixes: Sequence[str], request_payer: str | None = None
) -> Iterator[list[S3Object]]:
    """Yield the bucket's objects a page at a time; folder markers (keys ending in '/', no data) are not files."""
    paginator = client.get_paginator("list_objects_v2")
    extra = {"RequestPayer": request_payer} if request_payer else {}
    for prefix in collapse_prefixes(prefixes):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **extra):
            objects = [
                object_from_listing(bucket, entry)
                for entry in page.get("Contents", [])
                if not is_folder_marker(entry["Key"], int(entry.get("Size", 0)))
            ]
            if objects:
                yield objects


###############################################################################
# Filters
###############################################################################
# Pure functions: what to keep is decided from the listing alone, before any local or network I/O.

#: Storage classes whose objects cannot be read without a restore request first.
ARCHIVED_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})


@dataclass(frozen=True, slots=True)
class Filters:
    """The selection rules of a run, normalised once (lower-cased extensions, sizes in bytes)."""

    extensions: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 0
    max_size: int | None = None
    shard: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> Filters:
        extensions = tuple(
            (ext if ext.startswith(".") else "." + ext).lower() for ext in config.file_extensions if ext.strip(".")
        )
        return cls(
            extensions=extensions,
            include=config.include,
            exclude=config.exclude,
            min_size=int(config.min_file_size_mb * MiB),
            max_size=None if config.max_file_size_mb is None else int(config.max_file_size_mb * MiB),
            shard=parse_shard(config.shard, os.environ if environ is None else environ) if config.shard else None,
        )


def parse_shard(text: str, environ: Mapping[str, str]) -> tuple[int, int]:
    """'I/N' -> (I, N); 'auto/N' takes I from a Kubernetes Indexed Job or an AWS Batch array job."""
    index_text, _, count_text = text.partition("/")
    if not count_text.isdecimal() or int(count_text) < 1:
        raise ConfigError(f"config key 'shard' must look like 'I/N' or 'auto/N' with N >= 1, got {text!r}")
    count = int(count_text)
    if index_text == "auto":
        if not environ:  # validation time: 'auto' is resolved when the run starts
            return (0, count)
        for variable in ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"):
            if environ.get(variable, "").isdecimal():
                index_text = environ[variable]
                if int(index_text) >= count:
                    raise ConfigError(f"--shard {text}: {variable}={index_text} is not below N={count}")
                break
        else:
            raise ConfigError(
                "--shard auto/N needs JOB_COMPLETION_INDEX (Kubernetes Indexed Job) or AWS_BATCH_JOB_ARRAY_INDEX"
            )
    if not index_text.isdecimal() or int(index_text) >= count:
        raise ConfigError(f"config key 'shard' must have 0 <= I < N, got {text!r}")
    return int(index_text), count


def shard_of(bucket: str, key: str, count: int) -> int:
    """A stable shard number: the same on every machine and Python version (unlike hash())."""
    digest = hashlib.blake2b(f"{bucket}/{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def filter_reason(obj: S3Object, filters: Filters) -> str | None:
    """Why the object is left out of the selection, or None if it is selected."""
    if filters.shard is not None and shard_of(obj.bucket, obj.key, filters.shard[1]) != filters.shard[0]:
        return "other shard"
    lowered = obj.key.lower()
    if filters.extensions and not lowered.endswith(filters.extensions):
        return "extension"
    if filters.include and not any(fnmatch.fnmatchcase(obj.key, pattern) for pattern in filters.include):
        return "not included"
    if any(fnmatch.fnmatchcase(obj.key, pattern) for pattern in filters.exclude):
        return "excluded"
    if obj.size < filters.min_size:
        return "smaller than min_file_size_mb"
    if filters.max_size is not None and obj.size > filters.max_size:
        return "larger than max_file_size_mb"
    return None


###############################################################################
# Local-path plan
###############################################################################
# Object keys are untrusted input. One function decides whether a key can be stored, one whether an object
# is skipped; nothing is ever written outside the download directory or through a symlink.


class UnsafeKeyError(ValueError):
    """The key cannot be stored under the download directory as it is."""


#: Control characters (C0, DEL, C1): they could forge log lines and are refused in file names.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
NAME_MAX = 255
#: What display_key escapes: the control characters, and the Unicode line/paragraph separators.
_LINE_BREAKERS = {**_CONTROL, 0x2028: "\\u2028", 0x2029: "\\u2029"}


def display_key(key: str) -> str:
    """A key made safe to print on one line: control characters (newlines included) shown as escapes."""
    return key.translate(_LINE_BREAKERS)


def local_path_for(download_dir: Path, bucket: str, key: str) -> Path:
    """Where ``key`` is stored: ``<download_dir>/<bucket>/<key>``, or UnsafeKeyError with the reason."""
    for name, value in (("bucket", bucket), ("key", key)):
        if not value:
            raise UnsafeKeyError(f"unsafe key: empty {name}")
        if _CONTROL_RE.search(value):
            raise UnsafeKeyError(f"unsafe key: control character in {name}")
    if "/" in bucket or bucket in (".", ".."):
        raise UnsafeKeyError("unsafe key: bucket name is not a plain directory name")
    if key.startswith("/"):
        raise UnsafeKeyError("unsafe key: absolute path")
    parts = key.split("/")
    separators = {sep for sep in (os.sep, os.altsep) if sep and sep != "/"}
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeKeyError(f"unsafe key: path component {part or '(empty)'!r}")
        if any(sep in part for sep in separators):
            raise UnsafeKeyError("unsafe key: path separator of this OS in a component")
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise UnsafeKeyError(f"unsafe key: path component longer than {NAME_MAX} bytes")
    return download_dir.joinpath(bucket, *parts)


def temp_path_for(target: Path, key: str) -> Path:
    """The temporary file beside ``target``: hidden, stable across runs (so parts resume), and short.

    Its name is derived from the key, not the file name, so a 255-byte file name still fits.
    """
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return target.with_name(f".adl-{digest}.part")


@dataclass(frozen=True, slots=True)
class CompletedEntry:
    """What the resume journal remembers of a finished object."""

    etag: str
    size: int
    version_id: str | None = None
    checksum: str | None = None  #: "md5:<hex>", "crc32:<b64>", ... or "unverifiable: <reason>"
    path: str | None = None


def skip_reason(
    obj: S3Object, local: os.stat_result | None, done: CompletedEntry | None, overwrite: bool
) -> str | None:
    """Why the object need not be downloaded again, or None. The one place this is decided.

    A journal entry with the same ETag and size proves the local file; without one, a file of the same size
    that is not older than the object is taken as current (what ``aws s3 sync`` does).
    """
    if overwrite or local is None or not stat.S_ISREG(local.st_mode) or local.st_size != obj.size:
        return None
    if done is not None:
        if done.etag == obj.etag and done.size == obj.size:
            return "already downloaded"
        return None  # the object changed since we downloaded it
    if local.st_mtime + 1e-6 >= obj.last_modified:
        return "exists locally (same size, not older)"
    return None


###############################################################################
# Transfer
###############################################################################
# One object in, one result out: Transfer.download(obj, target) -> DownloadResult. It asks an Engine (above)
# for bytes; swapping the engine changes nothing here.
#
# Small objects take one GET streamed to a temporary file. Multipart objects are fetched on their own part
# boundaries in parallel, written in place with os.pwrite, each part recorded in the resume journal, so a re-run
# fetches only what is missing; large single-part objects stream with a running MD5 and journal each boundary
# they pass. Every GET carries If-Match with the listed ETag, so two versions are never stitched.
#
# With the http engine, the smallest objects (small_object_kb) skip the worker threads: SmallObjectLoop fetches
# them on one thread over non-blocking connections and stores each whole body with Transfer.store_small. Any
# outcome but a clean 200 goes back to Transfer.download as a first failed attempt.


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """The outcome of one object."""

    obj: S3Object
    status: str  #: "downloaded", "skipped", "failed" or "interrupted"
    reason: str = ""  #: why skipped or failed, in the user's words
    path: str | None = None
    checksum: str | None = None
    bytes_fetched: int = 0
    attempts: int = 0


class ChecksumMismatch(Exception):
    """The bytes received do not match the object's ETag or checksum."""


class DiskFull(Exception):
    """ENOSPC while writing; the whole run stops."""


class Interrupted(Exception):
    """The run's stop event was set while this object was in flight."""


#: S3 error codes worth another try: throttling and the server's own trouble.
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "503",
        "500",
    }
)


def is_retryable(exc: BaseException) -> bool:
    """The one place that decides which failures another attempt may cure."""
    import http.client

    if isinstance(exc, (ChecksumMismatch, TimeoutError, ConnectionError, http.client.HTTPException)):
        return True
    if isinstance(exc, S3Error):
        return exc.status >= 500 or exc.status == 429 or exc.code in RETRYABLE_CODES
    if isinstance(exc, (DiskFull, Interrupted, ObjectChanged, UnsafeKeyError)):
        return False
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)):
        return False  # a local path conflict (raised with errno None) is no network fault: retrying cannot cure it
    try:
        import botocore.exceptions
        import urllib3.exceptions
    except ImportError:  # pragma: no cover - both ship with boto3
        return False
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.IncompleteReadError)):
        return True
    if isinstance(exc, (urllib3.exceptions.HTTPError,)):
        return True
    response_streaming = getattr(botocore.exceptions, "ResponseStreamingError", None)
    if response_streaming is not None and isinstance(exc, response_streaming):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, None)


def failure_reason(exc: BaseException) -> str:
    """The user's words for a final failure, grouped in the summary."""
    if isinstance(exc, UnsafeKeyError):
        return str(exc)
    if isinstance(exc, ChecksumMismatch):
        return "checksum mismatch"
    if isinstance(exc, S3Error):
        if exc.status == 403 or exc.code == "AccessDenied":
            return "access denied"
        if exc.status == 404 or exc.code in ("NoSuchKey", "NoSuchVersion"):
            return "not found (deleted since listing)"
        if exc.code == "InvalidObjectState":
            return "archived (restore it first)"
        return f"S3 error {exc.code or exc.status}"
    if isinstance(exc, ObjectChanged):
        return "object kept changing during download"
    if isinstance(exc, DiskFull):
        return "no space left on device"
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return "path conflict: a file and a directory share this path"
    if isinstance(exc, PermissionError):
        return "permission denied writing the file"
    if is_retryable(exc):
        return f"network error: {type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


def backoff_delay(attempt: int, base: float, cap: float = 20.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter (AWS's recommendation): uniform in [0, min(cap, base * 2**n)]."""
    return (rng or random).uniform(0, min(cap, base * (2**attempt)))


@dataclass(frozen=True, slots=True)
class Part:
    """A byte range of an object that is fetched, hashed and journaled as one unit."""

    index: int  #: 0-based; S3's PartNumber is index + 1
    start: int  #: first byte
    end: int  #: last byte, inclusive (as in a Range header)

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def plan_parts(size: int, part_sizes: int | Sequence[int]) -> list[Part]:
    """Cut ``size`` bytes into parts: all of one size (the last shorter), or of the given sizes in order."""
    sizes = [part_sizes] * max(1, math.ceil(size / part_sizes)) if isinstance(part_sizes, int) else list(part_sizes)
    parts, start = [], 0
    for index, part_size in enumerate(sizes):
        end = min(size, start + part_size) - 1
        if end < start:
            break
        parts.append(Part(index, start, end))
        start = end + 1
    if start != size:
        raise ValueError(f"part sizes {sizes[:3]}... do not add up to the object size {size}")
    return parts


def _hash_file_prefix(path: Path, length: int, hasher: StreamHasher) -> None:
    """Feed the first ``length`` bytes a previous run wrote into ``hasher``: the one read of those bytes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    try:
        offset = 0
        while offset < length:
            chunk = os.pread(fd, min(MiB, length - offset), offset)
            if not chunk:
                raise ConnectionError("the partial file is shorter than its journal says")
            hasher.update(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written; ENOSPC becomes DiskFull so the run can stop cleanly."""
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(str(exc)) from None
        raise


class Transfer:
    """Moves one object from S3 to its final path; every retry, resume and verification decision is here."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        journal: ResumeJournal | None,
        part_pool: ThreadPoolExecutor | None,
        stop: threading.Event,
        on_bytes: Callable[[int], None] = lambda n: None,
        *,
        root: Path,
        pinned: bool = False,
    ) -> None:
        self.engine = engine
        self.config = config
        self.journal = journal
        self.part_pool = part_pool
        self.stop = stop
        self.on_bytes = on_bytes
        self._made_dirs: set[Path] = set()
        #: Multipart objects whose parts are fetched on exact, per-part sizes after a mismatch.
        self._exact_layout: set[tuple[str, str]] = set()
        #: Encrypted multipart objects seen in this run (SSE-KMS/SSE-C), and why their ETag cannot verify them.
        self._opaque_etags: dict[tuple[str, str], str] = {}
        self._dirs_lock = threading.Lock()
        #: The download directory: every directory below it is created by _ensure_parent, never through a link.
        self.root = root
        #: Set for --from-manifest runs: an object whose ETag changed fails instead of being fetched anew.
        self.pinned = pinned
        #: Version ids named by GET responses (listings carry none), so the journal and manifest can pin them.
        self._versions: dict[tuple[str, str], str] = {}

    # -- the boundary ---------------------------------------------------------------------------------------

    def download(self, obj: S3Object, target: Path, failed_attempt: BaseException | None = None) -> DownloadResult:
        """Fetch ``obj`` into ``target``; never raises for a per-object problem (it becomes the result).

        ``failed_attempt`` is how a first attempt made elsewhere (the small-object loop) failed: it is handled
        here exactly as if this method's own first attempt had raised it, backoff and all.
        """
        if self.stop.is_set():  # queued before the run began stopping: do not start it
            return DownloadResult(obj, "interrupted", "stopped")
        attempts = 0
        fetched = 0
        changes = 0
        while True:
            attempts += 1
            try:
                if failed_attempt is not None:
                    exc, failed_attempt = failed_attempt, None
                    raise exc
                self._ensure_parent(target)
                checksum, fetched_now = self._fetch(obj, target)
                fetched += fetched_now
                obj = self._with_version(obj)
                self._versions.pop((obj.bucket, obj.key), None)
                return DownloadResult(obj, "downloaded", "", str(target), checksum, fetched, attempts)
            except Interrupted:
                return DownloadResult(obj, "interrupted", "stopped", None, None, fetched, attempts)
            except DiskFull:
                self.stop.set()
                raise
            except ObjectChanged:
                changes += 1
                self._discard_partial(obj, target)
                if self.pinned:
                    reason = "etag no longer matches the manifest"
                    return DownloadResult(obj, "failed", reason, None, None, fetched, attempts)
                if changes > self.config.retry_attempts:
                    return DownloadResult(obj, "failed", failure_reason(ObjectChanged()), None, None, fetched, attempts)
                try:
                    obj = self.engine.head(obj)
                except Exception as exc:  # deleted in between, denied, ...
                    return DownloadResult(obj, "failed", failure_reason(exc), None, None, fetched, attempts)
                log.info(
                    "%s/%s changed since it was listed; fetching the new version", obj.bucket, display_key(obj.key)
                )
                attempts -= 1  # a new version is a fresh start, not a failed attempt
            except Exception as exc:
                if isinstance(exc, ChecksumMismatch):
                    self._discard_partial(obj, target)
                    if etag_kind(obj.etag) == "multipart":
                        self._exact_layout.add((obj.bucket, obj.key))  # maybe uneven parts: ask each one next time
                if self.stop.is_set():  # the stop shut its socket, or it failed while the run was ending
                    return DownloadResult(obj, "interrupted", "stopped", None, None, fetched, attempts)
                if not is_retryable(exc) or attempts > self.config.retry_attempts:
                    reason = failure_reason(exc)
                    log.debug(
                        "%s/%s failed after %d attempt(s)", obj.bucket, display_key(obj.key), attempts, exc_info=True
                    )
                    return DownloadResult(obj, "failed", reason, None, None, fetched, attempts)
                self._wait_before_retry(obj, attempts, exc)

    def _note_version(self, obj: S3Object, headers: Mapping[str, str]) -> None:
        version = headers.get("x-amz-version-id")
        if version and version != "null" and not obj.version_id:
            self._versions[(obj.bucket, obj.key)] = version

    def _with_version(self, obj: S3Object) -> S3Object:
        version = None if obj.version_id else self._versions.get((obj.bucket, obj.key))
        return dataclasses.replace(obj, version_id=version) if version else obj

    def _wait_before_retry(self, obj: S3Object, attempt: int, exc: BaseException) -> None:
        delay = backoff_delay(attempt - 1, self.config.retry_backoff_s)
        log.info(
            "Retrying %s/%s (attempt %d of %d) after %s; waiting %.2fs",
            obj.bucket,
            display_key(obj.key),
            attempt + 1,
            self.config.retry_attempts + 1,
            failure_reason(exc),
            delay,
        )
        if self.stop.wait(delay):
            raise Interrupted()

    # -- local files ----------------------------------------------------------------------------------------

    def _ensure_parent(self, target: Path) -> None:
        """Create the target's directories, refusing any that is a symlink or a file (key vs key clash)."""
        parent = target.parent
        if parent in self._made_dirs:
            return
        root = self.root
        relative = parent.relative_to(root)
        current = root
        for name in relative.parts:
            current = current / name
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                try:
                    os.mkdir(current)
                except FileExistsError:
                    pass  # another worker made it
                info = os.lstat(current)
            if stat.S_ISLNK(info.st_mode):
                raise UnsafeKeyError("unsafe key: path goes through a symlink")
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(str(current))
        with self._dirs_lock:
            self._made_dirs.add(parent)

    def _open_temp(self, temp: Path, keep: bool) -> int:
        """Open the temporary file without following symlinks; ``keep`` reuses one a previous run left."""
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        if not keep:
            flags |= os.O_EXCL  # a leftover (or planted symlink) is removed and the create tried once more
        try:
            try:
                return os.open(temp, flags, 0o644)
            except FileExistsError:
                os.unlink(temp)
                return os.open(temp, flags, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(exc)) from None
            raise

    def _finish(self, obj: S3Object, temp: Path, target: Path) -> None:
        """Give the file the object's mtime, then rename it into place: the only way a target appears."""
        os.utime(temp, (obj.last_modified, obj.last_modified))
        os.replace(temp, target)  # onto a directory this fails (EISDIR): a key vs key path conflict

    def _discard_partial(self, obj: S3Object, target: Path) -> None:
        with contextlib.suppress(OSError):
            os.unlink(temp_path_for(target, obj.key))
        if self.journal is not None:
            self.journal.drop_partial(obj)

    # -- fetching -------------------------------------------------------------------------------------------

    def _fetch(self, obj: S3Object, target: Path) -> tuple[str | None, int]:
        verify = self.config.verify_checksums
        if verify and etag_kind(obj.etag) == "multipart":
            return self._fetch_parts(obj, target, self._original_parts(obj))
        if obj.size >= self.config.multipart_threshold and not verify:
            return self._fetch_parts(obj, target, plan_parts(obj.size, self.config.part_size))
        return self._fetch_stream(obj, target)

    def _original_parts(self, obj: S3Object) -> list[Part]:
        """The object's upload parts, so per-part MD5s can rebuild its multipart ETag."""
        count = int(obj.etag.rsplit("-", 1)[1])
        if count == 1:
            return plan_parts(obj.size, max(obj.size, 1))
        first = self.engine.part_size(obj, 1)
        # Uneven parts can have the count equal ones would (6+5+1 MiB and 6+6+0.x MiB are both 3): check the last,
        # and after a mismatch ask every part (uneven middle parts are legal too, only rarer).
        if (
            (obj.bucket, obj.key) not in self._exact_layout
            and first > 0
            and math.ceil(obj.size / first) == count
            and self.engine.part_size(obj, count) == obj.size - (count - 1) * first
        ):
            return plan_parts(obj.size, first)
        # Parts of different sizes (allowed by S3): ask for each one.
        return plan_parts(obj.size, [first] + [self.engine.part_size(obj, n) for n in range(2, count + 1)])

    def _fetch_stream(self, obj: S3Object, target: Path) -> tuple[str | None, int]:
        """One GET streamed to the temp file and hashed as it arrives; a body fault resumes with a Range.

        A large object (>= multipart_threshold) journals each part boundary it passes and keeps its temp file
        when the run stops, so a re-run hashes the bytes already on disk once and asks only for the rest.
        """
        temp = temp_path_for(target, obj.key)
        parts, written = self._stream_resume_point(obj, temp)
        fd = self._open_temp(temp, keep=written > 0)
        fetched = 0
        next_part = 0
        layout = [part.size for part in parts]

        def checkpoint(offset: int) -> None:
            nonlocal next_part
            while next_part < len(parts) and parts[next_part].end < offset:
                if self.journal is not None:
                    self.journal.record_part(obj, layout, next_part, "")
                next_part += 1

        try:
            hasher: StreamHasher | None = None
            if written:
                hasher = choose_hasher(obj, {}, self.config.verify_checksums)
                if hasher is not None:
                    _hash_file_prefix(temp, written, hasher)
                next_part = sum(1 for part in parts if part.end < written)
                log.info(
                    "Resuming %s/%s at byte %s of %s", obj.bucket, display_key(obj.key), f"{written:,}", f"{obj.size:,}"
                )
            attempt = 0
            while True:
                byte_range = (written, obj.size - 1) if written else None
                try:
                    response = self.engine.get(
                        obj,
                        byte_range,
                        if_match=obj.etag or None,
                        checksum_mode=self.config.verify_checksums and not written,
                    )
                    if hasher is None:
                        hasher = choose_hasher(obj, response.headers, self.config.verify_checksums)
                        self._note_version(obj, response.headers)
                    try:
                        written, got, fault = self._copy_body(
                            response, fd, written, obj.size, hasher, checkpoint if parts else None
                        )
                        fetched += got
                    finally:
                        response.close()
                    if fault is not None:
                        raise fault
                    if written != obj.size:
                        raise ConnectionError(f"body ended at {written} of {obj.size} bytes")
                    break
                except (ObjectChanged, DiskFull, Interrupted):
                    raise
                except Exception as exc:
                    attempt += 1
                    if written == 0 or not is_retryable(exc) or attempt > self.config.retry_attempts:
                        raise
                    self._wait_before_retry(obj, attempt, exc)
            checksum = hasher.verify() if hasher else None
            os.close(fd)
            fd = -1
            self._finish(obj, temp, target)
            if self.journal is not None:
                self.journal.record_done(self._with_version(obj), checksum, str(target))
            return checksum, fetched
        except BaseException:
            if fd >= 0:
                os.close(fd)
                fd = -1
            if not parts:  # small objects start over; large ones keep their bytes for the next attempt or run
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise

    def store_small(self, obj: S3Object, target: Path, headers: Mapping[str, str], body: bytes) -> DownloadResult:
        """Verify and store a whole body the small-object loop received; raises what the stream path would.

        The same checksum choice, temp file, mtime, atomic rename and journal record as :meth:`_fetch_stream`,
        minus the network: the loop hands any exception back to :meth:`download` as its first failed attempt.
        """
        if len(body) != obj.size:
            raise ConnectionError(f"body ended at {len(body)} of {obj.size} bytes")
        hasher = choose_hasher(obj, headers, self.config.verify_checksums)
        checksum = None
        if hasher is not None:
            hasher.update(body)
            checksum = hasher.verify()
        self._ensure_parent(target)
        temp = temp_path_for(target, obj.key)
        fd = self._open_temp(temp, keep=False)
        try:
            try:
                _pwrite_all(fd, body, 0)
            finally:
                os.close(fd)
            self._finish(obj, temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self.on_bytes(len(body))
        self._note_version(obj, headers)
        obj = self._with_version(obj)
        self._versions.pop((obj.bucket, obj.key), None)
        if self.journal is not None:
            self.journal.record_done(obj, checksum, str(target))
        return DownloadResult(obj, "downloaded", "", str(target), checksum, len(body), 1)

    def _stream_resume_point(self, obj: S3Object, temp: Path) -> tuple[list[Part], int]:
        """For a large object: its checkpoint parts and how many bytes a previous run left verified-in-order."""
        if obj.size < self.config.multipart_threshold or self.journal is None:
            return [], 0
        parts = plan_parts(obj.size, self.config.part_size)
        done = self.journal.partial_parts(obj, [part.size for part in parts])
        contiguous = 0
        while contiguous in done:
            contiguous += 1
        offset = parts[contiguous - 1].end + 1 if contiguous else 0
        try:
            info = os.lstat(temp)
        except OSError:
            info = None
        if offset and (info is None or not stat.S_ISREG(info.st_mode) or info.st_size < offset):
            offset = 0
        if offset == 0:
            self.journal.drop_partial(obj)
        return parts, offset

    def _copy_body(
        self,
        response: Response,
        fd: int,
        offset: int,
        end: int,
        hasher: StreamHasher | None,
        checkpoint: Callable[[int], None] | None = None,
    ) -> tuple[int, int, Exception | None]:
        """Copy a response body to ``fd`` from ``offset``; returns (new offset, bytes read, the read error or None).

        A read error is returned, not raised, so the caller still learns how far the body got and resumes the
        next request from there.
        """
        chunk_size = self.config.chunk_size
        got = 0
        while offset < end:
            if self.stop.is_set():
                raise Interrupted()
            try:
                chunk = response.read(min(chunk_size, end - offset))
            except Exception as exc:
                return offset, got, exc
            if not chunk:
                break
            _pwrite_all(fd, chunk, offset)
            if hasher is not None:
                hasher.update(chunk)
            offset += len(chunk)
            got += len(chunk)
            self.on_bytes(len(chunk))
            if checkpoint is not None:
                checkpoint(offset)
        return offset, got, None

    def _fetch_parts(self, obj: S3Object, target: Path, parts: list[Part]) -> tuple[str | None, int]:
        """Ranged GETs in parallel into a preallocated temp file; done parts survive a crash via the journal."""
        temp = temp_path_for(target, obj.key)
        layout = [part.size for part in parts]
        verify = self.config.verify_checksums
        done: dict[int, str] = {}
        if self.journal is not None:
            done = self.journal.partial_parts(obj, layout)
            if verify:  # parts a --no-verify run fetched carry no MD5 to rebuild the ETag from
                done = {index: digest for index, digest in done.items() if digest}
        keep = bool(done) and temp.is_file() and not temp.is_symlink() and temp.stat().st_size == obj.size
        if not keep:
            done = {}
            if self.journal is not None:
                self.journal.drop_partial(obj)
        fd = self._open_temp(temp, keep=keep)
        fetched = 0
        try:
            if not keep:
                try:
                    os.ftruncate(fd, obj.size)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise DiskFull(str(exc)) from None
                    raise
            elif done:
                log.info(
                    "Resuming %s/%s: %d of %d parts already on disk",
                    obj.bucket,
                    display_key(obj.key),
                    len(done),
                    len(parts),
                )
            todo = [part for part in parts if part.index not in done]
            if self.part_pool is not None and len(todo) > 1:
                futures = [self.part_pool.submit(self._fetch_part, obj, fd, part, verify, layout) for part in todo]
                error: BaseException | None = None
                for part, future in zip(todo, futures, strict=True):
                    try:
                        digest, got = future.result()
                        done[part.index] = digest
                        fetched += got
                    except CancelledError:
                        pass
                    except BaseException as exc:  # cancel parts not yet started; finished ones stay journaled
                        if error is None or isinstance(exc, (ObjectChanged, DiskFull)):
                            error = exc
                        for pending in futures:
                            pending.cancel()
                if error is not None:
                    raise error
            else:
                for part in todo:
                    digest, got = self._fetch_part(obj, fd, part, verify, layout)
                    done[part.index] = digest
                    fetched += got
            os.close(fd)
            fd = -1
            checksum = None
            note = self._opaque_etags.pop((obj.bucket, obj.key), None)
            if verify and note:  # an encrypted multipart object: its ETag is no MD5 of MD5s either
                checksum = f"unverifiable: {note}"
            elif verify:
                digests = [bytes.fromhex(done[part.index]) for part in parts]
                checksum = verify_multipart_etag(obj.etag, digests) if etag_kind(obj.etag) == "multipart" else None
                if checksum is None and len(parts) == 1:
                    checksum = verify_md5(obj.etag, digests[0])
            self._finish(obj, temp, target)
            if self.journal is not None:
                self.journal.record_done(self._with_version(obj), checksum, str(target))
            return checksum, fetched
        finally:
            if fd >= 0:
                os.close(fd)

    def _fetch_part(self, obj: S3Object, fd: int, part: Part, verify: bool, layout: list[int]) -> tuple[str, int]:
        """One ranged GET (resumed within the part on a body fault), MD5'd as it streams, then journaled."""
        hasher = hashlib.md5(usedforsecurity=False) if verify else None
        offset = part.start
        attempt = 0
        fetched = 0
        while True:
            if self.stop.is_set():
                raise Interrupted()
            try:
                response = self.engine.get(obj, (offset, part.end), if_match=obj.etag or None)
                self._note_version(obj, response.headers)
                note = encryption_note(response.headers) if verify else None
                if note:
                    self._opaque_etags[(obj.bucket, obj.key)] = note
                try:
                    offset, got, fault = self._copy_body(response, fd, offset, part.end + 1, _Md5Sink(hasher))
                    fetched += got
                finally:
                    response.close()
                if fault is not None:
                    raise fault
                if offset != part.end + 1:
                    raise ConnectionError(f"part {part.index + 1} ended at byte {offset} of {part.end + 1}")
                break
            except (ObjectChanged, DiskFull, Interrupted):
                raise
            except Exception as exc:
                attempt += 1
                if not is_retryable(exc) or attempt > self.config.retry_attempts:
                    raise
                self._wait_before_retry(obj, attempt, exc)
        digest = hasher.hexdigest() if hasher is not None else ""
        if self.journal is not None:
            self.journal.record_part(obj, layout, part.index, digest)
        return digest, fetched


class _LoopConnection:
    """One non-blocking keep-alive connection of the small-object loop, and the request it is serving."""

    __slots__ = ("body_length", "buffer", "closed", "deadline", "events", "headers", "idle_since", "key", "outgoing")
    __slots__ += ("planned", "reused", "sock", "status", "tls", "will_close")

    def __init__(self, sock: Any, key: tuple[str, str], tls: bool) -> None:
        self.sock = sock
        #: (scheme, host): which requests this connection can serve.
        self.key = key
        self.tls = tls
        #: The selector events it is registered for (READ, plus WRITE while a request is half sent).
        self.events = 0
        #: It served a request before: an EOF or reset before the next answer means the server closed it idle.
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        #: The object whose GET it is serving; None while idle.
        self.planned: Planned | None = None
        self.reset()

    def reset(self) -> None:
        """Ready for the next request (the connection stays open)."""
        self.planned = None
        self.buffer = bytearray()
        self.outgoing = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body_length = 0
        self.will_close = False
        self.deadline = 0.0


class SmallObjectLoop:
    """Fetches small objects on one thread that multiplexes non-blocking keep-alive connections.

    Why: with a thread per request, every socket and file call hands the GIL to another thread, and on a
    2-core box those handoffs (futex waits, context switches) cost more CPU than the Python code itself:
    10,000 x 32 KiB cost 3.7 s of client CPU in 32 threads and 1.7 s with this loop. The loop does only the clean
    case, a 200 with a Content-Length body; anything else (an error status, a redirect, a timeout, a reset,
    a checksum mismatch) hands the object to the worker threads as its first failed attempt, so retries,
    backoff, redirects and failure reasons stay in one place (:meth:`Transfer.download`).
    """

    #: Objects queued ahead of the loop before submit() waits, so listing never runs far ahead of downloads.
    BACKLOG = 2000
    #: The longest response head accepted, and the largest error body read into memory.
    MAX_HEAD = 64 * KiB
    MAX_ERROR_BODY = MiB
    #: The longest the loop sleeps before it looks at the stop flag and the deadlines again.
    TICK_S = 0.2
    #: An idle connection older than this is checked for a server-side close before it is used again.
    IDLE_CHECK_S = 1.0

    def __init__(
        self,
        engine: HttpEngine,
        transfer: Transfer,
        on_result: Callable[[DownloadResult], None],
        on_fallback: Callable[[Planned, BaseException | None], None],
    ) -> None:
        import select
        import selectors
        import socket
        import ssl

        self.engine = engine
        self.transfer = transfer
        self.config = transfer.config
        self.stop = transfer.stop
        self.on_result = on_result
        self.on_fallback = on_fallback
        self.connections = self.config.parallel_downloads
        self._would_block = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self._stale = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, IncompleteBody)
        self._read, self._write = selectors.EVENT_READ, selectors.EVENT_WRITE
        self._select = select.select
        #: Objects submitted and not started yet; the main thread appends, the loop pops (deque ops are atomic).
        self._queue: collections.deque[Planned] = collections.deque()
        #: Set when the queue is short again, so a submit() waiting for room can go on.
        self._room = threading.Event()
        #: No more submissions: the loop ends once everything it has is finished.
        self._closed = False
        self._selector = selectors.DefaultSelector()
        #: A byte on this socket pair wakes the loop from select() (new objects, a finished connect, close).
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, self._read, None)
        #: Connections serving a request, and idle keep-alive connections by (scheme, host).
        self._active: set[_LoopConnection] = set()
        self._idle: dict[tuple[str, str], list[_LoopConnection]] = {}
        #: The object being started: if starting it raises, it is in neither the queue nor a connection.
        self._starting: Planned | None = None
        #: Objects waiting for a connection a connector thread is opening, and the finished openings.
        self._connecting: dict[int, Planned] = {}
        self._ready: collections.deque[tuple[Planned, BucketAddress, Future[Any]]] = collections.deque()
        self._connector: ThreadPoolExecutor | None = None
        self._finished = False
        self._ready_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="adl-small", daemon=True)
        self._thread.start()

    @property
    def _open(self) -> int:
        """Connections open or being opened: never more than ``connections``."""
        return len(self._active) + len(self._connecting) + sum(len(idle) for idle in self._idle.values())

    # -- the main thread's side -----------------------------------------------------------------------------

    def submit(self, plans: Sequence[Planned]) -> None:
        """Queue objects for the loop; waits while the loop is more than BACKLOG objects behind."""
        if not self._thread.is_alive():  # the loop died of a bug (logged): the threads take everything
            for planned in plans:
                self.on_fallback(planned, None)
            return
        self._queue.extend(plans)
        self._wake()
        while len(self._queue) > self.BACKLOG and self._thread.is_alive() and not self.stop.is_set():
            self._room.clear()
            if len(self._queue) > self.BACKLOG:
                self._room.wait(self.TICK_S)

    def close(self) -> None:
        """No more objects: wait until the loop has finished (or abandoned, when stopping) every one."""
        self._closed = True
        self._wake()
        self._thread.join()
        while self._queue:  # queued by a submit() that raced with the loop's death
            self.on_fallback(self._queue.popleft(), None)
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full socket buffer already means "wake up"
            self._wake_out.send(b"\0")

    # -- the loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug: say so, and let the worker threads fetch what the loop had
            log.error("The small-object loop failed; continuing with worker threads", exc_info=True)
            starting = self._starting
            if starting is not None and all(c.planned is not starting for c in self._active):
                self.on_fallback(starting, None)
            for connection in list(self._active):
                planned = connection.planned
                self._close(connection)
                if planned is not None:
                    self.on_fallback(planned, None)
            for planned in self._connecting.values():
                self.on_fallback(planned, None)
            self._connecting.clear()
            while self._queue:
                self.on_fallback(self._queue.popleft(), None)
        finally:
            self._shutdown()

    def _loop(self) -> None:
        queue, active = self._queue, self._active
        while True:
            if self.stop.is_set():
                self._abandon()
                return
            self._connected()
            while queue and len(active) + len(self._connecting) < self.connections and not self.stop.is_set():
                self._starting = queue.popleft()
                self._start(self._starting)
                self._starting = None
            if len(queue) <= self.BACKLOG // 2 and not self._room.is_set():
                self._room.set()
            if not active and not queue and not self._connecting and self._closed:
                return
            timeout = self.TICK_S
            if active:
                now = time.monotonic()
                timeout = max(0.0, min(timeout, min(c.deadline for c in active) - now))
            for key, events in self._selector.select(timeout):
                connection = key.data
                if connection is None:
                    with contextlib.suppress(OSError):
                        while self._wake_in.recv(4096):
                            pass
                    continue
                if events & self._write and connection.outgoing:
                    self._send(connection)
                if events & self._read and not connection.closed:
                    self._receive(connection)
            now = time.monotonic()
            for connection in [c for c in active if c.deadline <= now]:
                self._fail(connection, TimeoutError(f"no data for {self.config.read_timeout_s:g}s (read timed out)"))

    def _start(self, planned: Planned) -> None:
        """Send the GET for one object on an idle connection to its host, or open one for it first."""
        try:
            address = self.engine.address(planned.obj.bucket)
        except Exception as exc:
            self.on_fallback(planned, exc)
            return
        connection = self._idle_connection((address.scheme, address.host))
        if connection is None:
            self._connect(planned, address)
        else:
            self._request(planned, address, connection)

    def _request(self, planned: Planned, address: BucketAddress, connection: _LoopConnection) -> None:
        obj = planned.obj
        try:
            headers = {"x-amz-checksum-mode": "ENABLED"} if self.config.verify_checksums else {}
            if obj.etag:
                headers["if-match"] = f'"{obj.etag}"'
            query = [("versionId", obj.version_id)] if obj.version_id else []
            path, target = request_target(address, obj.key, query)
            request = request_bytes("GET", target, self.engine.signed_headers(address, "GET", path, query, headers))
        except Exception as exc:  # credentials that fail to refresh, an ETag that is not latin-1, ...
            self._park(connection)
            self.on_fallback(planned, exc)
            return
        connection.planned = planned
        connection.outgoing = request
        connection.deadline = time.monotonic() + self.config.read_timeout_s
        self._active.add(connection)
        self._send(connection)

    def _idle_connection(self, key: tuple[str, str]) -> _LoopConnection | None:
        """An idle keep-alive connection to the host; one idle for a while is checked first (servers close them)."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if time.monotonic() - connection.idle_since > self.IDLE_CHECK_S:
                readable, _, _ = self._select([connection.sock], [], [], 0)
                if readable:  # EOF, a reset or stray bytes: nothing a request can use
                    self._close(connection)
                    continue
            connection.reused = True
            return connection
        return None

    def _park(self, connection: _LoopConnection) -> None:
        """Keep a connection for the next request to its host."""
        connection.reset()
        connection.idle_since = time.monotonic()
        self._active.discard(connection)
        self._idle.setdefault(connection.key, []).append(connection)

    def _connect(self, planned: Planned, address: BucketAddress) -> None:
        """Open a connection for ``planned`` on a connector thread: DNS, TCP and TLS can each block for up to
        connect_timeout_s, and the loop must keep serving its other connections and see a stop meanwhile."""
        if self._open >= self.connections:  # make room: close an idle connection to another host
            other = next((c for connections in self._idle.values() for c in connections), None)
            if other is not None:
                self._close(other)
        self._connecting[id(planned)] = planned
        if self._connector is None:
            self._connector = ThreadPoolExecutor(min(8, self.connections), thread_name_prefix="adl-connect")

        def ready(future: Future[Any]) -> None:
            with self._ready_lock:
                if not self._finished:
                    self._ready.append((planned, address, future))
                    self._wake()
                    return
            if not future.cancelled() and future.exception() is None:
                future.result().close()  # the loop has ended: nobody will use this connection

        self._connector.submit(self._open_socket, address).add_done_callback(ready)

    def _open_socket(self, address: BucketAddress) -> Any:
        """Runs on a connector thread; the socket it returns is non-blocking."""
        import socket

        hostname, port = split_host(address.host, address.scheme)
        sock = socket.create_connection((hostname, port), timeout=self.config.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if address.scheme == "https":
                sock = self.engine._tls_context().wrap_socket(sock, server_hostname=hostname)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connected(self) -> None:
        """Start the requests whose connections are now open (or hand them over when opening failed)."""
        while self._ready:
            planned, address, future = self._ready.popleft()
            if self._connecting.pop(id(planned), None) is None:
                continue  # abandoned by a stop meanwhile
            try:
                sock = future.result()
            except Exception as exc:  # DNS, refused connection, TLS handshake: a network fault like any other
                self.on_fallback(planned, exc)
                continue
            connection = _LoopConnection(sock, (address.scheme, address.host), address.scheme == "https")
            connection.events = self._read
            self._selector.register(sock, self._read, connection)
            self._request(planned, address, connection)

    def _send(self, connection: _LoopConnection) -> None:
        try:
            sent = connection.sock.send(connection.outgoing)
        except self._would_block:
            sent = 0
        except OSError as exc:
            self._broken(connection, exc)
            return
        connection.outgoing = connection.outgoing[sent:]
        events = self._read | (self._write if connection.outgoing else 0)
        if events != connection.events:
            self._selector.modify(connection.sock, events, connection)
            connection.events = events

    def _receive(self, connection: _LoopConnection) -> None:
        sock = connection.sock
        try:
            data = sock.recv(256 * KiB)
            while connection.tls and data and sock.pending():  # decrypted bytes select() cannot see
                data += sock.recv(sock.pending())
        except self._would_block:
            return
        except OSError as exc:
            self._broken(connection, exc)
            return
        planned = connection.planned
        if planned is None:  # an idle connection became readable: the server closed it
            self._close(connection)
            return
        if not data:
            self._broken(connection, IncompleteBody("connection closed before the response was complete"))
            return
        connection.buffer += data
        connection.deadline = time.monotonic() + self.config.read_timeout_s
        try:
            if connection.status is None and not self._parse_head(connection):
                return
        except Exception as exc:  # a malformed response
            self._fail(connection, exc)
            return
        if connection.status is None:
            return  # handed over (no Content-Length)
        buffered = len(connection.buffer)
        if buffered < connection.body_length:
            return
        if buffered > connection.body_length:  # bytes after the body: nothing to trust on this connection
            self._fail(connection, ConnectionError("the server sent more than the Content-Length"))
            return
        status, headers, body = connection.status, connection.headers, bytes(connection.buffer)
        if connection.will_close or connection.outgoing:  # answered before the request was all sent: unusable
            self._close(connection)
        else:
            self._park(connection)
        self._complete(planned, status, headers, body)

    def _parse_head(self, connection: _LoopConnection) -> bool:
        """Parse the response head once it has arrived; False while more of it is needed."""
        while True:
            end = connection.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(connection.buffer) > self.MAX_HEAD:
                    raise ConnectionError("the response head is too long")
                return False
            version, status, headers = parse_response_head(bytes(connection.buffer[:end]))
            del connection.buffer[: end + 4]
            if not is_interim(status):
                break
        planned = connection.planned
        assert planned is not None
        length = headers.get("content-length", "")
        if "chunked" in headers.get("transfer-encoding", "").lower() or not length.isdigit():
            # Rare framing this loop does not speak: the worker threads fetch it afresh.
            self._close(connection)
            self.on_fallback(planned, None)
            return True
        connection.body_length = int(length)
        if connection.body_length > max(planned.obj.size, self.MAX_ERROR_BODY):
            raise ConnectionError(f"Content-Length {length} is not the listed size {planned.obj.size}")
        connection.status = status
        connection.headers = headers
        connection.will_close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
        return True

    def _complete(self, planned: Planned, status: int, headers: dict[str, str], body: bytes) -> None:
        """A whole response: store a 200, or hand the object over with what went wrong."""
        assert planned.target is not None
        if status == 200:
            try:
                result = self.transfer.store_small(planned.obj, planned.target, headers, body)
            except Exception as exc:
                self.on_fallback(planned, exc)
                return
            self.on_result(result)
            return
        code, message, _region = _parse_s3_error(body)
        if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "TemporaryRedirect"):
            self.on_fallback(planned, None)  # the engine follows redirects and remembers the bucket's region
        elif status == 412:
            self.on_fallback(planned, ObjectChanged(planned.obj.key))
        else:
            self.on_fallback(planned, S3Error(status, code or str(status), message))

    def _broken(self, connection: _LoopConnection, exc: BaseException) -> None:
        """The connection failed. Before any answer on a reused connection, that is the server having closed it
        while idle (as the worker threads' engine sees it too): the object is fetched again without counting
        an attempt. Anything else is the object's first failed attempt."""
        unanswered = connection.reused and connection.status is None and not connection.buffer
        self._fail(connection, None if unanswered and isinstance(exc, self._stale) else exc)

    def _fail(self, connection: _LoopConnection, exc: BaseException | None) -> None:
        planned = connection.planned
        self._close(connection)
        if planned is None:
            return
        if self.stop.is_set():
            self.on_result(DownloadResult(planned.obj, "interrupted", "stopped"))
        else:
            self.on_fallback(planned, exc)

    def _close(self, connection: _LoopConnection) -> None:
        if connection.closed:
            return
        connection.closed = True
        self._active.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(connection.sock)
        connection.sock.close()
        connection.planned = None

    def _abandon(self) -> None:
        """The run is stopping: whatever is in flight or queued ends as interrupted (nothing was renamed)."""
        for connection in list(self._active):
            planned = connection.planned
            self._close(connection)
            if planned is not None:
                self.on_result(DownloadResult(planned.obj, "interrupted", "stopped"))
        for planned in self._connecting.values():
            self.on_result(DownloadResult(planned.obj, "interrupted", "stopped"))
        self._connecting.clear()
        while self._queue:
            self.on_result(DownloadResult(self._queue.popleft().obj, "interrupted", "stopped"))

    def _shutdown(self) -> None:
        with self._ready_lock:
            self._finished = True
            ready, self._ready = self._ready, collections.deque()
        if self._connector is not None:
            self._connector.shutdown(wait=False, cancel_futures=True)
        for connections in list(self._idle.values()):
            for connection in list(connections):
                self._close(connection)
        for _planned, _address, future in ready:  # sockets opened for objects the loop no longer has
            if not future.cancelled() and future.exception() is None:
                future.result().close()
        self._room.set()


###############################################################################
# Verification
###############################################################################
# Every byte is hashed once, as it streams; nothing is read back from disk. Which checksum verifies an object
# is decided in one place (choose_hasher), from the ETag and the response's headers.

#: S3 additional checksums we can compute, cheapest first (a CRC is ~7x cheaper than MD5).
CHECKSUM_HEADERS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


_MD5_HEX = re.compile("[0-9a-fA-F]{32}")


def etag_kind(etag: str) -> str:
    """'md5' for a single-part upload's ETag, 'multipart' for '<hex>-N', 'opaque' for anything else."""
    head, dash, count = etag.partition("-")
    if _MD5_HEX.fullmatch(head):
        if not dash:
            return "md5"
        if count.isdigit() and int(count) >= 1:
            return "multipart"
    return "opaque"


def multipart_etag(part_md5s: Sequence[bytes]) -> str:
    """S3's multipart ETag: MD5 of the concatenated part MD5s, then '-<part count>'."""
    return f"{hashlib.md5(b''.join(part_md5s), usedforsecurity=False).hexdigest()}-{len(part_md5s)}"


def verify_md5(etag: str, digest: bytes) -> str:
    if digest.hex() != etag.lower():
        raise ChecksumMismatch(f"md5 {digest.hex()} != etag {etag}")
    return f"md5:{digest.hex()}"


def verify_multipart_etag(etag: str, part_md5s: Sequence[bytes]) -> str:
    computed = multipart_etag(part_md5s)
    if computed != etag.lower():
        raise ChecksumMismatch(f"multipart etag {computed} != {etag}")
    return f"md5-multipart:{computed}"


class _Md5Sink:
    """Adapts an optional hashlib object to the hasher interface _copy_body uses."""

    __slots__ = ("update",)

    def __init__(self, hasher: Any) -> None:
        self.update = hasher.update if hasher is not None else (lambda data: None)


def _crc_function(name: str) -> Callable[[bytes, int], int] | None:
    if name == "crc32":
        return zlib.crc32
    try:
        from awscrt import checksums  # optional: ships with boto3[crt]
    except ImportError:
        return None
    return {"crc32c": checksums.crc32c, "crc64nvme": getattr(checksums, "crc64nvme", None)}.get(name)


class StreamHasher:
    """Hashes a body as it streams and checks it against the expected value at the end."""

    def __init__(self, algorithm: str, expected: str, note: str = "") -> None:
        self.algorithm = algorithm
        self.expected = expected
        self.note = note
        self._crc: Callable[[bytes, int], int] | None = None
        self._crc_value = 0
        self._hash: Any = None
        if algorithm == "md5":
            self._hash = hashlib.md5(usedforsecurity=False)
        elif algorithm in ("sha1", "sha256"):
            self._hash = hashlib.new(algorithm)
        elif algorithm == "unverifiable":
            pass
        else:
            self._crc = _crc_function(algorithm)
            if self._crc is None:
                raise ValueError(f"no implementation of {algorithm}")

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)
        elif self._crc is not None:
            self._crc_value = self._crc(data, self._crc_value)

    def verify(self) -> str:
        """The checksum record for the journal; raises ChecksumMismatch when the bytes are wrong."""
        if self.algorithm == "unverifiable":
            return f"unverifiable: {self.note}"
        if self.algorithm == "md5":
            return verify_md5(self.expected, self._hash.digest())
        if self._hash is not None:
            actual = base64.b64encode(self._hash.digest()).decode()
        else:
            width = 8 if self.algorithm == "crc64nvme" else 4
            actual = base64.b64encode(self._crc_value.to_bytes(width, "big")).decode()
        if actual != self.expected:
            raise ChecksumMismatch(f"{self.algorithm} {actual} != {self.expected}")
        return f"{self.algorithm}:{actual}"


def encryption_note(headers: Mapping[str, str]) -> str | None:
    """Why the ETag cannot verify this object (SSE-KMS, SSE-C), from a GET's headers; None when it can."""
    if headers.get("x-amz-server-side-encryption-customer-algorithm"):
        return "SSE-C object: its ETag is not an MD5 of the content"
    if headers.get("x-amz-server-side-encryption", "").startswith("aws:kms"):
        return "SSE-KMS object: its ETag is not an MD5 of the content"
    return None


def choose_hasher(obj: S3Object, headers: Mapping[str, str], verify: bool) -> StreamHasher | None:
    """Which checksum verifies this object: an S3 full-object checksum if present, else the MD5 ETag.

    Multipart ETags never reach here (they take the per-part path). ETags of SSE-KMS and SSE-C objects are not
    MD5s of the content, so without an S3 checksum those objects are recorded as unverifiable, not failed.
    """
    if not verify:
        return None
    checksum_type = headers.get("x-amz-checksum-type", "FULL_OBJECT").upper()
    for name in CHECKSUM_HEADERS:
        value = headers.get(f"x-amz-checksum-{name}")
        if value and checksum_type == "FULL_OBJECT" and "-" not in value:
            with contextlib.suppress(ValueError):
                return StreamHasher(name, value)
    note = encryption_note(headers)
    if note:
        return StreamHasher("unverifiable", "", note)
    if etag_kind(obj.etag) == "md5":
        return StreamHasher("md5", obj.etag.lower())
    return StreamHasher("unverifiable", "", f"ETag {obj.etag!r} is not an MD5 and no S3 checksum is stored")


###############################################################################
# Resume journal
###############################################################################
# download_resume.json is a snapshot, replaced atomically; between snapshots every completion is one appended
# line in download_resume.json.journal. A kill -9 leaves the previous snapshot plus whole lines (a torn last
# line is ignored), so the state is always valid, and a million completions cost a million small appends, not
# a million rewrites. The snapshot is rewritten at load (folding in the last run's journal) and at the end.

RESUME_FORMAT = "aws-data-downloader/resume"


class ResumeJournal:
    """What is complete, and which parts of large objects are on disk. Never holds credentials."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        self._lock = threading.Lock()
        self._completed: dict[tuple[str, str], CompletedEntry] = {}
        self._partial: dict[tuple[str, str], dict[str, Any]] = {}
        self._fd = -1
        #: Counts of writes, for the benchmark and tests of the journal's cost.
        self.appends = 0
        self.snapshots = 0

    # -- reading ----------------------------------------------------------------------------------------

    def load(self) -> ResumeJournal:
        """Read the snapshot and replay the journal; a corrupt snapshot is set aside, not fatal."""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") != RESUME_FORMAT:
                    raise ValueError("not a resume file of this tool")
                for bucket, entries in data.get("completed", {}).items():
                    for key, entry in entries.items():
                        self._completed[(bucket, key)] = CompletedEntry(
                            entry["etag"],
                            int(entry["size"]),
                            entry.get("version_id"),
                            entry.get("checksum"),
                            entry.get("path"),
                        )
                for bucket, entries in data.get("partial", {}).items():
                    for key, entry in entries.items():
                        entry["done"] = {int(i): digest for i, digest in entry.get("done", {}).items()}
                        self._partial[(bucket, key)] = entry
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                aside = self.path.with_name(self.path.name + ".corrupt")
                log.warning(
                    "Resume file %s is unreadable (%s); moved it to %s and starting fresh", self.path, exc, aside
                )
                os.replace(self.path, aside)
                self._completed.clear()
                self._partial.clear()
        if self.journal_path.exists():
            with open(self.journal_path, "rb") as handle:
                for line in handle:
                    try:
                        self._apply(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a crash
        return self

    def _apply(self, record: dict[str, Any]) -> None:
        op, item = record["op"], (record["bucket"], record["key"])
        if op == "done":
            self._completed[item] = CompletedEntry(
                record["etag"],
                int(record["size"]),
                record.get("version_id"),
                record.get("checksum"),
                record.get("path"),
            )
            self._partial.pop(item, None)
        elif op == "part":
            entry = self._partial.get(item)
            if entry is None or entry["etag"] != record["etag"] or entry["layout"] != record["layout"]:
                entry = {"etag": record["etag"], "size": record["size"], "layout": record["layout"], "done": {}}
                self._partial[item] = entry
            entry["done"][int(record["part"])] = record["md5"]
        elif op == "drop":
            self._partial.pop(item, None)

    def completed(self, bucket: str, key: str) -> CompletedEntry | None:
        return self._completed.get((bucket, key))

    def partial_parts(self, obj: S3Object, layout: list[int]) -> dict[int, str]:
        """Parts already on disk for this exact version and part layout of the object (index -> md5 hex)."""
        entry = self._partial.get((obj.bucket, obj.key))
        if entry is None or entry["etag"] != obj.etag or entry["size"] != obj.size or entry["layout"] != layout:
            return {}
        return dict(entry["done"])

    def __len__(self) -> int:
        return len(self._completed)

    # -- writing ----------------------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")
        with self._lock:
            self._apply(record)
            if self._fd < 0:
                self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._fd, line)  # one write per line: a kill leaves whole lines and at most one torn one
            self.appends += 1

    def record_done(self, obj: S3Object, checksum: str | None, path: str | None) -> None:
        record = {"op": "done", "bucket": obj.bucket, "key": obj.key, "etag": obj.etag, "size": obj.size}
        if obj.version_id:
            record["version_id"] = obj.version_id
        record["checksum"] = checksum
        record["path"] = path
        self._append(record)

    def record_part(self, obj: S3Object, layout: list[int], index: int, md5_hex: str) -> None:
        self._append(
            {
                "op": "part",
                "bucket": obj.bucket,
                "key": obj.key,
                "etag": obj.etag,
                "size": obj.size,
                "layout": layout,
                "part": index,
                "md5": md5_hex,
            }
        )

    def drop_partial(self, obj: S3Object) -> None:
        if (obj.bucket, obj.key) in self._partial:
            self._append({"op": "drop", "bucket": obj.bucket, "key": obj.key})

    def compact(self) -> None:
        """Write the whole state as a new snapshot (atomic replace), then empty the journal."""
        with self._lock:
            completed: dict[str, dict[str, Any]] = {}
            for (bucket, key), entry in self._completed.items():
                record: dict[str, Any] = {"etag": entry.etag, "size": entry.size}
                if entry.version_id:
                    record["version_id"] = entry.version_id
                record["checksum"] = entry.checksum
                record["path"] = entry.path
                completed.setdefault(bucket, {})[key] = record
            partial: dict[str, dict[str, Any]] = {}
            for (bucket, key), entry in self._partial.items():
                partial.setdefault(bucket, {})[key] = {**entry, "done": {str(i): d for i, d in entry["done"].items()}}
            data = {"format": RESUME_FORMAT, "version": 1, "completed": completed, "partial": partial}
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(temp, "w", encoding="utf-8", errors="surrogatepass") as handle:
                handle.write(json.dumps(data, separators=(",", ":")))  # dumps uses the C encoder; dump does not
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
            self.snapshots += 1
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.journal_path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


###############################################################################
# Progress and summary
###############################################################################
# A tqdm bar on a terminal or in Jupyter; elsewhere (cron, pipes) a progress line at a fixed interval, so the
# output a cron mail carries has no carriage returns.


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1024 or unit == "TB":
            return f"{num_bytes:.0f} B" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TB"  # pragma: no cover


@dataclass(frozen=True, slots=True)
class FailedObject:
    bucket: str
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class DownloadSummary:
    """What a run did; returned by run_full_download and printed (or emitted as JSON) by the CLI."""

    total_files: int
    downloaded: int
    skipped: int
    failed: int
    total_bytes: int
    downloaded_bytes: int
    duration_s: float
    failures: tuple[FailedObject, ...] = ()
    skipped_reasons: Mapping[str, int] = field(default_factory=dict)
    buckets: tuple[str, ...] = ()
    #: Buckets the user named that could not be read (denied buckets found by discovery are only warned of).
    bucket_problems: tuple[BucketProblem, ...] = ()
    download_dir: str = ""
    resume_file: str | None = None
    manifest: str | None = None
    dry_run: bool = False
    interrupted: bool = False
    stopped_reason: str | None = None

    @property
    def average_speed(self) -> float:
        """Bytes per second over the whole run."""
        return self.downloaded_bytes / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def success_rate(self) -> float:
        return 100.0 * (self.downloaded + self.skipped) / self.total_files if self.total_files else 100.0

    @property
    def ok(self) -> bool:
        """Every selected object is on disk and verified, and every bucket the user named was readable."""
        return self.failed == 0 and not self.interrupted and self.stopped_reason is None and not self.bucket_problems

    def failures_by_reason(self) -> dict[str, list[FailedObject]]:
        grouped: dict[str, list[FailedObject]] = {}
        for failure in self.failures:
            grouped.setdefault(failure.reason, []).append(failure)
        return grouped

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_files": self.total_files,
            "downloaded": self.downloaded,
            "skipped": self.skipped,
            "failed": self.failed,
            "total_bytes": self.total_bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "duration_s": round(self.duration_s, 3),
            "average_speed_mb_s": round(self.average_speed / MiB, 3),
            "success_rate": round(self.success_rate, 2),
            "failures": [dataclasses.asdict(f) for f in self.failures],
            "failures_by_reason": {reason: len(items) for reason, items in self.failures_by_reason().items()},
            "skipped_reasons": dict(self.skipped_reasons),
            "buckets": list(self.buckets),
            "bucket_problems": [dataclasses.asdict(p) for p in self.bucket_problems],
            "download_dir": self.download_dir,
            "resume_file": self.resume_file,
            "manifest": self.manifest,
            "dry_run": self.dry_run,
            "interrupted": self.interrupted,
            "stopped_reason": self.stopped_reason,
        }

    def format(self) -> str:
        """The summary block, as the project README shows it."""
        rule = "=" * 60
        title = "DRY RUN SUMMARY (nothing was written)" if self.dry_run else "DOWNLOAD SUMMARY"
        downloaded_label = "Would download:" if self.dry_run else "Downloaded:"
        lines = [
            rule,
            title,
            rule,
            f"{'Total files:':<18}{self.total_files:,}",
            f"{downloaded_label:<18}{self.downloaded:,}",
            f"{'Skipped:':<18}{self.skipped:,}",
            f"{'Failed:':<18}{self.failed:,}",
            f"{'Total size:':<18}{format_size(self.total_bytes)}",
            f"{('Download size:' if self.dry_run else 'Downloaded size:'):<18}{format_size(self.downloaded_bytes)}",
            f"{'Duration:':<18}{self.duration_s:,.1f} seconds",
            f"{'Average speed:':<18}{self.average_speed / MiB:.1f} MB/s",
            f"{'Success rate:':<18}{self.success_rate:.1f}%",
        ]
        if self.skipped_reasons:
            lines.append("Skipped by reason:")
            lines += [f"  {reason}: {count:,}" for reason, count in sorted(self.skipped_reasons.items())]
        grouped = self.failures_by_reason()
        if grouped:
            lines.append("Failures by reason:")
            for reason, items in sorted(grouped.items(), key=lambda kv: -len(kv[1])):
                examples = ", ".join(f"{f.bucket}/{display_key(f.key)}" for f in items[:3])
                more = f", ... ({len(items) - 3} more)" if len(items) > 3 else ""
                lines.append(f"  {display_key(reason)} ({len(items):,}): {examples}{more}")
        for problem in self.bucket_problems:
            lines.append(f"Bucket not downloaded: {problem.reason}")
        if self.interrupted:
            lines.append("Interrupted: run the same command again to continue.")
        if self.stopped_reason:
            lines.append(f"Stopped: {self.stopped_reason}")
        return "\n".join(lines)


def in_notebook() -> bool:
    """True inside a Jupyter kernel, where tqdm.auto draws a widget instead of a text bar."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        return type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"  # type: ignore[attr-defined]
    except Exception:
        return False


class Tally:
    """Thread-safe running counts of a run; frozen into a DownloadSummary at the end."""

    #: Failures kept with their keys; beyond this only the counts by reason grow.
    MAX_FAILURES_KEPT = 10_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = self.downloaded = self.skipped = self.failed = 0
        self.total_bytes = self.downloaded_bytes = 0
        self.streamed_bytes = 0
        self.failures: list[FailedObject] = []
        self.failure_counts: Counter[str] = Counter()
        self.skipped_reasons: Counter[str] = Counter()

    def add_bytes(self, count: int) -> None:
        self.streamed_bytes += count  # a racy += only skews the speed shown, never a result

    def record(self, result: DownloadResult) -> None:
        with self.lock:
            if result.status == "downloaded":
                self.downloaded += 1
                self.downloaded_bytes += result.obj.size
            elif result.status == "skipped":
                self.skipped += 1
                self.skipped_reasons[result.reason] += 1
            elif result.status == "failed":
                self.failed += 1
                self.failure_counts[result.reason] += 1
                if len(self.failures) < self.MAX_FAILURES_KEPT:
                    self.failures.append(FailedObject(result.obj.bucket, result.obj.key, result.reason))

    @property
    def finished(self) -> int:
        return self.downloaded + self.skipped + self.failed


class Progress:
    """Shows a run's progress: a bar when someone is watching, a log line every interval when not, or nothing.

    The log lines come from a ticker thread, not from finished objects, so a cron log keeps saying what the
    run is doing even while one large object takes minutes.
    """

    def __init__(self, tally: Tally, *, bar: bool, log_lines: bool, interval: float) -> None:
        self.tally = tally
        self.interval = interval
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._last_postfix = 0.0
        self._bar: Any = None
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, desc="Downloading", unit="files", dynamic_ncols=True, leave=True)
            _BAR_ACTIVE.set()
        elif log_lines:
            self._ticker = threading.Thread(target=self._tick, name="adl-progress", daemon=True)
            self._ticker.start()

    def _speed(self) -> float:
        return self.tally.streamed_bytes / max(time.monotonic() - self.started, 1e-9) / MiB

    def _postfix(self) -> str:
        tally = self.tally
        return f"Success={tally.downloaded + tally.skipped}, Failed={tally.failed}, Speed={self._speed():.1f} MB/s"

    def _tick(self) -> None:
        while not self._closed.wait(self.interval):
            tally = self.tally
            log.info(
                "Progress: %s of %s files done (%s downloaded, %s skipped, %s failed), %s at %.1f MB/s",
                f"{tally.finished:,}",
                f"{tally.total:,}",
                f"{tally.downloaded:,}",
                f"{tally.skipped:,}",
                f"{tally.failed:,}",
                format_size(tally.streamed_bytes),
                self._speed(),
            )

    def set_total(self, total: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self) -> None:
        """Called as each object finishes (from worker threads)."""
        if self._bar is None:
            return
        with self._lock:
            if self._bar is None:
                return
            tally = self.tally
            now = time.monotonic()
            if now - self._last_postfix >= 0.5:
                self._last_postfix = now
                self._bar.set_postfix_str(self._postfix(), refresh=False)
            delta = tally.finished - self._bar.n
            if delta > 0:
                self._bar.update(delta)

    def close(self) -> None:
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self._bar is not None:  # the last frame shows the final counts, not a stale postfix
                tally = self.tally
                self._bar.total = tally.total
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.update(tally.finished - self._bar.n)
                self._bar.close()
                self._bar = None
                _BAR_ACTIVE.clear()


#: Set while a text bar is on screen, so console log lines go through tqdm.write and do not tear it.
_BAR_ACTIVE = threading.Event()


###############################################################################
# Run guards: lock, disk space
###############################################################################


class DirectoryLock:
    """An OS file lock on the download directory: a second run fails at once, a killed run's lock vanishes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".aws_downloader.lock"
        self._handle: Any = None

    def acquire(self) -> None:
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            _lock_file(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LockedError(
                f"another aws-data-downloader run (pid {holder}) is downloading into {self.path.parent}; "
                "wait for it or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.seek(0)
                self._handle.truncate()
            self._handle.close()  # closing drops the lock
            self._handle = None


def _lock_file(handle: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


#: Listing pages (of up to 1,000 objects) planned before the first download, for an exact disk-space check.
DISK_CHECK_PAGES = 10


class DiskBudget:
    """Tracks bytes promised to downloads against the free space measured at the start."""

    #: Head-room left free: the journal, the log, and other writers on the same disk.
    MARGIN = 64 * MiB

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.free = shutil.disk_usage(directory).free if enabled else 0
        self.reserved = 0

    def fits(self, more: int) -> bool:
        return not self.enabled or self.reserved + more <= self.free - self.MARGIN

    def reserve(self, more: int) -> None:
        self.reserved += more


###############################################################################
# The downloader
###############################################################################


@dataclass(frozen=True, slots=True)
class Planned:
    """An object that passed the filters, with where it goes (or why it cannot go anywhere)."""

    obj: S3Object
    target: Path | None
    result: DownloadResult | None  #: set when no transfer is needed (skipped, unsafe, archived)


class AWSDataDownloader:
    """Downloads the selected objects of one or more buckets; usable from Python, a notebook, or the CLI.

    It owns no threads or handlers between runs: each run_full_download starts its pools and joins them,
    so creating several downloaders in one notebook kernel leaks nothing and logs each line once.
    """

    def __init__(
        self, config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None, **overrides: Any
    ) -> None:
        if isinstance(config, Config):
            base = config
        elif isinstance(config, Mapping):
            base = build_config(config)
        elif config is not None:
            base = build_config(load_config_file(config))
        else:
            base = Config()
        #: The validated settings; run_full_download's overrides apply to one run only.
        self.config = base.replace(**overrides) if overrides else base
        self._stop = threading.Event()
        self._interrupt_reason: str | None = None
        #: Shuts the running engine's sockets (set while a run is active).
        self._abort: Callable[[], None] | None = None

    # -- public API -----------------------------------------------------------------------------------------

    #: Seconds in-flight objects get to reach a chunk boundary after a stop, before their sockets are shut.
    STOP_GRACE_S = 5.0

    def stop(self, reason: str = "interrupted") -> None:
        """Ask a running download to stop; safe from a signal handler.

        In-flight objects stop at their next chunk. A read stalled on a silent connection would wait for the
        read timeout (60 s by default), so after STOP_GRACE_S the engine's sockets are shut down too.
        """
        first = not self._stop.is_set()
        self._interrupt_reason = reason
        self._stop.set()
        abort = self._abort
        if first and abort is not None:
            timer = threading.Timer(self.STOP_GRACE_S, abort)
            timer.daemon = True
            timer.start()

    def run_full_download(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        *,
        session_token: str | None = None,
        dry_run: bool = False,
        from_manifest: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> DownloadSummary:
        """Download everything the config selects and return the summary; never calls sys.exit.

        Raises a DownloaderError subclass for problems that stop the whole run (bad config, credentials,
        another run holding the lock, disk space, interruption), each with a one-line message.
        """
        if region is not None:
            overrides["region"] = region
        config = self.config.replace(**overrides) if overrides else self.config
        credentials = Credentials(access_key, secret_key, session_token)
        self._stop.clear()
        self._interrupt_reason = None
        started = time.monotonic()
        root = Path(config.download_dir).expanduser().absolute()
        if not dry_run:
            prepare_download_dir(root)
        lock = DirectoryLock(root) if not dry_run else None
        if lock is not None:
            lock.acquire()
        try:
            return self._run(config, credentials, root, started, dry_run, from_manifest)
        finally:
            if lock is not None:
                lock.release()

    # -- the run --------------------------------------------------------------------------------------------

    def _run(
        self,
        config: Config,
        credentials: Credentials,
        root: Path,
        started: float,
        dry_run: bool,
        from_manifest: str | os.PathLike[str] | None,
    ) -> DownloadSummary:
        import botocore.exceptions

        # A manifest run fetches exactly the manifest's objects: the config's filters and shard do not apply.
        filters = Filters() if from_manifest is not None else Filters.from_config(config)
        session = make_session(config, credentials)
        if credentials.access_key:
            log.info("Using access key %s", mask_access_key(credentials.access_key))
        clients = SharedClient(session, config)
        engine = make_engine(session, clients, config)
        regions: dict[str, str] = {}
        manifest_objects: list[S3Object] | None = None
        if from_manifest is not None:
            manifest_objects = read_manifest(from_manifest)
            buckets = list(dict.fromkeys(obj.bucket for obj in manifest_objects))
            problems: list[BucketProblem] = []
        else:
            try:
                if config.buckets and isinstance(engine, HttpEngine) and engine.path_style_endpoint is not None:
                    # No botocore client is built for this run unless something needs it.
                    buckets, problems = discover_buckets(None, config.buckets, regions, engine.probe_bucket)
                else:
                    buckets, problems = discover_buckets(clients.get(), config.buckets, regions)
            except botocore.exceptions.NoCredentialsError:
                raise CredentialsError(credentials_problem(botocore.exceptions.NoCredentialsError()) or "") from None
        if not config.no_sign_request and buckets and manifest_objects is None:
            log.info("AWS credentials validated successfully")
        for problem in problems:
            log.warning("%s", problem.reason)
        if not buckets and manifest_objects is None:
            if config.buckets:
                raise NothingAccessibleError("; ".join(p.reason for p in problems) or "no bucket could be read")
            raise NothingAccessibleError("no accessible buckets found for these credentials")
        log.info("Discovered %d accessible bucket%s", len(buckets), "" if len(buckets) == 1 else "s")

        journal: ResumeJournal | None = None
        resume_path = root / config.resume_file
        if not dry_run:
            journal = ResumeJournal(resume_path).load()
            if journal.journal_path.exists():
                journal.compact()  # fold in the last run's journal so it never grows across runs
        manifest = ManifestWriter(Path(config.manifest)) if config.manifest and not dry_run else None
        tally = Tally()
        interactive = not config.quiet and (in_notebook() or sys.stderr.isatty())
        progress = Progress(
            tally,
            bar=interactive and not dry_run,
            log_lines=not config.quiet and not dry_run,
            interval=config.progress_interval_s,
        )
        stopped_reason: str | None = None
        workers = config.parallel_downloads
        self._abort = engine.abort
        for bucket, region in regions.items():
            engine.set_bucket_region(bucket, region)
        try:
            with (
                ThreadPoolExecutor(workers, thread_name_prefix="adl-object") as object_pool,
                ThreadPoolExecutor(workers, thread_name_prefix="adl-part") as part_pool,
            ):
                transfer = Transfer(
                    engine,
                    config,
                    journal,
                    part_pool,
                    self._stop,
                    tally.add_bytes,
                    root=root,
                    pinned=manifest_objects is not None,
                )
                in_flight = threading.BoundedSemaphore(workers * 4)
                budget = DiskBudget(root, config.check_disk_space and not dry_run)

                def finished(result: DownloadResult) -> None:
                    tally.record(result)
                    if manifest is not None:
                        manifest.write(result)
                    if result.status == "failed":
                        log.warning(
                            "Failed %s/%s: %s",
                            result.obj.bucket,
                            display_key(result.obj.key),
                            display_key(result.reason),
                        )
                    progress.update()

                def on_done(future: Future[DownloadResult], planned: Planned, release: bool = True) -> None:
                    if release:
                        in_flight.release()
                    try:
                        result = future.result()
                    except CancelledError:  # never started: the run was stopping (signal, disk full)
                        result = DownloadResult(planned.obj, "interrupted", "stopped")
                    except DiskFull as exc:
                        result = DownloadResult(planned.obj, "failed", failure_reason(exc))
                        self._interrupt_reason = "disk full"
                    except BaseException as exc:  # a bug, not a per-object problem: report it, keep going
                        log.error("Unexpected error on %s: %s", display_key(planned.obj.key), exc, exc_info=True)
                        result = DownloadResult(planned.obj, "failed", f"{type(exc).__name__}: {exc}")
                    finished(result)

                def fallback(planned: Planned, failed_attempt: BaseException | None) -> None:
                    """The small-object loop hands an object over: its worker threads carry on from there."""
                    try:
                        future = object_pool.submit(transfer.download, planned.obj, planned.target, failed_attempt)
                    except RuntimeError:  # the pool stopped taking work: the run is ending
                        finished(DownloadResult(planned.obj, "interrupted", "stopped"))
                        return
                    future.add_done_callback(lambda f, p=planned: on_done(f, p, release=False))

                # Objects from multipart_threshold up keep their ranged parts and resume checkpoints: never the loop.
                small_limit = min(config.small_object_kb * KiB, config.multipart_threshold - 1)
                if not isinstance(engine, HttpEngine) or dry_run or config.small_object_kb == 0:
                    small_limit = -1
                verify = config.verify_checksums
                loop: SmallObjectLoop | None = None
                pages = (
                    iter([manifest_objects])
                    if manifest_objects is not None
                    else self._pages(engine, config, buckets, problems)
                )
                needed_more = 0
                try:
                    planned_pages = (self._plan_page(page, root, filters, config, journal, tally) for page in pages)
                    # Plan the first pages before any download starts, so the disk check is exact for them (a
                    # selection of up to DISK_CHECK_PAGES pages writes nothing when it does not fit).
                    head = list(itertools.islice(planned_pages, DISK_CHECK_PAGES))
                    if not budget.fits(sum(page_bytes for _, page_bytes in head)):
                        stopped_reason = "disk space"
                    for plans, page_bytes in itertools.chain(head, planned_pages):
                        if stopped_reason is not None or not budget.fits(page_bytes):
                            needed_more += page_bytes  # keep listing to say how much is needed
                            if stopped_reason is None:
                                stopped_reason = "disk space"
                            continue
                        budget.reserve(page_bytes)
                        small: list[Planned] = []
                        threaded: list[Planned] = []
                        for planned in plans:
                            if planned.result is not None:
                                finished(planned.result)
                            elif dry_run:
                                log.info(
                                    "Would download %s/%s (%s)",
                                    planned.obj.bucket,
                                    display_key(planned.obj.key),
                                    format_size(planned.obj.size),
                                )
                                finished(DownloadResult(planned.obj, "downloaded", path=str(planned.target)))
                            elif planned.obj.size <= small_limit and not (
                                verify and etag_kind(planned.obj.etag) == "multipart"
                            ):
                                small.append(planned)  # multipart ETags need the per-part path
                            else:
                                threaded.append(planned)
                        if small:
                            if loop is None:
                                loop = SmallObjectLoop(engine, transfer, finished, fallback)  # type: ignore[arg-type]
                            loop.submit(small)
                        for planned in threaded:
                            while not in_flight.acquire(timeout=0.2):
                                if self._stop.is_set():
                                    break
                            if self._stop.is_set():
                                break
                            future = object_pool.submit(transfer.download, planned.obj, planned.target)
                            future.add_done_callback(lambda f, p=planned: on_done(f, p))
                        if self._stop.is_set():
                            break
                except KeyboardInterrupt:
                    self.stop("interrupted")
                except botocore.exceptions.ClientError as exc:
                    problem = credentials_problem(exc)
                    if problem:
                        raise CredentialsError(problem) from None
                    raise DownloaderError(f"listing failed: {exc}") from None
                finally:
                    # Every object the loop took ends in the loop or in the pool, so it closes before the pool.
                    while loop is not None:
                        try:
                            loop.close()
                            break
                        except KeyboardInterrupt:
                            self.stop("interrupted")
                progress.set_total(tally.total)
                if not self._stop.is_set():
                    log.info(
                        "Found %s objects to download (%s); listing complete",
                        f"{tally.total:,}",
                        format_size(tally.total_bytes),
                    )
                if self._stop.is_set():
                    object_pool.shutdown(wait=False, cancel_futures=True)
                # Leaving the with-block joins both pools; a Ctrl-C while waiting becomes a stop request.
                while True:
                    try:
                        object_pool.shutdown(wait=True)
                        break
                    except KeyboardInterrupt:
                        self.stop("interrupted")
        finally:
            progress.close()
            self._abort = None
            engine.close()
            if journal is not None:
                with contextlib.suppress(OSError):
                    journal.compact()
                journal.close()
            if manifest is not None:
                manifest.close()
        if stopped_reason == "disk space" and budget.enabled:
            free = max(0, budget.free - DiskBudget.MARGIN)
            needed = budget.reserved + needed_more
            summary = self._summary(
                tally, started, buckets, problems, root, config, journal, dry_run, "not enough disk space"
            )
            raise DiskSpaceError(
                f"not enough disk space in {root}: the selection needs {format_size(needed)}, "
                f"{format_size(free)} is free (free some space, narrow the selection, or use --ignore-disk-space)",
                summary,
            )
        summary = self._summary(
            tally,
            started,
            buckets,
            problems,
            root,
            config,
            journal,
            dry_run,
            self._interrupt_reason if self._stop.is_set() else None,
        )
        if self._interrupt_reason == "disk full":
            raise DiskSpaceError(
                f"no space left on device in {root}; completed files are kept, free some space and run again", summary
            )
        if self._stop.is_set():
            raise DownloadInterrupted(
                "interrupted; completed files and resume state are saved, run again to continue", summary
            )
        return summary

    def _pages(
        self, engine: Engine, config: Config, buckets: Sequence[str], problems: list[BucketProblem]
    ) -> Iterator[list[S3Object]]:
        """Every selected prefix of every bucket, a page at a time; a bucket whose listing is denied is a
        bucket problem (the others go on), rejected credentials stop the run."""
        import http.client

        import botocore.exceptions

        for bucket in buckets:
            try:
                for prefix in collapse_prefixes(config.prefixes):
                    yield from engine.list_pages(bucket, prefix)
            except (S3Error, botocore.exceptions.ClientError) as exc:
                problem = credentials_problem(exc)
                if problem:
                    raise CredentialsError(problem) from None
                status, code = error_code(exc)
                if status == 403 or code == "AccessDenied":
                    reason = f"Access Denied for listing bucket '{bucket}'"
                else:
                    reason = f"listing bucket '{bucket}' failed: {code or status}"
                log.warning("%s", reason)
                problems.append(BucketProblem(bucket, reason))
            except (OSError, http.client.HTTPException, botocore.exceptions.BotoCoreError) as exc:
                # Listing retries transient faults itself; past that the run cannot know what else to fetch.
                raise DownloaderError(
                    f"listing bucket '{bucket}' failed after {config.retry_attempts} retries: "
                    f"{type(exc).__name__}: {exc}; run again to continue"
                ) from None

    def _plan_page(
        self,
        page: list[S3Object],
        root: Path,
        filters: Filters,
        config: Config,
        journal: ResumeJournal | None,
        tally: Tally,
    ) -> tuple[list[Planned], int]:
        """Plan one listing page: the selected objects, and the bytes still to fetch for them."""
        plans = [planned for obj in page if (planned := self._plan(obj, root, filters, config, journal)) is not None]
        with tally.lock:
            tally.total += len(plans)
            tally.total_bytes += sum(planned.obj.size for planned in plans)
        return plans, sum(planned.obj.size for planned in plans if planned.result is None)

    def _plan(
        self, obj: S3Object, root: Path, filters: Filters, config: Config, journal: ResumeJournal | None
    ) -> Planned | None:
        """Filter, place and skip-check one object; None when the filters leave it out of the selection."""
        if filter_reason(obj, filters) is not None:
            return None
        if obj.key.endswith("/"):
            return Planned(obj, None, DownloadResult(obj, "failed", "unsafe key: folder marker with data"))
        if obj.storage_class in ARCHIVED_STORAGE_CLASSES:
            return Planned(obj, None, DownloadResult(obj, "skipped", f"archived storage class ({obj.storage_class})"))
        try:
            target = local_path_for(root, obj.bucket, obj.key)
        except UnsafeKeyError as exc:
            return Planned(obj, None, DownloadResult(obj, "failed", str(exc)))
        try:
            local = os.lstat(target)
        except OSError:
            local = None
        done = journal.completed(obj.bucket, obj.key) if journal is not None else None
        reason = skip_reason(obj, local, done, config.overwrite_existing)
        if reason is not None:
            checksum = done.checksum if done is not None else None
            if done is not None and done.version_id and not obj.version_id:
                obj = dataclasses.replace(obj, version_id=done.version_id)
            return Planned(obj, target, DownloadResult(obj, "skipped", reason, str(target), checksum))
        return Planned(obj, target, None)

    def _summary(
        self,
        tally: Tally,
        started: float,
        buckets: Sequence[str],
        problems: Sequence[BucketProblem],
        root: Path,
        config: Config,
        journal: ResumeJournal | None,
        dry_run: bool,
        stopped_reason: str | None,
    ) -> DownloadSummary:
        interrupted = stopped_reason == "interrupted"
        return DownloadSummary(
            total_files=tally.total,
            downloaded=tally.downloaded,
            skipped=tally.skipped,
            failed=tally.failed,
            total_bytes=tally.total_bytes,
            downloaded_bytes=tally.downloaded_bytes,
            duration_s=time.monotonic() - started,
            failures=tuple(tally.failures),
            skipped_reasons=dict(tally.skipped_reasons),
            buckets=tuple(buckets),
            bucket_problems=tuple(problems) if config.buckets else (),
            download_dir=str(root),
            resume_file=str(journal.path) if journal is not None else None,
            manifest=config.manifest,
            dry_run=dry_run,
            interrupted=interrupted,
            stopped_reason=None if interrupted else stopped_reason,
        )


def prepare_download_dir(root: Path) -> None:
    """Create the download directory and prove it writable, so the run fails before listing, not after."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"download directory {root} exists and is not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"download directory {root}: a component of the path is a file") from None
    except PermissionError:
        raise ConfigError(f"download directory {root} cannot be created: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"download directory {root} cannot be created: {exc.strerror}") from None
    if not root.is_dir():
        raise ConfigError(f"download directory {root} is not a directory")
    probe = root / f".adl-write-test-{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror
        raise ConfigError(f"download directory {root} is not writable: {reason}") from None


###############################################################################
# Manifest
###############################################################################
# One JSON line per selected object: enough to know which bytes a model was trained on and to fetch exactly
# those again elsewhere (--from-manifest).


class ManifestWriter:
    """Appends one JSON line per result, from any worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._handle = open(path, "w", encoding="utf-8", errors="surrogatepass")
        except OSError as exc:
            raise ConfigError(f"cannot write manifest {path}: {exc.strerror}") from None

    def write(self, result: DownloadResult) -> None:
        obj = result.obj
        checksum = result.checksum
        algorithm, _, value = (checksum or "").partition(":")
        record = {
            "bucket": obj.bucket,
            "key": obj.key,
            "version_id": obj.version_id,
            "etag": obj.etag,
            "size": obj.size,
            "last_modified": obj.last_modified,
            "checksum": {"algorithm": algorithm, "value": value.strip()} if checksum else None,
            "path": result.path,
            "status": result.status,
            "reason": result.reason or None,
        }
        line = json.dumps(record, ensure_ascii=True) + "\n"
        with self._lock:
            self._handle.write(line)

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def read_manifest(path: str | os.PathLike[str]) -> list[S3Object]:
    """The objects a manifest records, with their version ids and ETags; failed entries are included too."""
    objects: list[S3Object] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    objects.append(
                        S3Object(
                            bucket=record["bucket"],
                            key=record["key"],
                            size=int(record["size"]),
                            etag=str(record["etag"]),
                            last_modified=float(record.get("last_modified") or 0.0),
                            version_id=record.get("version_id"),
                        )
                    )
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"manifest {path} line {number} is not a manifest record") from None
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
    return objects


###############################################################################
# Demo
###############################################################################
# --demo starts moto's S3 server on 127.0.0.1, fills a bucket with a small road-distress-like dataset and
# downloads it through the normal path, so a fresh machine can see the tool work without an AWS account.

DEMO_BUCKET = "road-distress-demo"


def demo_objects(seed: int = 7) -> dict[str, bytes]:
    """A deterministic sample dataset in the project's layout (a few dozen files, two of several MB)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    roads = {"Co Rd 4235": (31.708136, -97.693460), "Co Rd 360": (31.512200, -97.801100)}
    for road, (lat, lon) in roads.items():
        annotations = []
        for index in range(12):
            name = f"{index:03d}_{lat + index * 0.000092:.6f}_{lon + index * 0.000181:.6f}.png"
            body = b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(20_000, 120_000))
            files[f"coryell/{road}/img/{name}"] = body
            annotations.append({"image": name, "distress": rng.choice(["none", "crack", "pothole", "patch"])})
        files[f"coryell/{road}/ann/annotations.json"] = json.dumps(annotations, indent=2).encode()
    files["coryell/Co Rd 4235/video/drive_000.mp4"] = rng.randbytes(6 * MiB + 12345)
    files["coryell/Co Rd 360/lidar/scan_000.bin"] = rng.randbytes(20 * MiB + 777)
    files["road-distress/README.txt"] = b"Sample road-distress dataset for aws-data-downloader --demo.\n"
    return files


@contextlib.contextmanager
def demo_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, seeded with demo_objects(); yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigError("--demo needs moto's S3 server: pip install 'moto[server]'") from None
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="demo", aws_secret_access_key="demo"
        )
        client.create_bucket(Bucket=DEMO_BUCKET)
        for key, body in demo_objects().items():
            if len(body) > 16 * MiB:  # uploaded in parts, as large files are: exercises multipart verification
                upload = client.create_multipart_upload(Bucket=DEMO_BUCKET, Key=key)
                parts = []
                for number, start in enumerate(range(0, len(body), 8 * MiB), 1):
                    etag = client.upload_part(
                        Bucket=DEMO_BUCKET,
                        Key=key,
                        UploadId=upload["UploadId"],
                        PartNumber=number,
                        Body=body[start : start + 8 * MiB],
                    )["ETag"]
                    parts.append({"ETag": etag, "PartNumber": number})
                client.complete_multipart_upload(
                    Bucket=DEMO_BUCKET, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
                )
            else:
                client.put_object(Bucket=DEMO_BUCKET, Key=key, Body=body)
        yield endpoint
    finally:
        server.stop()


###############################################################################
# CLI
###############################################################################


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes through tqdm while a bar is on screen, so log lines never tear it."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):  # already shown on the console in another form
            return None
        if not _BAR_ACTIVE.is_set():
            return super().emit(record)
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


@contextlib.contextmanager
def cli_logging(level: int, log_file: str | None) -> Iterator[None]:
    """Console and file handlers for one CLI run, removed afterwards (main() may be called many times)."""
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    console = _ConsoleHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handlers.append(console)
    if log_file:
        try:
            file_handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from None
        file_handler.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        handler.addFilter(REDACTOR)
        root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.INFO)
    quiet_loggers = {name: logging.getLogger(name).level for name in ("botocore", "boto3", "urllib3", "s3transfer")}
    if level > logging.DEBUG:
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
        for name, old in quiet_loggers.items():
            logging.getLogger(name).setLevel(old)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aws_data_downloader.py",
        description="Download whole datasets from S3 and S3-compatible stores: parallel, verified, resumable.",
        epilog=(
            "Exit codes: 0 all selected objects on disk and verified; 1 some objects failed; 2 usage, config or "
            "directory error; 3 credentials rejected or nothing accessible; 4 another run holds the lock; "
            "5 not enough disk space; 130 interrupted."
        ),
    )
    add = parser.add_argument
    add("--config", metavar="PATH", help="YAML or JSON config file (default: ./aws_downloader_config.yaml if present)")
    add(
        "--create-config",
        nargs="?",
        const="aws_downloader_config.yaml",
        metavar="PATH",
        help="write the commented default config (refuses to overwrite) and exit",
    )
    add("--access-key", help="AWS access key id (prefer the environment: flags are visible to other users)")
    add("--secret-key", help="AWS secret access key (prefer the environment)")
    add("--session-token", help="AWS session token for temporary credentials")
    add("--dry-run", action="store_true", help="list and filter, print what would be downloaded, write nothing")
    add("--from-manifest", metavar="PATH", help="download exactly the objects (and versions) of a manifest")
    add("--verbose", "-v", action="store_true", help="debug logging")
    add("--json", action="store_true", help="print the summary as one JSON object on stdout")
    add("--demo", action="store_true", help="download a sample dataset from an embedded local S3 server")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    for option in OPTIONS:
        if option.flag is None:
            continue
        kwargs: dict[str, Any] = {
            "dest": option.key,
            "default": argparse.SUPPRESS,
            "help": option.flag_help or option.help,
        }
        if option.kind == "bool":
            kwargs["action"] = "store_const"
            kwargs["const"] = not option.inverted
        elif option.kind == "list":
            kwargs["nargs"] = "+"
            kwargs["metavar"] = {"buckets": "BUCKET", "prefixes": "PREFIX", "file_extensions": "EXT"}.get(
                option.key, "GLOB"
            )
        elif option.kind == "int":
            kwargs["type"] = int
            kwargs["metavar"] = "N"
        elif option.kind == "float":
            kwargs["type"] = float
            kwargs["metavar"] = "MB" if option.key.endswith("_mb") else "X"
        elif option.kind == "choice":
            kwargs["choices"] = option.choices
        else:
            kwargs["metavar"] = {"endpoint_url": "URL", "shard": "I/N"}.get(
                option.key, "PATH" if option.key.endswith(("_dir", "_file", "manifest")) else option.key.upper()
            )
        add(option.flag, **kwargs)
    return parser


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: value for key, value in vars(args).items() if key in OPTIONS_BY_KEY}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: returns the exit code (see build_parser's epilog) instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the one-line usage error
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
    if args.create_config:
        try:
            path = write_default_config(args.create_config)
        except ConfigError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"Wrote the default configuration to {path}")
        return EXIT_OK
    try:
        file_values: dict[str, Any] = {}
        if args.config:
            file_values = load_config_file(args.config)
        elif Path("aws_downloader_config.yaml").is_file() and not args.demo:
            file_values = load_config_file("aws_downloader_config.yaml")
        flags = _flag_overrides(args)
        if args.demo:
            flags.setdefault("download_dir", "demo_data")
        config = build_config(file_values, flags)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    level = logging.DEBUG if args.verbose else (logging.ERROR if config.quiet else logging.INFO)
    if args.json and not args.verbose:
        level = max(level, logging.WARNING)
    try:
        with cli_logging(level, config.log_file or None):
            return _run_cli(args, config)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run_cli(args: argparse.Namespace, config: Config) -> int:
    """Run once with logging set up; translate the outcome to output and an exit code."""
    if args.access_key or args.secret_key or args.session_token:
        REDACTOR.add(args.secret_key)
        REDACTOR.add(args.session_token)
        REDACTOR.add(args.access_key, mask_access_key(args.access_key))
        log.warning(
            "Credentials given on the command line are visible to other users of this machine (ps); "
            "prefer AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --profile"
        )
    downloader = AWSDataDownloader(config)
    previous = _install_signal_handlers(downloader)
    summary: DownloadSummary | None = None
    code = EXIT_OK
    try:
        with contextlib.ExitStack() as stack:
            access_key, secret_key, token = args.access_key, args.secret_key, args.session_token
            if args.demo:
                log.info("Starting the demo S3 server and seeding bucket '%s'", DEMO_BUCKET)
                endpoint = stack.enter_context(demo_server())
                downloader.config = config = config.replace(endpoint_url=endpoint, buckets=[DEMO_BUCKET])
                access_key, secret_key = "demo", "demo"
            summary = downloader.run_full_download(
                access_key, secret_key, session_token=token, dry_run=args.dry_run, from_manifest=args.from_manifest
            )
            code = EXIT_OK if summary.ok else EXIT_FAILED
    except DownloaderError as exc:
        shown = not args.json or exc.summary is None
        # The console gets the one "Error: ..." line; the log file keeps the timestamped record.
        log.error("%s", exc, extra={"file_only": shown})
        if shown:
            print(f"Error: {REDACTOR.redact(str(exc))}", file=sys.stderr)
        summary = exc.summary
        code = exc.exit_code
    finally:
        _restore_signal_handlers(previous)
    if summary is not None:
        if args.json:
            print(json.dumps(summary.to_dict()))
        else:
            print(summary.format())
    return code


def _install_signal_handlers(downloader: AWSDataDownloader) -> dict[int, Any]:
    """SIGINT/SIGTERM ask the run to stop cleanly; a second one exits at once (files stay consistent)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        if downloader._stop.is_set():
            os.write(2, b"Second interrupt: exiting now; a re-run continues from the resume journal.\n")
            os._exit(EXIT_INTERRUPTED)
        downloader.stop("interrupted")
        os.write(2, b"Stopping: finishing in-flight files (press Ctrl-C again to exit at once)...\n")

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def console_main() -> None:
    """Entry point of the installed ``aws-data-downloader`` command."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
