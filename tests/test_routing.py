"""Pure decisions of the transfer: which path fetches an object, how it is cut into parts, which checksum
verifies it. No server: these are the rules the server-backed tests then see in action."""

from __future__ import annotations

import base64
import hashlib
import itertools
import zlib

import pytest

import aws_data_downloader as adl

KiB = 1024
MiB = 1024 * KiB
MD5 = "0123456789abcdef0123456789abcdef"


def obj(size: int, etag: str = MD5) -> adl.S3Object:
    return adl.S3Object("bkt", "k", size, etag, 0.0)


DEFAULTS = adl.build_config({})
UNVERIFIED = adl.build_config({"verify_checksums": False})


#: HEAD answers, as route_for sees them once a "head" route asked: no checksum, a full-object CRC64NVME, a
#: composite CRC32C (a checksum of part checksums: not of the bytes) and a full-object SHA-256.
NONE: dict[str, str] = {}
CRC64 = {"x-amz-checksum-crc64nvme": "uT8sd9RjkJg=", "x-amz-checksum-type": "FULL_OBJECT"}
COMPOSITE = {"x-amz-checksum-crc32c": "fW9/vg==-3", "x-amz-checksum-type": "COMPOSITE"}
SHA256 = {"x-amz-checksum-sha256": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg="}


@pytest.mark.parametrize(
    ("size", "etag", "config", "small_loop", "head", "path", "own_parts"),
    [
        (0, MD5, DEFAULTS, True, None, "loop", False),
        (256 * KiB, MD5, DEFAULTS, True, None, "loop", False),
        (256 * KiB + 1, MD5, DEFAULTS, True, None, "stream", False),
        (10 * KiB, MD5, DEFAULTS, False, None, "stream", False),  # boto3 engine: no loop
        (16 * MiB - 1, MD5, DEFAULTS, True, None, "stream", False),
        (10 * KiB, MD5, adl.build_config({"small_object_kb": 0}), True, None, "stream", False),
        (
            12 * KiB,
            MD5,
            adl.build_config({"small_object_kb": 16, "multipart_threshold_mb": 1}),
            True,
            None,
            "loop",
            False,
        ),
        # Unverified: the size alone decides.
        (10 * KiB, f"{MD5}-2", UNVERIFIED, True, None, "loop", False),
        (16 * MiB, MD5, UNVERIFIED, True, None, "parts", False),
        (64 * MiB, f"{MD5}-8", UNVERIFIED, True, None, "parts", False),
        # Verified, large or multipart: ask first, then the checksum the object carries decides.
        (16 * MiB, MD5, DEFAULTS, True, None, "head", False),
        (10 * KiB, f"{MD5}-2", DEFAULTS, True, None, "head", False),
        (16 * MiB, MD5, DEFAULTS, True, NONE, "stream", False),  # MD5 only: one hashed stream
        (16 * MiB, MD5, DEFAULTS, True, CRC64, "parts", False),  # a CRC: ranges in parallel, CRCs combined
        (16 * MiB, MD5, DEFAULTS, True, SHA256, "stream", False),  # a SHA cannot be combined
        (64 * MiB, f"{MD5}-8", DEFAULTS, True, NONE, "parts", True),  # the part MD5s rebuild the ETag
        (64 * MiB, f"{MD5}-8", DEFAULTS, True, CRC64, "parts", False),  # its own part sizes are not needed
        (64 * MiB, f"{MD5}-8", DEFAULTS, True, COMPOSITE, "parts", True),  # composite: its own parts' CRCs
        (10 * KiB, f"{MD5}-2", DEFAULTS, True, NONE, "parts", True),
        (10 * KiB, f"{MD5}-2", DEFAULTS, True, CRC64, "stream", False),  # small: one GET verified by the CRC
    ],
)
def test_route_for(
    size: int,
    etag: str,
    config: adl.Config,
    small_loop: bool,
    head: dict[str, str] | None,
    path: str,
    own_parts: bool,
) -> None:
    route = adl.route_for(obj(size, etag), config, small_loop, head)
    assert (route.path, route.own_parts) == (path, own_parts), route.why
    assert route.why
    assert (route.checksum is not None) == (path == "parts" and head in (CRC64, COMPOSITE))


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (COMPOSITE, ("crc32c", "fW9/vg==-3", 3)),
        ({"x-amz-checksum-crc32": "O3stkw==-3", "x-amz-checksum-type": "COMPOSITE"}, ("crc32", "O3stkw==-3", 3)),
        # SSE-KMS: the ETag is no MD5, the composite CRC still verifies the bytes.
        ({**COMPOSITE, "x-amz-server-side-encryption": "aws:kms"}, ("crc32c", "fW9/vg==-3", 3)),
        (CRC64, None),  # full-object: not composite
        ({"x-amz-checksum-crc32": "O3stkw==", "x-amz-checksum-type": "FULL_OBJECT"}, None),
        ({"x-amz-checksum-sha256": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=-2"}, None),  # left to the ETag
        ({"x-amz-checksum-crc32": "O3stkw==-x"}, None),  # no part count
        (NONE, None),
    ],
)
def test_composite_checksum_takes_a_composite_crc_with_its_part_count(
    head: dict[str, str], expected: tuple[str, str, int] | None
) -> None:
    found = adl.composite_checksum(head)
    assert (found and (found.algorithm, found.value, found.parts)) == expected


def test_a_composite_object_is_cut_on_its_own_parts_even_with_an_etag_that_is_no_md5() -> None:
    route = adl.route_for(
        obj(64 * MiB, "kms-opaque-etag"), DEFAULTS, True, {**COMPOSITE, "x-amz-server-side-encryption": "aws:kms"}
    )
    assert (route.path, route.own_parts, route.checksum and route.checksum.parts) == ("parts", True, 3)


def test_an_object_from_the_multipart_threshold_up_never_takes_the_loop() -> None:
    """A large object keeps its resume checkpoints or ranged parts, whatever small_object_kb says."""
    config = adl.build_config({"small_object_kb": 16384, "multipart_threshold_mb": 1})
    assert adl.route_for(obj(1 * MiB - 1), config, True).path == "loop"
    assert adl.route_for(obj(1 * MiB), config, True).path == "head"
    assert adl.route_for(obj(1 * MiB), config, True, {}).path == "stream"


@pytest.mark.parametrize(
    ("size", "part_sizes", "expected"),
    [
        (10, 4, [(0, 0, 3), (1, 4, 7), (2, 8, 9)]),
        (8, 4, [(0, 0, 3), (1, 4, 7)]),
        (3, 4, [(0, 0, 2)]),
        (0, 4, []),
        (12, [6, 5, 1], [(0, 0, 5), (1, 6, 10), (2, 11, 11)]),
    ],
)
def test_plan_parts(size: int, part_sizes: int | list[int], expected: list[tuple[int, int, int]]) -> None:
    parts = adl.plan_parts(size, part_sizes)
    assert [(p.index, p.start, p.end) for p in parts] == expected
    assert sum(p.size for p in parts) == size


def test_part_sizes_that_do_not_add_up_are_refused() -> None:
    with pytest.raises(ValueError, match="do not add up"):
        adl.plan_parts(12, [6, 5])


def test_choose_hasher_prefers_a_full_object_s3_checksum() -> None:
    body = b"road image bytes"
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    hasher = adl.choose_hasher(obj(len(body), hashlib.md5(body).hexdigest()), {"x-amz-checksum-crc32": crc}, True)
    assert hasher is not None and hasher.algorithm == "crc32"
    hasher.update(body)
    assert hasher.verify() == f"crc32:{crc}"


def test_choose_hasher_falls_back_to_the_md5_etag_and_catches_a_flipped_byte() -> None:
    body = b"road image bytes"
    hasher = adl.choose_hasher(obj(len(body), hashlib.md5(body).hexdigest()), {}, True)
    assert hasher is not None and hasher.algorithm == "md5"
    hasher.update(body[:-1] + b"X")
    with pytest.raises(adl.ChecksumMismatch):
        hasher.verify()


def test_choose_hasher_skips_composite_checksums() -> None:
    headers = {"x-amz-checksum-crc32": "AAAAAA==-3", "x-amz-checksum-type": "COMPOSITE"}
    hasher = adl.choose_hasher(obj(5, MD5), headers, True)
    assert hasher is not None and hasher.algorithm == "md5"


@pytest.mark.parametrize(
    ("headers", "etag", "note"),
    [
        ({"x-amz-server-side-encryption": "aws:kms"}, MD5, "SSE-KMS"),
        ({"x-amz-server-side-encryption-customer-algorithm": "AES256"}, MD5, "SSE-C"),
        ({}, "not-an-md5", "is not an MD5"),
    ],
)
def test_choose_hasher_records_what_cannot_be_verified(headers: dict[str, str], etag: str, note: str) -> None:
    hasher = adl.choose_hasher(obj(5, etag), headers, True)
    assert hasher is not None and hasher.algorithm == "unverifiable"
    assert note in hasher.verify()


def test_choose_hasher_is_none_without_verification() -> None:
    assert adl.choose_hasher(obj(5), {"x-amz-checksum-crc32": "AAAAAA=="}, False) is None


def test_full_checksum_takes_the_cheapest_full_object_one() -> None:
    headers = {"x-amz-checksum-sha256": "c2hh", "x-amz-checksum-crc32": "Y3JjMzI=", "x-amz-checksum-crc64nvme": "Y3Jj"}
    assert adl.full_checksum(headers) == adl.FullChecksum("crc64nvme", "Y3Jj")
    assert adl.full_checksum(COMPOSITE) is None
    assert adl.full_checksum({"x-amz-checksum-crc32": "AAAAAA==-2"}) is None
    assert adl.full_checksum({}) is None


@pytest.mark.parametrize("name", ["crc64nvme", "crc32c", "crc32"])
def test_crcs_of_ranges_combine_into_the_whole_objects(name: str) -> None:
    import random

    body = random.Random(4).randbytes(100_000)
    crc = adl.crc_function(name)
    cuts = [0, 1, 4096, 33_333, 99_999, 100_000]
    pieces = [(crc(body[a:b], 0), b - a) for a, b in itertools.pairwise(cuts)]
    assert adl.combine_crcs(name, pieces) == crc(body, 0)
    hasher = adl.PartHash(name)
    hasher.update(body[:500])
    hasher.update(body[500:])
    assert hasher.text() == f"{name}:{crc(body, 0):x}"
