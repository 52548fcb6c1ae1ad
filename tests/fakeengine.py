"""An in-memory Engine: the run's logic (planning, disk budget, routing, retries, stop) tested without a server.

It implements the Engine protocol of aws_data_downloader over a dict of buckets, answers GETs with Range and
If-Match like S3 does, and records every request, so a test asserts what the run asked for. Faults are
scripted per key: ``engine.fail(key, exc, times)`` makes the next ``times`` GETs of that key raise ``exc``.
Install it for a whole run with the ``fake_engine`` fixture (conftest.py), which replaces adl.make_engine.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import aws_data_downloader as adl

#: The Last-Modified every fake object carries (well in the past, so a local copy is never "older").
MODIFIED = 1_700_000_000.0


@dataclass
class Request:
    """One request the engine received."""

    method: str  #: "GET", "HEAD", "HEAD bucket" or "LIST"
    bucket: str
    key: str = ""
    query: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def range(self) -> tuple[int, int] | None:
        value = self.headers.get("range")
        if value is None:
            return None
        first, _, last = value.removeprefix("bytes=").partition("-")
        return int(first), int(last)


class _Body:
    def __init__(self, data: bytes, headers: dict[str, str]) -> None:
        self.headers = headers
        self._data = io.BytesIO(data)

    def read(self, amount: int) -> bytes:
        return self._data.read(amount)

    def close(self) -> None:
        pass


class FakeEngine:
    """Buckets of ``{key: body}`` served through the Engine protocol; ETags are the bodies' MD5s."""

    supports_small_loop = False
    anonymous = False

    def __init__(self, buckets: Mapping[str, Mapping[str, bytes]], page_size: int = 1000) -> None:
        self.buckets = {name: dict(objects) for name, objects in buckets.items()}
        self.page_size = page_size
        #: Every request, in the order received.
        self.requests: list[Request] = []
        self._faults: dict[str, list[BaseException]] = {}
        self._corrupt: dict[str, int] = {}
        self.closed = False

    # -- scripting ------------------------------------------------------------------------------------------

    def fail(self, key: str, exc: BaseException, times: int = 1) -> None:
        """The next ``times`` GETs of ``key`` raise ``exc`` (after the request is recorded)."""
        self._faults.setdefault(key, []).extend([exc] * times)

    def corrupt(self, key: str, times: int = 1) -> None:
        """The next ``times`` GETs of ``key`` send its first byte flipped (the ETag stays the true one)."""
        self._corrupt[key] = self._corrupt.get(key, 0) + times

    def replace(self, bucket: str, key: str, body: bytes) -> None:
        """A new version of the object, as an upload after the listing makes one."""
        self.buckets[bucket][key] = body

    def gets(self, key: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.key == key]

    def listing_objects(self, bucket: str) -> list[adl.S3Object]:
        return [self._object(bucket, key) for key in sorted(self.buckets[bucket])]

    # -- the Engine protocol --------------------------------------------------------------------------------

    def get(self, obj: adl.S3Object, request: adl.ObjectRequest) -> _Body:
        self.requests.append(Request("GET", obj.bucket, obj.key, request.query, dict(request.headers)))
        faults = self._faults.get(obj.key)
        if faults:
            raise faults.pop(0)
        body = self._body(obj)
        etag = hashlib.md5(body).hexdigest()
        if_match = request.headers.get("if-match")
        if if_match is not None and if_match.strip('"') != etag:
            raise adl.ObjectChanged(obj.key)
        if self._corrupt.get(obj.key) and body:
            self._corrupt[obj.key] -= 1
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        value = Request("GET", obj.bucket, obj.key, (), request.headers).range
        first, last = value if value is not None else (0, len(body) - 1)
        return _Body(body[first : last + 1], {"content-length": str(last + 1 - first), "etag": f'"{etag}"'})

    def head(self, obj: adl.S3Object, request: adl.ObjectRequest) -> Mapping[str, str]:
        self.requests.append(Request("HEAD", obj.bucket, obj.key, request.query, dict(request.headers)))
        body = self._body(obj)
        return {
            "content-length": str(len(body)),
            "etag": f'"{hashlib.md5(body).hexdigest()}"',
            "last-modified": email.utils.formatdate(MODIFIED, usegmt=True),
        }

    def head_bucket(self, bucket: str) -> str | None:
        self.requests.append(Request("HEAD bucket", bucket))
        if bucket not in self.buckets:
            raise adl.S3Error(404, "404")
        return None

    def list_page(
        self, bucket: str, prefix: str, token: str | None, max_keys: int | None = None
    ) -> tuple[list[adl.S3Object], str | None]:
        self.requests.append(Request("LIST", bucket, prefix, (("token", token or ""),)))
        if bucket not in self.buckets:
            raise adl.S3Error(404, "NoSuchBucket")
        keys = sorted(key for key in self.buckets[bucket] if key.startswith(prefix))
        start = int(token or 0)
        size = self.page_size if max_keys is None else max_keys
        page = keys[start : start + size]
        more = start + size < len(keys)
        return [self._object(bucket, key) for key in page], str(start + size) if more else None

    def list_level(
        self, bucket: str, prefix: str, token: str | None, start_after: str | None = None, delimiter: str = ""
    ) -> adl.ListPage:
        """ListObjectsV2 with start-after and a delimiter, as S3 answers it (keys and common prefixes in one
        sorted sequence, page_size entries a page)."""
        self.requests.append(
            Request(
                "LIST", bucket, prefix, (("token", token or ""), ("after", start_after or ""), ("delim", delimiter))
            )
        )
        if bucket not in self.buckets:
            raise adl.S3Error(404, "NoSuchBucket")
        entries: list[tuple[str | None, str | None]] = []
        seen: set[str] = set()
        for key in sorted(self.buckets[bucket]):
            if not key.startswith(prefix) or (start_after is not None and key <= start_after):
                continue
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut < 0:
                entries.append((key, None))
            elif key[: cut + 1] not in seen:
                seen.add(key[: cut + 1])
                entries.append((None, key[: cut + 1]))
        start = int(token or 0)
        page = entries[start : start + self.page_size]
        more = start + self.page_size < len(entries)
        keys = [key for key, _ in page if key is not None]
        return adl.ListPage(
            [self._object(bucket, key) for key in keys],
            [common for _, common in page if common is not None],
            str(start + self.page_size) if more else None,
            keys[-1] if keys else None,
        )

    def set_bucket_region(self, bucket: str, region: str | None) -> None:
        pass

    def small_loop(self, *args: object) -> None:
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    # -- helpers --------------------------------------------------------------------------------------------

    def _body(self, obj: adl.S3Object) -> bytes:
        try:
            return self.buckets[obj.bucket][obj.key]
        except KeyError:
            raise adl.S3Error(404, "NoSuchKey") from None

    def _object(self, bucket: str, key: str) -> adl.S3Object:
        body = self.buckets[bucket][key]
        return adl.S3Object(bucket, key, len(body), hashlib.md5(body).hexdigest(), MODIFIED)
