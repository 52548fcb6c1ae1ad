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
(the engines, the small-object loop) -> retries -> bucket discovery -> streaming listing (or an S3 Inventory
report) -> filters -> local-path plan -> transfer (route_for, Transfer) -> verification -> resume journal ->
progress/summary -> run guards -> the downloader (one _Run per run) -> manifest -> demo -> CLI.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import stat
import struct
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
from typing import Any, Protocol, TypeVar

__version__ = "1.0.0"

#: The module's own logger; importing the module configures no handler (the CLI adds them).
log = logging.getLogger("aws_data_downloader")

KiB = 1024
MiB = 1024 * KiB

T = TypeVar("T")


def plan_object(
    obj: S3Object,
    root: Path,
    overwrite: bool,
    journal: ResumeJournal | NullJournal,
    compare: bool = False,
    files: LocalTree | None = None,
) -> Planned:
    """Place and skip-check one selected object (the filters have kept it); ``compare`` is --checksum; ``files``
    is the run's LocalTree, which checks each folder of the keys once.

    It runs once per listed key, so the target stays a string: a Path cost more than the rest of the planning
    (measured with benchmarks/listing_cpu.py); the workers make one for the objects they fetch.
    """
    if obj.key.endswith("/"):
        return Planned(obj, None, DownloadResult(obj, "failed", "unsafe key: folder marker with data"))
    if obj.storage_class in ARCHIVED_STORAGE_CLASSES:
        return Planned(obj, None, DownloadResult(obj, "skipped", f"archived storage class ({obj.storage_class})"))
    tree = files or _ANY_TREE
    try:
        target = tree.place(str(root), obj.bucket, obj.key)
    except UnsafeKeyError as exc:
        return Planned(obj, None, DownloadResult(obj, "failed", str(exc)))
    local = tree.lstat(target)
    done = journal.completed(obj.bucket, obj.key)
    reason = skip_reason(obj, local, done, overwrite)
    if compare and needs_local_check(obj, local, done, overwrite):
        return Planned(obj, target, None, hash_local=True, fallback=reason)
    if reason is None:
        return Planned(obj, target, None)
    checksum = done.checksum if done is not None else None
    if done is not None and done.version_id and not obj.version_id:
        obj = dataclasses.replace(obj, version_id=done.version_id)
    return Planned(obj, target, DownloadResult(obj, "skipped", reason, target, checksum))


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
EXIT_NO_SPACE = 5  #: not enough free disk space (checked page by page as the listing arrives, or the disk filled)
EXIT_NOTHING_LISTED = 6  #: a bucket given does not exist, or a bucket or prefix lists no objects (a typo?)
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


class CannotConnectError(DownloaderError):
    """No connection to S3 could be opened (nothing listening at the endpoint, no such host)."""


class NoSuchBucketError(NothingAccessibleError):
    """Every bucket named does not exist: a typo, not a permission problem."""

    exit_code = EXIT_NOTHING_LISTED


class LockedError(DownloaderError):
    """Another run is downloading into the same directory."""

    exit_code = EXIT_LOCKED


class DiskSpaceError(DownloaderError):
    """The selection does not fit on the disk, or the disk filled during the run."""

    exit_code = EXIT_NO_SPACE


class DownloadInterrupted(DownloaderError):
    """The run was stopped (Ctrl-C, SIGTERM); completed files and resume state are kept."""

    exit_code = EXIT_INTERRUPTED


# Failures of one object, raised inside a transfer and turned into its result (never out of a run).


class ChecksumMismatch(Exception):
    """The bytes received do not match the object's ETag or checksum."""

    #: Some of the bytes were kept from an earlier attempt or run (a crash mid-write, a power loss can spoil them).
    kept = False


class DiskFull(Exception):
    """ENOSPC while writing; the whole run stops."""


class Interrupted(Exception):
    """The run's stop event was set while this object was in flight."""


###############################################################################
# Config
###############################################################################
# One table describes every setting: its config key, type, default, flag and help. The parser, the default
# config file, validation and the README's tables all come from it, so they cannot drift apart.


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: config key, kind of value, default, and the flag that overrides it (None: file-only)."""

    key: str
    kind: str  # "str", "int", "float", "bool", "list", "choice", or "timestamp"
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
    Option(
        "list_concurrency",
        "int",
        16,
        "Listing requests in flight for one bucket: a prefix of more than a page is split by its sub-prefixes "
        "('/'), which are listed at once; 1 lists page after page.",
        "--list-concurrency",
        minimum=1,
        maximum=256,
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
    Option("min_file_size_mb", "float", 0.0, "Skip objects smaller than this (MiB).", "--min-size-mb", minimum=0),
    Option(
        "max_file_size_mb",
        "float",
        None,
        "Skip objects larger than this (MiB); null means no limit.",
        "--max-size-mb",
        minimum=0,
        nullable=True,
        flag_help="Skip objects larger than this (MiB); no limit unless given.",
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
        "checksum",
        "bool",
        False,
        "Hash same-size local files the resume journal does not vouch for (another tool's, a backup) and download "
        "only those that differ from the object's checksum, instead of trusting size and date.",
        "--checksum",
    ),
    Option(
        "retry_attempts",
        "int",
        5,
        "Retries of each request (listing page, HEAD, GET of an object or a part) on network faults, 5xx and "
        "throttling; also how often an object is fetched again after a checksum mismatch.",
        "--retry-attempts",
        minimum=0,
        maximum=50,
    ),
    Option(
        "retry_mode",
        "choice",
        "standard",
        "botocore's retry mode: 'adaptive' adds its client-side rate limiting after throttling (boto3 engine); "
        "retries themselves follow retry_attempts.",
        choices=("standard", "adaptive"),
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
        "Objects at least this large (MiB) resume across runs: streamed with journaled checkpoints (ranged parts with --no-verify; multipart objects always go by parts).",
        "--multipart-threshold-mb",
        minimum=1,
    ),
    Option(
        "multipart_chunksize_mb",
        "float",
        8.0,
        "Part size (MiB) for ranged fetches when the object's own part size is unknown or not needed.",
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
        "inventory",
        "str",
        None,
        "Take the listing from this S3 Inventory report (s3://bucket/path/manifest.json, CSV or Parquet) instead "
        "of listing the bucket; prefixes, filters and shard apply to its rows.",
        "--inventory",
        nullable=True,
    ),
    Option(
        "inventory_fetch_changed",
        "bool",
        False,
        "Objects changed since the inventory are fetched as they are now, instead of failing as changed.",
        "--inventory-fetch-changed",
    ),
    Option(
        "shard",
        "str",
        None,
        "Keep only shard I of N ('I/N', 0-based) by a stable hash of bucket/key; 'auto/N' reads I from the job.",
        "--shard",
        nullable=True,
    ),
    Option(
        "as_of",
        "timestamp",
        None,
        "Download each key as it stood at this moment, from a versioned bucket's versions; null: as it is now.",
        "--as-of",
        nullable=True,
        flag_help="Download each key as it stood at this moment (ISO 8601 with a zone: 2026-11-01T00:00:00Z), "
        "from a versioned bucket's versions.",
    ),
    Option(
        "delete",
        "bool",
        False,
        "Mirror: after a complete listing, delete local files under the selection that the listing no longer "
        "has (as 'aws s3 sync --delete'); never when a listing or download failed or the run stopped.",
        "--delete",
    ),
    Option(
        "max_delete",
        "int",
        None,
        "With delete: delete nothing, and exit 1, when more than this many files would go; null means no limit.",
        "--max-delete",
        minimum=0,
        nullable=True,
        flag_help="With --delete: delete nothing, and exit 1, when more than N files would go (as rclone).",
    ),
    Option(
        "max_age",
        "age",
        None,
        "Keep only objects modified within this long ('7d', '36h', '90m') or since this ISO 8601 time (UTC "
        "unless it has a zone), as rclone's --max-age; null keeps all.",
        "--max-age",
        nullable=True,
        flag_help="Keep only objects modified within this long ('7d', '36h') or since this ISO 8601 time.",
    ),
    Option(
        "min_age",
        "age",
        None,
        "Keep only objects modified at least this long ago ('7d', '36h') or before this ISO 8601 time (UTC "
        "unless it has a zone), as rclone's --min-age; null keeps all.",
        "--min-age",
        nullable=True,
        flag_help="Keep only objects modified at least this long ago ('7d') or before this ISO 8601 time.",
    ),
    Option(
        "max_bandwidth",
        "rate",
        None,
        "Cap on the download rate of the whole run, every connection together: bytes per second, or with "
        "KB/s, MB/s, GB/s (1024-based, as aws-cli's max_bandwidth) or Kbit/s, Mbit/s, Gbit/s (1000-based bits); "
        "null means no cap.",
        "--max-bandwidth",
        nullable=True,
        flag_help="Cap the download rate of the whole run: '50MB/s', '400Mbit/s', or bytes per second.",
    ),
    Option(
        "check_disk_space",
        "bool",
        True,
        "Stop before writing past the free space: each listing page's bytes to fetch are checked as it arrives.",
        "--ignore-disk-space",
        inverted=True,
        flag_help="Download even when the bytes to fetch exceed the free disk space.",
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
    list_concurrency: int = 16
    overwrite_existing: bool = False
    file_extensions: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_file_size_mb: float = 0.0
    max_file_size_mb: float | None = None
    verify_checksums: bool = True
    checksum: bool = False
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
    inventory: str | None = None
    inventory_fetch_changed: bool = False
    shard: str | None = None
    as_of: str | None = None  #: ISO 8601 with its zone, as check_value normalised it
    delete: bool = False
    max_delete: int | None = None
    max_age: str | None = None
    min_age: str | None = None
    max_bandwidth: int | None = None  #: bytes per second
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
        if option.maximum is None:
            return f"an integer >= {option.minimum:g}" + (" or null" if option.nullable else "")
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
    if option.kind == "timestamp":
        example = "like 2026-11-01T00:00:00Z or 2026-11-01T02:00:00+02:00"
        return f"an ISO 8601 timestamp with a zone, {example}" + (", or null" if option.nullable else "")
    if option.kind == "age":
        return "a duration ('7d', '36h', '90m', '1h30m'; units ms s m h d w M y) or an ISO 8601 time, or null"
    if option.kind == "rate":
        return "a rate such as '50MB/s' or '400Mbit/s' (at least 1KB/s), bytes per second, or null"
    return "a string" + (" or null" if option.nullable else "")


def check_value(option: Option, value: Any, name: str | None = None) -> Any:
    """Coerce one config value to its kind, or raise ConfigError naming it and what it takes.

    ``name`` is the value as the user wrote it (``--parallel``, ``parallel_downloads in config.yaml``, see
    ConfigLayer.name); without it, the error names the config key.
    """
    bad = ConfigError(f"{name or f'config key {option.key!r}'} must be {_describe(option)}, got {value!r}")
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
    if option.kind == "timestamp":  # YAML may have made it a datetime already
        return parse_timestamp_option(value, bad, name or f"config key {option.key!r}")
    return _text_value(option, value, bad)


def parse_timestamp_option(value: Any, bad: ConfigError, name: str) -> str:
    """An ISO 8601 moment with its zone, normalised ('2026-11-01T00:00:00+00:00'), or ``bad``.

    YAML turns an unquoted timestamp into a datetime (aware when it has a zone), so one is accepted as given.
    A moment without a zone is refused: it would mean a different instant on every machine's clock.
    """
    given = value
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise bad from None
    if not isinstance(value, datetime.datetime):  # a YAML date (2026-11-01) has no time of day
        raise bad
    if value.tzinfo is None or value.utcoffset() is None:
        given = given if isinstance(given, str) else given.isoformat()
        raise ConfigError(f"{name} needs a zone: {given!r} has none (add Z for UTC, or an offset like +02:00)")
    return value.isoformat()


def _text_value(option: Option, value: Any, bad: ConfigError) -> Any:
    """A string, or a value written in a small syntax of its own (an age, a rate) parsed; ``bad`` if not."""
    if option.kind == "age":
        parse: Callable[[Any], Any] = age_value
    elif option.kind == "rate":
        parse = parse_rate
    elif isinstance(value, str):
        return value
    else:
        raise bad
    try:
        return parse(value)
    except ValueError:
        raise bad from None


def endpoint_url_problem(url: str) -> str | None:
    """What is wrong with an endpoint URL, as the end of a "<name> must be ..." message, or None.

    botocore refuses a URL without a scheme ('127.0.0.1:5123', 'localhost:5123') or with a host it cannot
    use, but only when it builds its client, with a traceback; its own check runs here, while the config is
    read, so the error is one line naming what the user typed. A port that is not a number would crash the
    http engine, and another scheme would never reach an S3 server.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        hint = ""
        if "://" not in url and endpoint_url_problem("http://" + url) is None:
            # a port, localhost or an IPv4 address: a local store, most likely without TLS
            guess = urllib.parse.urlsplit("http://" + url)
            local = guess.port or guess.hostname == "localhost" or (guess.hostname or "").replace(".", "").isdecimal()
            hint = f"; did you mean '{'http' if local else 'https'}://{url}'?"
        return f"must be a URL starting with http:// or https://, got {url!r}{hint}"
    if not (_plain_endpoint_host(url) or _botocore_accepts_endpoint(url)):
        return f"must name a valid host, got {url!r}"
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked for it
    except ValueError:
        return f"must have a port from 0 to 65535, got {url!r}"
    return None


#: botocore's is_valid_endpoint_url, copied so that the usual endpoint is checked without importing botocore
#: (~0.1 s); anything it refuses is asked of botocore itself.
_ENDPOINT_HOST = re.compile(r"^((?!-)[A-Z\d-]{1,63}(?<!-)\.)*((?!-)[A-Z\d-]{1,63}(?<!-))$", re.IGNORECASE)


def _plain_endpoint_host(url: str) -> bool:
    """Whether botocore's is_valid_endpoint_url accepts ``url`` (the same steps)."""
    if {"\t", "\r", "\n"}.intersection(url):
        return False
    hostname = urllib.parse.urlsplit(url).hostname
    if hostname is None or len(hostname) > 255:
        return False
    return _ENDPOINT_HOST.match(hostname.removesuffix(".")) is not None


def _botocore_accepts_endpoint(url: str) -> bool:
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    return bool(is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))


@dataclass(frozen=True, slots=True)
class ConfigLayer:
    """Settings from one place, and which place: an error names a bad value the way the user wrote it, as the
    flag (``--parallel``), the key in its file (``parallel_downloads in config.yaml``), or the config key."""

    #: Config keys and their values as read, not yet validated.
    values: Mapping[str, Any]
    #: "flags" (the command line), "file" (a config file), or "python" (a dict or keyword arguments).
    origin: str = "python"
    #: The config file as the user named it, for origin "file".
    path: str | None = None

    def name(self, key: str) -> str:
        """How the user wrote ``key`` in this layer, for the start of an error message."""
        flag = OPTIONS_BY_KEY[key].flag if key in OPTIONS_BY_KEY else None
        if self.origin == "flags" and flag:
            return flag
        if self.origin == "file":
            return f"{key} in {self.path}"
        return f"config key '{key}'"


#: Keys people put credentials under; they belong in the environment, a profile or a role.
CREDENTIAL_KEYS = frozenset({"access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "session_token"})


def closest_key(key: str) -> str | None:
    """The config key a mistyped one most likely meant: misspelt, or a flag's name written as a key
    (``max_size_mb`` for ``max_file_size_mb``). The cutoff is above difflib's default, which offers
    'prefixes' for 'retries'."""
    candidates = {o.flag.lstrip("-").replace("-", "_"): o.key for o in OPTIONS if o.flag}
    candidates.update((k, k) for k in OPTIONS_BY_KEY)
    import difflib  # 12 ms to import: only for a config with an unknown key

    close = difflib.get_close_matches(key.lower().replace("-", "_"), candidates, n=1, cutoff=0.7)
    return candidates[close[0]] if close else None


def unknown_key_error(key: Any, layer: ConfigLayer) -> ConfigError:
    """The error for a key no option has: the likely meant key when there is one, else every key."""
    key = str(key)  # YAML keys may be numbers or dates
    where = f" in {layer.path}" if layer.origin == "file" else ""
    meant = None if key in CREDENTIAL_KEYS else closest_key(key)
    if key in CREDENTIAL_KEYS:
        hint = " (credentials do not belong in a config file: use environment variables or --profile)"
    elif meant:
        hint = f"; did you mean '{meant}'?"
    else:
        hint = "; known keys: " + ", ".join(sorted(OPTIONS_BY_KEY))
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def build_config(*layers: Mapping[str, Any] | ConfigLayer | None) -> Config:
    """Merge layers (later wins: defaults < file < flags) into a validated Config.

    A plain mapping's values are named in errors by their config key; a ConfigLayer's by how the user gave
    them (the flag, or the key and its file), so the message says what to fix in the user's own words.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, ConfigLayer] = {}
    for given in layers:
        layer = given if isinstance(given, ConfigLayer) else ConfigLayer(given or {})
        for key, value in layer.values.items():
            if key not in OPTIONS_BY_KEY:
                raise unknown_key_error(key, layer)
            merged[key] = check_value(OPTIONS_BY_KEY[key], value, layer.name(key))
            sources[key] = layer

    def name(key: str) -> str:
        return sources.get(key, ConfigLayer({})).name(key)

    config = Config(**merged)
    if config.max_file_size_mb is not None and config.max_file_size_mb < config.min_file_size_mb:
        raise ConfigError(
            f"{name('max_file_size_mb')} ({config.max_file_size_mb:g}) must not be smaller than "
            f"{name('min_file_size_mb')} ({config.min_file_size_mb:g})"
        )
    if config.shard is not None:
        # fail early on a malformed value; 'auto' is resolved at run time
        parse_shard(config.shard, {}, name("shard"))
    if config.inventory is not None and parse_s3_url(config.inventory) is None:
        raise ConfigError(
            f"{name('inventory')} must be the s3:// URL of an inventory's manifest.json "
            f"(s3://bucket/path/manifest.json), got {config.inventory!r}"
        )
    if config.max_age is not None and config.min_age is not None:
        now = time.time()
        if age_cutoff(config.max_age, now) >= age_cutoff(config.min_age, now):
            raise ConfigError(
                f"{name('max_age')} ({config.max_age}) must reach further back than {name('min_age')} "
                f"({config.min_age}): together they keep no object"
            )
    if config.endpoint_url:
        problem = endpoint_url_problem(config.endpoint_url)
        if problem:
            raise ConfigError(f"{name('endpoint_url')} {problem}")
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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as exc:  # json.JSONDecodeError's message has the line and column
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    else:
        data = _load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _load_yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, with any error as one line that keeps YAML's line and column.

    A scalar that YAML resolves to a date can still fail to build ('2001-13-01' is a date with month 13):
    safe_load raises a bare ValueError then, with no position, so each node's ValueError is given the node's
    mark here.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except ValueError as exc:
                kind = "date" if node.tag.endswith(":timestamp") else node.tag.rsplit(":", 1)[-1]
                problem = f"{node.value} is not a valid {kind} ({exc}); quote it to keep it text"
                raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: builds only plain data, never objects
    except yaml.MarkedYAMLError as exc:
        message = exc.problem or exc.context or type(exc).__name__
        if exc.problem_mark is not None:
            message = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: {message}"
        if exc.problem and exc.context and exc.context_mark is not None:
            mark = exc.context_mark
            message += f" ({exc.context} at line {mark.line + 1}, column {mark.column + 1})"
        raise ConfigError(f"config file {path} is not valid YAML: {message}") from None
    except yaml.YAMLError as exc:  # a ReaderError (a character YAML does not allow) has no mark, a position
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None


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
# Importing boto3 and building its session cost ~0.17 s of a ~0.4 s start-up, so a run whose keys and region
# botocore would take from the flags or the environment alone (known_session) does without it until it needs
# a botocore client (ListBuckets, AWS's addresses, the boto3 engine); any profile or shared file in play goes
# to botocore.

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

    def clear(self) -> None:
        """Forget every secret: a new run registers its own."""
        self._replacements = {}

    def add_credentials(self, access_key: str | None, secret_key: str | None, token: str | None) -> None:
        """Mask a set of credentials: the secret and token entirely, the access key id as the console shows it."""
        self.add(secret_key)
        self.add(token)
        self.add(access_key, mask_access_key(access_key))

    @contextlib.contextmanager
    def on_every_handler(self) -> Iterator[None]:
        """Filter every log handler while a run is active (a notebook's, an application's), then step back.

        Records of botocore's loggers reach handlers anywhere up their tree, so every logger's handlers get it.
        """
        loggers = [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values())]
        handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers if self not in h.filters}
        for handler in handlers:
            handler.addFilter(self)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(self)

    def add(self, secret: str | None, shown_as: str = "****") -> None:
        if secret and len(secret) >= 4:
            replacements = dict(self._replacements)  # replaced whole: handlers on other threads read it
            replacements[secret] = shown_as
            # Also as presigned URLs and canonical query strings write it (session tokens hold '/', '+', '=').
            for safe in ("", "-_.~"):
                replacements[urllib.parse.quote(secret, safe=safe)] = shown_as
            self._replacements = replacements

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


@dataclass(frozen=True, slots=True)
class Credentials:
    """Explicit credentials from the caller; all None means boto3's default chain."""

    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # never print a secret, even in a traceback's locals
        return f"Credentials(access_key={mask_access_key(self.access_key)!r})"

    # What the signer and the redactor read of botocore's credentials, for keys known without botocore.
    @property
    def token(self) -> str | None:
        return self.session_token

    def get_frozen_credentials(self) -> Credentials:
        return self


def make_session(config: Config, credentials: Credentials, redactor: SecretRedactingFilter) -> Any:
    """The run's session: explicit keys, else the profile, else boto3's default chain; ``redactor`` learns the
    secrets, whichever way they came. A KnownSession when botocore's answer is known without it, else boto3's."""
    if bool(credentials.access_key) != bool(credentials.secret_key):
        raise CredentialsError("give both an access key and a secret key, or neither")
    redactor.add_credentials(credentials.access_key, credentials.secret_key, credentials.session_token)
    session: Any = known_session(config, credentials, os.environ)
    if session is None:
        session = boto3_session(config, credentials)
    else:
        log.debug("Credentials (%s) and region (%s) settled without botocore", session.source, session.region_name)
    if not config.no_sign_request:  # anonymous runs never resolve credentials (no IMDS wait on a laptop)
        _redact_resolved_credentials(session, redactor)
    return session


def boto3_session(config: Config, credentials: Credentials) -> Any:
    """boto3's session for the run: explicit keys, else the profile, else its default chain."""
    import boto3
    import botocore.exceptions

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
    except botocore.exceptions.ProfileNotFound as exc:  # --profile, or one AWS_PROFILE names
        profile = exc.kwargs.get("profile") or config.profile
        raise ConfigError(f"AWS profile '{profile}' not found in ~/.aws/config or ~/.aws/credentials") from None
    return session


class KnownSession:
    """A session whose credentials and region are known without botocore (known_session says when): it answers
    what the http engine asks (get_credentials, region_name) itself and builds boto3's session, the one
    make_session would have made, only when a botocore client is asked for.

    The trade-off: botocore's own debug lines about finding credentials are missing from a --verbose log.
    """

    def __init__(
        self, credentials: Credentials | None, region_name: str | None, source: str, build: Callable[[], Any]
    ) -> None:
        #: The keys the requests are signed with; None for an anonymous run.
        self.credentials = credentials
        #: Where they came from, for the debug log: "flags", "environment" or "anonymous".
        self.source = source
        #: The region botocore's session would report (None: make_client's us-east-1).
        self.region_name = region_name
        self._build = build
        self._session: Any = None
        self._lock = threading.Lock()

    def get_credentials(self) -> Credentials | None:
        return self.credentials

    def boto3(self) -> Any:
        """boto3's session, built (and boto3 imported) on first use."""
        with self._lock:
            if self._session is None:
                self._session = self._build()
            return self._session

    def client(self, *args: Any, **kwargs: Any) -> Any:
        return self.boto3().client(*args, **kwargs)


#: botocore's variables naming a profile: with one set, its chain decides (conservatively, even for keys that
#: would win over the profile).
PROFILE_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def known_session(config: Config, credentials: Credentials, environ: Mapping[str, str]) -> KnownSession | None:
    """A KnownSession when botocore would take the run's credentials and region from the flags or the environment
    alone; None when its chain may have another answer (a profile, a shared file, a role, SSO, IMDS...).

    botocore's order, kept: explicit keys, then AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (token from
    AWS_SECURITY_TOKEN, else AWS_SESSION_TOKEN) ahead of every file; the region from the config, then
    AWS_DEFAULT_REGION, then the profile in ~/.aws/config or ~/.aws/credentials, so with neither set only the
    absence of both files settles it. Expiring environment keys (AWS_CREDENTIAL_EXPIRATION) are botocore's to
    refresh.
    """
    if config.profile is not None or any(name in environ for name in PROFILE_VARIABLES):
        return None
    keys: Credentials | None = None
    if config.no_sign_request:
        source = "anonymous"
    elif credentials.access_key:
        keys, source = credentials, "flags"
    elif environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        if environ.get("AWS_CREDENTIAL_EXPIRATION"):
            return None
        token = environ.get("AWS_SECURITY_TOKEN") or environ.get("AWS_SESSION_TOKEN") or None
        keys, source = Credentials(environ["AWS_ACCESS_KEY_ID"], environ["AWS_SECRET_ACCESS_KEY"], token), "environment"
    else:
        return None
    if config.region:
        region: str | None = config.region
    elif config.region is None and environ.get("AWS_DEFAULT_REGION"):
        region = environ["AWS_DEFAULT_REGION"]
    elif config.region is None and not any(_shared_file_exists(environ, *file) for file in SHARED_FILES):
        region = None
    else:
        return None
    return KnownSession(keys, region, source, lambda: boto3_session(config, credentials))


#: The files botocore reads profiles from: (its variable, the default path).
SHARED_FILES = (("AWS_CONFIG_FILE", "~/.aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))


def _shared_file_exists(environ: Mapping[str, str], variable: str, default: str) -> bool:
    """Whether botocore would find this file; a variable set but empty counts as a file (botocore's case to judge)."""
    path = environ.get(variable, default)
    return not path or os.path.isfile(os.path.expanduser(os.path.expandvars(path)))


def _redact_resolved_credentials(session: Any, redactor: SecretRedactingFilter) -> None:
    """Register the credentials boto3 resolved (environment, profile, role) too: botocore's debug log prints them."""
    try:
        resolved = session.get_credentials()
        frozen = resolved.get_frozen_credentials() if resolved is not None else None
    except Exception:  # no or broken credentials: the run reports that when it first needs them
        return
    if frozen is not None:
        redactor.add_credentials(frozen.access_key, frozen.secret_key, frozen.token)


def resolve_endpoint_url(config: Config) -> str | None:
    """The custom endpoint, if any: config/flag first, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL.

    The config's value was checked with the config; a variable's is checked here, so a URL botocore would
    refuse is a one-line error naming the variable.
    """
    if config.endpoint_url:
        return config.endpoint_url
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(variable)
        if value:
            problem = endpoint_url_problem(value)
            if problem:
                raise ConfigError(f"{variable} {problem}")
            return value
    return None


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
        # The run retries every request itself (the Retries section); botocore retrying too would multiply them.
        retries={"mode": config.retry_mode, "total_max_attempts": 1},
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
    """The run's one botocore S3 client, built on first use: building it costs ~0.06 s (and with a KnownSession,
    importing boto3 ~0.17 s more), and a run of named buckets on a path-style endpoint with the http engine never
    needs it."""

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


def loaded_module(name: str) -> Any:
    """The module if something imported it already, else None. An exception of botocore's (or urllib3's) exists only
    once its module is loaded, so the checks for them import nothing on a run that never needed botocore."""
    return sys.modules.get(name)


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
    boto_errors = loaded_module("botocore.exceptions")
    if boto_errors is not None:
        if isinstance(exc, (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)):
            return "AWS credentials not found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, use --profile, or run on an instance with an IAM role"
        if isinstance(exc, boto_errors.TokenRetrievalError):
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
# Every request after the session is made goes through an Engine, which sends it once: listing pages, bucket
# HEADs, object GETs (whole, ranged, with If-Match) and HEADs. One place builds a request (object_request) and one
# reads its answer (classify_response), for every engine and the small-object loop alike. HttpEngine is the
# default and the fast one: a minimal HTTP/1.1 client with a keep-alive connection per worker thread and a SigV4
# signer that caches the day's key, while credentials, endpoint, addressing style and region still come from
# botocore; SmallObjectLoop multiplexes its small GETs on one thread. Boto3Engine sends the same requests through
# the shared boto3 client; it is used behind an HTTP proxy, or when the config asks for it.


class S3Error(Exception):
    """An error response from the store for one request."""

    def __init__(self, status: int, code: str, message: str = "", region: str = "") -> None:
        super().__init__(f"{code or status}: {message}" if message else (code or str(status)))
        self.status = status
        self.code = code
        #: The bucket's region, when the answer names one (a 301 or a HEAD's x-amz-bucket-region).
        self.region = region


class ObjectChanged(Exception):
    """If-Match failed: the object was replaced after we listed it."""


def is_denied(status: int, code: str) -> bool:
    """The one test for "not allowed". A HEAD answer has no body, so a bare 403 says it all; a 403 with another
    code is something else (InvalidObjectState: archived; RequestTimeTooSkewed: the clock; a credentials code)."""
    return code in ("AccessDenied", "Forbidden", "AllAccessDisabled") or (status == 403 and code in ("", "403"))


def is_missing(status: int, code: str) -> bool:
    """The one test for "no such bucket, key or version"."""
    return status == 404 or code in ("404", "NotFound", "NoSuchBucket", "NoSuchKey", "NoSuchVersion")


def part_number_gone(exc: S3Error) -> bool:
    """A HEAD ?partNumber=N refused because the object now has fewer parts: it was replaced (InvalidPartNumber;
    a HEAD answer has no body, so only its status says so)."""
    return exc.status in (400, 416) or exc.code == "InvalidPartNumber"


# -- the request seam: one place builds a request, one reads its answer -------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectRequest:
    """A GET or HEAD of one object as every engine sends it: unencoded query pairs and lower-cased headers."""

    query: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]


def object_request(
    obj: S3Object,
    *,
    byte_range: tuple[int, int] | None = None,
    if_match: str | None = None,
    checksum_mode: bool = False,
    part_number: int | None = None,
    request_payer: str | None = None,
) -> ObjectRequest:
    """The one place a GET or HEAD is built: Range, If-Match, checksum mode, request payer, version id."""
    query: list[tuple[str, str]] = []
    if part_number is not None:
        query.append(("partNumber", str(part_number)))
    if obj.version_id:
        query.append(("versionId", obj.version_id))
    headers: dict[str, str] = {}
    if byte_range is not None:
        headers["range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    if if_match:
        headers["if-match"] = f'"{if_match}"'
    if checksum_mode:
        headers["x-amz-checksum-mode"] = "ENABLED"
    if request_payer:
        headers["x-amz-request-payer"] = request_payer
    return ObjectRequest(tuple(query), headers)


#: botocore's parameter for each query pair and header of an ObjectRequest.
_BOTO3_PARAMS = {
    "partNumber": "PartNumber",
    "versionId": "VersionId",
    "range": "Range",
    "if-match": "IfMatch",
    "x-amz-checksum-mode": "ChecksumMode",
    "x-amz-request-payer": "RequestPayer",
}


def boto3_params(obj: S3Object, request: ObjectRequest) -> dict[str, Any]:
    """An ObjectRequest as keyword arguments of botocore's get_object/head_object."""
    params: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
    for name, value in (*request.query, *request.headers.items()):
        params[_BOTO3_PARAMS[name]] = int(value) if name == "partNumber" else value
    return params


@dataclass(frozen=True, slots=True)
class Answer:
    """What a response means for the request that got it."""

    kind: str  #: "ok", "redirect", "changed", "denied", "missing", "retry" or "error"
    error: Exception | None = None  #: what the caller raises when it does not follow the answer
    region: str = ""  #: a region redirect: the bucket's region
    location: str = ""  #: a 307: where to ask instead


#: Error codes that say "ask again elsewhere": a wrong region, or a temporary redirect.
REDIRECT_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "TemporaryRedirect"})


def classify_response(
    status: int, headers: Mapping[str, str], code: str = "", message: str = "", region: str = "", what: str = ""
) -> Answer:
    """The one place a status and S3 error code are read, for every engine and the small-object loop.

    ``code``, ``message`` and ``region`` come from the error body (parse_s3_error); ``what`` names the key or
    bucket for an ObjectChanged.
    """
    if status in (200, 206):
        return Answer("ok")
    if status == 412 or code == "PreconditionFailed":
        return Answer("changed", ObjectChanged(what))
    region = headers.get("x-amz-bucket-region") or region
    error = S3Error(status, code or str(status), message, region)
    if status == 307 or code == "TemporaryRedirect":
        return Answer("redirect", error, location=headers.get("location", ""))
    if status == 301 or code in REDIRECT_CODES:
        return Answer("redirect", error, region=region)
    if is_denied(status, code):
        return Answer("denied", error)
    if is_missing(status, code):
        return Answer("missing", error)
    return Answer("retry" if is_retryable(error) else "error", error)


def parse_s3_error(body: bytes) -> tuple[str, str, str]:
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


class Response(Protocol):
    """What an engine's GET returns: status, lower-cased headers, and a body to read in chunks."""

    headers: Mapping[str, str]

    def read(self, amount: int) -> bytes:
        """Up to ``amount`` bytes of the body, as soon as some have arrived; empty at its end. Returning what has
        arrived, not waiting for all ``amount``, keeps the bytes a kill loses to those not yet received."""
        ...

    def close(self) -> None: ...


class Engine(Protocol):
    """Sends single requests for one run and raises S3Error (or ObjectChanged) for an error answer.

    Engines never retry: the run's retry policy (the Retries section) wraps every request it makes once.
    """

    #: Whether the small-object event loop can fetch through this engine (it speaks HTTP itself).
    supports_small_loop: bool
    #: Requests go unsigned (--no-sign-request): a 403 then means "not public".
    anonymous: bool

    def get(self, obj: S3Object, request: ObjectRequest) -> Response: ...

    def head(self, obj: S3Object, request: ObjectRequest) -> Mapping[str, str]:
        """The lower-cased headers of a HEAD of the object (or of one part, with part_number)."""
        ...

    def head_bucket(self, bucket: str) -> str | None:
        """HEAD the bucket; returns its region when the answer tells it."""
        ...

    def list_page(
        self, bucket: str, prefix: str, token: str | None, max_keys: int | None = None
    ) -> tuple[list[S3Object], str | None]:
        """One ListObjectsV2 page: its objects (folder markers left out) and the next continuation token."""
        ...

    def list_level(
        self, bucket: str, prefix: str, token: str | None, start_after: str | None = None, delimiter: str = ""
    ) -> ListPage:
        """One ListObjectsV2 page with start-after and a delimiter: its objects, common prefixes and last key."""
        ...

    def list_versions_page(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None, max_keys: int | None = None
    ) -> tuple[list[ObjectVersion], tuple[str, str] | None]:
        """One ListObjectVersions page (versions and delete markers) and the next (key, version id) marker."""
        ...

    def bucket_versioning(self, bucket: str) -> str | None:
        """GetBucketVersioning's Status: "Enabled", "Suspended", or None for a bucket never versioned."""
        ...

    def set_bucket_region(self, bucket: str, region: str | None) -> None: ...

    def small_loop(
        self,
        config: Config,
        stop: threading.Event,
        deliver: Callable[[Planned, Mapping[str, str], bytes], None],
        fallback: Callable[[Planned, BaseException | None], None],
        interrupted: Callable[[Planned], None],
        limiter: BandwidthLimiter | None = None,
    ) -> SmallObjectLoop | None:
        """The event loop for small objects over this engine's addressing and signing, where it has one."""
        ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


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

    def read1(self, amount: int) -> bytes:
        """Up to ``amount`` bytes with at most one read from the socket: what has arrived, not all of ``amount``."""
        if self._remaining is None or self._chunked or self._remaining == 0:
            return self.read(amount)
        data = self._file.read1(min(amount, self._remaining))
        if not data:
            raise IncompleteBody(f"connection closed with {self._remaining} bytes of the body missing")
        self._remaining -= len(data)
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
    version, _, rest = line.decode("latin-1").partition(" ")
    code, _, _reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.strip().isdigit():
        import http.client  # for its exceptions only, so imported when one is raised (~5 ms at start-up)

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

    def __init__(
        self,
        scheme: str,
        host: str,
        connect_timeout: float,
        read_timeout: float,
        tls: Any,
        receive_buffer: int | None = None,
    ) -> None:
        self.scheme = scheme
        #: SO_RCVBUF under a bandwidth cap (see capped_receive_buffer); None: the kernel's own.
        self.receive_buffer = receive_buffer
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
        if self.receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        if self.scheme == "https":
            sock = self.tls.wrap_socket(sock, server_hostname=hostname)
        sock.settimeout(self.read_timeout)
        self._sock = sock
        self._file = sock.makefile("rb", buffering=256 * 1024)

    def request(self, method: str, target: str, headers: Mapping[str, str]) -> _Http11Response:
        """Send the request and read the status line and headers; the body is left to the caller."""
        if self._sock is None:
            self._connect()
        self._sock.sendall(request_bytes(method, target, headers))
        file = self._file
        while True:
            line = file.readline(65537)
            if not line:
                import http.client

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
        return self._response.read1(amount)

    def close(self) -> None:
        response = self._response
        if response.isclosed() and not response.will_close:
            return  # fully read: the connection stays open for the next request
        response.close()
        self._engine.drop_connection(self._connection)


#: Bucket names that stand in a URL path as they are (every valid S3 bucket name does).
_PLAIN_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]*")


def default_ca_bundle() -> str:
    """botocore's CA bundle when none is configured (httpsession.get_cert_path(True)): certifi's if it is installed,
    else the one botocore ships. certifi is asked first, as botocore does, so the answer costs no botocore import."""
    try:
        import certifi
    except ImportError:
        from botocore.httpsession import get_cert_path

        return str(get_cert_path(True))
    return str(certifi.where())


class HttpEngine:
    """GETs, listings and HEADs over a minimal HTTP/1.1 client, a keep-alive connection per worker thread, and a
    caching signer (the small-object loop borrows its addressing and signing too).

    Measured on a 2-core box against SeaweedFS: botocore's client machinery costs ~1 ms of CPU per small GET
    and urllib3 ~0.2 ms more than http.client; this engine is what lets a Python process keep up with s5cmd.
    Credentials, endpoint, addressing style and region are botocore's (read without it when make_session finds
    them in the flags or the environment alone), so profiles, SSO, IAM roles, custom endpoints and path-style
    addressing behave exactly as they do in boto3. The botocore client itself (for ListBuckets, discovery and
    virtual-hosted addresses) is built only when needed: named buckets on a path-style custom endpoint are
    probed and addressed here, saving its ~0.06 s at start-up (and boto3's import with a KnownSession).
    """

    supports_small_loop = True

    def __init__(self, session: Any, clients: SharedClient, config: Config) -> None:
        self.session = session
        self.clients = clients
        self.config = config
        self.anonymous = config.no_sign_request
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
        #: Every socket's SO_RCVBUF under a bandwidth cap (the small-object loop's too); None without one.
        self.receive_buffer = capped_receive_buffer(config)

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

    def head_bucket(self, bucket: str) -> str | None:
        self._bucket_request(bucket, [], method="HEAD")
        return self._regions.get(bucket)

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
            self.receive_buffer,
        )
        connections[key] = connection
        with self._lock:
            self._live.add(connection)
        return connection, False

    def _tls_context(self) -> Any:
        if self._ssl_context is None:
            import ssl

            bundle = os.environ.get("AWS_CA_BUNDLE") or default_ca_bundle()
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

    def get(self, obj: S3Object, request: ObjectRequest) -> Response:
        connection, response = self._open(obj.bucket, obj.key, list(request.query), dict(request.headers))
        return _HttpBody(self, connection, response)

    def head(self, obj: S3Object, request: ObjectRequest) -> Mapping[str, str]:
        connection, response = self._open(obj.bucket, obj.key, list(request.query), dict(request.headers), "HEAD")
        if response.will_close:
            self.drop_connection(connection)
        return response.headers

    def list_page(
        self, bucket: str, prefix: str, token: str | None, max_keys: int | None = None
    ) -> tuple[list[S3Object], str | None]:
        """A ListObjectsV2 page parsed with ElementTree: ~10x less CPU per key than botocore's parser, whose
        dateutil timestamp parsing alone cost ~0.35 ms per object."""
        query = [("list-type", "2"), ("encoding-type", "url")]
        if prefix:
            query.append(("prefix", prefix))
        if token:
            query.append(("continuation-token", token))
        if max_keys is not None:
            query.append(("max-keys", str(max_keys)))
        return parse_list_objects_v2(bucket, self._bucket_request(bucket, query))

    def list_level(
        self, bucket: str, prefix: str, token: str | None, start_after: str | None = None, delimiter: str = ""
    ) -> ListPage:
        query = [("list-type", "2"), ("encoding-type", "url")]
        if prefix:
            query.append(("prefix", prefix))
        if delimiter:
            query.append(("delimiter", delimiter))
        if token:
            query.append(("continuation-token", token))
        elif start_after:
            query.append(("start-after", start_after))
        return parse_list_level(bucket, self._bucket_request(bucket, query))

    def list_versions_page(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None, max_keys: int | None = None
    ) -> tuple[list[ObjectVersion], tuple[str, str] | None]:
        query = [("versions", ""), ("encoding-type", "url")]
        if prefix:
            query.append(("prefix", prefix))
        if marker is not None:
            query += [("key-marker", marker[0]), ("version-id-marker", marker[1])]
        if max_keys is not None:
            query.append(("max-keys", str(max_keys)))
        return parse_list_object_versions(bucket, self._bucket_request(bucket, query))

    def bucket_versioning(self, bucket: str) -> str | None:
        return parse_bucket_versioning(self._bucket_request(bucket, [("versioning", "")]))

    def small_loop(
        self,
        config: Config,
        stop: threading.Event,
        deliver: Callable[[Planned, Mapping[str, str], bytes], None],
        fallback: Callable[[Planned, BaseException | None], None],
        interrupted: Callable[[Planned], None],
        limiter: BandwidthLimiter | None = None,
    ) -> SmallObjectLoop:
        return SmallObjectLoop(self, config, stop, deliver, fallback, interrupted, limiter)

    def _bucket_request(self, bucket: str, query: list[tuple[str, str]], method: str = "GET") -> bytes:
        """One request on the bucket itself (a listing page, a HEAD); returns the whole body."""
        connection, response = self._open(bucket, None, query, {}, method=method)
        try:
            return response.read()
        finally:
            if response.will_close or not response.isclosed():
                self.drop_connection(connection)

    def _open(
        self,
        bucket: str,
        key: str | None,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        method: str = "GET",
    ) -> tuple[Any, Any]:
        """Send a signed GET (or HEAD) for a key, or the bucket itself when key is None; return a 2xx response.

        Follows region redirects (301, or 400 with the right region) and 307s; raises what classify_response
        says for any other answer.
        """
        for _hop in range(3):  # a region redirect or a 307 costs one more request each
            address = self.address(bucket)
            connection, response = self._exchange(address, key, query, headers, method)
            if response.status in (200, 206):
                return connection, response
            answer = self._answer(connection, response, key or bucket)
            if answer.kind == "redirect" and answer.region and answer.region != address.region:
                log.debug("Bucket %s is in region %s; re-addressing", bucket, answer.region)
                self.set_bucket_region(bucket, answer.region)
            elif answer.kind == "redirect" and answer.location:
                location = urllib.parse.urlsplit(answer.location)
                with self._lock:
                    self._addresses[bucket] = dataclasses.replace(
                        address, scheme=location.scheme or address.scheme, host=location.netloc or address.host
                    )
            else:
                raise answer.error or S3Error(response.status, str(response.status))
        raise S3Error(301, "PermanentRedirect", f"bucket '{bucket}' kept redirecting")

    def _exchange(
        self,
        address: BucketAddress,
        key: str | None,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        method: str,
    ) -> tuple[Any, Any]:
        """Sign and send one request and read its head; a keep-alive connection the server closed while idle is
        replaced once at no cost (not a fault)."""
        path, target = request_target(address, key, query)
        connection, reused = self._connection(address)
        try:
            return connection, self._send(connection, address, path, target, query, headers, method)
        except (BrokenPipeError, ConnectionResetError):  # http.client's RemoteDisconnected is a ConnectionResetError
            if not reused:
                raise
        connection, _ = self._connection(address)
        return connection, self._send(connection, address, path, target, query, headers, method)

    def _answer(self, connection: Any, response: Any, what: str) -> Answer:
        """Read an error answer's body (bounded) and classify it; the connection is dropped unless reusable."""
        try:
            body = response.read() if response._remaining is not None else response.read(64 * 1024)
        except (OSError, ValueError):
            body = b""
        if response.will_close or not response.isclosed():
            self.drop_connection(connection)
        code, message, region = parse_s3_error(body)
        return classify_response(response.status, response.headers, code, message, region, what)

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
        if self.config.request_payer and "x-amz-request-payer" not in headers:
            headers = {**headers, "x-amz-request-payer": self.config.request_payer}
        request_headers = self.signer.sign(method, address.host, path, query, dict(headers), address.region)
        request_headers["host"] = address.host
        request_headers["user-agent"] = self._user_agent
        return request_headers


#: max_bandwidth's units: aws-cli's bytes (1024-based) and, for links sold in bits, 1000-based bits.
RATE_UNITS = {
    "b/s": 1,
    "kb/s": KiB,
    "mb/s": MiB,
    "gb/s": 1024 * MiB,
    "kib/s": KiB,
    "mib/s": MiB,
    "gib/s": 1024 * MiB,
    "kbit/s": 1000 / 8,
    "mbit/s": 1000**2 / 8,
    "gbit/s": 1000**3 / 8,
}
#: The lowest cap taken: below it a connection waits so long between reads that servers drop it.
MIN_RATE = KiB


def parse_rate(value: Any) -> int:
    """Bytes per second of a max_bandwidth value: an integer, or a number with a RATE_UNITS suffix
    ('50MB/s' as aws-cli reads it, '400Mbit/s'). Raises ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+/s)?\s*", value)
        if match is None or (match.group(2) or "b/s").lower() not in RATE_UNITS:
            raise ValueError(value)
        rate = float(match.group(1)) * RATE_UNITS[(match.group(2) or "b/s").lower()]
    else:
        raise ValueError(value)
    if not math.isfinite(rate) or rate < MIN_RATE:
        raise ValueError(value)
    return int(rate)


#: Seconds of the capped rate that the receive buffers of all connections together may hold.
RECEIVE_BUFFER_S = 0.1
#: The smallest receive buffer a capped connection gets (see capped_receive_buffer).
MIN_RECEIVE_BUFFER = 64 * KiB


def capped_connections(config: Config) -> int:
    """How many connections a run opens: parallel_downloads, or under a low --max-bandwidth as few as leave each
    one a receive buffer of at least twice MIN_RECEIVE_BUFFER within RECEIVE_BUFFER_S of the cap.

    Every buffer fills once as the run starts, before the limiter can hold anyone back, and each connection has
    more buffers upstream: at an 8MB/s cap the busiest second took 141% of it with 32 connections (the floor
    made their buffers 0.25 s of the cap), 125% with 12 and 118% with 6 (benchmarks/bandwidth.py, one run
    each). Fewer, fuller connections still carry the cap, since the buffers hold RECEIVE_BUFFER_S of it between
    them whatever their number: a tenth of a second of the cap per round trip of up to 100 ms.
    """
    if not config.max_bandwidth:
        return config.parallel_downloads
    fits = int(config.max_bandwidth * RECEIVE_BUFFER_S // (2 * MIN_RECEIVE_BUFFER))
    return max(1, min(config.parallel_downloads, fits))


def capped_receive_buffer(config: Config) -> int | None:
    """SO_RCVBUF for each socket of a capped run, or None without a cap.

    The limiter paces what the program reads, but the kernel keeps accepting bytes until a socket's receive
    buffer is full, and on a fast link Linux grows that buffer to megabytes: at the start of a run every
    connection would fill its buffer at once, a burst of tens of MiB in the first second whatever the cap.
    A buffer of RECEIVE_BUFFER_S of the rate, shared among the connections (64 KiB to 4 MiB each), keeps that
    burst small; TCP's window then holds the server back. Not below 64 KiB: with 8 KiB buffers a loopback
    connection (its segments are 64 KiB) crawled at a twentieth of a 2MB/s cap, window probe by window probe;
    capped_connections keeps that floor within the share by opening fewer connections under a low cap.
    (The boto3 engine's sockets keep the kernel's.)
    """
    if not config.max_bandwidth:
        return None
    share = config.max_bandwidth * RECEIVE_BUFFER_S / config.parallel_downloads
    return int(min(4 * MiB, max(MIN_RECEIVE_BUFFER, share)))


class BandwidthLimiter:
    """The --max-bandwidth cap: one token bucket drawn on by every connection of the run, the worker threads'
    and the small-object loop's alike, so the cap holds however many connections are open.

    Readers reserve bytes before they read them, and a reservation may overdraw the bucket: the reader then
    waits until the overdraft is paid back at the cap's rate. So readers are served in the order they asked,
    the bytes read in any window of T seconds are at most rate * T + burst, and a short read gives back what
    it did not use. The burst is BURST_S of the rate, small enough that no one-second window exceeds the cap
    by more than a twentieth; reads are cut to that size too (``quantum``). Thread-safe; the clock is injected for
    tests. A run without a cap has no limiter at all: its reads take no lock.
    """

    #: Seconds of the rate the bucket holds: the largest burst above the cap.
    BURST_S = 0.05

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        #: Bytes per second.
        self.rate = float(rate)
        self.burst = max(1.0, self.rate * self.BURST_S)
        #: The most bytes one read reserves.
        self.quantum = max(1, int(self.burst))
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._stamp = clock()

    def reserve(self, amount: int) -> float:
        """Take ``amount`` bytes of the budget; returns the seconds to wait before reading them (0: now)."""
        with self._lock:
            now = self._clock()
            tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate) - amount
            self._tokens, self._stamp = tokens, now
        return -tokens / self.rate if tokens < 0 else 0.0

    def refund(self, amount: int) -> None:
        """Give back bytes reserved and not read (a short read, a body that ended)."""
        with self._lock:
            self._tokens += amount


class _LoopConnection:
    """One non-blocking keep-alive connection of the small-object loop, and the request it is serving."""

    __slots__ = ("body_length", "buffer", "closed", "deadline", "events", "headers", "idle_since", "key", "outgoing")
    __slots__ += ("planned", "reused", "sent_at", "sock", "status", "tls", "will_close")

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

    def expected(self) -> int:
        """Bytes still to come for the request it serves, for a bandwidth budget (a response head's ~1 KiB
        counted until the head has arrived)."""
        if self.planned is None:
            return 0
        if self.status is None:
            return self.planned.obj.size + KiB - len(self.buffer)
        return self.body_length - len(self.buffer)

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
        #: When the request began to be sent (time.monotonic()).
        self.sent_at = 0.0


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
        config: Config,
        stop: threading.Event,
        deliver: Callable[[Planned, Mapping[str, str], bytes], None],
        on_fallback: Callable[[Planned, BaseException | None], None],
        on_interrupted: Callable[[Planned], None],
        limiter: BandwidthLimiter | None = None,
    ) -> None:
        import select
        import selectors
        import socket
        import ssl

        self.engine = engine
        self.config = config
        self.stop = stop
        #: Takes each clean 200 (headers and whole body) to be verified and stored; it never raises.
        self.deliver = deliver
        #: Takes an object the loop gives up on, with the failure (None: fetch it afresh, no attempt counted).
        self.on_fallback = on_fallback
        #: Takes an object the loop ended because the run is stopping.
        self.on_interrupted = on_interrupted
        self.connections = self.config.parallel_downloads
        #: The run's bandwidth cap (None: none). The loop never sleeps per read: it reserves a budget for
        #: the bytes its connections still expect, and reads no socket until the budget is due.
        self.limiter = limiter
        #: Bytes reserved and due (the loop may read them), and when a reservation still waiting is due.
        self._budget = 0
        self._budget_due = 0.0
        self._receive_buffer = capped_receive_buffer(config)
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
        #: How long the GET of the object being delivered took: read by ``deliver``, which runs on this thread.
        self.seconds = 0.0
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
                if self.limiter is not None and self._hold(now, timeout):
                    continue
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

    def _hold(self, now: float, timeout: float) -> bool:
        """Under a bandwidth cap: reserve the bytes the connections still expect (at most a quantum) once the
        last budget is spent, and wait (on the wake socket only, at most ``timeout``) until it is due. True
        when the loop waited instead of reading: the connections' deadlines move on by the time held."""
        limiter = self.limiter
        assert limiter is not None
        if self._budget <= 0 and self._budget_due <= now:
            expected = sum(c.expected() for c in self._active)
            self._budget = min(limiter.quantum, max(1, expected))
            self._budget_due = now + limiter.reserve(self._budget)
        if self._budget_due <= now:
            return False
        readable, _, _ = self._select([self._wake_in], [], [], min(timeout, self._budget_due - now))
        if readable:
            with contextlib.suppress(OSError):
                while self._wake_in.recv(4096):
                    pass
        held = time.monotonic() - now
        for connection in self._active:
            connection.deadline += held
        return True

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
            get = object_request(obj, if_match=obj.etag or None, checksum_mode=self.config.verify_checksums)
            query, headers = list(get.query), dict(get.headers)
            path, target = request_target(address, obj.key, query)
            request = request_bytes("GET", target, self.engine.signed_headers(address, "GET", path, query, headers))
        except Exception as exc:  # credentials that fail to refresh, an ETag that is not latin-1, ...
            self._park(connection)
            self.on_fallback(planned, exc)
            return
        connection.planned = planned
        connection.outgoing = request
        connection.sent_at = time.monotonic()
        connection.deadline = connection.sent_at + self.config.read_timeout_s
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
            if self._receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
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
        limiter = self.limiter
        if limiter is not None and self._budget <= 0 and connection.planned is not None:
            connection.deadline = time.monotonic() + self.config.read_timeout_s  # readable: alive, held back
            return
        try:
            data = sock.recv(256 * KiB if limiter is None else min(256 * KiB, self._budget))
            while connection.tls and data and sock.pending():  # decrypted bytes select() cannot see
                data += sock.recv(sock.pending())
        except self._would_block:
            return
        except OSError as exc:
            self._broken(connection, exc)
            return
        if limiter is not None:
            self._budget -= len(data)
            if self._budget < 0:  # decrypted bytes past the budget (a TLS record): paid for by later readers
                limiter.reserve(-self._budget)
                self._budget = 0
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
        self.seconds = time.monotonic() - connection.sent_at
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
        """A whole response: deliver a 200, or hand the object over with what went wrong."""
        if status == 200:
            self.deliver(planned, headers, body)
            return
        answer = classify_response(status, headers, *parse_s3_error(body), what=planned.obj.key)
        # The threads' engine follows redirects and remembers the bucket's region: hand those over unfailed.
        self.on_fallback(planned, None if answer.kind == "redirect" else answer.error)

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
            self.on_interrupted(planned)
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
                self.on_interrupted(planned)
        for planned in self._connecting.values():
            self.on_interrupted(planned)
        self._connecting.clear()
        while self._queue:
            self.on_interrupted(self._queue.popleft())

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
    """The same requests through the shared boto3 client: correct everywhere boto3 is, at ~2 ms CPU a GET.

    Its client retries nothing itself (total_max_attempts 1): the run's retry policy is the only one.
    """

    supports_small_loop = False

    def __init__(self, client: Any, config: Config) -> None:
        self.client = client
        self.anonymous = config.no_sign_request
        self._extra = {"RequestPayer": config.request_payer} if config.request_payer else {}

    def _call(self, operation: Callable[..., Any], **params: Any) -> Any:
        import botocore.exceptions

        try:
            return operation(**params)
        except botocore.exceptions.ClientError as exc:
            response = exc.response
            error = response.get("Error", {})
            status, code = error_code(exc)
            headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            answer = classify_response(status, headers, code, error.get("Message", ""), "", params.get("Key", ""))
            raise answer.error or S3Error(status, code) from None

    def get(self, obj: S3Object, request: ObjectRequest) -> Response:
        return _Boto3Body(self._call(self.client.get_object, **boto3_params(obj, request)))

    def head(self, obj: S3Object, request: ObjectRequest) -> Mapping[str, str]:
        return self._call(self.client.head_object, **boto3_params(obj, request))["ResponseMetadata"]["HTTPHeaders"]

    def head_bucket(self, bucket: str) -> str | None:
        response = self._call(self.client.head_bucket, Bucket=bucket)
        return response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")

    def list_page(
        self, bucket: str, prefix: str, token: str | None, max_keys: int | None = None
    ) -> tuple[list[S3Object], str | None]:
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, **self._extra}
        if token:
            params["ContinuationToken"] = token
        if max_keys is not None:
            params["MaxKeys"] = max_keys
        page = self._call(self.client.list_objects_v2, **params)
        objects = [
            object_from_listing(bucket, entry)
            for entry in page.get("Contents", [])
            if not is_folder_marker(entry["Key"], int(entry.get("Size", 0)))
        ]
        return objects, page.get("NextContinuationToken") if page.get("IsTruncated") else None

    def list_level(
        self, bucket: str, prefix: str, token: str | None, start_after: str | None = None, delimiter: str = ""
    ) -> ListPage:
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, **self._extra}
        if delimiter:
            params["Delimiter"] = delimiter
        if token:
            params["ContinuationToken"] = token
        elif start_after:
            params["StartAfter"] = start_after
        page = self._call(self.client.list_objects_v2, **params)
        entries = page.get("Contents", [])
        return ListPage(
            [
                object_from_listing(bucket, entry)
                for entry in entries
                if not is_folder_marker(entry["Key"], int(entry.get("Size", 0)))
            ],
            [entry["Prefix"] for entry in page.get("CommonPrefixes", [])],
            page.get("NextContinuationToken") if page.get("IsTruncated") else None,
            entries[-1]["Key"] if entries else None,
        )

    def list_versions_page(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None, max_keys: int | None = None
    ) -> tuple[list[ObjectVersion], tuple[str, str] | None]:
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, **self._extra}
        if marker is not None:
            params["KeyMarker"], params["VersionIdMarker"] = marker
        if max_keys is not None:
            params["MaxKeys"] = max_keys
        page = self._call(self.client.list_object_versions, **params)
        entries = [
            ObjectVersion(
                dataclasses.replace(object_from_listing(bucket, entry), version_id=entry.get("VersionId") or "null"),
                deleted=False,
                latest=bool(entry.get("IsLatest")),
            )
            for entry in page.get("Versions", [])
        ]
        for entry in page.get("DeleteMarkers", []):
            modified = entry.get("LastModified")
            stamp = modified.timestamp() if modified is not None else 0.0
            obj = S3Object(bucket, entry["Key"], 0, "", stamp, version_id=entry.get("VersionId") or "null")
            entries.append(ObjectVersion(obj, deleted=True, latest=bool(entry.get("IsLatest"))))
        # botocore returns versions and delete markers as two lists: bring each key's entries together again
        entries.sort(key=lambda entry: entry.obj.key)
        truncated = page.get("IsTruncated")
        return entries, (page.get("NextKeyMarker", ""), page.get("NextVersionIdMarker", "")) if truncated else None

    def bucket_versioning(self, bucket: str) -> str | None:
        return self._call(self.client.get_bucket_versioning, Bucket=bucket, **self._extra).get("Status")

    def set_bucket_region(self, bucket: str, region: str | None) -> None:
        pass  # botocore follows region redirects itself

    def small_loop(self, *args: Any) -> None:
        return None  # the loop speaks HTTP itself; this engine's requests are botocore's

    def abort(self) -> None:
        pass  # urllib3's sockets are not ours to shut: a stalled read waits for read_timeout_s

    def close(self) -> None:
        pass


def make_engine(session: Any, clients: SharedClient, config: Config) -> Engine:
    """The GET engine for a run: the fast one unless the config or an HTTP proxy asks for boto3's."""
    choice = config.engine
    if choice == "auto":
        proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))
        choice = "boto3" if proxied else "http"
    if choice == "http":
        return HttpEngine(session, clients, config)
    return Boto3Engine(clients.get(), config)


def parse_s3_timestamp(text: str) -> float:
    """Seconds since the epoch from S3's ISO 8601 timestamps ('2026-11-26T07:32:03.000Z')."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        from botocore.utils import parse_timestamp

        return parse_timestamp(text).timestamp()


@dataclass(frozen=True, slots=True)
class ListPage:
    """One ListObjectsV2 page as the parallel listing needs it."""

    objects: list[S3Object]  #: folder markers left out
    prefixes: list[str]  #: CommonPrefixes, with a delimiter
    token: str | None  #: the next continuation token; None on the last page
    last_key: str | None  #: the page's last key, folder markers included (None: no keys)


def parse_list_objects_v2(bucket: str, body: bytes) -> tuple[list[S3Object], str | None]:
    """One ListObjectsV2 page -> (objects, continuation token or None). Folder markers are not files."""
    page = parse_list_level(bucket, body)
    return page.objects, page.token


def parse_list_level(bucket: str, body: bytes) -> ListPage:
    """One ListObjectsV2 page, common prefixes and last key included.

    Keys are URL-decoded when the server honoured encoding-type=url (as botocore does), which is how keys with
    characters XML 1.0 cannot carry come back intact. A page as S3 and its peers write it is scanned with
    str.find (scan_list_level); anything else goes to ElementTree.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    page = scan_list_level(bucket, text) if text else None
    return page if page is not None else parse_list_level_xml(bucket, body)


#: What scan_list_level leaves to ElementTree: CDATA, comments, processing instructions past the declaration,
#: and DOCTYPEs (entities it would have to expand).
_UNSCANNED = ("<![CDATA[", "<!--", "<!DOCTYPE", "<?xml-")


def _element(text: str, name: str, start: int = 0, end: int | None = None) -> str | None:
    """The text of the first ``<name>...</name>`` in text[start:end], unescaped; "" for ``<name/>``; None if absent."""
    opening = f"<{name}>"
    at = text.find(opening, start, end)
    if at < 0:
        return "" if text.find(f"<{name}/>", start, end) >= 0 else None
    at += len(opening)
    closing = text.find(f"</{name}>", at, end)
    if closing < 0:
        raise ValueError(name)
    return _unescape(text[at:closing])


def scan_list_level(bucket: str, text: str) -> ListPage | None:
    """parse_list_level without a parser, for the layout S3 writes (each element on its own, no markup but
    elements and character references): 5.4 us of CPU per key against 6.8 for ElementTree, objects included
    (issue 13: listing a million keys must be bound by the server, not by us). None for anything else, which
    ElementTree then reads."""
    if "<ListBucketResult" not in text or any(mark in text for mark in _UNSCANNED):
        return None
    try:
        decode = _element(text, "EncodingType") == "url"
        unquote, timestamp = urllib.parse.unquote_plus, parse_s3_timestamp
        objects, last_key = [], None
        for entry in text.split("<Contents>")[1:]:
            end = entry.find("</Contents>")
            at = entry.find("<Key>", 0, end) + 5
            key = entry[at : entry.find("</Key>", at, end)]
            at = entry.find("<Size>", 0, end) + 6
            size = int(entry[at : entry.find("</Size>", at, end)])
            at = entry.find("<ETag>", 0, end) + 6
            etag = entry[at : entry.find("</ETag>", at, end)]
            at = entry.find("<LastModified>", 0, end) + 14
            modified = entry[at : entry.find("</LastModified>", at, end)]
            at = entry.find("<StorageClass>", 0, end)
            storage = entry[at + 14 : entry.find("</StorageClass>", at, end)] if at >= 0 else "STANDARD"
            if end < 0 or not (key and etag and modified) or "<" in key + etag + modified + storage:
                return None  # an element missing or out of place: not the layout this scan reads
            if "&" in key + etag + storage:
                key, etag, storage = (_unescape(value) for value in (key, etag, storage))
            if decode:
                key = unquote(key)
            last_key = key
            if not is_folder_marker(key, size):
                objects.append(S3Object(bucket, key, size, etag.strip('"'), timestamp(modified), storage or "STANDARD"))
        prefixes = []
        for entry in text.split("<CommonPrefixes>")[1:]:
            prefix = _element(entry, "Prefix", 0, entry.find("</CommonPrefixes>"))
            if prefix is None:
                return None
            prefixes.append(unquote(prefix) if decode else prefix)
        truncated = (_element(text, "IsTruncated") or "").lower() == "true"
        token = (_element(text, "NextContinuationToken") or None) if truncated else None
    except ValueError:  # a size that is no number, an element left open: ElementTree says what is wrong
        return None
    return ListPage(objects, prefixes, token, last_key)


def _unescape(value: str) -> str:
    """XML's five entities and character references, as an XML parser expands them. html is imported only for a
    value that has one: its import (~2.5 ms) is a fiftieth of the start-up, and most listings escape nothing."""
    if "&" not in value:
        return value
    from html import unescape

    return unescape(value)


def parse_list_level_xml(bucket: str, body: bytes) -> ListPage:
    """parse_list_level with ElementTree: any well-formed page."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    decode = root.findtext(f"{ns}EncodingType") == "url"
    objects = []
    last_key = None
    for entry in root.iterfind(f"{ns}Contents"):
        key = entry.findtext(f"{ns}Key") or ""
        if decode:
            key = urllib.parse.unquote_plus(key)
        last_key = key
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
    prefixes = [entry.findtext(f"{ns}Prefix") or "" for entry in root.iterfind(f"{ns}CommonPrefixes")]
    if decode:
        prefixes = [urllib.parse.unquote_plus(prefix) for prefix in prefixes]
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    token = (root.findtext(f"{ns}NextContinuationToken") or None) if truncated else None
    return ListPage(objects, prefixes, token, last_key)


def parse_list_object_versions(bucket: str, body: bytes) -> tuple[list[ObjectVersion], tuple[str, str] | None]:
    """One ListObjectVersions page -> (versions and delete markers, next (key, version id) marker or None).

    S3 interleaves Version and DeleteMarker elements newest first within each key; some servers (moto) send
    all versions, then all delete markers. The entries are sorted by key (stably, so S3's own order within a
    key survives), which brings each key's entries together either way. Folder markers are kept here:
    whether a key existed at a moment is decided before what it is (versions_as_of).
    """
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    decode = root.findtext(f"{ns}EncodingType") == "url"
    entries = []
    for entry in root:
        deleted = entry.tag == f"{ns}DeleteMarker"
        if not deleted and entry.tag != f"{ns}Version":
            continue
        key = entry.findtext(f"{ns}Key") or ""
        if decode:
            key = urllib.parse.unquote_plus(key)
        modified = entry.findtext(f"{ns}LastModified")
        obj = S3Object(
            bucket=bucket,
            key=key,
            size=int(entry.findtext(f"{ns}Size") or 0),
            etag=(entry.findtext(f"{ns}ETag") or "").strip('"'),
            last_modified=parse_s3_timestamp(modified) if modified else 0.0,
            storage_class=entry.findtext(f"{ns}StorageClass") or "STANDARD",
            version_id=entry.findtext(f"{ns}VersionId") or "null",
        )
        entries.append(ObjectVersion(obj, deleted, (entry.findtext(f"{ns}IsLatest") or "").lower() == "true"))
    entries.sort(key=lambda entry: entry.obj.key)
    if (root.findtext(f"{ns}IsTruncated") or "").lower() != "true":
        return entries, None
    key_marker = root.findtext(f"{ns}NextKeyMarker") or ""
    if decode:
        key_marker = urllib.parse.unquote_plus(key_marker)
    return entries, (key_marker, root.findtext(f"{ns}NextVersionIdMarker") or "")


def parse_bucket_versioning(body: bytes) -> str | None:
    """The Status of a GetBucketVersioning answer; None when absent (versioning was never enabled)."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    return root.findtext(f"{ns}Status") or None


###############################################################################
# Retries
###############################################################################
# One policy for every request the run makes: engines send a request once, and the caller wraps it in an
# Attempts. A transient fault (is_retryable) is retried at the level of the request it hit and nowhere else:
# with retry_attempts N, a listing page, a HEAD, a bucket probe, a whole-object GET or one part's GET is tried
# at most N+1 times (a resumed body counts as a try). botocore retries nothing itself. A checksum mismatch or an
# object replaced mid-download is no request fault: Transfer.download starts that object over, at most N times.

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
    if isinstance(exc, (ChecksumMismatch, TimeoutError, ConnectionError)):
        return True
    http_client = loaded_module("http.client")
    if http_client is not None and isinstance(exc, http_client.HTTPException):
        return True
    if isinstance(exc, S3Error):
        return exc.status >= 500 or exc.status == 429 or exc.code in RETRYABLE_CODES
    if isinstance(exc, (DiskFull, Interrupted, ObjectChanged, UnsafeKeyError)):
        return False
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)):
        return False  # a local path conflict (raised with errno None) is no network fault: retrying cannot cure it
    boto_errors, urllib3_errors = loaded_module("botocore.exceptions"), loaded_module("urllib3.exceptions")
    if boto_errors is not None and isinstance(exc, (boto_errors.ConnectionError, boto_errors.IncompleteReadError)):
        return True
    if urllib3_errors is not None and isinstance(exc, urllib3_errors.HTTPError):
        return True
    response_streaming = getattr(boto_errors, "ResponseStreamingError", None)
    if response_streaming is not None and isinstance(exc, response_streaming):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, None)


def cannot_connect(exc: BaseException) -> str | None:
    """Why no connection could be opened at all (nothing listening, no such host), or None. Unlike a fault of
    one request, waiting long rarely cures it: the first contact of a run gives it a few seconds only."""
    import socket

    boto_errors = loaded_module("botocore.exceptions")
    endpoint_error = boto_errors is not None and isinstance(exc, boto_errors.EndpointConnectionError)
    if endpoint_error:
        exc = exc.kwargs.get("error") or exc  # type: ignore[attr-defined]
        exc = getattr(exc, "__context__", None) or exc  # urllib3 wraps the socket's error
    if isinstance(exc, ConnectionRefusedError) or "Connection refused" in str(exc):
        return "connection refused"
    if isinstance(exc, socket.gaierror) or "Name or service not known" in str(exc):
        return "host name not found"
    if endpoint_error:
        return "cannot connect"
    return None


def failure_reason(exc: BaseException) -> str:
    """The user's words for a final failure, grouped in the summary."""
    if isinstance(exc, UnsafeKeyError):
        return str(exc)
    if isinstance(exc, ChecksumMismatch):
        return "checksum mismatch"
    if isinstance(exc, S3Error):
        if is_denied(exc.status, exc.code):
            return "access denied"
        if is_missing(exc.status, exc.code):
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


class Attempts:
    """The tries of one request: a transient fault gets up to retry_attempts more, after a full-jitter backoff.

    Each retry is logged at INFO with what was asked, the attempt, the reason and the wait; a stop during the
    wait ends the request as Interrupted.
    """

    def __init__(
        self, what: str, config: Config, stop: threading.Event | None = None, connect_wait_s: float | None = None
    ) -> None:
        #: What the request is for, in the retry log line ("bucket/key", "listing of bucket").
        self.what = what
        self.limit = config.retry_attempts
        self.backoff_s = config.retry_backoff_s
        self.stop = stop
        #: Failed tries so far.
        self.failures = 0
        #: Seconds of waiting allowed for tries that could not connect at all (None: as for any fault).
        self.connect_wait_s = connect_wait_s

    def failed(self, exc: BaseException) -> None:
        """Return after the backoff when another try may cure ``exc``; otherwise raise it."""
        if not self.another(exc):
            raise exc

    def another(self, exc: BaseException) -> bool:
        """Count a failure: True after the backoff when another try may cure it, False when none is left."""
        self.failures += 1
        if self.failures > self.limit or not is_retryable(exc):
            return False
        delay = backoff_delay(self.failures - 1, self.backoff_s)
        if self.connect_wait_s is not None and cannot_connect(exc):
            if self.connect_wait_s <= 0:
                return False
            delay = min(delay, self.connect_wait_s)
            self.connect_wait_s -= delay
        log.info(
            "Retrying %s (attempt %d of %d) after %s; waiting %.2fs",
            self.what,
            self.failures + 1,
            self.limit + 1,
            failure_reason(exc),
            delay,
        )
        if self.stop is None:
            time.sleep(delay)
        elif self.stop.wait(delay):
            raise Interrupted()
        return True

    def call(self, request: Callable[[], T]) -> T:
        """Make the request until it succeeds or fails for good."""
        while True:
            try:
                return request()
            except (ObjectChanged, DiskFull, Interrupted):
                raise
            except Exception as exc:
                self.failed(exc)


###############################################################################
# Bucket discovery
###############################################################################
# With no buckets named we list the account's and probe each, so one denied bucket costs a warning, not the run.


@dataclass(frozen=True, slots=True)
class BucketProblem:
    """A bucket we cannot download from, and why, in the user's words."""

    bucket: str
    reason: str
    #: The bucket does not exist (a typo, usually), as opposed to one that exists but cannot be read.
    missing: bool = False


def bucket_problem(bucket: str, exc: BaseException, anonymous: bool, denied: bool = False) -> BucketProblem:
    """What a failed request on ``bucket`` means, in the user's words; CredentialsError when the keys are at fault.

    ``denied`` says a bare 403 was already seen (a HEAD has no error body to say more).
    """
    problem = credentials_problem(exc)
    if problem:
        raise CredentialsError(problem) from None
    status, code = error_code(exc)
    if not denied and is_missing(status, code):
        return BucketProblem(bucket, f"bucket '{bucket}' does not exist", missing=True)
    if denied or is_denied(status, code):
        reason = f"Access Denied for bucket '{bucket}'"
        if anonymous:
            reason += " (the request was anonymous: the bucket is not public; drop --no-sign-request)"
        return BucketProblem(bucket, reason)
    return BucketProblem(bucket, f"bucket '{bucket}' cannot be read: {code or status}")


def probe_bucket(
    engine: Engine, bucket: str, attempts: Callable[[str], Attempts]
) -> tuple[str | None, BucketProblem | None]:
    """Check one bucket is readable; returns (its region if known, None) or (None, the problem).

    A HEAD first. A HEAD answer has no body, so a wrong secret key and a denied bucket are the same bare 403
    (on AWS and SeaweedFS alike); a zero-key listing's error body tells them apart, and a bucket that can be
    listed, which is all a download needs, is readable.
    """
    try:
        try:
            return attempts(f"request on bucket {bucket}").call(lambda: engine.head_bucket(bucket)), None
        except S3Error as exc:
            if exc.status == 301 and exc.region:
                return exc.region, None
            if not is_denied(exc.status, exc.code):
                return None, bucket_problem(bucket, exc, engine.anonymous)
        try:
            attempts(f"listing of {bucket}").call(lambda: engine.list_page(bucket, "", None, max_keys=0))
        except S3Error as exc:
            return None, bucket_problem(bucket, exc, engine.anonymous, denied=True)
        return None, None
    except (S3Error, DownloaderError, Interrupted):
        raise
    except Exception as exc:
        raise unreachable(exc, f"cannot reach S3 for bucket '{bucket}'") from None


def unreachable(exc: BaseException, what: str) -> Exception:
    """The error for a request that failed for good without an answer: credentials, or the network."""
    problem = credentials_problem(exc)
    if problem:
        return CredentialsError(problem)
    reason = cannot_connect(exc)
    if reason:
        return CannotConnectError(reason)
    boto_errors = loaded_module("botocore.exceptions")
    if is_retryable(exc) or (boto_errors is not None and isinstance(exc, boto_errors.BotoCoreError)):
        return DownloaderError(f"{what}: {exc}")
    return exc  # a bug: let it show as one


def account_buckets(client: Any, attempts: Callable[[str], Attempts]) -> list[str]:
    """The account's buckets (ListBuckets), for a run that names none."""
    import botocore.exceptions

    try:
        response = attempts("listing buckets").call(client.list_buckets)
    except botocore.exceptions.ClientError as exc:
        problem = credentials_problem(exc)
        if problem:
            raise CredentialsError(problem) from None
        if is_denied(*error_code(exc)):
            raise NothingAccessibleError(
                "Access Denied for listing buckets; name the buckets to download with --buckets"
            ) from None
        raise DownloaderError(f"cannot list buckets: {exc}") from None
    except (DownloaderError, Interrupted):
        raise
    except Exception as exc:
        raise unreachable(exc, "cannot list buckets") from None
    return [entry["Name"] for entry in response.get("Buckets", [])]


def discover_buckets(
    engine: Engine, names: Sequence[str], attempts: Callable[[str], Attempts]
) -> tuple[list[str], list[BucketProblem]]:
    """Probe each bucket once: the readable ones, and why the others cannot be read; regions learned on the way
    are handed to the engine."""
    accessible: list[str] = []
    problems: list[BucketProblem] = []
    for name in dict.fromkeys(names):
        region, problem = probe_bucket(engine, name, attempts)
        if problem:
            problems.append(problem)
        else:
            accessible.append(name)
            engine.set_bucket_region(name, region)
    return accessible, problems


###############################################################################
# Streaming listing
###############################################################################
# ListObjectsV2 pages feed the workers as they arrive, so the first download starts after the first page and
# memory stays flat however large the bucket is.


# The records made once per listed key (S3Object, Planned, DownloadResult) are treated as frozen but are not
# declared so: a frozen dataclass's __init__ sets each field through object.__setattr__, which cost 1.1 us per
# S3Object, ~1 us per Planned and ~2 us per DownloadResult, a quarter of the planner's time per key on an
# inventory of a million rows (benchmarks/inventory_plan.py: 128,000 -> 165,000 rows/s). They keep their
# hash (unsafe_hash) and nothing assigns to them; make a changed copy with dataclasses.replace.


@dataclass(slots=True, unsafe_hash=True)  # frozen in all but name: see above S3Object
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


def object_from_head(obj: S3Object, headers: Mapping[str, str]) -> S3Object:
    """The object as a HEAD answer describes it now (a new version: size, ETag and date may all differ)."""
    import email.utils  # ~5 ms to import, and a run that HEADs no object never needs it

    return dataclasses.replace(
        obj,
        size=int(headers["content-length"]),
        etag=headers.get("etag", "").strip('"'),
        last_modified=email.utils.parsedate_to_datetime(headers["last-modified"]).timestamp(),
    )


def list_pages(
    engine: Engine, bucket: str, prefix: str, attempts: Callable[[str], Attempts]
) -> Iterator[list[S3Object]]:
    """The objects under a prefix, a page at a time; each page request gets its own tries."""
    token: str | None = None
    while True:
        objects, token = attempts(f"listing of {bucket}").call(
            lambda token=token: engine.list_page(bucket, prefix, token)  # type: ignore[misc]
        )
        if objects:
            yield objects
        if not token:
            return


# -- parallel listing -----------------------------------------------------------------------------------------
# One ListObjectsV2 stream is one page per round trip. A prefix of more than one page is split along its
# sub-prefixes (delimiter "/"), and runs of them are listed at once. Every key comes from exactly one request:
# the first page holds the keys up to its last key L; after L, the delimiter listing gives the keys directly
# under the prefix, and each run of sub-prefixes is one flat range [first, past last) that keeps only keys in
# them; a range that is itself more than a page narrows to the sub-prefix holding its last key (split again,
# the same way) and hands the rest of its run back as a new range, so one huge folder never holds up the others.


@dataclass(frozen=True, slots=True)
class _ListJob:
    """One piece of a parallel listing."""

    kind: str  #: "prefix": every key under ``prefix`` after ``after``; "range": those under ``runs``
    prefix: str
    after: str | None = None  #: list only keys after this one
    #: For kind "range": the sub-prefixes of ``prefix`` (sorted, contiguous in the listing) whose keys it lists.
    runs: tuple[str, ...] = ()


def sub_prefix_of(prefix: str, key: str) -> str | None:
    """The sub-prefix (up to and including the next "/") of ``prefix`` that holds ``key``; None for a key
    directly under it."""
    rest = key[len(prefix) :]
    slash = rest.find("/")
    return None if slash < 0 else prefix + rest[: slash + 1]


def in_s3_order(prefix: str, after: str, subs: list[str]) -> bool:
    """Whether ``subs`` are sub-prefixes one level below ``prefix``, ascending byte by byte, all after ``after``:
    what a delimiter listing in S3's order gives, and what ranges of sub-prefixes rely on."""
    return all(sub_prefix_of(prefix, sub) == sub and sub > low for low, sub in zip([after, *subs], subs, strict=False))


def past(sub_prefix: str) -> str:
    """The smallest string above every key under ``sub_prefix`` (which ends in "/"; "0" follows "/")."""
    return sub_prefix[:-1] + "0"


class ParallelListing:
    """The keys under one prefix of one bucket, listed by up to ``concurrency`` threads at once, a page at a time.

    Iterate it once; pages come as they are listed, in no particular order, through a bounded queue, so memory
    stays flat. Closing it (or leaving the loop early, or an error) stops and joins its threads; an error of a
    request (after its own tries) ends the iteration with that error, as a sequential listing would.
    """

    def __init__(
        self,
        engine: Engine,
        bucket: str,
        prefix: str,
        attempts: Callable[[str], Attempts],
        concurrency: int,
    ) -> None:
        import queue

        self.engine, self.bucket, self.prefix, self.attempts = engine, bucket, prefix, attempts
        self.concurrency = concurrency
        self._pages: queue.Queue[list[S3Object] | None] = queue.Queue(maxsize=2 * concurrency)
        self._jobs: collections.deque[_ListJob] = collections.deque([_ListJob("prefix", prefix)])
        self._cond = threading.Condition()
        #: Jobs queued or running; the listing is complete when it is back to 0.
        self._pending = 1
        self._error: BaseException | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []

    def __iter__(self) -> Iterator[list[S3Object]]:
        self._threads = [
            threading.Thread(target=self._work, name=f"adl-list-{n}", daemon=True) for n in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        try:
            while (page := self._pages.get()) is not None:
                yield page
            if self._error is not None:
                raise self._error
        finally:
            self.close()

    def close(self) -> None:
        """Stop the threads (a page being fetched is finished and dropped) and wait for them."""
        import queue

        with self._cond:
            self._closed = True
            self._cond.notify_all()
        while any(thread.is_alive() for thread in self._threads):
            try:
                while True:
                    self._pages.get_nowait()
            except queue.Empty:
                pass
            for thread in self._threads:
                thread.join(0.05)

    # -- the threads --------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and self._pending and not self._closed:
                    self._cond.wait()
                if self._closed or not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                self._run(job)
            except BaseException as exc:  # the request's own tries are spent (or the run stops)
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._jobs.clear()
                    self._pending = 0
                    self._cond.notify_all()
                self._put(None)
                return
            with self._cond:
                self._pending -= 1
                done = self._pending == 0
                self._cond.notify_all()
            if done:
                self._put(None)

    def _add(self, job: _ListJob) -> None:
        with self._cond:
            self._jobs.append(job)
            self._pending += 1
            self._cond.notify()

    def _put(self, page: list[S3Object] | None) -> None:
        import queue

        while not self._closed:
            try:
                self._pages.put(page, timeout=0.1)
                return
            except queue.Full:
                continue

    def _page(self, prefix: str, token: str | None, after: str | None, delimiter: str = "") -> ListPage:
        if self._closed:
            raise Interrupted()
        return self.attempts(f"listing of {self.bucket}").call(
            lambda: self.engine.list_level(self.bucket, prefix, token, after, delimiter)
        )

    def _run(self, job: _ListJob) -> None:
        if job.kind == "range":
            self._range(job)
            return
        page = self._page(job.prefix, None, job.after)
        if page.objects:
            self._put(page.objects)
        if page.token and page.last_key is not None:
            self._split(job.prefix, page.last_key)

    def _split(self, prefix: str, last: str) -> None:
        """The keys under ``prefix`` after ``last``: those directly under it from a delimiter listing, those in
        its sub-prefixes by ranges of them; the sub-prefix holding ``last`` on its own, after ``last``.

        Ranges need S3's order: sub-prefixes after ``last``, each a level below ``prefix``, ascending from page to
        page. SeaweedFS 4.48 breaks it two ways: after a key inside a folder it names the folders inside that one,
        and it lists a folder where its name sorts ("q/" before "q!ab/", whose keys sort first byte by byte). A
        page out of that order ends the split there: the rest is listed page after page, without what the pages
        before it handed out."""
        holding = sub_prefix_of(prefix, last)
        token: str | None = None
        covered: set[str] = set()  # the sub-prefixes handed out as ranges
        direct: str | None = None  # the last key directly under ``prefix`` put
        bound = last
        while True:
            page = self._page(prefix, token, last, "/")
            runs = [sub for sub in page.prefixes if sub != holding]
            if not in_s3_order(prefix, bound, runs):
                self._in_order(prefix, last, None if token is None else (holding, covered, direct))
                return
            if token is None and holding is not None:
                self._add(_ListJob("prefix", holding, last))
            if page.objects:
                self._put(page.objects)
                direct = page.objects[-1].key
            if runs:
                covered.update(runs)
                bound = runs[-1]
            step = max(1, -(-len(runs) // (2 * self.concurrency)))
            for start in range(0, len(runs), step):
                self._add(_ListJob("range", prefix, None, tuple(runs[start : start + step])))
            token = page.token
            if not token:
                return

    def _in_order(self, prefix: str, last: str, handed: tuple[str | None, set[str], str | None] | None) -> None:
        """The keys under ``prefix`` after ``last``, page after page; without, when ``handed`` names them, the keys
        a split already handed out: those in the sub-prefix holding ``last``, in the sub-prefixes given to ranges,
        and those directly under ``prefix`` up to the last one put (a folder's own keys keep S3's order
        everywhere)."""
        token: str | None = None
        while True:
            page = self._page(prefix, token, last)
            objects = page.objects
            if handed is not None and objects:
                objects = [obj for obj in objects if not self._handed_out(prefix, obj.key, *handed)]
            if objects:
                self._put(objects)
            token = page.token
            if not token:
                return

    @staticmethod
    def _handed_out(prefix: str, key: str, holding: str | None, covered: set[str], direct: str | None) -> bool:
        sub = sub_prefix_of(prefix, key)
        if sub is None:
            return direct is not None and key <= direct
        return sub == holding or sub in covered

    def _range(self, job: _ListJob) -> None:
        """A run of sub-prefixes, listed flat from the first to past the last: the first request by the first
        sub-prefix itself, the next ones after the last key seen (start-after is only ever a real key: SeaweedFS
        4.48 skips whatever starts with a start-after that is no key). A run of more than a page keeps its first
        page, lists the sub-prefix holding that page's last key as a prefix of its own (split again if it is
        large) and hands the rest of the run back as a new range."""
        runs, prefix = job.runs, job.prefix
        low, high = runs[0], past(runs[-1])
        page = self._page(low, None, None)
        if page.objects:
            self._put(page.objects)
        last = page.last_key
        if last is None:
            if len(runs) > 1:
                self._add(_ListJob("range", prefix, None, runs[1:]))
            return
        if page.token:  # the first sub-prefix alone is more than a page: split it, and the rest of the run apart
            if len(runs) > 1:
                self._add(_ListJob("range", prefix, None, runs[1:]))
            self._split(low, last)
            return
        if len(runs) == 1:
            return
        page = self._page(prefix, None, last)
        kept = [obj for obj in page.objects if obj.key < high and "/" in obj.key[len(prefix) :]]
        if kept:
            self._put(kept)
        last = page.last_key
        if not page.token or last is None or last >= high:
            return
        holding = sub_prefix_of(prefix, last)
        rest = tuple(sub for sub in runs if sub > last and sub != holding)
        if rest:
            self._add(_ListJob("range", prefix, None, rest))
        if holding is not None and holding in runs:
            self._add(_ListJob("prefix", holding, last))


# -- the dataset as it was (--as-of) ------------------------------------------------------------------------
# A versioned bucket keeps every version and every delete: ListObjectVersions lists them, keys in order and each
# key's entries newest first, and the key as it stood at a moment is its newest entry from before it.


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One entry of a version listing: a version of a key, or a delete marker."""

    obj: S3Object  #: with its version id ("null" for one written while versioning was off); a delete marker's
    #: size is 0 and its ETag empty
    deleted: bool  #: a delete marker: the key did not exist from this entry's LastModified on
    latest: bool = False  #: IsLatest: the key's newest entry (decides a tie of dates, see versions_as_of)


#: The filtered-count labels of keys --as-of leaves out because they did not exist at that moment.
CREATED_AFTER = "created after --as-of"
DELETED_AT = "deleted at --as-of"


def versions_as_of(
    pages: Iterable[list[ObjectVersion]], moment: float, absent: Counter[str]
) -> Iterator[list[S3Object]]:
    """Each key as it stood at ``moment`` (seconds since the epoch), one page of objects per page listed.

    A key's state is its newest entry with LastModified <= moment, inclusive. Dates can tie (S3's have
    milliseconds, SeaweedFS's and moto's whole seconds): then the key's latest entry (IsLatest) wins, else the
    one listed first, as S3 lists a key's entries newest first. A key whose state is a delete marker, or
    that has no entry that old, did not exist then: it is counted in ``absent`` and left out. The entries of one
    key may span pages, so the key being read is carried to the next page; nothing else is held.
    """
    key: str | None = None
    chosen: ObjectVersion | None = None

    def settle(objects: list[S3Object]) -> None:
        if chosen is None:
            absent[CREATED_AFTER] += 1
        elif chosen.deleted:
            absent[DELETED_AT] += 1
        elif not is_folder_marker(chosen.obj.key, chosen.obj.size):
            objects.append(chosen.obj)

    for page in pages:
        objects: list[S3Object] = []
        for entry in page:
            if entry.obj.key != key:
                if key is not None:
                    settle(objects)
                key, chosen = entry.obj.key, None
            when = entry.obj.last_modified
            if when <= moment and (
                chosen is None or when > chosen.obj.last_modified or (when == chosen.obj.last_modified and entry.latest)
            ):
                chosen = entry
        if objects:
            yield objects
    if key is not None:
        last: list[S3Object] = []
        settle(last)
        if last:
            yield last


def version_pages(
    engine: Engine, bucket: str, prefix: str, attempts: Callable[[str], Attempts]
) -> Iterator[list[ObjectVersion]]:
    """The versions and delete markers under a prefix, a page at a time; each page request gets its own tries."""
    marker: tuple[str, str] | None = None
    while True:
        entries, marker = attempts(f"version listing of {bucket}").call(
            lambda marker=marker: engine.list_versions_page(bucket, prefix, marker)  # type: ignore[misc]
        )
        if entries:
            yield entries
        if marker is None:
            return


def parse_as_of(text: str) -> float:
    """Seconds since the epoch of a config's as_of (check_value has made it ISO 8601 with a zone)."""
    return datetime.datetime.fromisoformat(text).timestamp()


def require_versioning(engine: Engine, bucket: str, attempts: Callable[[str], Attempts]) -> None:
    """Refuse --as-of on a bucket that was never versioned: it keeps no past, only what is there now.

    A suspended bucket still holds the versions written while versioning was on (and "null" ones since).
    Without permission to ask (s3:GetBucketVersioning), the versions are listed anyway, with a warning.
    """
    try:
        status = attempts(f"versioning of {bucket}").call(lambda: engine.bucket_versioning(bucket))
    except S3Error as exc:
        if not is_denied(exc.status, exc.code):
            raise DownloaderError(f"reading the versioning of bucket '{bucket}' failed: {exc.code}") from None
        log.warning("Cannot read whether bucket '%s' is versioned (access denied); listing its versions", bucket)
        return
    if status is None:
        raise ConfigError(
            f"bucket '{bucket}' is not versioned, so --as-of has no past to read: leave out --as-of, or enable "
            "versioning on it (only later changes are kept)"
        )


###############################################################################
# Inventory listing
###############################################################################
# --inventory takes the listing from an S3 Inventory report instead of ListObjectsV2: for a bucket of millions of
# keys, a few GETs of its data files replace thousands of listing pages. The report is laid out as the S3 user
# guide documents it: manifest.json (sourceBucket, destinationBucket, fileFormat, fileSchema, and its data files
# with their MD5s), manifest.checksum (the MD5 of manifest.json), and the data files, all in the destination
# bucket. Each data file is fetched whole into a temporary file and its MD5 checked before one of its rows is read
# (an MD5 is known only at a file's end), so a damaged file mixes nothing into the run; its rows then stream out
# a page at a time, so memory stays flat however large the inventory is.

#: Objects per page an inventory yields: a listing page's worth, so the workers start as soon as with a listing.
INVENTORY_PAGE = 1000
#: The failure reason of an object whose ETag no longer matches the inventory's (If-Match failed).
CHANGED_SINCE_INVENTORY = "changed since the inventory"
#: The note on an object that changed since the inventory and was fetched as it is now (inventory_fetch_changed).
CHANGED_FETCHED = "changed since the inventory; fetched as it is now"
#: The failure reason of an object (or version) the inventory lists and the bucket no longer has.
MISSING_SINCE_INVENTORY = "missing since the inventory"
#: Fields a run cannot do without: sizes plan the disk and the parts, ETags verify the bytes and detect changes.
INVENTORY_NEEDED_FIELDS = ("key", "size", "etag", "lastmodifieddate")


@dataclass(frozen=True, slots=True)
class InventoryFile:
    """One data file of an inventory, as its manifest lists it."""

    key: str  #: in the destination bucket
    size: int
    md5: str  #: hex, lower-case


@dataclass(frozen=True, slots=True)
class InventoryManifest:
    """What manifest.json says about one inventory report."""

    url: str  #: the manifest as the user named it
    source_bucket: str  #: the bucket the inventory lists: the one objects are fetched from
    destination_bucket: str  #: where the manifest and the data files are
    file_format: str  #: "CSV", "Parquet" or "ORC"
    #: fileSchema's field names, normalised by inventory_field: for CSV, the columns in order.
    fields: tuple[str, ...]
    files: tuple[InventoryFile, ...]


def parse_s3_url(url: str) -> tuple[str, str] | None:
    """(bucket, key) of 's3://bucket/key', or None when ``url`` is not one. Split by hand, not by urlsplit: a key
    may hold '#' or '?', which are no fragment or query here, as in aws-cli's s3:// paths."""
    if not url.startswith("s3://"):
        return None
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/"):
        return None
    return bucket, key


def inventory_field(name: str) -> str:
    """One spelling for a field in every format: CSV's fileSchema says 'LastModifiedDate' and 'ETag', Parquet's
    columns 'last_modified_date' and 'e_tag'."""
    return name.strip().replace("_", "").lower()


def parse_inventory_manifest(text: bytes, url: str) -> InventoryManifest:
    """manifest.json -> InventoryManifest; a ConfigError naming the URL for anything this run cannot use."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"inventory {url}: {what}")

    try:
        data = json.loads(text)
        source = str(data["sourceBucket"])
        destination = str(data["destinationBucket"]).removeprefix("arn:aws:s3:::")
        file_format = str(data["fileFormat"])
        schema = str(data["fileSchema"])
        files = tuple(
            InventoryFile(str(entry["key"]), int(entry["size"]), str(entry["MD5checksum"]).lower())
            for entry in data["files"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise bad(
            "not an S3 Inventory manifest.json (needs sourceBucket, destinationBucket, fileFormat, "
            "fileSchema and files)"
        ) from None
    file_format = {"CSV": "CSV", "PARQUET": "Parquet", "ORC": "ORC"}.get(file_format.upper(), file_format)
    if file_format == "ORC":
        raise bad("ORC inventories are not supported; configure the inventory as CSV or Parquet")
    if file_format not in ("CSV", "Parquet"):
        raise bad(f"unknown fileFormat {file_format!r} (CSV or Parquet)")
    # a Parquet schema is a 'message s3.inventory { required binary bucket (UTF8); ... }' text: each field's name
    # is the last word before its annotation
    declarations = (piece.split("(")[0].split() for piece in schema.partition("{")[2].split(";"))
    parquet_names = [words[-1] for words in declarations if words and words[-1].isidentifier()]
    names = parquet_names if file_format == "Parquet" else schema.split(",")
    fields = tuple(inventory_field(name) for name in names)
    missing = [name for name in INVENTORY_NEEDED_FIELDS if name not in fields]
    if missing:
        spelled = {"key": "Key", "size": "Size", "etag": "ETag", "lastmodifieddate": "LastModifiedDate"}
        raise bad(
            f"the inventory has no {', '.join(spelled[m] for m in missing)} field; add "
            f"{'it' if len(missing) == 1 else 'them'} to the inventory configuration's optional fields"
        )
    return InventoryManifest(url, source, destination, file_format, fields, files)


def inventory_objects_csv(
    lines: Iterable[str], manifest: InventoryManifest, left_out: Counter[str]
) -> Iterator[S3Object]:
    """The objects of one CSV data file's rows: no header, every field quoted, keys URL-encoded (as the guide
    says; unquote_plus, as for a url-encoded listing, since a '+' in a key is stored as %2B).

    Only objects as they were at the inventory's time are kept: a delete marker, or a version that was not the
    latest, is counted in ``left_out`` instead (a versioned inventory lists every version of every key).
    """
    import csv

    column = {name: index for index, name in enumerate(manifest.fields)}
    key_at, size_at, etag_at, date_at = (column[name] for name in INVENTORY_NEEDED_FIELDS)
    version_at, latest_at = column.get("versionid"), column.get("islatest")
    marker_at, class_at = column.get("isdeletemarker"), column.get("storageclass")
    bucket, unquote, timestamp = manifest.source_bucket, urllib.parse.unquote_plus, parse_s3_timestamp
    # Decoding is most of a row's cost (~4 us of ~7): keys share their folders, so each folder is decoded once.
    folders: dict[str, str] = {}
    # S3 dates are to the second, and keys uploaded together (in key order, as sync tools upload) share theirs:
    # a row repeating the row before's date costs no parse (0.4 us, a tenth of a row's ~4 us).
    date, when = "", 0.0
    for row in csv.reader(lines):
        if marker_at is not None and row[marker_at] == "true":
            left_out["delete marker"] += 1
            continue
        if latest_at is not None and row[latest_at] == "false":
            left_out["noncurrent version"] += 1
            continue
        folder, slash, name = row[key_at].rpartition("/")
        decoded = folders.get(folder)
        if decoded is None:
            if len(folders) > 100_000:  # flat memory, whatever the layout
                folders.clear()
            decoded = folders[folder] = unquote(folder)
        key = decoded + slash + (unquote(name) if "%" in name or "+" in name else name)
        size = int(row[size_at] or 0)
        if is_folder_marker(key, size):
            continue
        version = row[version_at] if version_at is not None else ""
        if row[date_at] != date:
            date = row[date_at]
            when = timestamp(date) if date else 0.0
        yield S3Object(
            bucket,
            key,
            size,
            row[etag_at].strip('"'),
            when,
            (row[class_at] if class_at is not None else "") or "STANDARD",
            version if version and version != "null" else None,
        )


def inventory_objects_parquet(source: Any, manifest: InventoryManifest, left_out: Counter[str]) -> Iterator[S3Object]:
    """The objects of one Parquet data file, as inventory_objects_csv keeps them; keys are stored as they are.

    pyarrow is optional: only a Parquet inventory needs it, and it is read a batch at a time."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            f"inventory {manifest.url} is in Parquet, which needs pyarrow: pip install pyarrow "
            "(or configure the inventory as CSV)"
        ) from None
    parquet = pyarrow.parquet.ParquetFile(source)
    names = {inventory_field(name): name for name in parquet.schema_arrow.names}
    wanted = ("key", "size", "etag", "lastmodifieddate", "versionid", "islatest", "isdeletemarker", "storageclass")
    bucket = manifest.source_bucket
    for batch in parquet.iter_batches(batch_size=INVENTORY_PAGE, columns=[names[n] for n in wanted if n in names]):
        table = batch.to_pydict()
        rows = len(batch)
        column = {name: table[names[name]] if name in names else [None] * rows for name in wanted}
        for key, size, etag, modified, version, latest, marker, storage in zip(*column.values(), strict=True):
            if marker:
                left_out["delete marker"] += 1
                continue
            if latest is False:
                left_out["noncurrent version"] += 1
                continue
            size = int(size or 0)
            if is_folder_marker(key, size):
                continue
            if isinstance(modified, datetime.datetime):
                modified = modified.replace(tzinfo=modified.tzinfo or datetime.timezone.utc).timestamp()
            elif isinstance(modified, str):
                modified = parse_s3_timestamp(modified)
            yield S3Object(
                bucket,
                key,
                size,
                str(etag or "").strip('"'),
                float(modified or 0.0),
                storage or "STANDARD",
                version if version and version != "null" else None,
            )


class InventoryReader:
    """Reads one inventory report through the run's engine: the same addressing, signing, region and retries as
    every other request, and the same credentials (the destination bucket may be another bucket)."""

    def __init__(
        self, engine: Engine, url: str, attempts: Callable[[str], Attempts], request_payer: str | None
    ) -> None:
        self.engine = engine
        self.url = url
        self.attempts = attempts
        self.request_payer = request_payer
        bucket, key = parse_s3_url(url) or ("", "")
        self.bucket, self.key = bucket, key
        self.manifest: InventoryManifest | None = None

    def _get(self, bucket: str, key: str, sink: Callable[[bytes], object]) -> None:
        """One whole object, its chunks handed to ``sink``; ``sink`` is called again from the start on a retry."""
        obj = S3Object(bucket, key, 0, "", 0.0)
        request = object_request(obj, request_payer=self.request_payer)

        def fetch() -> None:
            response = self.engine.get(obj, request)
            try:
                sink(b"")  # a retry starts the sink over
                while chunk := response.read(1 * MiB):
                    sink(chunk)
            finally:
                response.close()

        try:
            self.attempts(f"inventory file s3://{bucket}/{display_key(key)}").call(fetch)
        except S3Error as exc:
            where = f"inventory {self.url}" + ("" if key == self.key else f": s3://{bucket}/{display_key(key)}")
            if is_missing(exc.status, exc.code):
                raise ConfigError(f"{where}: no such object (check the manifest's URL)") from None
            if is_denied(exc.status, exc.code):
                raise NothingAccessibleError(f"{where}: Access Denied") from None
            raise DownloaderError(f"{where}: {exc}") from None
        except (DownloaderError, Interrupted):
            raise
        except Exception as exc:
            raise unreachable(exc, f"reading inventory {self.url} failed") from None

    def _get_bytes(self, bucket: str, key: str) -> bytes:
        chunks: list[bytes] = []

        def sink(chunk: bytes) -> None:
            if not chunk:
                chunks.clear()
            chunks.append(chunk)

        self._get(bucket, key, sink)
        return b"".join(chunks)

    def read_manifest(self) -> InventoryManifest:
        """manifest.json, checked against manifest.checksum beside it when the report has one."""
        text = self._get_bytes(self.bucket, self.key)
        checksum_key = self.key.rsplit("/", 1)[0] + "/manifest.checksum" if "/" in self.key else "manifest.checksum"
        try:
            expected = self._get_bytes(self.bucket, checksum_key).decode("ascii", "replace").strip().lower()
        except ConfigError:  # no manifest.checksum: an inventory copied without it still has the files' MD5s
            log.warning(
                "inventory %s has no manifest.checksum beside it; its data files' MD5s are still checked", self.url
            )
        else:
            actual = hashlib.md5(text, usedforsecurity=False).hexdigest()
            if expected != actual:
                raise ConfigError(
                    f"inventory {self.url}: manifest.json does not match manifest.checksum (MD5 {actual}, expected "
                    f"{expected}): the inventory is damaged or still being written"
                )
        self.manifest = parse_inventory_manifest(text, self.url)
        return self.manifest

    def _fetch_file(self, entry: InventoryFile, handle: Any) -> None:
        """A data file into ``handle``, its MD5 checked against the manifest's before anything reads it."""
        md5 = hashlib.md5(usedforsecurity=False)

        def sink(chunk: bytes) -> None:
            nonlocal md5
            if not chunk:
                handle.seek(0)
                handle.truncate()
                md5 = hashlib.md5(usedforsecurity=False)
                return
            handle.write(chunk)
            md5.update(chunk)

        assert self.manifest is not None
        self._get(self.manifest.destination_bucket, entry.key, sink)
        handle.flush()
        if md5.hexdigest() != entry.md5:
            raise ConfigError(
                f"inventory {self.url}: data file s3://{self.manifest.destination_bucket}/{display_key(entry.key)} "
                f"has MD5 {md5.hexdigest()}, the manifest says {entry.md5}: the inventory is damaged; none of that "
                "file's rows were used"
            )

    def objects(self, left_out: Counter[str]) -> Iterator[S3Object]:
        """Every object the inventory lists as current, data file by data file (one on local disk at a time)."""
        import gzip
        import io
        import tempfile

        manifest = self.manifest or self.read_manifest()
        for entry in manifest.files:
            with tempfile.TemporaryFile(prefix="adl-inventory-") as handle:
                self._fetch_file(entry, handle)
                handle.seek(0)
                gzipped = manifest.file_format == "CSV" and entry.key.endswith(".gz")
                try:
                    if manifest.file_format == "Parquet":
                        yield from inventory_objects_parquet(handle, manifest, left_out)
                    else:
                        raw = gzip.GzipFile(fileobj=handle) if gzipped else handle
                        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                        yield from inventory_objects_csv(text, manifest, left_out)
                except (OSError, EOFError, UnicodeDecodeError, IndexError, ValueError) as exc:  # pyarrow's: the same
                    what = "Parquet" if manifest.file_format == "Parquet" else "gzip CSV" if gzipped else "CSV"
                    raise ConfigError(
                        f"inventory {self.url}: data file {display_key(entry.key)} cannot be read as {what} with "
                        f"the manifest's fileSchema: {exc}"
                    ) from None

    def pages(self, prefixes: Sequence[str], unlisted: set[str], left_out: Counter[str]) -> Iterator[list[S3Object]]:
        """The inventory's objects under ``prefixes`` (all when empty), a page at a time; ``unlisted`` loses each
        prefix given as soon as an object under it is seen, as for a listing."""
        wanted = tuple(prefixes)
        page: list[S3Object] = []
        for obj in self.objects(left_out):
            if wanted and not obj.key.startswith(wanted):
                continue
            if unlisted:
                unlisted -= {given for given in unlisted if obj.key.startswith(given)}
            page.append(obj)
            if len(page) >= INVENTORY_PAGE:
                yield page
                page = []
        if page:
            yield page


def probe_for_inventory(engine: Engine, bucket: str, url: str, attempts: Callable[[str], Attempts]) -> None:
    """Learn a bucket's region, and stop on one that does not exist. A bucket that cannot be listed is no
    problem here: an inventory run only GETs objects, and s3:GetObject on the report and the data is all it needs
    (a denied GET says so itself)."""
    region, problem = probe_bucket(engine, bucket, attempts)
    if problem is not None and problem.missing:
        raise NoSuchBucketError(f"inventory {url}: {problem.reason}")
    engine.set_bucket_region(bucket, region)


def open_inventory(engine: Engine, config: Config, attempts: Callable[[str], Attempts]) -> InventoryReader:
    """The run's inventory, its manifest read and checked, and the bucket it lists agreed with --buckets."""
    assert config.inventory is not None
    reader = InventoryReader(engine, config.inventory, attempts, config.request_payer)
    probe_for_inventory(engine, reader.bucket, config.inventory, attempts)
    manifest = reader.read_manifest()
    probe_for_inventory(engine, manifest.source_bucket, config.inventory, attempts)
    others = [bucket for bucket in config.buckets if bucket != manifest.source_bucket]
    if others:  # an inventory lists one bucket: the others would silently not be downloaded
        raise ConfigError(
            f"inventory {config.inventory} lists bucket '{manifest.source_bucket}' only, and the buckets given "
            f"name {', '.join(repr(b) for b in others)}; drop --buckets or name just that bucket"
        )
    log.info(
        "Inventory %s: bucket %s, %s, %d data file%s",
        config.inventory,
        manifest.source_bucket,
        manifest.file_format,
        len(manifest.files),
        "" if len(manifest.files) == 1 else "s",
    )
    return reader


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
    #: Epoch seconds: objects modified before this are left out (--max-age), at or after that (--min-age).
    modified_since: float | None = None
    modified_before: float | None = None

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None, now: float | None = None) -> Filters:
        """``now`` (epoch seconds, default the clock) anchors --max-age/--min-age durations: read once, when
        the run starts, so every object of the run is judged against the same instant."""
        now = time.time() if now is None else now
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
            modified_since=None if config.max_age is None else age_cutoff(config.max_age, now),
            modified_before=None if config.min_age is None else age_cutoff(config.min_age, now),
        )


#: rclone's duration units in seconds (its month is 30 days and its year 365).
AGE_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "M": 30 * 86400, "y": 365 * 86400}
#: The longest duration taken: 1,000 years.
MAX_AGE_S = 1000 * AGE_UNITS["y"]
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|M|y)")


def age_text(value: Any) -> str:
    """A --max-age/--min-age value as text: YAML reads an unquoted ``2026-01-31`` as a date and ``3600`` as a
    number, and both mean what they would as text (a UTC midnight, seconds)."""
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}"
    if not isinstance(value, str):
        raise ValueError(value)
    return value.strip()


def age_value(value: Any) -> str:
    """A --max-age/--min-age value checked and kept as text: its instant depends on when the run starts."""
    text = age_text(value)
    age_cutoff(text, 0.0)
    return text


def age_cutoff(text: str, now: float) -> float:
    """The instant (epoch seconds) a --max-age/--min-age value names: ``now`` minus a duration in rclone's
    syntax ('7d', '36h', '1h30m', '1.5d'; a bare number is seconds, as in rclone), or an ISO 8601 time.

    A time without a zone is UTC, as S3's LastModified is, so a cron job means the same on every machine
    (rclone would read it as local time). Raises ValueError for anything else.
    """
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text)
    elif text and _AGE_PART.sub("", text) == "" and _AGE_PART.match(text):
        seconds = sum(float(number) * AGE_UNITS[unit] for number, unit in _AGE_PART.findall(text))
    else:
        seconds = None
    if seconds is not None:
        if seconds > MAX_AGE_S:  # a typo, and a date before year 1 that no log line could print
            raise ValueError(text)
        return now - seconds
    if not re.match(r"\d{4}-\d{2}-\d{2}", text):  # fromisoformat also takes '20260131', too easily a typo
        raise ValueError(text)
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def cutoff_text(moment: float) -> str:
    """An age cut-off for the log: a UTC time to the second."""
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_shard(text: str, environ: Mapping[str, str], name: str = "config key 'shard'") -> tuple[int, int]:
    """'I/N' -> (I, N); 'auto/N' takes I from a Kubernetes Indexed Job or an AWS Batch array job.

    ``name`` is the value as the user wrote it (ConfigLayer.name), for the errors about its form.
    """
    index_text, _, count_text = text.partition("/")
    if not count_text.isdecimal() or int(count_text) < 1:
        raise ConfigError(f"{name} must look like 'I/N' or 'auto/N' with N >= 1, got {text!r}")
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
        raise ConfigError(f"{name} must have 0 <= I < N, got {text!r}")
    return int(index_text), count


def shard_of(bucket: str, key: str, count: int) -> int:
    """A stable shard number: the same on every machine and Python version (unlike hash())."""
    digest = hashlib.blake2b(f"{bucket}/{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def filter_reason(obj: S3Object, filters: Filters) -> str | None:
    """Why the object is left out of the selection (the rule, as the summary counts it), or None if selected."""
    if filters.shard is not None and shard_of(obj.bucket, obj.key, filters.shard[1]) != filters.shard[0]:
        return "shard"
    if filters.extensions and not obj.key.lower().endswith(filters.extensions):
        return "extension"
    if filters.include and not any(fnmatch.fnmatchcase(obj.key, pattern) for pattern in filters.include):
        return "include"
    if filters.exclude and any(fnmatch.fnmatchcase(obj.key, pattern) for pattern in filters.exclude):
        return "exclude"
    if obj.size < filters.min_size:
        return "size < min"
    if filters.max_size is not None and obj.size > filters.max_size:
        return "size > max"
    if filters.modified_since is not None and obj.last_modified < filters.modified_since:
        return "age > max"
    if filters.modified_before is not None and obj.last_modified >= filters.modified_before:
        return "age < min"
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


#: Path separators of this OS besides "/" (Windows: "\\"): no component of a key may hold one.
_OTHER_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep and sep != "/")
#: A component of at most this many characters is within NAME_MAX bytes (UTF-8 takes at most 4 a character).
_SHORT_NAME = NAME_MAX // 4


def local_path_for(download_dir: Path, bucket: str, key: str) -> Path:
    """Where ``key`` is stored: ``<download_dir>/<bucket>/<key>``, or UnsafeKeyError with the reason."""
    return Path(local_name_for(str(download_dir), bucket, key))


def local_name_for(download_dir: str, bucket: str, key: str) -> str:
    """local_path_for as a string, for the planner: it places every listed key, and a Path costs more than this.

    The usual key passes a few whole-key tests; one that fails any is looked at part by part for the reason.
    """
    parts = key.split("/")
    if (
        bucket
        and key
        and not _CONTROL_RE.search(bucket)
        and not _CONTROL_RE.search(key)
        and "/" not in bucket
        and bucket not in (".", "..")
        and "" not in parts
        and "." not in parts
        and ".." not in parts
        and not any(sep in key for sep in _OTHER_SEPARATORS)
        and (len(key) <= _SHORT_NAME or all(_fits_name_max(part) for part in parts))
    ):
        if os.sep != "/":
            key = key.replace("/", os.sep)
        return f"{download_dir.rstrip(os.sep)}{os.sep}{bucket}{os.sep}{key}"
    raise UnsafeKeyError(unsafe_key_reason(bucket, key))


def _fits_name_max(part: str) -> bool:
    return len(part) <= _SHORT_NAME or len(part.encode("utf-8", "surrogatepass")) <= NAME_MAX


def unsafe_key_reason(bucket: str, key: str) -> str:
    """Why local_name_for refuses the key, in the order a user would fix things (bucket first, then key)."""
    for name, value in (("bucket", bucket), ("key", key)):
        if not value:
            return f"unsafe key: empty {name}"
        if _CONTROL_RE.search(value):
            return f"unsafe key: control character in {name}"
    if "/" in bucket or bucket in (".", ".."):
        return "unsafe key: bucket name is not a plain directory name"
    if key.startswith("/"):
        return "unsafe key: absolute path"
    for part in key.split("/"):
        if part in ("", ".", ".."):
            return f"unsafe key: path component {part or '(empty)'!r}"
        if any(sep in part for sep in _OTHER_SEPARATORS):
            return "unsafe key: path separator of this OS in a component"
        if not _fits_name_max(part):
            return f"unsafe key: path component longer than {NAME_MAX} bytes"
    raise AssertionError(f"local_name_for refused a safe key: {display_key(key)!r}")  # pragma: no cover


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


@dataclass(slots=True, unsafe_hash=True)  # frozen in all but name: see above S3Object
class DownloadResult:
    """The outcome of one object."""

    obj: S3Object
    status: str  #: "downloaded", "skipped", "failed" or "interrupted"
    reason: str = ""  #: why skipped or failed, in the user's words
    path: str | None = None
    checksum: str | None = None
    bytes_fetched: int = 0
    attempts: int = 0
    route: str = ""  #: the path that fetched it: "loop", "stream" or "parts"; "" when none did
    seconds: float = 0.0  #: how long its fetch took, retries and backoff included
    #: How the local file compared with the object (--checksum, --verify-local): "match", "differ",
    #: "unverifiable", "missing"; "" when it was not compared.
    local_check: str = ""
    #: For a local file that differs: how (the two checksums, or sizes), for the log.
    detail: str = ""


@dataclass(slots=True, unsafe_hash=True)  # frozen in all but name: see above S3Object
class Planned:
    """An object that passed the filters, with where it goes (or why it cannot go anywhere)."""

    obj: S3Object
    #: The local file, as a string (local_name_for); None for an unsafe key.
    target: str | None
    result: DownloadResult | None  #: set when no transfer is needed (skipped, unsafe, archived)
    #: Hash the local file and compare it with the object's checksum first (--checksum, --verify-local).
    hash_local: bool = False
    #: skip_reason's decision without the hash: what a --checksum object with no usable checksum gets.
    fallback: str | None = None


class LocalTree:
    """The planner's view of the download directory, which it consults once per listed key: where a key goes
    (local_name_for, each folder's checks made once, since keys share their folders) and what is there (an
    lstat, skipped for a folder found missing). For the first download of a million keys that is two lookups
    a folder instead of a key check and an lstat a key (1.6 and 1.1-2.5 us each, measured with
    benchmarks/inventory_plan.py).

    Remembering a missing folder is sound for one run: while it holds the download directory's lock nothing else
    writes there, and the run itself writes only the files it planned, each key once, so no file can appear in
    a folder that was missing when the planner looked before the planner has passed that file's key.
    """

    #: Folders remembered at most, of each kind; past it a set starts over, so memory stays flat on any layout.
    LIMIT = 100_000

    def __init__(self) -> None:
        #: (download dir, bucket, folder of a key) -> the local folder it maps to, with a trailing separator.
        self.folders: dict[tuple[str, str, str], str] = {}
        #: Local folders an lstat found missing.
        self.missing: set[str] = set()

    def place(self, root: str, bucket: str, key: str) -> str:
        """local_name_for(root, bucket, key), or its UnsafeKeyError."""
        folder, slash, name = key.rpartition("/")
        base = self.folders.get((root, bucket, folder)) if slash else None
        if (
            base is None
            or name in ("", ".", "..")
            or _CONTROL_RE.search(name)
            or not _fits_name_max(name)
            or (_OTHER_SEPARATORS and any(sep in name for sep in _OTHER_SEPARATORS))
        ):
            target = local_name_for(root, bucket, key)
            if slash:
                if len(self.folders) >= self.LIMIT:
                    self.folders.clear()
                self.folders[(root, bucket, folder)] = target[: len(target) - len(name)]
            return target
        return base + name

    def lstat(self, target: str) -> os.stat_result | None:
        """The target's lstat, or None when nothing is there."""
        folder = target.rpartition(os.sep)[0]
        if folder in self.missing:
            return None
        try:
            return os.lstat(target)
        except FileNotFoundError:
            pass
        except OSError:  # a file where a folder should be, a name too long: the transfer reports it
            return None
        try:
            os.lstat(folder)
        except FileNotFoundError:
            if len(self.missing) >= self.LIMIT:
                self.missing.clear()
            self.missing.add(folder)
        except OSError:
            pass
        return None


class _AnyTree(LocalTree):
    """A LocalTree that remembers nothing: for a plan made outside a run (--verify-local, tests)."""

    def place(self, root: str, bucket: str, key: str) -> str:
        return local_name_for(root, bucket, key)

    def lstat(self, target: str) -> os.stat_result | None:
        try:
            return os.lstat(target)
        except OSError:
            return None


_ANY_TREE = _AnyTree()


def skip_reason(
    obj: S3Object, local: os.stat_result | None, done: CompletedEntry | None, overwrite: bool
) -> str | None:
    """Why the object need not be downloaded again, or None. The one place this is decided.

    A journal entry with the same ETag and size proves the local file; without one, a file of the same size
    that is not older than the object is taken as current (what ``aws s3 sync`` does). An object pinned to a
    version (--as-of, a manifest) may be older than a newer version's local copy: without a journal entry, only
    a file dated the version's own LastModified (as this tool and ``aws s3 sync`` date what they fetch; to the
    second, as HTTP dates are) is taken as that version.
    """
    if overwrite or local is None or not stat.S_ISREG(local.st_mode) or local.st_size != obj.size:
        return None
    if done is not None:
        if vouches(done, obj):
            return "already downloaded"
        return None  # the object changed since we downloaded it
    if obj.version_id:
        return "exists locally (same size and date)" if abs(local.st_mtime - obj.last_modified) < 1 else None
    if local.st_mtime + 1e-6 >= obj.last_modified:
        return "exists locally (same size, not older)"
    return None


def vouches(done: CompletedEntry | None, obj: S3Object) -> bool:
    """The journal recorded this version of the object as downloaded and verified."""
    return done is not None and done.etag == obj.etag and done.size == obj.size


def needs_local_check(
    obj: S3Object, local: os.stat_result | None, done: CompletedEntry | None, overwrite: bool
) -> bool:
    """With --checksum: a local file of the object's size that the journal does not vouch for is hashed
    (whatever its date, as rclone --checksum compares size and hash only); a journaled one is trusted, and a
    missing or other-size one is downloaded without reading it."""
    if overwrite or local is None or not stat.S_ISREG(local.st_mode) or local.st_size != obj.size:
        return False
    return not vouches(done, obj)


def plan_verify(obj: S3Object, root: Path) -> Planned:
    """--verify-local: which local files need hashing. Every file is (bit rot, too: the journal vouches for
    none); a missing one or one of another size differs without being read."""
    planned = plan_object(obj, root, True, NullJournal())  # unsafe keys, folder markers, archived objects
    if planned.result is not None or planned.target is None:
        return planned
    try:
        local = os.lstat(planned.target)
    except OSError:
        local = None
    if local is None or not stat.S_ISREG(local.st_mode):
        return Planned(obj, planned.target, DownloadResult(obj, "failed", "missing locally", local_check="missing"))
    if local.st_size != obj.size:
        reason, detail = "differs from S3 (size)", f"local size {local.st_size:,} != {obj.size:,}"
        result = DownloadResult(obj, "failed", reason, str(planned.target), local_check="differ", detail=detail)
        return Planned(obj, planned.target, result)
    return Planned(obj, planned.target, None, hash_local=True)


###############################################################################
# Transfer
###############################################################################
# One object in, one result out: Transfer.download(obj, target) -> DownloadResult. It asks an Engine (above)
# for bytes; swapping the engine changes nothing here. route_for decides which path fetches an object:
#
# - "loop": the smallest objects (small_object_kb, http engine) skip the worker threads. SmallObjectLoop fetches
#   them on one thread over non-blocking connections and Transfer.store_small verifies and stores each whole
#   body; any outcome but a clean 200 goes back to Transfer.download as a first failed attempt.
# - "stream": one GET streamed to a temporary file, hashed as it arrives. Large objects journal each part
#   boundary they pass, so a re-run hashes the bytes already on disk once and asks only for the rest.
# - "parts": ranged GETs in parallel, written in place with os.pwrite, each part recorded in the resume
#   journal, so a re-run fetches only what is missing. A large object with a full-object CRC is cut into
#   multipart_chunksize_mb ranges whose CRCs combine into the object's; a multipart object without one is cut
#   on its own upload parts, whose MD5s rebuild the multipart ETag.
# - "head": a large or multipart object being verified is asked about first (one HEAD with checksum mode):
#   the checksum it carries decides between the two above.
#
# Every GET carries If-Match with the listed ETag, so two versions are never stitched.


@dataclass(frozen=True, slots=True)
class Route:
    """Which path fetches an object, and why."""

    path: str  #: "loop", "stream", "parts" or "head" (ask the object first, then route again)
    why: str
    #: For "parts": cut on the object's own upload parts (to rebuild its multipart ETag), not on part_size.
    own_parts: bool = False
    #: The full-object CRC the ranges' CRCs combine into, for "parts" verified by one; or the composite CRC the
    #: own parts' CRCs rebuild (``checksum.parts``).
    checksum: FullChecksum | None = None


def route_for(obj: S3Object, config: Config, small_loop: bool, head: Mapping[str, str] | None = None) -> Route:
    """The one place that decides how an object is fetched.

    ``small_loop`` says the engine has the event loop; ``head`` is the object's HEAD answer (with checksum
    mode), once a "head" route has asked for it.
    """
    verify = config.verify_checksums
    large = obj.size >= config.multipart_threshold
    multipart = etag_kind(obj.etag) == "multipart"
    if verify and (large or multipart):
        if head is None:
            return Route("head", "large or multipart, verified: its checksum decides how it is fetched")
        checksum = full_checksum(head)
        if checksum is not None and checksum.algorithm in COMBINABLE:
            if large:
                return Route("parts", f"verified by its {checksum.algorithm}: ranges combined", checksum=checksum)
            return Route("stream", f"verified by its {checksum.algorithm} in one GET")
        composite = composite_checksum(head) if checksum is None else None
        if composite is not None:
            why = f"composite {composite.algorithm}: its own upload parts' CRCs rebuild it"
            return Route("parts", why, own_parts=True, checksum=composite)
        if multipart:
            return Route("parts", "multipart ETag: verified part by part on its own upload parts", own_parts=True)
        return Route("stream", "large, verified by MD5: one hashed stream with resume checkpoints")
    if large:
        return Route("parts", "large, unverified: ranged parts in parallel")
    if small_loop and obj.size <= config.small_object_kb * KiB:
        return Route("loop", "small: the event loop")
    return Route("stream", "one GET streamed to disk")


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


def _hash_file_range(path: Path, start: int, length: int, hasher: StreamHasher | PartHash | _StopChecking) -> None:
    """Feed ``length`` bytes from ``start`` that an earlier run wrote into ``hasher``: the one read of them."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    try:
        offset, end = start, start + length
        while offset < end:
            chunk = os.pread(fd, min(MiB, end - offset), offset)
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


class _Checkpoints:
    """Journals each part boundary a large stream passes, and the bytes written inside the part it is in (a
    progress slot), so a re-run resumes from the last byte on disk."""

    def __init__(self, journal: ResumeJournal, obj: S3Object, parts: list[Part], offset: int) -> None:
        self.journal = journal
        self.obj = obj
        self.parts = parts
        self.layout = [part.size for part in parts]
        #: The first part whose end the stream has not passed yet, and its progress slot.
        self.next = sum(1 for part in parts if part.end < offset)
        self.ident = b""
        self.slot = -1
        self._claim()

    def _claim(self) -> None:
        if self.next < len(self.parts):
            self.ident = part_ident(self.obj, self.layout, self.next, "stream")
            self.slot = self.journal.progress.claim(self.ident)

    def __call__(self, offset: int) -> None:
        while self.next < len(self.parts) and self.parts[self.next].end < offset:
            self.journal.record_part(self.obj, self.layout, self.next, "")
            self.journal.progress.release(self.ident)
            self.next += 1
            self._claim()
        if self.next < len(self.parts):
            self.journal.progress.update(self.slot, self.ident, offset - self.parts[self.next].start, 0)

    def close(self) -> None:
        """The stream is whole: nothing of it needs resuming."""
        if self.next < len(self.parts):
            self.journal.progress.release(self.ident)


@dataclass(frozen=True, slots=True)
class _PartsJob:
    """One object being fetched in parts: where its bytes go, and how each part is hashed."""

    obj: S3Object
    fd: int  #: the temp file, open for writing
    temp: Path
    layout: list[int]  #: the part sizes, as the journal keys the object's progress
    kind: str  #: the PartHash kind: "md5", a CRC name, or "" (unverified)
    kept: bool  #: the temp file holds an earlier attempt's bytes (its progress slots can be trusted)


#: Local files hashed at once by --checksum and --verify-local (see benchmarks/hash_local.py): enough to keep
#: both cores and an SSD's queue busy; more only makes a spinning disk seek between files.
HASH_THREADS = 4


class _StopChecking:
    """A hasher that notices the run stopping between the chunks of a local file (a 50 GB file takes minutes)."""

    __slots__ = ("hasher", "stop")

    def __init__(self, hasher: StreamHasher | PartHash, stop: threading.Event) -> None:
        self.hasher = hasher
        self.stop = stop

    def update(self, data: bytes) -> None:
        if self.stop.is_set():
            raise Interrupted()
        self.hasher.update(data)


class Transfer:
    """Moves one object from S3 to its final path; every resume and verification decision is here."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        journal: ResumeJournal,
        part_pool: ThreadPoolExecutor | None,
        stop: threading.Event,
        on_bytes: Callable[[int], None] = lambda n: None,
        *,
        root: Path,
        pinned: bool = False,
        halt: Callable[[str], None] | None = None,
        inventory: bool = False,
        limiter: BandwidthLimiter | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.journal = journal
        self.part_pool = part_pool
        self.stop = stop
        self.on_bytes = on_bytes
        #: Stops the whole run with a reason (a full disk); by default just the stop event.
        self.halt = halt or (lambda reason: stop.set())
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
        #: Set for --inventory runs: a changed or gone object is reported as changed or missing since the inventory.
        self.inventory = inventory
        #: Version ids named by GET responses (listings carry none), so the journal and manifest can pin them.
        self._versions: dict[tuple[str, str], str] = {}
        #: The route each object in flight took (route_for's path, after its HEAD), for its result.
        self._routes: dict[tuple[str, str], str] = {}
        #: Local files being hashed (--checksum, --verify-local): at most HASH_THREADS at once.
        self._hashing = threading.BoundedSemaphore(min(HASH_THREADS, config.parallel_downloads))
        #: The run's bandwidth cap, shared with the small-object loop; None: reads take no lock.
        self.limiter = limiter

    # -- the boundary ---------------------------------------------------------------------------------------

    def download(self, obj: S3Object, target: Path, failed_attempt: BaseException | None = None) -> DownloadResult:
        """Fetch ``obj`` into ``target``; never raises for a per-object problem (it becomes the result).

        ``failed_attempt`` is how a first attempt made elsewhere (the small-object loop) failed: it is handled
        here exactly as if this method's own first attempt had raised it, backoff and all.
        """
        if self.stop.is_set():  # queued before the run began stopping: do not start it
            return DownloadResult(obj, "interrupted", "stopped")
        started = time.monotonic()
        try:
            result = self._download(obj, target, failed_attempt)
        except Interrupted:
            result = DownloadResult(obj, "interrupted", "stopped")
        except DiskFull:
            self.halt("disk full")
            raise
        finally:
            route = self._routes.pop((obj.bucket, obj.key), "")
        return dataclasses.replace(result, route=route, seconds=time.monotonic() - started)

    def _download(self, obj: S3Object, target: Path, pending: BaseException | None) -> DownloadResult:
        """The object-level loop: a checksum mismatch or a new version starts the object over."""
        restarts = Attempts(self._what(obj), self.config, self.stop)
        changes = 0
        while True:
            try:
                self._ensure_parent(target)
                checksum, fetched = self._fetch(obj, target, pending)
                obj = self._take_version(obj)
                note = CHANGED_FETCHED if changes and self.inventory else ""
                return DownloadResult(obj, "downloaded", note, str(target), checksum, fetched, restarts.failures + 1)
            except ChecksumMismatch as exc:
                self._discard_partial(obj, target)
                if exc.kept:
                    log.warning(
                        "%s: the bytes kept from an earlier try did not verify; fetching it whole", self._what(obj)
                    )
                if etag_kind(obj.etag) == "multipart":
                    self._exact_layout.add((obj.bucket, obj.key))  # maybe uneven parts: ask each one next time
                if not restarts.another(exc):
                    return self._failed(obj, exc, restarts.failures)
            except ObjectChanged:
                self._discard_partial(obj, target)
                changes += 1
                obj, failure = self._new_version(obj, changes)
                if failure is not None:
                    return failure
            except (Interrupted, DiskFull):
                raise
            except Exception as exc:
                return self._failed(obj, exc, restarts.failures + 1)
            pending = None

    def _failed(self, obj: S3Object, exc: BaseException, attempts: int) -> DownloadResult:
        if self.stop.is_set():  # the stop shut its socket, or it failed while the run was ending
            return DownloadResult(obj, "interrupted", "stopped", attempts=attempts)
        log.debug("%s failed after %d attempt(s)", self._what(obj), attempts, exc_info=exc)
        gone = self.inventory and isinstance(exc, S3Error) and is_missing(exc.status, exc.code)
        return DownloadResult(
            obj, "failed", MISSING_SINCE_INVENTORY if gone else failure_reason(exc), attempts=attempts
        )

    def _new_version(self, obj: S3Object, changes: int) -> tuple[S3Object, DownloadResult | None]:
        """The object was replaced mid-download: fetch the new version, unless the run is pinned to the old one."""
        if self.pinned:
            reason = CHANGED_SINCE_INVENTORY if self.inventory else "etag no longer matches the manifest"
            return obj, DownloadResult(obj, "failed", reason)
        if changes > self.config.retry_attempts:
            return obj, DownloadResult(obj, "failed", failure_reason(ObjectChanged()))
        try:
            headers = Attempts(self._what(obj), self.config, self.stop).call(
                lambda: self.engine.head(obj, object_request(obj, request_payer=self.config.request_payer))
            )
        except (Interrupted, DiskFull):
            raise
        except Exception as exc:  # deleted in between, denied, ...
            return obj, self._failed(obj, exc, changes)
        since = "the inventory" if self.inventory else "it was listed"
        log.info("%s changed since %s; fetching the new version", self._what(obj), since)
        return object_from_head(obj, headers), None

    @staticmethod
    def _what(obj: S3Object) -> str:
        return f"{obj.bucket}/{display_key(obj.key)}"

    def _note_version(self, obj: S3Object, headers: Mapping[str, str]) -> None:
        version = headers.get("x-amz-version-id")
        if version and version != "null" and not obj.version_id:
            self._versions[(obj.bucket, obj.key)] = version

    def _take_version(self, obj: S3Object) -> S3Object:
        """The object with the version id its GET named, if the listing had none."""
        version = self._versions.pop((obj.bucket, obj.key), None)
        return dataclasses.replace(obj, version_id=version) if version and not obj.version_id else obj

    def _with_version(self, obj: S3Object) -> S3Object:
        version = None if obj.version_id else self._versions.get((obj.bucket, obj.key))
        return dataclasses.replace(obj, version_id=version) if version else obj

    # -- local files ----------------------------------------------------------------------------------------

    def _ensure_parent(self, target: Path) -> None:
        """Create the target's directories, refusing any that is a symlink or a file (key vs key clash)."""
        parent = target.parent
        if parent in self._made_dirs:
            return
        current = self.root
        for name in parent.relative_to(self.root).parts:
            current = current / name
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # another worker made it
                    os.mkdir(current)
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

    def _finish(self, obj: S3Object, temp: Path, target: Path, checksum: str | None) -> None:
        """Give the file the object's mtime, rename it into place (the only way a target appears), journal it."""
        os.utime(temp, (obj.last_modified, obj.last_modified))
        os.replace(temp, target)  # onto a directory this fails (EISDIR): a key vs key path conflict
        self.journal.record_done(self._with_version(obj), checksum, str(target))

    def _discard_partial(self, obj: S3Object, target: Path) -> None:
        with contextlib.suppress(OSError):
            os.unlink(temp_path_for(target, obj.key))
        self.journal.drop_partial(obj)

    # -- fetching -------------------------------------------------------------------------------------------

    def _fetch(self, obj: S3Object, target: Path, pending: BaseException | None) -> tuple[str | None, int]:
        """Fetch by the object's route; ``pending`` is a failed first try made elsewhere, counted as this one's."""
        tries = Attempts(self._what(obj), self.config, self.stop)
        if isinstance(pending, (ChecksumMismatch, ObjectChanged)):
            raise pending
        if pending is not None:
            tries.failed(pending)
        route = route_for(obj, self.config, small_loop=False)
        if route.path == "head":
            route = route_for(obj, self.config, False, self._head(obj))
        self._routes[(obj.bucket, obj.key)] = route.path
        if route.path == "parts":
            if route.own_parts:
                parts = self._own_parts(obj, route.checksum.parts if route.checksum else 0)
            else:
                parts = plan_parts(obj.size, self.config.part_size)
            return self._fetch_parts(obj, target, parts, route)
        return self._fetch_stream(obj, target, tries)

    def _head(self, obj: S3Object) -> Mapping[str, str]:
        """The object's HEAD with its checksums (If-Match: a replaced object is ObjectChanged here already)."""
        request = object_request(
            obj, if_match=obj.etag or None, checksum_mode=True, request_payer=self.config.request_payer
        )
        headers = Attempts(self._what(obj), self.config, self.stop).call(lambda: self.engine.head(obj, request))
        self._note_version(obj, headers)
        return headers

    def _part_size(self, obj: S3Object, part_number: int) -> int:
        """Content length of one upload part (HEAD ?partNumber=N)."""
        request = object_request(obj, part_number=part_number, request_payer=self.config.request_payer)
        try:
            headers = Attempts(self._what(obj), self.config, self.stop).call(lambda: self.engine.head(obj, request))
        except S3Error as exc:
            if part_number_gone(exc):
                raise ObjectChanged(obj.key) from None
            raise
        return int(headers["content-length"])

    def _own_parts(self, obj: S3Object, count: int = 0) -> list[Part]:
        """The object's upload parts, so per-part MD5s can rebuild its multipart ETag, or per-part CRCs its
        composite checksum; ``count`` is the part count when the ETag does not tell it (an SSE-KMS one)."""
        count = count or int(obj.etag.rsplit("-", 1)[1])
        if count == 1:
            return plan_parts(obj.size, max(obj.size, 1))
        first = self._part_size(obj, 1)
        # Uneven parts can have the count equal ones would (6+5+1 MiB and 6+6+0.x MiB are both 3): check the last,
        # and after a mismatch ask every part (uneven middle parts are legal too, only rarer).
        if (
            (obj.bucket, obj.key) not in self._exact_layout
            and first > 0
            and math.ceil(obj.size / first) == count
            and self._part_size(obj, count) == obj.size - (count - 1) * first
        ):
            return plan_parts(obj.size, first)
        # Parts of different sizes (allowed by S3): ask for each one.
        return plan_parts(obj.size, [first] + [self._part_size(obj, n) for n in range(2, count + 1)])

    def _fetch_stream(self, obj: S3Object, target: Path, tries: Attempts) -> tuple[str | None, int]:
        """One GET streamed to the temp file and hashed as it arrives; a body fault resumes with a Range.

        A large object (>= multipart_threshold) journals each part boundary it passes and keeps its temp file
        when the run stops, so a re-run hashes the bytes already on disk once and asks only for the rest.
        """
        temp = temp_path_for(target, obj.key)
        parts, written = self._stream_resume_point(obj, temp)
        fd = self._open_temp(temp, keep=written > 0)
        try:
            hasher = self._resumed_hasher(obj, temp, written)
            checkpoint = _Checkpoints(self.journal, obj, parts, written) if parts else None
            hasher, fetched = self._stream_into(obj, fd, written, hasher, checkpoint, tries)
            if checkpoint is not None:
                checkpoint.close()
            try:
                checksum = hasher.verify() if hasher else None
            except ChecksumMismatch as exc:
                exc.kept = written > 0
                raise
            os.close(fd)
            fd = -1
            self._finish(obj, temp, target, checksum)
            return checksum, fetched
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if not parts:  # small objects start over; large ones keep their bytes for the next attempt or run
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise

    def _resumed_hasher(self, obj: S3Object, temp: Path, written: int) -> StreamHasher | None:
        """For a stream a previous run left ``written`` bytes of: the hasher, fed those bytes from disk once."""
        if not written:
            return None
        hasher = choose_hasher(obj, {}, self.config.verify_checksums)
        if hasher is not None:
            _hash_file_range(temp, 0, written, hasher)
        log.info("Resuming %s at byte %s of %s", self._what(obj), f"{written:,}", f"{obj.size:,}")
        return hasher

    def _stream_into(
        self,
        obj: S3Object,
        fd: int,
        written: int,
        hasher: StreamHasher | None,
        checkpoint: Callable[[int], None] | None,
        tries: Attempts,
    ) -> tuple[StreamHasher | None, int]:
        """GET the object from byte ``written`` into ``fd`` until it is whole; a retry continues where the body
        broke off. Returns the hasher (chosen from the first answer's headers) and the bytes fetched."""
        fetched = 0
        verify = self.config.verify_checksums
        while True:
            try:
                request = object_request(
                    obj,
                    byte_range=(written, obj.size - 1) if written else None,
                    if_match=obj.etag or None,
                    checksum_mode=verify and not written,
                    request_payer=self.config.request_payer,
                )
                response = self.engine.get(obj, request)
                if hasher is None:
                    hasher = choose_hasher(obj, response.headers, verify)
                    self._note_version(obj, response.headers)
                try:
                    written, got, fault = self._copy_body(response, fd, written, obj.size, hasher, checkpoint)
                finally:
                    response.close()
                fetched += got
                if fault is None and written != obj.size:
                    fault = ConnectionError(f"body ended at {written} of {obj.size} bytes")
                if fault is None:
                    return hasher, fetched
                raise fault
            except (ObjectChanged, DiskFull, Interrupted):
                raise
            except Exception as exc:
                tries.failed(exc)

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
        self._note_version(obj, headers)
        try:
            try:
                _pwrite_all(fd, body, 0)
            finally:
                os.close(fd)
            self._finish(obj, temp, target, checksum)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self.on_bytes(len(body))
        return DownloadResult(self._take_version(obj), "downloaded", "", str(target), checksum, len(body), 1, "loop")

    # -- local files compared with the object (--checksum, --verify-local) --------------------------------------

    def refresh(self, obj: S3Object, target: Path, fallback: str | None) -> DownloadResult:
        """--checksum: keep a local file the journal does not vouch for when its bytes match the object's
        checksum (journaled as complete, so the next run trusts it), download it when they differ.

        An object with no usable checksum gets ``fallback``, the size-and-date decision a run without
        --checksum makes, and is counted as unverifiable.
        """
        started = time.monotonic()
        # Replaced since it was listed: the download fetches the new version.
        check = self._checked(obj, target, changed=LocalCheck("differ", "", "the object changed since it was listed"))
        if isinstance(check, DownloadResult):
            return check
        if check.outcome == "match":
            obj = self._take_version(obj)
            with contextlib.suppress(OSError):  # its date, as a download would have set it (rclone does too)
                os.utime(target, (obj.last_modified, obj.last_modified), follow_symlinks=False)
            with contextlib.suppress(OSError):  # a temp file an earlier attempt left: the file is whole already
                os.unlink(temp_path_for(target, obj.key))
            self.journal.record_done(obj, check.detail, str(target))
            seconds = time.monotonic() - started
            return DownloadResult(
                obj, "skipped", "checksum matches", str(target), check.detail, local_check="match", seconds=seconds
            )
        if check.outcome == "unverifiable" and fallback is not None:
            self._take_version(obj)
            return DownloadResult(obj, "skipped", fallback, str(target), local_check="unverifiable")
        log.info("%s: the local file differs (%s); downloading it", self._what(obj), check.detail)
        result = self.download(obj, target)
        return dataclasses.replace(result, local_check=check.outcome, detail=check.detail)

    def verify_local(self, obj: S3Object, target: Path) -> DownloadResult:
        """--verify-local: is the local file the object's bytes? Reads it and asks S3; writes nothing."""
        started = time.monotonic()
        check = self._checked(obj, target)  # an object changed or gone since it was listed fails
        if isinstance(check, DownloadResult):
            return check
        obj = self._take_version(obj)
        seconds = time.monotonic() - started
        if check.outcome == "match":
            return DownloadResult(
                obj, "skipped", "intact", str(target), check.detail, local_check="match", seconds=seconds
            )
        if check.outcome == "unverifiable":
            reason = f"unverifiable: {check.detail}"
            return DownloadResult(obj, "skipped", reason, str(target), local_check="unverifiable", seconds=seconds)
        reason = f"differs from S3 ({check.algorithm})"
        return DownloadResult(
            obj, "failed", reason, str(target), local_check="differ", detail=check.detail, seconds=seconds
        )

    def _checked(self, obj: S3Object, target: Path, changed: LocalCheck | None = None) -> LocalCheck | DownloadResult:
        """compare_local, or the result that ends the object instead: stopped, or failed (denied, gone, ...).
        An object replaced since it was listed fails too, unless ``changed`` says what that means instead."""
        if self.stop.is_set():
            return DownloadResult(obj, "interrupted", "stopped")
        try:
            return self.compare_local(obj, target)
        except Interrupted:
            return DownloadResult(obj, "interrupted", "stopped")
        except ObjectChanged as exc:
            return changed if changed is not None else self._failed(obj, exc, 1)
        except Exception as exc:
            return self._failed(obj, exc, 1)

    def compare_local(self, obj: S3Object, target: Path) -> LocalCheck:
        """Hash the local file by the checksum a download would verify it with (choose_hasher, or a composite CRC
        or the multipart ETag on the object's own parts).

        A small object's MD5 ETag from the listing needs no request. Anything else asks a HEAD with checksum mode
        first, as route_for does: a multipart or other ETag for its full-object CRC, a large object because a
        CRC hashes several times faster than MD5 here (benchmarks/hash_local.py). An MD5 mismatch asks one too
        before saying the file differs: an SSE-KMS ETag looks like an MD5, and the object may carry a CRC.
        """
        md5 = None
        if etag_kind(obj.etag) == "md5" and obj.size < self.config.multipart_threshold:
            md5 = self._hash_local(obj, target, {})
            if md5.outcome == "match":
                return md5
        headers = self._head(obj)
        composite = composite_checksum(headers) if full_checksum(headers) is None else None
        if composite is not None:
            return self._hash_local_parts(obj, target, composite)
        if full_checksum(headers) is None and not encryption_note(headers) and etag_kind(obj.etag) == "multipart":
            return self._hash_local_parts(obj, target)
        if md5 is not None and full_checksum(headers) is None and not encryption_note(headers):
            return md5  # the MD5 ETag was the right checksum: the file differs
        return self._hash_local(obj, target, headers)

    def _hash_local(self, obj: S3Object, target: Path, headers: Mapping[str, str]) -> LocalCheck:
        """The whole file hashed by what choose_hasher picks for ``headers`` ({}: the listing's ETag)."""
        hasher = choose_hasher(obj, headers, verify=True)
        assert hasher is not None, "verify=True always chooses"
        if hasher.algorithm == "unverifiable":
            return LocalCheck("unverifiable", "", hasher.note)
        try:
            self._hash_whole(obj, target, [(0, obj.size, hasher)])
            return LocalCheck("match", hasher.algorithm, hasher.verify())
        except ChecksumMismatch as exc:
            return LocalCheck("differ", hasher.algorithm, str(exc))

    def _hash_local_parts(self, obj: S3Object, target: Path, composite: FullChecksum | None = None) -> LocalCheck:
        """The local file cut on the object's own upload parts: their MD5s rebuild a multipart ETag, or their
        CRCs the ``composite`` checksum."""
        kind = composite.algorithm if composite else "md5"
        record_kind = kind if composite else "md5-multipart"
        parts = self._own_parts(obj, composite.parts if composite else 0)
        digests = [PartHash(kind) for _ in parts]
        try:
            self._hash_whole(obj, target, [(p.start, p.size, digest) for p, digest in zip(parts, digests, strict=True)])
            if composite is not None:
                record = verify_composite(composite, [digest.value for digest in digests])
            else:
                record = verify_multipart_etag(obj.etag, [bytes.fromhex(digest.text()) for digest in digests])
        except ChecksumMismatch as exc:
            return LocalCheck("differ", record_kind, str(exc))
        return LocalCheck("match", record_kind, record)

    def _hash_whole(
        self, obj: S3Object, target: Path, pieces: Sequence[tuple[int, int, StreamHasher | PartHash]]
    ) -> None:
        """Feed the local file, piece by piece, to the hashers; at most HASH_THREADS files are read at once,
        so parallel_downloads threads do not make a disk seek between 32 files."""
        with self._hashing:
            try:
                for start, length, hasher in pieces:
                    _hash_file_range(target, start, length, _StopChecking(hasher, self.stop))
                if os.stat(target).st_size != obj.size:
                    raise ConnectionError("the local file changed size")
            except ConnectionError:  # shorter or longer than the listing says: it changed since it was planned
                raise ChecksumMismatch("the local file changed while it was read") from None
            except OSError as exc:  # gone, unreadable, or a symlink put there since (O_NOFOLLOW)
                raise ChecksumMismatch(f"the local file cannot be read: {exc.strerror or exc}") from None

    def _stream_resume_point(self, obj: S3Object, temp: Path) -> tuple[list[Part], int]:
        """For a large object: its checkpoint parts and how many bytes an earlier run left on disk in order (the
        journaled part boundaries, plus what the progress slot says of the part after them)."""
        if obj.size < self.config.multipart_threshold:
            return [], 0
        parts = plan_parts(obj.size, self.config.part_size)
        layout = [part.size for part in parts]
        offset = 0
        if self.journal.has_partial(obj, layout):
            done = self.journal.partial_parts(obj, layout)
            contiguous = 0
            while contiguous in done:
                contiguous += 1
            offset = parts[contiguous - 1].end + 1 if contiguous else 0
            kept = self.journal.progress.kept(part_ident(obj, layout, contiguous, "stream"))
            if kept is not None and contiguous < len(parts) and kept[0] < parts[contiguous].size:
                offset += kept[0]
        try:
            info = os.lstat(temp)
        except OSError:
            info = None
        if offset and (info is None or not stat.S_ISREG(info.st_mode) or info.st_size < offset):
            offset = 0
        if offset == 0:
            self.journal.drop_partial(obj)
            self.journal.begin_parts(obj, layout)
        return parts, offset

    def _copy_body(
        self,
        response: Response,
        fd: int,
        offset: int,
        end: int,
        hasher: StreamHasher | PartHash | None,
        checkpoint: Callable[[int], None] | None = None,
    ) -> tuple[int, int, Exception | None]:
        """Copy a response body to ``fd`` from ``offset``; returns (new offset, bytes read, the read error or None).

        A read error is returned, not raised, so the caller still learns how far the body got and resumes the
        next request from there.
        """
        chunk_size, limiter = self.config.chunk_size, self.limiter
        got = 0
        while offset < end:
            if self.stop.is_set():
                raise Interrupted()
            want = min(chunk_size, end - offset)
            if limiter is not None:
                want = min(want, limiter.quantum)
                wait = limiter.reserve(want)
                if wait > 0 and self.stop.wait(wait):
                    raise Interrupted()
            try:
                chunk = response.read(want) if limiter is None else self._read_reserved(response, want)
            except Exception as exc:
                if limiter is not None:
                    limiter.refund(want)
                return offset, got, exc
            if limiter is not None and len(chunk) < want:
                limiter.refund(want - len(chunk))
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

    @staticmethod
    def _read_reserved(response: Response, want: int) -> bytes:
        """Under a bandwidth cap, the ``want`` bytes reserved and waited for, read whole (short only at the
        body's end). One read returns what has arrived, often a receive buffer's worth: giving the rest back
        would let others read in its place while readers queued behind it still wait their original turn,
        and the run then read up to a third above the cap in its last second (benchmarks/bandwidth.py)."""
        chunk = response.read(want)
        if len(chunk) == want or not chunk:
            return chunk
        pieces = [chunk]
        have = len(chunk)
        while have < want:
            piece = response.read(want - have)
            if not piece:
                break
            pieces.append(piece)
            have += len(piece)
        return b"".join(pieces)

    def _fetch_parts(self, obj: S3Object, target: Path, parts: list[Part], route: Route) -> tuple[str | None, int]:
        """Ranged GETs in parallel into a preallocated temp file; parts done, and the bytes on disk inside the
        parts in flight, survive a crash via the journal and its progress slots."""
        temp = temp_path_for(target, obj.key)
        layout = [part.size for part in parts]
        kind = route.checksum.algorithm if route.checksum else ("md5" if self.config.verify_checksums else "")
        done, kept = self._parts_on_disk(obj, temp, layout, kind)
        fd = self._open_temp(temp, keep=kept)
        try:
            if not kept:
                self._preallocate(fd, obj.size)
                self.journal.begin_parts(obj, layout)
            elif done:
                log.info("Resuming %s: %d of %d parts already on disk", self._what(obj), len(done), len(parts))
            job = _PartsJob(obj, fd, temp, layout, kind, kept)
            fetched = self._fetch_missing_parts(job, [part for part in parts if part.index not in done], done)
            os.close(fd)
            fd = -1
            try:
                checksum = self._parts_checksum(obj, parts, done, route)
            except ChecksumMismatch as exc:
                exc.kept = kept
                raise
            self._finish(obj, temp, target, checksum)
            return checksum, fetched
        finally:
            if fd >= 0:
                os.close(fd)

    def _parts_on_disk(self, obj: S3Object, temp: Path, layout: list[int], kind: str) -> tuple[dict[int, str], bool]:
        """The parts an earlier attempt or run left in the temp file with the digest this fetch needs (index ->
        digest as PartHash.text() writes it), and whether that temp file is kept at all."""
        done = self.journal.partial_parts(obj, layout)
        if kind == "md5":  # parts fetched unverified carry no MD5, parts of a CRC fetch no MD5 either
            done = {index: digest for index, digest in done.items() if digest and ":" not in digest}
        elif kind:
            done = {index: digest for index, digest in done.items() if digest.startswith(kind + ":")}
        began = self.journal.has_partial(obj, layout)
        if began and temp.is_file() and not temp.is_symlink() and temp.stat().st_size == obj.size:
            if kind and not self.journal.written_this_boot(obj):
                done = self._check_on_disk(obj, temp, layout, done, kind)
                self.journal.begin_parts(obj, layout)
            return done, True
        self.journal.drop_partial(obj)
        return {}, False

    def _check_on_disk(
        self, obj: S3Object, temp: Path, layout: list[int], done: dict[int, str], kind: str
    ) -> dict[int, str]:
        """The parts whose bytes on disk still match their journaled digest, read back once: the journal was
        written in another boot, and a power loss can keep a journal line whose data never reached the disk."""
        starts = list(itertools.accumulate(layout, initial=0))
        good = {}
        for index, digest in done.items():
            disk = PartHash(kind)
            _hash_file_range(temp, starts[index], layout[index], disk)
            if disk.text() == digest:
                good[index] = digest
            else:
                self._spoiled(obj, index)
        if kind in COMBINABLE:  # a slot's CRC may have outrun its data too (an MD5 prefix is read back anyway)
            for index in sorted(set(range(len(layout))) - set(done)):
                ident = part_ident(obj, layout, index, kind)
                kept = self.journal.progress.kept(ident)
                disk = PartHash(kind)
                if kept is not None and 0 < kept[0] < layout[index]:
                    _hash_file_range(temp, starts[index], kept[0], disk)
                    if disk.value != kept[1]:
                        self.journal.progress.release(ident)
                        self._spoiled(obj, index)
        return good

    def _spoiled(self, obj: S3Object, index: int) -> None:
        log.warning(
            "%s part %d on disk does not match its journaled checksum (the machine restarted since); fetching that "
            "part again",
            self._what(obj),
            index + 1,
        )

    @staticmethod
    def _preallocate(fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskFull(str(exc)) from None
            raise

    def _fetch_missing_parts(self, job: _PartsJob, todo: list[Part], done: dict[int, str]) -> int:
        """Fetch ``todo``, in parallel when there is a part pool, adding each part's digest to ``done``."""
        if self.part_pool is None or len(todo) <= 1:
            fetched = 0
            for part in todo:
                done[part.index], got = self._fetch_part(job, part)
                fetched += got
            return fetched
        futures = [self.part_pool.submit(self._fetch_part, job, part) for part in todo]
        fetched, error = 0, None
        for part, future in zip(todo, futures, strict=True):
            try:
                done[part.index], got = future.result()
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
        return fetched

    def _parts_checksum(self, obj: S3Object, parts: list[Part], done: dict[int, str], route: Route) -> str | None:
        """The checksum record of an object fetched in parts, from its parts' digests (ChecksumMismatch if wrong):
        their CRCs combined into the object's full-object CRC, or their MD5s into its multipart ETag."""
        if not self.config.verify_checksums:
            return None
        expected = route.checksum
        note = self._opaque_etags.pop((obj.bucket, obj.key), None)
        if expected is not None:
            name = expected.algorithm
            crcs = [int(done[part.index].partition(":")[2], 16) for part in parts]
            if expected.parts:
                return verify_composite(expected, crcs)
            pieces = [(crc, part.size) for crc, part in zip(crcs, parts, strict=True)]
            actual = crc_base64(name, combine_crcs(name, pieces))
            if actual != expected.value:
                raise ChecksumMismatch(f"{name} of the combined ranges {actual} != {expected.value}")
            return f"{name}:{actual}"
        if note:  # an encrypted multipart object: its ETag is no MD5 of MD5s either
            return f"unverifiable: {note}"
        digests = [bytes.fromhex(done[part.index]) for part in parts]
        if etag_kind(obj.etag) == "multipart":
            return verify_multipart_etag(obj.etag, digests)
        return verify_md5(obj.etag, digests[0]) if len(parts) == 1 else None

    def _fetch_part(self, job: _PartsJob, part: Part) -> tuple[str, int]:
        """One ranged GET (resumed within the part on a body fault), hashed as it streams, then journaled; the
        part's progress slot follows every write, so a kill costs only the bytes not yet on disk."""
        obj, progress = job.obj, self.journal.progress
        ident = part_ident(obj, job.layout, part.index, job.kind)
        digest = PartHash(job.kind)
        offset = self._resume_part(job, part, ident, digest)
        slot = progress.claim(ident)
        tries = Attempts(f"{self._what(obj)} part {part.index + 1}", self.config, self.stop)
        fetched = 0

        def written(reached: int) -> None:
            progress.update(slot, ident, reached - part.start, digest.value)

        while offset <= part.end:
            if self.stop.is_set():
                raise Interrupted()
            try:
                offset, got, fault = self._get_range(obj, job.fd, (offset, part.end), digest, written)
                fetched += got
                if fault is not None:
                    raise fault
            except (ObjectChanged, DiskFull, Interrupted):
                raise
            except Exception as exc:
                tries.failed(exc)
        self.journal.record_part(obj, job.layout, part.index, digest.text())
        progress.release(ident)
        return digest.text(), fetched

    def _resume_part(self, job: _PartsJob, part: Part, ident: bytes, digest: PartHash) -> int:
        """Where the part continues: after the bytes an earlier run left on disk (its progress slot), the digest
        fed with them (a CRC from the slot; an MD5 by reading them back once)."""
        kept = self.journal.progress.kept(ident) if job.kept else None
        if kept is None or not 0 < kept[0] < part.size:
            return part.start
        done, crc = kept
        if job.kind in COMBINABLE:
            digest.value = crc
        elif job.kind == "md5":
            _hash_file_range(job.temp, part.start, done, digest)
        log.info(
            "Resuming %s part %d at byte %s of %s", self._what(job.obj), part.index + 1, f"{done:,}", f"{part.size:,}"
        )
        return part.start + done

    def _get_range(
        self, obj: S3Object, fd: int, span: tuple[int, int], digest: PartHash, written: Callable[[int], None]
    ) -> tuple[int, int, Exception | None]:
        """One ranged GET of bytes ``span`` (first, last) into ``fd``: (offset reached, bytes read, the body's
        fault); ``written`` hears of every offset reached."""
        offset, end = span
        request = object_request(
            obj, byte_range=(offset, end), if_match=obj.etag or None, request_payer=self.config.request_payer
        )
        response = self.engine.get(obj, request)
        self._note_version(obj, response.headers)
        note = encryption_note(response.headers) if digest.kind == "md5" else None
        if note:
            self._opaque_etags[(obj.bucket, obj.key)] = note
        try:
            reached, got, fault = self._copy_body(response, fd, offset, end + 1, digest, written)
        finally:
            response.close()
        if fault is None and reached != end + 1:
            fault = ConnectionError(f"part ended at byte {reached} of {end + 1}")
        return reached, got, fault


###############################################################################
# Verification
###############################################################################
# Every byte is hashed once, as it streams; nothing is read back from disk. Which checksum verifies an object
# is decided in one place (choose_hasher, and full_checksum beneath it), from the ETag and the answer's headers.
# Since December 2024 S3 stores a full-object CRC64NVME for every object uploaded without a checksum, multipart
# ones included, so nearly every object carries one; its CRCs of ranges fetched in parallel combine into the
# whole object's (combine_crcs), where an MD5 can only be computed in order.

#: S3 additional checksums we can compute, cheapest first. Measured on one core here: CRC64NVME and CRC32C
#: ~24 GB/s (awscrt), CRC32 ~2.5 GB/s (zlib), MD5 0.74 GB/s.
CHECKSUM_HEADERS = ("crc64nvme", "crc32c", "crc32", "sha256", "sha1")
#: The checksums whose values over consecutive ranges combine into the whole object's.
COMBINABLE = frozenset({"crc64nvme", "crc32c", "crc32"})


@dataclass(frozen=True, slots=True)
class FullChecksum:
    """An S3 checksum of the whole object, as an answer with x-amz-checksum-mode: ENABLED carries it."""

    algorithm: str  #: "crc64nvme", "crc32c", "crc32", "sha256" or "sha1"
    value: str  #: base64 of the big-endian value, as S3 sends it ("<base64>-N" for a composite one)
    #: For a COMPOSITE checksum, its N: the upload's part count. It is the checksum of the parts' checksums, so
    #: it verifies the bytes only when they are fetched on the object's own part boundaries. 0: full-object.
    parts: int = 0


def full_checksum(headers: Mapping[str, str]) -> FullChecksum | None:
    """The cheapest full-object checksum the answer carries that this machine can compute, or None.

    A composite checksum (``<value>-N``: a checksum of the parts' checksums) is no checksum of the bytes.
    """
    if headers.get("x-amz-checksum-type", "FULL_OBJECT").upper() != "FULL_OBJECT":
        return None
    for name in CHECKSUM_HEADERS:
        value = headers.get(f"x-amz-checksum-{name}")
        if value and "-" not in value and (name not in ("crc32c", "crc64nvme") or _awscrt_checksums() is not None):
            return FullChecksum(name, value)
    return None


def composite_checksum(headers: Mapping[str, str]) -> FullChecksum | None:
    """A multipart upload's COMPOSITE CRC32C or CRC32 (``<base64>-N``: the CRC of its parts' CRCs, big-endian,
    concatenated), which this machine can rebuild from the CRCs of the object's own parts; or None.

    It is what a multipart upload with CRC32/CRC32C checksums and no ChecksumType gets, and the only checksum of
    an SSE-KMS multipart object, whose ETag is no MD5 (S3 user guide, "Checking object integrity"; SeaweedFS 4.48
    stores them too). S3 allows no composite CRC64NVME; composite SHAs are left to the ETag.
    """
    if headers.get("x-amz-checksum-type", "COMPOSITE").upper() != "COMPOSITE":
        return None
    for name in ("crc32c", "crc32"):
        value = headers.get(f"x-amz-checksum-{name}", "")
        count = value.rpartition("-")[2]
        if "-" in value and count.isdigit() and int(count) >= 1:
            if name == "crc32c" and _awscrt_checksums() is None:
                return None
            return FullChecksum(name, value, parts=int(count))
    return None


@functools.cache
def _awscrt_checksums() -> Any:
    """awscrt's checksum module, imported on first use (~50 ms); None, with one warning, if it is missing."""
    try:
        from awscrt import checksums
    except ImportError:
        log.warning("awscrt is not installed: objects with CRC32C/CRC64NVME checksums are verified by MD5 instead")
        return None
    return checksums


def crc_function(name: str) -> Callable[[bytes, int], int]:
    """The running CRC of ``name``: crc(data, previous) -> value."""
    if name == "crc32":
        return zlib.crc32
    return {"crc32c": _awscrt_checksums().crc32c, "crc64nvme": _awscrt_checksums().crc64nvme}[name]


def combine_crcs(name: str, pieces: Sequence[tuple[int, int]]) -> int:
    """The CRC of consecutive ranges given as (their CRC, their length), in offset order."""
    checksums = _awscrt_checksums()
    combine = {
        "crc32": checksums.combine_crc32,
        "crc32c": checksums.combine_crc32c,
        "crc64nvme": checksums.combine_crc64nvme,
    }[name]
    total = 0
    for index, (value, length) in enumerate(pieces):
        total = value if index == 0 else combine(total, value, length)
    return total


def composite_crc(name: str, part_crcs: Sequence[int]) -> str:
    """A composite checksum as S3 writes it: the CRC of the parts' big-endian CRCs, concatenated, then "-N"."""
    joined = b"".join(crc.to_bytes(4, "big") for crc in part_crcs)
    return f"{crc_base64(name, crc_function(name)(joined, 0))}-{len(part_crcs)}"


def verify_composite(expected: FullChecksum, part_crcs: Sequence[int]) -> str:
    """The checksum record of an object whose parts' CRCs rebuild its composite checksum; ChecksumMismatch if not."""
    actual = composite_crc(expected.algorithm, part_crcs)
    if actual != expected.value:
        raise ChecksumMismatch(f"composite {expected.algorithm} of the parts {actual} != {expected.value}")
    return f"{expected.algorithm}:{actual}"


def crc_base64(name: str, value: int) -> str:
    """A CRC as S3 writes it: base64 of its big-endian bytes."""
    return base64.b64encode(value.to_bytes(8 if name == "crc64nvme" else 4, "big")).decode()


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


class PartHash:
    """The digest of one part fetched on its own: an MD5 (to rebuild a multipart ETag), a CRC (to combine into
    the object's), or nothing (unverified); ``text()`` is how the journal records it."""

    __slots__ = ("_md5", "kind", "update", "value")

    def __init__(self, kind: str) -> None:
        #: "md5", a name in COMBINABLE, or "" for none.
        self.kind = kind
        self.value = 0
        self._md5: Any = None
        if kind == "md5":
            self._md5 = hashlib.md5(usedforsecurity=False)
            self.update: Callable[[bytes], None] = self._md5.update
        elif kind:
            crc = crc_function(kind)

            def update(data: bytes) -> None:
                self.value = crc(data, self.value)

            self.update = update
        else:
            self.update = lambda data: None

    def text(self) -> str:
        if self._md5 is not None:
            return self._md5.hexdigest()
        return f"{self.kind}:{self.value:x}" if self.kind else ""


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
            self._crc = crc_function(algorithm)

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
            actual = crc_base64(self.algorithm, self._crc_value)
        if actual != self.expected:
            raise ChecksumMismatch(f"{self.algorithm} {actual} != {self.expected}")
        return f"{self.algorithm}:{actual}"


@dataclass(frozen=True, slots=True)
class LocalCheck:
    """How a local file compares with its object's checksum (--checksum, --verify-local)."""

    outcome: str  #: "match", "differ" or "unverifiable"
    algorithm: str  #: what compared them: "md5", "md5-multipart", a CRC or SHA name; "" when nothing did
    detail: str  #: the checksum record on a match ("crc64nvme:<b64>"), else how they differ or why unverifiable


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
    checksum = full_checksum(headers)
    if checksum is not None:
        return StreamHasher(checksum.algorithm, checksum.value)
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
#
# Inside a part, progress is too frequent for a journal line: download_resume.json.progress (ProgressSlots) is
# a small file mapped into memory, a slot per part in flight, updated after every write with a memory store.

RESUME_FORMAT = "aws-data-downloader/resume"


@functools.lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot of the machine (Linux), or None where the OS does not say.

    Bytes written before a kill -9 are in the page cache for the next run of the same boot, whatever reached the
    disk; after a power loss or a reboot, journaled parts and progress slots may be ahead of the data, so a run
    of another boot checks the kept bytes against their journaled checksums before it trusts them.
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class ResumeJournal:
    """What is complete, and which parts of large objects are on disk. Never holds credentials."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        self._lock = threading.Lock()
        self._completed: dict[tuple[str, str], CompletedEntry] = {}
        self._partial: dict[tuple[str, str], dict[str, Any]] = {}
        self._fd = -1
        #: Bytes on disk inside the parts in flight (see ProgressSlots).
        self.progress = ProgressSlots(path.with_name(path.name + ".progress"))
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
        self.progress.load()
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
        elif op == "begin":
            entry = self._partial.get(item)
            if entry is None or entry["etag"] != record["etag"] or entry["layout"] != record["layout"]:
                entry = {"etag": record["etag"], "size": record["size"], "layout": record["layout"], "done": {}}
                self._partial[item] = entry
            entry["boot"] = record.get("boot")
        elif op == "drop":
            self._partial.pop(item, None)

    def completed(self, bucket: str, key: str) -> CompletedEntry | None:
        return self._completed.get((bucket, key))

    def has_partial(self, obj: S3Object, layout: list[int]) -> bool:
        """A fetch of this exact version and part layout began earlier (its temp file may hold bytes)."""
        entry = self._partial.get((obj.bucket, obj.key))
        return entry is not None and (entry["etag"], entry["size"], entry["layout"]) == (obj.etag, obj.size, layout)

    def written_this_boot(self, obj: S3Object) -> bool:
        """The object's kept bytes were written in this boot of the machine (see boot_id): trust them as written."""
        entry = self._partial.get((obj.bucket, obj.key))
        return entry is not None and boot_id() is not None and entry.get("boot") == boot_id()

    def partial_parts(self, obj: S3Object, layout: list[int]) -> dict[int, str]:
        """Parts already on disk for this exact version and part layout of the object (index -> md5 hex)."""
        entry = self._partial.get((obj.bucket, obj.key))
        if entry is None or entry["etag"] != obj.etag or entry["size"] != obj.size or entry["layout"] != layout:
            return {}
        return dict(entry["done"])

    def __len__(self) -> int:
        return len(self._completed)

    def unfinished(self) -> tuple[int, int]:
        """(objects, bytes) of large objects begun and not finished, as a re-run finds them on disk: their
        journaled parts, plus the bytes inside the parts that were in flight (their progress slots)."""
        with self._lock:
            entries = list(self._partial.values())
        journaled = sum(
            size for entry in entries for index, size in enumerate(entry["layout"]) if index in entry["done"]
        )
        return len(entries), journaled + self.progress.bytes_done()

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
        entry = self._partial.get((obj.bucket, obj.key))
        if entry is not None:
            self.progress.forget(obj, entry["layout"])
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

    def begin_parts(self, obj: S3Object, layout: list[int]) -> None:
        """A fetch in parts begins (or continues, its kept bytes checked): from now on its temp file is kept for
        the next attempt or run, and the bytes it writes are this boot's."""
        if not (self.has_partial(obj, layout) and self.written_this_boot(obj)):
            record = {"op": "begin", "bucket": obj.bucket, "key": obj.key, "etag": obj.etag, "size": obj.size}
            self._append({**record, "layout": layout, "boot": boot_id()})

    def drop_partial(self, obj: S3Object) -> None:
        entry = self._partial.get((obj.bucket, obj.key))
        if entry is not None:
            self.progress.forget(obj, entry["layout"])
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
        self.progress.close()


def part_ident(obj: S3Object, layout: Sequence[int], index: int, kind: str) -> bytes:
    """Names one part of one version and layout of an object, with the digest it is fetched for, in 16 bytes."""
    text = f"{obj.bucket}\0{obj.key}\0{obj.etag}\0{obj.size}\0{','.join(map(str, layout))}\0{index}\0{kind}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ProgressSlots:
    """How many bytes of each part in flight are on disk, kept where a kill -9 cannot lose them.

    The file is mapped into memory (MAP_SHARED) with one fixed slot per part being fetched; after every write
    to the temp file the part's slot is updated with a plain memory store, no system call (a journal line per
    read would cost one each). The kernel keeps the mapped pages when the process dies, so the next run reads
    them back and continues each part from its last write. A slot holds the part's identity (part_ident), the
    bytes done, the running CRC for CRC-verified parts, and a CRC32 of those, so a slot torn by the kill is
    ignored. A power loss can lose the pages or keep them ahead of the data: a run of another boot checks kept
    CRCs against the disk (Transfer._check_on_disk), and a kept MD5 prefix fails the object's checksum.
    """

    SLOT = 48
    #: Slots beyond the ones loaded: a part or stream per thread, for the largest parallel_downloads (512).
    CAPACITY = 1100
    _FORMAT = struct.Struct("<16sQQI")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._map: Any = None
        #: Progress left by the previous run, by ident: (bytes done, crc).
        self._kept: dict[bytes, tuple[int, int]] = {}
        self._slots: dict[bytes, int] = {}
        self._free: list[int] = []

    def load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        for offset in range(0, len(data) - self.SLOT + 1, self.SLOT):
            ident, done, crc, check = self._FORMAT.unpack_from(data, offset)
            if done and check == zlib.crc32(data[offset : offset + 32]):
                self._kept[ident] = (done, crc)

    def kept(self, ident: bytes) -> tuple[int, int] | None:
        """(bytes done, crc) the previous run left for this part, if any."""
        return self._kept.get(ident)

    def claim(self, ident: bytes) -> int:
        """A slot for a part now in flight (the one it had, if it was parked)."""
        with self._lock:
            self._open()
            slot = self._slots.get(ident)
            if slot is None:
                slot = self._free.pop() if self._free else self._grow()
                self._slots[ident] = slot
            return slot

    def bytes_done(self) -> int:
        """Bytes on disk inside the parts whose slots are held: in flight when the run stopped, or parked."""
        with self._lock:
            if self._map is None:
                return sum(done for done, _crc in self._kept.values())
            return sum(self._FORMAT.unpack_from(self._map, slot * self.SLOT)[1] for slot in self._slots.values())

    def update(self, slot: int, ident: bytes, done: int, crc: int) -> None:
        head = struct.pack("<16sQQ", ident, done, crc)
        self._map[slot * self.SLOT : slot * self.SLOT + 36] = head + struct.pack("<I", zlib.crc32(head))

    def release(self, ident: bytes) -> None:
        """The part is done (or abandoned): its slot is free."""
        with self._lock:
            self._kept.pop(ident, None)
            slot = self._slots.pop(ident, None)
            if slot is not None and self._map is not None:
                self._map[slot * self.SLOT : (slot + 1) * self.SLOT] = bytes(self.SLOT)
                self._free.append(slot)

    def forget(self, obj: S3Object, layout: Sequence[int]) -> None:
        """Drop every slot of this version and layout of an object (it changed, its bytes did not verify, or it
        is done); the slots of parts fetched in this run are released as each part ends."""
        if not self._kept:
            return
        for kind in ("md5", *COMBINABLE, "", "stream"):  # every PartHash kind, and the stream's
            for index in range(len(layout)):
                ident = part_ident(obj, layout, index, kind)
                if ident in self._kept or ident in self._slots:
                    self.release(ident)

    def _open(self) -> None:
        """Map a fresh file, the previous run's progress parked in its first slots (a second kill keeps it)."""
        if self._map is not None:
            return
        import mmap

        count = self.CAPACITY + len(self._kept)
        with open(self.path, "wb") as handle:
            handle.truncate(count * self.SLOT)
        with open(self.path, "r+b") as handle:
            self._map = mmap.mmap(handle.fileno(), count * self.SLOT)
        for slot, (ident, (done, crc)) in enumerate(self._kept.items()):
            self._slots[ident] = slot
            self.update(slot, ident, done, crc)
        self._free = list(range(count - 1, len(self._kept) - 1, -1))

    def _grow(self) -> int:
        raise RuntimeError("no free progress slot")  # CAPACITY covers every thread of the largest run

    def close(self) -> None:
        """Unmap; the file goes when no part is left half done (a finished run leaves none)."""
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
                if not self._slots:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)


class NullJournal:
    """The journal of a dry run: vouches for nothing and writes nothing."""

    path = None

    def completed(self, bucket: str, key: str) -> CompletedEntry | None:
        return None

    def compact(self) -> None:
        pass

    def unfinished(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        pass


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
    #: Listed objects the filters left out, by rule ("size > max", "extension", ...).
    filtered: Mapping[str, int] = field(default_factory=dict)
    #: The buckets and prefixes given that list no objects at all, as s3:// URLs (a typo, usually).
    nothing_under: tuple[str, ...] = ()
    #: Selected objects a stopped run did not finish (in flight, or not started yet).
    interrupted_files: int = 0
    #: Large objects begun and not finished, and their bytes on disk that a re-run continues from.
    partial_files: int = 0
    partial_bytes: int = 0
    #: Local files --delete removed because the listing no longer has them (a dry run: would remove); None
    #: without --delete. Those it could not remove, and why it removed none (a failed listing, --max-delete).
    deleted: int | None = None
    delete_failed: int = 0
    delete_refused: str | None = None
    #: The run compared local files the journal did not vouch for with their objects' checksums (--checksum).
    checksum: bool = False
    #: Local files compared, by outcome: "match", "differ", "unverifiable", "missing" (--verify-local only).
    local_checks: Mapping[str, int] = field(default_factory=dict)
    #: Files --checksum found different and downloaded again.
    replaced: int = 0
    #: The run only compared the local copy with S3 (--verify-local): nothing was downloaded or written.
    verify_local: bool = False
    #: The local files that differ (reason: how) or are missing (reason: "missing locally").
    local_problems: tuple[FailedObject, ...] = ()
    #: The inventory report the listing came from (--inventory), or None.
    inventory: str | None = None
    #: Objects whose ETag no longer matched the inventory's, all of them, and those of them fetched as they are
    #: now (inventory_fetch_changed); the others failed as CHANGED_SINCE_INVENTORY.
    changed_since_inventory: int = 0
    changed_fetched: int = 0
    #: Objects (or versions) the inventory lists that the bucket no longer has.
    missing_since_inventory: int = 0

    @property
    def stopped_early(self) -> bool:
        return self.interrupted or self.stopped_reason is not None

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
        return (
            self.failed == 0
            and not self.interrupted
            and self.stopped_reason is None
            and not self.bucket_problems
            and not self.nothing_under
            and not self.delete_failed
            and self.delete_refused is None
        )

    @property
    def exit_code(self) -> int:
        """What the CLI exits with for a run that ran to its end (a stopped run raises instead)."""
        if self.failed or self.delete_failed or any(not problem.missing for problem in self.bucket_problems):
            return EXIT_FAILED
        if self.nothing_under or self.bucket_problems:
            return EXIT_NOTHING_LISTED
        return EXIT_FAILED if self.delete_refused is not None else EXIT_OK

    def filtered_text(self) -> str:
        return filtered_text(self.filtered)

    @property
    def checked(self) -> int:
        """Local files hashed and compared (or, for --verify-local, found missing or of another size too)."""
        return sum(self.local_checks.values())

    def local_check_counts(self) -> dict[str, Any]:
        """The JSON keys of --checksum and --verify-local: what the comparisons found."""
        counts = self.local_checks
        if self.verify_local:
            return {
                "intact": counts.get("match", 0),
                "differ": counts.get("differ", 0),
                "missing": counts.get("missing", 0),
                "unverifiable": counts.get("unverifiable", 0),
                "differ_files": [dataclasses.asdict(f) for f in self.local_problems if f.reason != "missing locally"],
                "missing_files": [dataclasses.asdict(f) for f in self.local_problems if f.reason == "missing locally"],
            }
        return {
            "checked": self.checked,
            "matched": counts.get("match", 0),
            "replaced": self.replaced,
            "unverifiable": counts.get("unverifiable", 0),
        }

    def failures_by_reason(self) -> dict[str, list[FailedObject]]:
        grouped: dict[str, list[FailedObject]] = {}
        for failure in self.failures:
            grouped.setdefault(failure.reason, []).append(failure)
        return grouped

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
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
            "filtered_out": sum(self.filtered.values()),
            "filtered_out_by_rule": dict(self.filtered),
            "nothing_under": list(self.nothing_under),
            "buckets": list(self.buckets),
            "bucket_problems": [dataclasses.asdict(p) for p in self.bucket_problems],
            "download_dir": self.download_dir,
            "resume_file": self.resume_file,
            "manifest": self.manifest,
            "dry_run": self.dry_run,
            "interrupted": self.interrupted,
            "stopped_reason": self.stopped_reason,
            "interrupted_files": self.interrupted_files,
            "partial_files": self.partial_files,
            "partial_bytes": self.partial_bytes,
            "deleted": self.deleted,
            "delete_failed": self.delete_failed,
            "delete_refused": self.delete_refused,
            "checksum": self.checksum,
            "verify_local": self.verify_local,
            **self.local_check_counts(),
        }
        if self.inventory is not None:
            data.update(
                inventory=self.inventory,
                changed_since_inventory=self.changed_since_inventory,
                changed_since_inventory_fetched=self.changed_fetched,
                missing_since_inventory=self.missing_since_inventory,
            )
        if self.dry_run:  # nothing was fetched: what would be, under its own keys; no speed, no success rate
            renamed = {"downloaded": "would_download", "deleted": "would_delete"}
            data = {renamed.get(key, key): value for key, value in data.items()}
            data.update(downloaded_bytes=0, average_speed_mb_s=0.0, success_rate=None)
            data["would_download_bytes"] = self.downloaded_bytes
        return data

    def _rows(self) -> list[tuple[str, str]]:
        """The README's lines of a run, plus what a stopped run left: the objects it did not finish, and the
        bytes of large ones on disk that a re-run continues from."""
        rows = [
            ("Total files:", f"{self.total_files:,}"),
            ("Downloaded:", f"{self.downloaded:,}"),
            ("Skipped:", f"{self.skipped:,}"),
            ("Failed:", f"{self.failed:,}"),
        ]
        if self.stopped_early:
            rows.append(("Interrupted:", f"{self.interrupted_files:,}"))
        if self.deleted is not None:
            failed = f" ({self.delete_failed:,} could not be deleted)" if self.delete_failed else ""
            rows.append(("Deleted:", f"{self.deleted:,}{failed}"))
        if self.checksum:
            counts = self.local_check_counts()
            matched, replaced, unverifiable = counts["matched"], counts["replaced"], counts["unverifiable"]
            text = f"{self.checked:,} (matched {matched:,}, replaced {replaced:,}, unverifiable {unverifiable:,})"
            rows.append(("Checked:", text))
        rows += [
            ("Total size:", format_size(self.total_bytes)),
            ("Downloaded size:", format_size(self.downloaded_bytes)),
        ]
        if self.partial_files:
            files = f"{self.partial_files:,} unfinished file{'' if self.partial_files == 1 else 's'}"
            rows.append(("Resumable:", f"{format_size(self.partial_bytes)} of {files}, kept on disk"))
        return [
            *rows,
            ("Duration:", f"{self.duration_s:,.1f} seconds"),
            ("Average speed:", f"{self.average_speed / MiB:.1f} MB/s"),
            ("Success rate:", f"{self.success_rate:.1f}%"),
        ]

    def _dry_run_rows(self) -> list[tuple[str, str]]:
        """What a run would do; nothing was fetched, so there is no speed and no success rate."""
        return [
            ("Total files:", f"{self.total_files:,}"),
            ("Would download:", f"{self.downloaded:,} ({format_size(self.downloaded_bytes)})"),
            ("Would skip:", f"{self.skipped:,}"),
            ("Would fail:", f"{self.failed:,}"),
            *([("Would delete:", f"{self.deleted:,}")] if self.deleted is not None else []),
            ("Total size:", format_size(self.total_bytes)),
            ("Duration:", f"{self.duration_s:,.1f} seconds"),
        ]

    def _verify_local_rows(self) -> list[tuple[str, str]]:
        """What --verify-local found: nothing was fetched, so there is no download count, speed or success rate."""
        counts = self.local_check_counts()
        unchecked = self.failed - counts["differ"] - counts["missing"]
        return [
            ("Total files:", f"{self.total_files:,}"),
            ("Intact:", f"{counts['intact']:,}"),
            ("Differ:", f"{counts['differ']:,}"),
            ("Missing:", f"{counts['missing']:,}"),
            ("Unverifiable:", f"{counts['unverifiable']:,}"),
            ("Not checked:", f"{self.skipped - counts['intact'] - counts['unverifiable'] + unchecked:,}"),
            ("Total size:", format_size(self.total_bytes)),
            ("Duration:", f"{self.duration_s:,.1f} seconds"),
        ]

    #: Differing and missing files the --verify-local summary names (the log and --json name them all).
    SHOWN_PROBLEMS = 20

    def _local_problem_lines(self) -> list[str]:
        """--verify-local: the first SHOWN_PROBLEMS files that differ or are missing, and how."""
        if not self.local_problems:
            return []
        lines = ["Differ or missing:"]
        for problem in self.local_problems[: self.SHOWN_PROBLEMS]:
            lines.append(f"  {problem.bucket}/{display_key(problem.key)}: {display_key(problem.reason)}")
        if len(self.local_problems) > self.SHOWN_PROBLEMS:
            lines.append(f"  ... {len(self.local_problems) - self.SHOWN_PROBLEMS:,} more in the log and --json")
        return lines

    def format(self) -> str:
        """The summary block, as the project README shows it."""
        rule = "=" * 60
        if self.verify_local:
            title, rows = "VERIFY-LOCAL SUMMARY (nothing was downloaded)", self._verify_local_rows()
        elif self.dry_run:
            title, rows = "DRY RUN SUMMARY (nothing was written)", self._dry_run_rows()
        else:
            title, rows = "DOWNLOAD SUMMARY", self._rows()
        if self.filtered:
            rows.append(("Filtered out:", self.filtered_text()))
        if self.download_dir:
            rows.append(("Download dir:", self.download_dir))
        if self.manifest and not self.dry_run:
            rows.append(("Manifest:", self.manifest))
        lines = [rule, title, rule, *(f"{label:<18}{value}" for label, value in rows)]
        # --verify-local's intact files have their own row; its other skips (unverifiable, archived) are listed
        reasons = {
            reason: n for reason, n in self.skipped_reasons.items() if not (self.verify_local and reason == "intact")
        }
        if reasons:
            lines.append("Would skip, by reason:" if self.dry_run else "Skipped by reason:")
            lines += [f"  {reason}: {count:,}" for reason, count in sorted(reasons.items())]
        if self.verify_local:
            lines += self._local_problem_lines()
        grouped = self.failures_by_reason()
        if grouped:
            lines.append("Failures by reason:")
            for reason, items in sorted(grouped.items(), key=lambda kv: -len(kv[1])):
                examples = ", ".join(f"{f.bucket}/{display_key(f.key)}" for f in items[:3])
                more = f", ... ({len(items) - 3} more)" if len(items) > 3 else ""
                lines.append(f"  {display_key(reason)} ({len(items):,}): {examples}{more}")
        for problem in self.bucket_problems:
            lines.append(f"Bucket not downloaded: {problem.reason}")
        lines += self._inventory_lines()
        for place in self.nothing_under:
            lines.append(f"No objects under {place}")
        if self.delete_refused is not None:
            lines.append(f"Not deleted: {self.delete_refused}")
        if self.interrupted:
            lines.append("Interrupted: run the same command again to continue.")
        if self.stopped_reason:
            lines.append(f"Stopped: {self.stopped_reason}")
        return "\n".join(lines)

    def _inventory_lines(self) -> list[str]:
        """What differs between the inventory and the bucket now: never mixed in silently."""
        if self.inventory is None:
            return []
        lines = [f"Inventory: {self.inventory}"]
        changed, fetched = self.changed_since_inventory, self.changed_fetched
        if changed:
            how = (
                f"{fetched:,} fetched as they are now"
                if fetched
                else "not fetched; --inventory-fetch-changed fetches them as they are now"
            )
            lines.append(f"Changed since the inventory: {changed:,} ({how})")
        if self.missing_since_inventory:
            lines.append(f"Missing since the inventory: {self.missing_since_inventory:,}")
        return lines


def filtered_text(filtered: Mapping[str, int]) -> str:
    """'17 (size > max 12, extension 5)': the objects the filters left out, most common rule first."""
    rules = ", ".join(f"{rule} {count:,}" for rule, count in sorted(filtered.items(), key=lambda kv: -kv[1]))
    return f"{sum(filtered.values()):,} ({rules})" if rules else "0"


def in_notebook() -> bool:
    """True inside a Jupyter kernel, where tqdm.auto draws a widget instead of a text bar."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        return type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"  # type: ignore[attr-defined]
    except Exception:
        return False


def bar_class() -> tuple[type, bool]:
    """The tqdm class to draw the bar with, and whether it writes text into a notebook's output.

    tqdm.auto draws a widget in a Jupyter kernel; without ipywidgets it warns (TqdmWarning: IProgress not found)
    and falls back to the text bar. Here that case gets the text bar directly, with no warning.
    """
    if "ipykernel.zmqshell" in sys.modules:  # tqdm.autonotebook's own test for a kernel
        from tqdm import notebook

        if notebook.IProgress is None:
            from tqdm.std import tqdm as text_bar

            return text_bar, True
    from tqdm.auto import tqdm

    return tqdm, False


class Tally:
    """Thread-safe running counts of a run; frozen into a DownloadSummary at the end."""

    #: Failures kept with their keys; beyond this only the counts by reason grow.
    MAX_FAILURES_KEPT = 10_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = self.downloaded = self.skipped = self.failed = 0
        self.total_bytes = self.downloaded_bytes = 0
        self.streamed_bytes = 0
        #: Sizes of the objects skipped, sizes of those whose fetch is over (downloaded or failed), and the bytes
        #: those fetches streamed: what the progress bar fills with (Progress._fetched).
        self.skipped_bytes = self.settled_bytes = self.settled_streamed = 0
        self.failures: list[FailedObject] = []
        self.failure_counts: Counter[str] = Counter()
        self.skipped_reasons: Counter[str] = Counter()
        #: Listed objects the filters left out, by rule (filter_reason).
        self.filtered: Counter[str] = Counter()
        #: Local files compared with their objects (--checksum, --verify-local), by DownloadResult.local_check;
        #: the differing ones --checksum downloaded again; the differing and missing ones, kept with their keys.
        self.local_checks: Counter[str] = Counter()
        self.replaced = 0
        self.local_problems: list[FailedObject] = []
        #: Downloaded objects with a note on how (CHANGED_FETCHED), by note.
        self.notes: Counter[str] = Counter()

    def add_selected(self, sizes: Iterable[int]) -> None:
        """Objects of a listing page the filters kept."""
        sizes = list(sizes)
        with self.lock:
            self.total += len(sizes)
            self.total_bytes += sum(sizes)

    def add_bytes(self, count: int) -> None:
        self.streamed_bytes += count  # a racy += only skews the speed shown, never a result

    def record(self, result: DownloadResult) -> None:
        with self.lock:
            if result.local_check:
                self.local_checks[result.local_check] += 1
                self.replaced += result.local_check == "differ" and result.status == "downloaded"
                if result.local_check in ("differ", "missing") and len(self.local_problems) < self.MAX_FAILURES_KEPT:
                    obj = result.obj
                    self.local_problems.append(FailedObject(obj.bucket, obj.key, result.detail or result.reason))
            # A file hashed by --checksum or --verify-local was work, like a fetch: the bar counts it, kept or not.
            if result.status in ("downloaded", "failed") or result.local_check:
                self.settled_bytes += result.obj.size
                self.settled_streamed += result.bytes_fetched
            if result.status == "downloaded":
                self.downloaded += 1
                self.downloaded_bytes += result.obj.size
                if result.reason:
                    self.notes[result.reason] += 1
            elif result.status == "skipped":
                self.skipped += 1
                self.skipped_bytes += 0 if result.local_check else result.obj.size
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

    Both are drawn by a ticker thread, not by finished objects, so they keep moving while one large object takes
    minutes, and a run of many small files pays for a redraw every REFRESH_S, not one per file. The bar fills with
    bytes: its percentage, bar and elapsed<remaining are of the bytes still to fetch (in-flight objects and parts
    included), while its counter and rate are files, as the README shows it::

        Downloading:  45%|████▌     | 556/1234 [02:15<02:45, 4.1files/s, Success=550, Failed=6, Speed=15.2 MB/s]
    """

    #: Seconds between redraws of the bar.
    REFRESH_S = 0.25
    #: Seconds between redraws of a text bar in a notebook, where every redraw is a chunk of the cell's output.
    NOTEBOOK_TEXT_REFRESH_S = 1.0

    def __init__(self, tally: Tally, *, bar: bool, log_lines: bool, interval: float, cap: int | None = None) -> None:
        self.tally = tally
        self.interval = interval
        #: The --max-bandwidth cap (bytes per second) shown beside the speed, so a slow run explains itself.
        self.cap_text = f"{format_size(cap)}/s" if cap else ""
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._bar: Any = None
        #: The listing is complete: the totals are final.
        self._listed = False
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None
        if bar:
            tqdm, notebook_text = bar_class()
            period = self.NOTEBOOK_TEXT_REFRESH_S if notebook_text else self.REFRESH_S
            # mininterval 0 and miniters 1: the ticker decides when to draw, tqdm draws whenever asked.
            self._bar = tqdm(
                total=None,
                desc="Downloading",
                bar_format=self._bar_format(),
                dynamic_ncols=True,
                leave=True,
                mininterval=0,
                miniters=1,
            )
        elif log_lines:
            period = interval
        else:
            return
        self._ticker = threading.Thread(target=self._tick, args=(period,), name="adl-progress", daemon=True)
        self._ticker.start()

    def _speed(self) -> float:
        return self.tally.streamed_bytes / max(time.monotonic() - self.started, 1e-9) / MiB

    def _postfix(self) -> str:
        tally = self.tally
        cap = f", Cap={self.cap_text}" if self.cap_text else ""
        return f"Success={tally.downloaded + tally.skipped}, Failed={tally.failed}, Speed={self._speed():.1f} MB/s{cap}"

    def _bar_format(self) -> str:
        """tqdm's fields for the bytes ({percentage}, {bar}, {elapsed}<{remaining}); the files as plain text."""
        tally = self.tally
        finished = tally.finished
        rate = f"{finished / max(time.monotonic() - self.started, 1e-9):.1f}" if finished else "?"
        files = f"{finished}/{tally.total}"
        return "{desc}: {percentage:3.0f}%|{bar}| " + files + " [{elapsed}<{remaining}, " + rate + "files/s{postfix}]"

    def _fetched(self) -> tuple[int, int]:
        """(bytes fetched, bytes to fetch) so far, objects skipped left out of both. Bytes of objects in flight
        count as they arrive; a finished object counts its whole size (a failed one too: its fetch is over)."""
        tally = self.tally
        to_fetch = tally.total_bytes - tally.skipped_bytes
        in_flight = max(0, tally.streamed_bytes - tally.settled_streamed)
        return min(to_fetch, tally.settled_bytes + in_flight), to_fetch

    def _measure(self) -> tuple[int, int | None]:
        """What the bar fills with: the bytes; the files when there are no bytes to fetch; total None while unknown."""
        done, to_fetch = self._fetched()
        if to_fetch > 0:
            return done, to_fetch
        return (self.tally.finished, self.tally.total or None) if self._listed else (0, None)

    def _tick(self, period: float) -> None:
        while not self._closed.wait(period):
            if self._bar is not None:
                self._draw()
            else:
                self._log_line()

    def _log_line(self) -> None:
        tally = self.tally
        done, to_fetch = self._fetched()
        log.info(
            "Progress: %s of %s files done (%s downloaded, %s skipped, %s failed), %s of %s fetched at %.1f MB/s%s",
            f"{tally.finished:,}",
            f"{tally.total:,}",
            f"{tally.downloaded:,}",
            f"{tally.skipped:,}",
            f"{tally.failed:,}",
            format_size(done),
            format_size(to_fetch),
            self._speed(),
            f" (cap {self.cap_text})" if self.cap_text else "",
        )

    def _draw(self, final: bool = False) -> None:
        """Bring the bar up to date and redraw it (the final frame is close's: tqdm.close draws it once)."""
        with self._lock:
            bar, tally = self._bar, self.tally
            if bar is None or (not final and self._listed and tally.finished >= tally.total):
                return  # every object is done: the next frame is the final one
            done, total = self._measure()
            if total != bar.total:
                bar.total = total
                widget = getattr(bar, "container", None)
                if widget is not None and total:  # tqdm.notebook sizes its widget's bar only when it is made
                    widget.children[1].max = total
                    widget.children[1].bar_style = ""
            bar.bar_format = self._bar_format()
            bar.set_postfix_str(self._postfix(), refresh=False)
            if final:
                bar.n = done
            elif done > bar.n:
                bar.update(done - bar.n)  # tqdm's rate and ETA follow the updates it is given
            else:
                bar.refresh()

    def listing_complete(self) -> None:
        """The listing is complete: the tally's totals are final."""
        self._listed = True

    def close(self) -> None:
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:  # the last frame shows the final counts, not a stale postfix
            self._draw(final=True)
            with self._lock:
                self._bar.close()
                self._bar = None


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


class DiskBudget:
    """Tracks bytes promised to downloads against the free space measured at the start.

    Some space is left free for the journal, the log and other writers on the same disk: 64 MiB, or on a
    small volume 5% of its size (at least 1 MiB), so a 64 MiB volume can still take 60 MB of files.
    """

    MARGIN = 64 * MiB

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.enabled = enabled
        usage = shutil.disk_usage(directory) if enabled else None
        self.free = usage.free if usage else 0
        #: Bytes kept free beyond the selection.
        self.margin = min(self.MARGIN, max(MiB, usage.total // 20)) if usage else 0
        self.reserved = 0

    def fits(self, more: int) -> bool:
        return not self.enabled or self.reserved + more <= self.free - self.margin

    def reserve(self, more: int) -> None:
        self.reserved += more


###############################################################################
# Mirror deletions (--delete)
###############################################################################
# After a complete listing, the local files under the selection that the listing no longer has are removed, as
# `aws s3 sync --delete` and `rclone sync` do. The selection's local roots are <download_dir>/<bucket>/ cut to
# each prefix: a file is in scope when its key (its path below the bucket's directory, the inverse of
# local_path_for) starts with a selected prefix and the filters would keep it. Like rclone and aws-cli, a file a
# filter leaves out is neither fetched nor deleted, so a shard's run never touches another shard's files.
#
# The listing is remembered as one hash() per key, not the key itself: about 70 bytes a key instead of ~130 for
# a 50-character key (benchmarks/mirror_memory.py). A collision can only keep a file, never delete one.


def delete_base(root: Path, bucket: str, prefix: str) -> Path | None:
    """The directory that holds every local file of ``prefix`` (its part up to the last '/'), or None when no
    key with that prefix can be stored (local_path_for refuses it)."""
    directory = prefix.rpartition("/")[0]
    if not directory:
        return root / bucket
    try:
        return local_path_for(root, bucket, directory)
    except UnsafeKeyError:
        return None


def through_symlink(root: Path, path: Path) -> bool:
    """True when a directory from ``root`` (excluded: the user chose it) down to ``path`` is a symlink or no
    directory: a scope reached that way is another tree, and none of its files are ours to delete."""
    current = root
    for name in path.relative_to(root).parts:
        current = current / name
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return False  # nothing there to delete
        if not stat.S_ISDIR(info.st_mode):
            return True
    return False


class Mirror:
    """The keys a --delete run listed, and the local files in scope that they no longer account for.

    ``own_files`` are the tool's own files wherever they live (journal, lock, log, manifest, config); the
    temporary files of downloads (``.adl-*``) and the resume journal's siblings are recognised by name.
    """

    def __init__(self, root: Path, filters: Filters, resume_file: Path, own_files: Iterable[Path]) -> None:
        self.root = root
        self.filters = filters
        self.resume_file = resume_file
        self.own_files = {os.path.abspath(path) for path in own_files}
        #: Per bucket, hash() of every key listed (the filtered-out ones too).
        self.listed: dict[str, set[int]] = {}

    def add(self, page: Sequence[S3Object]) -> None:
        """Remember a listing page's keys (a page holds one bucket's objects)."""
        if page:
            self.listed.setdefault(page[0].bucket, set()).update(hash(obj.key) for obj in page)

    def is_own_file(self, path: Path) -> bool:
        name, resume = path.name, self.resume_file
        if name.startswith(".adl-"):  # temp_path_for's names, and prepare_download_dir's probe
            return True
        if path.parent == resume.parent and (
            name == resume.name or name.startswith((resume.name + ".", f".{resume.name}."))
        ):
            return True  # the journal, its .journal/.progress/.corrupt files and compaction's temp file
        return os.path.abspath(path) in self.own_files

    def unlisted(self, bucket: str, prefixes: Sequence[str]) -> Iterator[Path]:
        """The files in scope that no listed key maps to; symlinks and other non-files are kept,
        and no symlinked directory is entered."""
        listed = self.listed.get(bucket, set())
        bucket_dir = self.root / bucket
        for prefix in collapse_prefixes(prefixes):
            base = delete_base(self.root, bucket, prefix)
            if base is None or through_symlink(self.root, base) or not base.is_dir():
                continue
            for directory, dirnames, filenames in os.walk(base):  # os.walk never descends into a symlink
                relative = os.path.relpath(directory, bucket_dir)
                dir_key = "" if relative == "." else relative.replace(os.sep, "/") + "/"
                dirnames[:] = [
                    name
                    for name in dirnames
                    if (dir_key + name + "/").startswith(prefix) or prefix.startswith(dir_key + name + "/")
                ]
                for name in filenames:
                    key = dir_key + name
                    if key.startswith(prefix) and hash(key) not in listed:
                        path = Path(directory, name)
                        if self.deletable(path, bucket, key):
                            yield path

    def deletable(self, path: Path, bucket: str, key: str) -> bool:
        """A file in scope that no listed key maps to: deleted unless it is the tool's own, not a regular file,
        could not have come from a key, or a filter leaves its key out."""
        if self.is_own_file(path):
            return False
        try:
            info = os.lstat(path)
            stored = local_path_for(self.root, bucket, key) == path
        except (OSError, UnsafeKeyError):
            return False
        if not stored or not stat.S_ISREG(info.st_mode):
            return False
        local = S3Object(bucket, key, info.st_size, "", info.st_mtime)
        return filter_reason(local, self.filters) is None


def remove_emptied_dirs(bucket_dir: Path, prefixes: Sequence[str], removed: Iterable[Path]) -> int:
    """Remove the directories that deleting ``removed`` left empty, deepest first, up to (not including) the
    bucket's directory and only within scope: a directory the user made, or one that still holds anything,
    stays. Returns how many went."""
    pending = {path.parent for path in removed}
    scopes = collapse_prefixes(prefixes)
    count = 0
    while pending:
        directory = max(pending, key=lambda path: len(path.parts))
        pending.discard(directory)
        if directory == bucket_dir or bucket_dir not in directory.parents:
            continue
        dir_key = directory.relative_to(bucket_dir).as_posix() + "/"
        if not any(dir_key.startswith(prefix) for prefix in scopes):
            continue
        try:
            os.rmdir(directory)  # only an empty directory goes
        except OSError:
            continue
        count += 1
        pending.add(directory.parent)
    return count


###############################################################################
# The downloader
###############################################################################
# AWSDataDownloader is the public face: settings, stop() and run_full_download(). Each run is a _Run, whose fields
# are that run's whole state (engine, journal, manifest, tally, progress, disk budget, why it stopped) and whose
# execute() reads as the run goes: discover -> plan pages -> reserve disk -> dispatch -> finish. The objects it
# dispatches go to a _Workers (the small-object loop, the object and part pools) or, in a dry run, a _DryRun.


class _Workers:
    """Fetches planned objects, each by its route: the event loop for small ones, worker threads for the rest.

    A context manager with an explicit end: leaving it waits for every object it took (or, once the run is
    stopping, ends the ones not started as interrupted), so a notebook kernel keeps no thread after a run.
    """

    def __init__(self, run: _Run) -> None:
        config = run.config
        self.run = run
        workers = config.parallel_downloads
        self.object_pool = ThreadPoolExecutor(workers, thread_name_prefix="adl-object")
        self.part_pool = ThreadPoolExecutor(workers, thread_name_prefix="adl-part")
        #: One cap for every connection, threads and loop alike (--max-bandwidth).
        self.limiter = BandwidthLimiter(config.max_bandwidth) if config.max_bandwidth else None
        if config.max_bandwidth:
            log.info("Download rate capped at %s/s for the whole run", format_size(config.max_bandwidth))
        self.transfer = Transfer(
            run.engine,
            config,
            run.journal,  # type: ignore[arg-type]  # a real journal: dry runs have no workers
            self.part_pool,
            run.stop,
            run.tally.add_bytes,
            root=run.root,
            pinned=run.manifest_objects is not None
            or (run.inventory is not None and not config.inventory_fetch_changed),
            halt=run.halt,
            inventory=run.inventory is not None,
            limiter=self.limiter,
        )
        #: Objects handed to the threads and not finished yet: bounded, so listing never runs far ahead.
        self.in_flight = threading.BoundedSemaphore(workers * 4)
        self.small_loop = run.engine.supports_small_loop and config.small_object_kb > 0
        #: Started with the first small object, so a run without any starts no loop thread.
        self.loop: SmallObjectLoop | None = None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, plans: Sequence[Planned]) -> None:
        routes = [
            "hash" if planned.hash_local else route_for(planned.obj, self.run.config, self.small_loop).path
            for planned in plans
        ]
        small = [planned for planned, path in zip(plans, routes, strict=True) if path == "loop"]
        if small:
            self._loop().submit(small)
        for planned, path in zip(plans, routes, strict=True):
            if path != "loop" and not self._thread(planned):
                return

    def _loop(self) -> SmallObjectLoop:
        if self.loop is None:
            run = self.run
            loop = run.engine.small_loop(run.config, run.stop, self.deliver, self.fallback, self.stopped, self.limiter)
            assert loop is not None, "routed to the loop by an engine without one"
            self.loop = loop
        return self.loop

    def _thread(self, planned: Planned, failed_attempt: BaseException | None = None) -> bool:
        """Hand one object to the pool once there is room; False when the run stopped meanwhile."""
        while not self.in_flight.acquire(timeout=0.2):
            if self.run.stop.is_set():
                return False
        if self.run.stop.is_set():
            self.in_flight.release()
            return False
        target = Path(planned.target)  # type: ignore[arg-type]
        if self.run.verify_local:
            future = self.object_pool.submit(self.transfer.verify_local, planned.obj, target)
        elif planned.hash_local:
            future = self.object_pool.submit(self.transfer.refresh, planned.obj, target, planned.fallback)
        else:
            future = self.object_pool.submit(self.transfer.download, planned.obj, target)
        future.add_done_callback(lambda done, p=planned: self._done(done, p, release=True))
        return True

    # -- how objects finish (called from the loop and pool threads) -----------------------------------------

    def deliver(self, planned: Planned, headers: Mapping[str, str], body: bytes) -> None:
        """A whole body from the loop: verify and store it, or hand it to the threads as a failed first try."""
        assert planned.target is not None
        try:
            result = self.transfer.store_small(planned.obj, Path(planned.target), headers, body)
        except Exception as exc:
            self.fallback(planned, exc)
            return
        self.run.finished(dataclasses.replace(result, seconds=self.loop.seconds if self.loop else 0.0))

    def fallback(self, planned: Planned, failed_attempt: BaseException | None) -> None:
        """The loop hands an object over: the threads carry on from its failed attempt (None: start afresh)."""
        try:
            target = Path(planned.target)  # type: ignore[arg-type]
            future = self.object_pool.submit(self.transfer.download, planned.obj, target, failed_attempt)
        except RuntimeError:  # the pool stopped taking work: the run is ending
            self.stopped(planned)
            return
        future.add_done_callback(lambda done, p=planned: self._done(done, p, release=False))

    def stopped(self, planned: Planned) -> None:
        self.run.finished(DownloadResult(planned.obj, "interrupted", "stopped"))

    def _done(self, future: Future[DownloadResult], planned: Planned, release: bool) -> None:
        if release:
            self.in_flight.release()
        try:
            result = future.result()
        except CancelledError:  # never started: the run was stopping (signal, disk full)
            result = DownloadResult(planned.obj, "interrupted", "stopped")
        except DiskFull as exc:  # the transfer has halted the run already
            result = DownloadResult(planned.obj, "failed", failure_reason(exc))
        except BaseException as exc:  # a bug, not a per-object problem: report it, keep going
            log.error("Unexpected error on %s: %s", display_key(planned.obj.key), exc, exc_info=True)
            result = DownloadResult(planned.obj, "failed", f"{type(exc).__name__}: {exc}")
        self.run.finished(result)

    # -- the end --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for every object taken: the loop first (it hands failures to the pool), then the pools."""
        loop = self.loop
        if loop is not None:
            self.run.until_done(loop.close)
        if self.run.stop.is_set():
            self.object_pool.shutdown(wait=False, cancel_futures=True)
        self.run.until_done(self.object_pool.shutdown)
        self.run.until_done(self.part_pool.shutdown)


class _DryRun:
    """Stands in for _Workers in a dry run: each object that would be fetched is logged and counted.

    A page's "Would download" lines go out as one log record (``per_line``): a record per key cost more than
    listing the key. The CLI's formatter (_LineFormatter) prefixes every line, so its output is the same as a
    record per key; another handler (a notebook's) shows the page as one multi-line message.
    """

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __enter__(self) -> _DryRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def submit(self, plans: Sequence[Planned]) -> None:
        lines, results = [], []
        for planned in plans:
            obj = planned.obj
            shown = f"{obj.bucket}/{display_key(obj.key)}"
            if planned.hash_local:  # a dry run reads no local file and asks S3 for no checksum
                lines.append(f"Would hash and compare {shown} (--checksum)")
                reason = "would be hashed and compared (--checksum)"
                results.append(DownloadResult(obj, "skipped", reason, planned.target))
                continue
            version = f", version {display_key(obj.version_id)}" if obj.version_id else ""
            lines.append(f"Would download {shown} ({format_size(obj.size)}{version})")
            results.append(DownloadResult(obj, "downloaded", path=planned.target))
        if lines:
            log.info("%s", "\n".join(lines), extra={"per_line": True})
        for result in results:
            self.run.finished(result)


@dataclass(eq=False)
class _Run:
    """One run of run_full_download, from discovery to its summary: every field is that run's own state."""

    config: Config
    credentials: Credentials
    root: Path
    dry_run: bool
    #: The objects of --from-manifest, fetched exactly as recorded; None for a run that lists its buckets.
    manifest_objects: list[S3Object] | None
    stop: threading.Event
    redactor: SecretRedactingFilter
    #: Seconds in-flight objects get to reach a chunk boundary after a stop, before their sockets are shut.
    grace_s: float = 5.0
    started: float = field(default_factory=time.monotonic)
    #: Why the run ends early, the first reason given: "interrupted", "disk full", or "disk space" (the
    #: selection does not fit, found before its bytes are fetched).
    stop_reason: str | None = None
    buckets: list[str] = field(default_factory=list)
    #: Buckets that cannot be read, and why.
    problems: list[BucketProblem] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    journal: ResumeJournal | NullJournal = field(default_factory=lambda: NullJournal())
    manifest: ManifestWriter | NullManifest = field(default_factory=lambda: NullManifest())
    progress: Progress = field(default_factory=lambda: Progress(Tally(), bar=False, log_lines=False, interval=1))
    #: Bytes of pages left undispatched for lack of disk space, so the error can say how much is needed.
    needed_more: int = 0
    #: Per bucket, the prefixes given (or "") that have listed no object yet.
    unlisted: dict[str, set[str]] = field(default_factory=dict)
    #: The listing ran to its end (every page of every bucket), so an empty prefix really is empty.
    listed_all: bool = False
    #: Shuts the engine's sockets; a no-op until the engine exists.
    abort: Callable[[], None] = lambda: None
    #: (objects, bytes) of large objects begun and not finished, read from the journal as the run closes.
    unfinished: tuple[int, int] = (0, 0)
    #: The tool's own files (lock, log, manifest, config file) that --delete never removes.
    own_files: tuple[Path, ...] = ()
    #: The listed keys of a --delete run; None without --delete.
    mirror: Mirror | None = None
    #: Local files a --delete run removed (a dry run: would remove), those it could not, and why it removed none.
    deleted: int = 0
    delete_failed: int = 0
    delete_refused: str | None = None
    #: --verify-local: hash every local file against S3, download nothing, write nothing but the log.
    verify_local: bool = False
    #: The inventory report the listing comes from (--inventory); None for a run that lists its buckets.
    inventory: InventoryReader | None = None

    def execute(self) -> DownloadSummary:
        """discover -> plan pages -> reserve disk -> dispatch -> finish."""
        self.open()
        try:
            self.discover()
            self.open_outputs()
            with _DryRun(self) if self.dry_run else _Workers(self) as workers:
                try:
                    for plans in self.within_budget(self.planned_pages()):
                        self.dispatch(plans, workers)
                        if self.stop.is_set():
                            break
                    self.listing_complete()
                except KeyboardInterrupt:  # Python API: Ctrl-C in a notebook is a stop request
                    self.halt("interrupted")
            if self.mirror is not None:
                self.delete_unlisted(self.mirror)
        finally:
            self.close()
        return self.finish()

    # -- discover -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """The selection rules, the session and the engine: everything checked before a request is made."""
        config = self.config
        manifest_run = self.manifest_objects is not None
        # A manifest run fetches exactly the manifest's objects: the config's filters and shard do not apply.
        self.filters = Filters() if manifest_run else Filters.from_config(config)
        #: --as-of as seconds since the epoch (not for a manifest run, whose versions are recorded).
        self.as_of = parse_as_of(config.as_of) if config.as_of and not manifest_run else None
        if config.delete and not manifest_run and not self.verify_local:  # --verify-local writes nothing
            self.mirror = Mirror(self.root, self.filters, self.root / config.resume_file, self.own_files)
        if self.filters.modified_since is not None:
            log.info(
                "Keeping objects modified since %s (max age %s)",
                cutoff_text(self.filters.modified_since),
                config.max_age,
            )
        if self.filters.modified_before is not None:
            log.info(
                "Keeping objects modified before %s (min age %s)",
                cutoff_text(self.filters.modified_before),
                config.min_age,
            )
        session = make_session(config, self.credentials, self.redactor)
        if self.credentials.access_key:
            log.info("Using access key %s", mask_access_key(self.credentials.access_key))
        self.clients = SharedClient(session, config)
        self.engine = make_engine(session, self.clients, config)
        self.abort = self.engine.abort

    def attempts(self, what: str) -> Attempts:
        """The tries of one request of this run (the Retries section)."""
        return Attempts(what, self.config, self.stop)

    #: Seconds discovery waits, in all, for a server it cannot connect to before saying so.
    CONNECT_WAIT_S = 3.0

    def first_contact(self, what: str) -> Attempts:
        """The tries of a discovery request: nothing listening at the endpoint is said after a few seconds."""
        return Attempts(what, self.config, self.stop, connect_wait_s=self.CONNECT_WAIT_S)

    def endpoint_text(self) -> tuple[str, str]:
        """Where the requests go, and what to check, for the cannot-connect error."""
        endpoint = resolve_endpoint_url(self.config)
        if endpoint:
            return endpoint, "is the server running, and is --endpoint-url right?"
        region = self.config.region or self.clients.get().meta.region_name
        return f"https://s3.{region}.amazonaws.com", "check the network and --region"

    def discover(self) -> None:
        """The buckets to read: the manifest's, the named ones that are readable, or every readable one."""
        if self.manifest_objects is not None:
            self.buckets = list(dict.fromkeys(obj.bucket for obj in self.manifest_objects))
        else:
            try:
                if self.config.inventory:  # its buckets are probed as it needs them (open_inventory)
                    self.inventory = open_inventory(self.engine, self.config, self.first_contact)
                    self.buckets = [self.inventory.manifest.source_bucket]  # type: ignore[union-attr]
                else:
                    names = self.config.buckets or account_buckets(self.clients.get(), self.first_contact)
                    self.buckets, self.problems = discover_buckets(self.engine, names, self.first_contact)
            except CannotConnectError as exc:
                where, check = self.endpoint_text()
                raise CannotConnectError(f"cannot reach S3 at {where}: {exc} ({check})") from None
            if not self.config.no_sign_request and self.buckets:
                log.info("AWS credentials validated successfully")
            if not self.buckets:  # the error says why, once
                reasons = "; ".join(problem.reason for problem in self.problems)
                if self.problems and all(problem.missing for problem in self.problems):
                    raise NoSuchBucketError(reasons)
                if self.config.buckets:
                    raise NothingAccessibleError(reasons or "no bucket could be read")
                raise NothingAccessibleError("no accessible buckets found for these credentials")
            for problem in self.problems:
                log.warning("%s", problem.reason)
            if self.as_of is not None:
                for bucket in self.buckets:
                    require_versioning(self.engine, bucket, self.first_contact)
                later = " (in the future: the latest versions)" if self.as_of > time.time() else ""
                log.info("Selecting each key as it stood at %s%s", self.config.as_of, later)
        log.info("Discovered %d accessible bucket%s", len(self.buckets), "" if len(self.buckets) == 1 else "s")

    def open_outputs(self) -> None:
        """The journal, manifest, progress display and disk budget; a dry run writes none of them."""
        config = self.config
        if not self.dry_run and not self.verify_local:
            self.journal = ResumeJournal(self.root / config.resume_file).load()
            if self.journal.journal_path.exists():
                self.journal.compact()  # fold in the last run's journal so it never grows across runs
            if config.manifest:
                self.manifest = ManifestWriter(Path(config.manifest))
        watched = not config.quiet and (in_notebook() or sys.stderr.isatty())
        self.progress = Progress(
            self.tally,
            bar=watched and not self.dry_run,
            log_lines=not config.quiet and not self.dry_run,
            interval=config.progress_interval_s,
            cap=config.max_bandwidth,
        )
        self.budget = DiskBudget(self.root, config.check_disk_space and not self.dry_run and not self.verify_local)

    # -- plan pages -----------------------------------------------------------------------------------------

    def pages(self) -> Iterator[list[S3Object]]:
        """Every selected prefix of every bucket, a page at a time (a manifest run: the manifest as one page)."""
        if self.manifest_objects is not None:
            yield self.manifest_objects
            return
        for bucket in self.buckets:
            unlisted = self.unlisted[bucket] = set(self.config.prefixes or [""])
            if self.inventory is not None:  # its rows stand in for the listing: one bucket, filtered by prefix
                try:
                    yield from self.inventory.pages(self.config.prefixes, unlisted, self.tally.filtered)
                except Interrupted:  # stopped while a data file was fetched
                    return
                continue
            try:
                for prefix in collapse_prefixes(self.config.prefixes):
                    for page in self.listing(bucket, prefix):
                        if unlisted:
                            unlisted -= {given for given in unlisted if any(o.key.startswith(given) for o in page)}
                        yield page
            except S3Error as exc:  # a bucket whose listing is denied is a bucket problem: the others go on
                unlisted.clear()
                self.listing_refused(bucket, exc)
            except Interrupted:
                return
            except Exception as exc:  # the page's own retries are spent: the run cannot know what else to fetch
                error = unreachable(exc, f"listing bucket '{bucket}' failed after {self.config.retry_attempts} retries")
                raise error from None
        self.listed_all = True

    def listing(self, bucket: str, prefix: str) -> Iterator[list[S3Object]]:
        """The objects under one prefix: as they are now (listed in parallel past its first page, unless
        list_concurrency is 1), or with --as-of as they stood then."""
        if self.as_of is None:
            if self.config.list_concurrency > 1:
                return iter(ParallelListing(self.engine, bucket, prefix, self.attempts, self.config.list_concurrency))
            return list_pages(self.engine, bucket, prefix, self.attempts)
        entries = version_pages(self.engine, bucket, prefix, self.attempts)
        return versions_as_of(entries, self.as_of, self.tally.filtered)

    def listing_refused(self, bucket: str, exc: S3Error) -> None:
        problem = credentials_problem(exc)
        if problem:
            raise CredentialsError(problem) from None
        if is_denied(exc.status, exc.code):
            reason = f"Access Denied for listing bucket '{bucket}'"
        else:
            reason = f"listing bucket '{bucket}' failed: {exc.code or exc.status}"
        log.warning("%s", reason)
        self.problems.append(BucketProblem(bucket, reason))

    def planned_pages(self) -> Iterator[tuple[list[Planned], int]]:
        """Each page's selected objects, placed and skip-checked, with the bytes still to fetch for them."""
        overwrite, filters, filtered = self.config.overwrite_existing, self.filters, self.tally.filtered
        compare, files = self.config.checksum, LocalTree()
        for page in self.pages():
            if self.mirror is not None:
                self.mirror.add(page)
            plans = []
            for obj in page:
                rule = filter_reason(obj, filters)
                if rule is not None:
                    filtered[rule] += 1
                elif self.verify_local:
                    plans.append(plan_verify(obj, self.root))
                else:
                    plans.append(plan_object(obj, self.root, overwrite, self.journal, compare, files))
            self.tally.add_selected(plan.obj.size for plan in plans)
            # A file --checksum hashes is fetched only if it differs: its bytes are not promised up front.
            yield plans, sum(plan.obj.size for plan in plans if plan.result is None and not plan.hash_local)

    # -- reserve disk and dispatch --------------------------------------------------------------------------

    def within_budget(self, pages: Iterator[tuple[list[Planned], int]]) -> Iterator[list[Planned]]:
        """The pages whose bytes fit on the disk, each reserved as it arrives, so the first download waits for one
        page, not the whole listing. A selection of one page (up to 1,000 objects, or a manifest) that does not
        fit writes nothing; a longer one writes the pages that fit and stops dispatching at the first that does
        not, keeping every file it completes. The pages past it are only counted, so the error can say how much
        the whole selection needs."""
        for plans, need in pages:
            if self.stop_reason == "disk space" or not self.budget.fits(need):
                self.needed_more += need
                self.halt("disk space")
                continue
            self.budget.reserve(need)
            yield plans

    def dispatch(self, plans: list[Planned], workers: _Workers | _DryRun) -> None:
        """Record the objects already decided (skipped, unsafe, archived); hand the rest to the workers."""
        for planned in plans:
            if planned.result is not None:
                self.finished(planned.result)
        workers.submit([planned for planned in plans if planned.result is None])

    def finished(self, result: DownloadResult) -> None:
        """One object's outcome, from any thread: counted, written to the manifest, shown."""
        self.tally.record(result)
        self.manifest.write(result)
        obj = result.obj
        if result.local_check in ("differ", "missing") and self.verify_local:
            what = "Missing locally" if result.local_check == "missing" else "Differs from S3"
            how = f" ({display_key(result.detail)})" if result.detail else ""
            log.warning("%s: %s/%s%s", what, obj.bucket, display_key(obj.key), how)
        elif result.status == "failed":
            log.warning("Failed %s/%s: %s", obj.bucket, display_key(obj.key), display_key(result.reason))
        if log.isEnabledFor(logging.DEBUG):
            outcome = f"{result.status} ({display_key(result.reason)})" if result.reason else result.status
            log.debug(
                "Object %s/%s: %s, %s B, path=%s, checksum=%s, attempts=%d, %.3f s",
                obj.bucket,
                display_key(obj.key),
                outcome,
                f"{obj.size:,}",
                result.route or ("skipped" if result.status == "skipped" else "none"),
                result.checksum or "none",
                result.attempts,
                result.seconds,
            )

    def listing_complete(self) -> None:
        self.progress.listing_complete()
        if not self.stop.is_set():  # found, not "to download": the summary says how many were skipped
            count, size = self.tally.total, format_size(self.tally.total_bytes)
            log.info("Found %s object%s (%s); listing complete", f"{count:,}", "" if count == 1 else "s", size)
        for place in self.nothing_under():
            log.warning("No objects under %s: check the bucket and prefix", place)
        filtered = self.tally.filtered
        if filtered and not self.tally.total:
            log.warning("The filters left out every object listed: %s", filtered_text(filtered))

    def nothing_under(self) -> list[str]:
        """The places given that listed no object: each named bucket/prefix, or a prefix no bucket has."""
        if not self.listed_all or self.manifest_objects is not None:
            return []
        if self.config.buckets or self.inventory is not None:
            return [f"s3://{b}/{display_key(p)}" for b, unlisted in self.unlisted.items() for p in sorted(unlisted)]
        everywhere = set.intersection(*self.unlisted.values()) if self.unlisted else set()
        count = len(self.unlisted)
        return [
            f"s3://*/{display_key(p)} (in any of {count} bucket{'s' if count != 1 else ''})" for p in sorted(everywhere)
        ]

    # -- mirror deletions -----------------------------------------------------------------------------------

    def why_not_delete(self) -> str | None:
        """Why this --delete run must delete nothing, or None. rclone's rule, the safe one: no deletion after any
        error (aws s3 sync deletes even when copies failed). Keys that can never be stored (unsafe keys) are not
        errors of this run: they would block every mirror of their bucket for good."""
        if self.stop.is_set() or self.stop_reason is not None:
            return "the run stopped before its end"
        if not self.listed_all:
            return "the listing did not complete"
        unread = [problem for problem in self.problems if self.config.buckets or problem.bucket in self.buckets]
        if unread:
            return f"a listing failed ({unread[0].reason})"
        if self.nothing_under():
            return "a bucket or prefix given lists no objects (a typo would delete the whole local copy)"
        failed = sum(n for reason, n in self.tally.failure_counts.items() if not reason.startswith("unsafe key"))
        if failed:
            return f"{failed:,} object{'' if failed == 1 else 's'} failed; run again when they download"
        return None

    def delete_unlisted(self, mirror: Mirror) -> None:
        """Remove the local files in scope that the complete listing no longer has (a dry run: list them), then
        the directories that leaves empty; nothing at all when why_not_delete says so or more than max_delete
        would go."""
        reason = self.why_not_delete()
        if reason is not None:
            self.delete_refused = reason
            log.warning("Not deleting any local file: %s", reason)
            return
        prefixes = self.config.prefixes
        doomed = [(bucket, path) for bucket in self.buckets for path in mirror.unlisted(bucket, prefixes)]
        limit = self.config.max_delete
        if self.dry_run:
            for _bucket, path in doomed:
                log.info("Would delete %s (no longer listed)", display_key(str(path)))
            self.deleted = len(doomed)
        if limit is not None and len(doomed) > limit:
            self.delete_refused = (
                f"{len(doomed):,} local file{'' if len(doomed) == 1 else 's'} would be deleted, more than "
                f"--max-delete {limit:,}: none {'would be' if self.dry_run else 'was'} deleted"
            )
            log.error("Not deleting any local file: %s", self.delete_refused)
            return
        if self.dry_run:
            log.info(
                "Would delete %s local file%s no longer listed", f"{len(doomed):,}", "" if len(doomed) == 1 else "s"
            )
            return
        removed: dict[str, list[Path]] = {}
        try:
            for bucket, path in doomed:
                if self.stop.is_set():
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue  # gone meanwhile
                except OSError as exc:
                    self.delete_failed += 1
                    log.warning("Could not delete %s: %s", display_key(str(path)), exc.strerror)
                    continue
                self.deleted += 1
                removed.setdefault(bucket, []).append(path)
                log.info("Deleted %s (no longer listed)", display_key(str(path)))
        except KeyboardInterrupt:
            self.halt("interrupted")
        dirs = sum(remove_emptied_dirs(self.root / bucket, prefixes, paths) for bucket, paths in removed.items())
        log.info(
            "Deleted %s local file%s no longer listed, and %s emptied director%s",
            f"{self.deleted:,}",
            "" if self.deleted == 1 else "s",
            f"{dirs:,}",
            "y" if dirs == 1 else "ies",
        )

    # -- stopping -------------------------------------------------------------------------------------------

    def halt(self, reason: str) -> None:
        """Stop the run for ``reason``; safe from a signal handler. The first reason given is the one reported.

        "disk space" only stops dispatching: what has started finishes. Any other reason stops in-flight objects
        at their next chunk, and grace_s later shuts the engine's sockets, so a read stalled on a silent
        connection does not wait out the read timeout (60 s by default).
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        if reason == "disk space" or self.stop.is_set():
            return
        self.stop.set()
        timer = threading.Timer(self.grace_s, self.abort)
        timer.daemon = True
        timer.start()

    def until_done(self, wait: Callable[[], object]) -> None:
        """Run a wait to its end; a Ctrl-C meanwhile becomes a stop request, which makes the wait shorter."""
        while True:
            try:
                wait()
                return
            except KeyboardInterrupt:
                self.halt("interrupted")

    # -- finish ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.progress.close()
        self.abort = lambda: None
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        with contextlib.suppress(OSError):
            self.journal.compact()
        self.unfinished = self.journal.unfinished()
        self.journal.close()
        self.manifest.close()

    def finish(self) -> DownloadSummary:
        """The summary, or the error that ended the run (carrying the summary so far)."""
        reason = self.stop_reason or ("interrupted" if self.stop.is_set() else None)
        if reason == "disk space":
            budget = self.budget
            needed = budget.reserved + self.needed_more
            raise DiskSpaceError(
                f"not enough disk space in {self.root}: the selection needs {format_size(needed)}, "
                f"{format_size(budget.free)} is free and {format_size(budget.margin)} of it is kept free "
                "(free some space, narrow the selection, or use --ignore-disk-space)",
                self.summary("not enough disk space"),
            )
        summary = self.summary(reason)
        if reason == "disk full":
            raise DiskSpaceError(
                f"no space left on device in {self.root}; completed files are kept, free some space and run again",
                summary,
            )
        if reason is not None:
            raise DownloadInterrupted(
                "interrupted; completed files and resume state are saved, run again to continue", summary
            )
        return summary

    def summary(self, stopped_reason: str | None) -> DownloadSummary:
        tally, interrupted = self.tally, stopped_reason == "interrupted"
        return DownloadSummary(
            total_files=tally.total,
            downloaded=tally.downloaded,
            skipped=tally.skipped,
            failed=tally.failed,
            total_bytes=tally.total_bytes,
            downloaded_bytes=tally.downloaded_bytes,
            duration_s=time.monotonic() - self.started,
            failures=tuple(tally.failures),
            skipped_reasons=dict(tally.skipped_reasons),
            buckets=tuple(self.buckets),
            bucket_problems=tuple(self.problems) if self.config.buckets else (),
            download_dir=str(self.root),
            resume_file=str(self.journal.path) if self.journal.path else None,
            manifest=self.config.manifest,
            dry_run=self.dry_run,
            interrupted=interrupted,
            stopped_reason=None if interrupted else stopped_reason,
            filtered=dict(tally.filtered),
            nothing_under=tuple(self.nothing_under()),
            interrupted_files=tally.total - tally.finished if stopped_reason else 0,
            partial_files=self.unfinished[0],
            partial_bytes=self.unfinished[1],
            deleted=self.deleted if self.mirror is not None else None,
            delete_failed=self.delete_failed,
            delete_refused=self.delete_refused,
            checksum=self.config.checksum and not self.verify_local,
            local_checks=dict(tally.local_checks),
            replaced=tally.replaced,
            verify_local=self.verify_local,
            local_problems=tuple(tally.local_problems),
            inventory=self.config.inventory if self.inventory is not None else None,
            changed_since_inventory=tally.failure_counts[CHANGED_SINCE_INVENTORY] + tally.notes[CHANGED_FETCHED],
            changed_fetched=tally.notes[CHANGED_FETCHED],
            missing_since_inventory=tally.failure_counts[MISSING_SINCE_INVENTORY],
        )


class AWSDataDownloader:
    """Downloads the selected objects of one or more buckets; usable from Python, a notebook, or the CLI.

    It owns no threads or handlers between runs: each run_full_download starts its pools and joins them,
    so creating several downloaders in one notebook kernel leaks nothing and logs each line once.
    """

    #: Seconds in-flight objects get to reach a chunk boundary after a stop, before their sockets are shut.
    STOP_GRACE_S = 5.0

    def __init__(
        self, config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None, **overrides: Any
    ) -> None:
        if isinstance(config, Config):
            base = config
        elif isinstance(config, Mapping):
            base = build_config(config)
        elif config is not None:
            base = build_config(ConfigLayer(load_config_file(config), "file", os.fspath(config)))
        else:
            base = Config()
        #: The validated settings; run_full_download's overrides apply to one run only.
        self.config = base.replace(**overrides) if overrides else base
        #: Masks the current run's secrets wherever they could be printed: every log handler during a run, the
        #: CLI's handlers and its error line. It holds one run's secrets at a time.
        self.redactor = SecretRedactingFilter()
        self._stop = threading.Event()
        #: The run in progress, if any (stop() forwards to it).
        self._run: _Run | None = None
        #: The config file the settings came from, if any: --delete never removes it.
        self.config_file: str | None = (
            None if config is None or isinstance(config, (Mapping, Config)) else os.fspath(config)
        )

    # -- public API -----------------------------------------------------------------------------------------

    def stop(self, reason: str = "interrupted") -> None:
        """Ask a running download to stop; safe from a signal handler.

        In-flight objects stop at their next chunk. A read stalled on a silent connection would wait for the
        read timeout (60 s by default), so after STOP_GRACE_S the engine's sockets are shut down too.
        """
        run = self._run
        if run is not None:
            run.halt(reason)
        else:
            self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for during the current run."""
        return self._stop.is_set()

    def run_full_download(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        *,
        session_token: str | None = None,
        dry_run: bool = False,
        from_manifest: str | os.PathLike[str] | None = None,
        verify_local: bool = False,
        **overrides: Any,
    ) -> DownloadSummary:
        """Download everything the config selects and return the summary; never calls sys.exit.

        Raises a DownloaderError subclass for problems that stop the whole run (bad config, credentials,
        another run holding the lock, disk space, interruption), each with a one-line message.

        ``verify_local`` downloads nothing: it hashes every selected local file against its object's checksum
        and returns a summary whose ``failed`` counts the files that differ or are missing (``local_problems``
        lists them); nothing is written, not even the resume journal.
        """
        if verify_local and dry_run:
            raise ConfigError("--verify-local and --dry-run cannot be combined: --verify-local downloads nothing")
        if region is not None:
            overrides["region"] = region
        config = self.config.replace(**overrides) if overrides else self.config
        connections = capped_connections(config)
        if connections < config.parallel_downloads:
            log.info(
                "%d connections instead of %d under the %s/s cap, so their receive buffers hold a tenth of a second",
                connections,
                config.parallel_downloads,
                format_size(config.max_bandwidth or 0),
            )
            config = dataclasses.replace(config, parallel_downloads=connections)
        self._stop.clear()
        self.redactor.clear()
        root = Path(config.download_dir).expanduser().absolute()
        if config.delete and from_manifest is not None:
            raise ConfigError(
                "--delete cannot be used with --from-manifest: a manifest run lists nothing, so it cannot know "
                "which local files are gone from the bucket"
            )
        if from_manifest is not None and config.inventory:
            raise ConfigError("--from-manifest and --inventory both say what to fetch; give one of them")
        if config.as_of and config.inventory:
            raise ConfigError(
                "--as-of and --inventory both say which versions to fetch (an inventory pins its own); give one of them"
            )
        manifest_objects = read_manifest(from_manifest) if from_manifest is not None else None
        writes = not dry_run and not verify_local
        if writes:
            prepare_download_dir(root)
        lock = DirectoryLock(root) if writes else None
        if lock is not None:
            lock.acquire()
        credentials = Credentials(access_key, secret_key, session_token)
        run = _Run(config, credentials, root, dry_run, manifest_objects, self._stop, self.redactor, self.STOP_GRACE_S)
        own = [DirectoryLock(root).path, *(Path(p) for p in (config.log_file, config.manifest, self.config_file) if p)]
        run.own_files = tuple(own)
        run.verify_local = verify_local
        self._run = run
        try:
            with self.redactor.on_every_handler():
                return run.execute()
        finally:
            self._run = None
            if lock is not None:
                lock.release()


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


class NullManifest:
    """The manifest of a run that writes none."""

    def write(self, result: DownloadResult) -> None:
        pass

    def close(self) -> None:
        pass


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
    """Writes through tqdm once it is loaded: tqdm.write lifts any bar off the screen for the line and redraws it,
    so log lines never tear a bar, and without a bar it is a plain write."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):  # already shown on the console in another form
            return None
        tqdm_module = sys.modules.get("tqdm")
        if tqdm_module is None:
            return super().emit(record)
        try:
            tqdm_module.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _EventAliasFilter(logging.Filter):
    """Drops botocore's "Changing event name from X to Y": a dozen lines per session about its own event
    aliases, nothing about this run. The rest of botocore's debug output stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Changing event name from")


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _LineFormatter(logging.Formatter):
    """Gives each line of a ``per_line`` record (a dry run's page of "Would download" lines) the prefix a record
    of its own would have had, so a page logged at once reads, and greps, like one line per key."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        message = record.message
        if not getattr(record, "per_line", False) or not message or not text.endswith(message):
            return text
        prefix = text[: len(text) - len(message)]
        return prefix + message.replace("\n", "\n" + prefix)


@contextlib.contextmanager
def cli_logging(level: int, log_file: str | None, redactor: SecretRedactingFilter) -> Iterator[None]:
    """Console and file handlers for one CLI run, removed afterwards (main() may be called many times)."""
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    console = _ConsoleHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(_LineFormatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handlers.append(console)
    if log_file:
        try:
            file_handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from None
        file_handler.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.INFO)
        file_handler.setFormatter(_LineFormatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        handler.addFilter(redactor)
        root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.INFO)
    quiet_loggers = {name: logging.getLogger(name).level for name in ("botocore", "boto3", "urllib3", "s3transfer")}
    if level > logging.DEBUG:
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
    aliases = _EventAliasFilter()
    logging.getLogger("botocore.hooks").addFilter(aliases)
    try:
        yield
    finally:
        logging.getLogger("botocore.hooks").removeFilter(aliases)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
        for name, old in quiet_loggers.items():
            logging.getLogger(name).setLevel(old)


def _flag_help(option: Option) -> str:
    """A flag's help with its default, as --help shows it; switches and empty or unset defaults need none."""
    text = option.flag_help or option.help
    if option.kind in ("bool", "list") or option.default is None:
        return text
    default = f"{option.default:g}" if option.kind == "float" else option.default
    return f"{text.removesuffix('.')} (default: {default})."


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags: the hand-written ones, then one per OPTIONS entry with a flag, each help a sentence.

    The program name is argparse's default, the name the user ran (``aws-data-downloader`` when installed,
    ``aws_data_downloader.py`` as a script or with ``python -m``); -h is added by hand so that its help is a
    sentence like the rest.
    """
    parser = argparse.ArgumentParser(
        add_help=False,
        description="Download whole datasets from S3 and S3-compatible stores: parallel, verified, resumable.",
        epilog=(
            "Exit codes: 0 all selected objects on disk and verified; 1 some objects failed (or --delete "
            "could not delete: see the summary; --verify-local: some local files differ or are missing); 2 usage, "
            "config or "
            "directory error; 3 credentials rejected or nothing accessible; 4 another run holds the lock; "
            "5 not enough disk space; 6 a named bucket does not exist, or a bucket or prefix lists nothing; "
            "130 interrupted."
        ),
    )
    add = parser.add_argument
    add("-h", "--help", action="help", help="Show this help and exit.")
    add("--config", metavar="PATH", help="YAML or JSON config file (default: ./aws_downloader_config.yaml if present).")
    add(
        "--create-config",
        nargs="?",
        const="aws_downloader_config.yaml",
        metavar="PATH",
        help="Write the commented default config to PATH (default: aws_downloader_config.yaml; refuses to "
        "overwrite) and exit.",
    )
    add("--access-key", help="AWS access key id (prefer the environment: flags are visible to other users).")
    add("--secret-key", help="AWS secret access key (prefer the environment).")
    add("--session-token", help="AWS session token for temporary credentials.")
    add("--dry-run", action="store_true", help="List and filter, print what would be downloaded, write nothing.")
    add(
        "--verify-local",
        action="store_true",
        help="Download nothing: hash every selected local file against its object's checksum and exit 1 listing "
        "the files that differ or are missing (rclone check).",
    )
    add("--from-manifest", metavar="PATH", help="Download exactly the objects (and versions) of a manifest.")
    add("--verbose", "-v", action="store_true", help="Debug logging.")
    add("--json", action="store_true", help="Print the summary as one JSON object on stdout.")
    add("--demo", action="store_true", help="Download a sample dataset from an embedded local S3 server.")
    add("--version", action="version", version=f"%(prog)s {__version__}", help="Print the version and exit.")
    for option in OPTIONS:
        if option.flag is None:
            continue
        kwargs: dict[str, Any] = {
            "dest": option.key,
            "default": argparse.SUPPRESS,
            "help": _flag_help(option),
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
            kwargs["metavar"] = "MiB" if option.key.endswith("_mb") else "X"
        elif option.kind == "choice":
            kwargs["choices"] = option.choices
        else:
            kwargs["metavar"] = {"endpoint_url": "URL", "shard": "I/N", "as_of": "TIMESTAMP"}.get(
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
        config_path = args.config
        if not config_path and Path("aws_downloader_config.yaml").is_file() and not args.demo:
            config_path = "aws_downloader_config.yaml"
        if config_path:
            file_values = load_config_file(config_path)
        flags = _flag_overrides(args)
        if args.demo:
            flags.setdefault("download_dir", "demo_data")
        config = build_config(ConfigLayer(file_values, "file", config_path), ConfigLayer(flags, "flags"))
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    level = logging.DEBUG if args.verbose else (logging.ERROR if config.quiet else logging.INFO)
    if args.json and not args.verbose:
        level = max(level, logging.WARNING)
    downloader = AWSDataDownloader(config)
    downloader.config_file = config_path
    header = run_header(parser.prog, sys.argv[1:] if argv is None else argv, config_path, config)
    try:
        with cli_logging(level, config.log_file or None, downloader.redactor):
            return _run_cli(args, downloader, header)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run_cli(args: argparse.Namespace, downloader: AWSDataDownloader, header: str) -> int:
    """Run once with logging set up; translate the outcome to output and an exit code. The log starts with
    ``header`` and ends with the outcome line, so a log that stops short of one is a crash, not a run."""
    started = time.monotonic()
    config = downloader.config
    downloader.redactor.add_credentials(args.access_key, args.secret_key, args.session_token)
    log.info("%s", header)
    if args.access_key or args.secret_key or args.session_token:
        log.warning(
            "Credentials given on the command line are visible to other users of this machine (ps); "
            "prefer AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --profile"
        )
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
                access_key,
                secret_key,
                session_token=token,
                dry_run=args.dry_run,
                from_manifest=args.from_manifest,
                verify_local=args.verify_local,
            )
            code = summary.exit_code
    except DownloaderError as exc:
        shown = not args.json or exc.summary is None
        # The console gets the one "Error: ..." line; the log file keeps the timestamped record.
        log.error("%s", exc, extra={"file_only": shown})
        if shown:
            print(f"Error: {downloader.redactor.redact(str(exc))}", file=sys.stderr)
        summary = exc.summary
        code = exc.exit_code
    finally:
        _restore_signal_handlers(previous)
    if summary is not None:
        if args.json:
            print(json.dumps(summary.to_dict()))
        else:
            print(summary.format())
    # Without a summary the console's last line stays the one "Error: ..." line; the log file gets the outcome.
    log.info("%s", run_outcome(code, summary, time.monotonic() - started), extra={"file_only": summary is None})
    return code


#: The flags whose values never appear in the log's copy of the command line.
SECRET_FLAGS = ("--secret-key", "--session-token")


def masked_command_line(prog: str, argv: Sequence[str]) -> str:
    """The command line as typed, with the values of SECRET_FLAGS masked, also as --flag=VALUE or abbreviated
    (argparse takes --secret for --secret-key). The log handlers' redactor masks the access key id."""
    words, hide = [shlex.quote(prog)], False
    for word in argv:
        name, equals, _value = word.partition("=")
        secret = len(name) > 2 and any(flag.startswith(name) for flag in SECRET_FLAGS)
        if hide:
            words.append("****")
        elif secret and equals:
            words.append(f"{shlex.quote(name)}=****")
        else:
            words.append(shlex.quote(word))
        hide = secret and not equals and not hide
    return " ".join(words)


def run_header(prog: str, argv: Sequence[str], config_file: str | None, config: Config) -> str:
    """The line a run's log starts with: version, command line, config file and download directory."""
    used = os.path.abspath(config_file) if config_file else "none"
    root = Path(config.download_dir).expanduser().absolute()
    command = masked_command_line(prog, argv)
    return f"aws-data-downloader {__version__} starting: {command}; config file: {used}; download dir: {root}"


def run_outcome(code: int, summary: DownloadSummary | None, seconds: float) -> str:
    """The line a run's log ends with: exit code, counts, bytes and duration."""
    if summary is None:
        return f"Run finished: exit code {code}, before any object was listed, after {seconds:.1f} s"
    total = f"{summary.total_files:,} object{'' if summary.total_files == 1 else 's'}"
    if summary.verify_local:
        found = summary.local_check_counts()
        counts = (
            f"verify-local, {total}: {found['intact']:,} intact, {found['differ']:,} differ, {found['missing']:,} "
            f"missing, {found['unverifiable']:,} unverifiable"
        )
    elif summary.dry_run:
        fetched = f"{summary.downloaded:,} would be downloaded ({format_size(summary.downloaded_bytes)})"
        counts = f"dry run, {total}: {fetched}, {summary.skipped:,} skipped, {summary.failed:,} failed"
        if summary.deleted is not None:
            counts += f", {summary.deleted:,} would be deleted"
    else:
        counts = f"{total}: {summary.downloaded:,} downloaded, {summary.skipped:,} skipped, {summary.failed:,} failed"
        if summary.stopped_early:
            counts += f", {summary.interrupted_files:,} interrupted"
        if summary.deleted is not None:
            counts += f", {summary.deleted:,} deleted"
        counts += f"; {format_size(summary.downloaded_bytes)} downloaded"
        if summary.partial_files:
            counts += f", {format_size(summary.partial_bytes)} kept for resume"
    return f"Run finished: exit code {code}; {counts}; {seconds:.1f} s"


def _install_signal_handlers(downloader: AWSDataDownloader) -> dict[int, Any]:
    """SIGINT/SIGTERM ask the run to stop cleanly; a second one exits at once (files stay consistent)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        if downloader.stopping:
            os.write(2, b"Second interrupt: exiting now; a re-run continues from the resume journal.\n")
            os._exit(EXIT_INTERRUPTED)
        downloader.stop("interrupted")
        os.write(
            2,
            b"Stopping: no new files are started; in-flight ones stop at their next chunk, large ones keeping their "
            b"bytes for a re-run (press Ctrl-C again to exit at once)...\n",
        )

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
