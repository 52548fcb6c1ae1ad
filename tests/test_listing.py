"""Parallel listing (issue 13): a prefix of more than one page is split along its sub-prefixes and listed by
several threads, and every key still comes exactly once, whatever the shape of the keys. The shapes run on the
in-memory engine with small pages (the same splits as 1,000-key pages on far fewer keys), against the engine's
own ListObjectsV2 semantics (start-after, delimiter, common prefixes); a few run against moto's server, over
HTTP, with its real 1,000-key pages, and one through the fault proxy with a page that fails mid-way."""

from __future__ import annotations

import collections
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import S3Server
from fakeengine import FakeEngine
from faultproxy import FaultProxy

import aws_data_downloader as adl

FAST = {"retry_backoff_s": 0.01, "retry_attempts": 3, "log_file": ""}


def listed(engine, prefix: str = "", concurrency: int = 8, bucket: str = "b") -> list[str]:
    """Every key the parallel listing gives, in the order it gave them."""
    config = adl.build_config(FAST)
    stop = threading.Event()
    listing = adl.ParallelListing(engine, bucket, prefix, lambda what: adl.Attempts(what, config, stop), concurrency)
    return [obj.key for page in listing for obj in page]


def shapes() -> dict[str, list[str]]:
    rng = random.Random(5)
    deep = [f"d{a}/" * depth + f"k{n}" for depth in range(6) for a in range(3) for n in range(7)]
    return {
        "keys at every depth": deep,
        "keys without a slash": [f"flat-{n:04d}" for n in range(230)],
        "the delimiter twice": [f"a//b{n}" for n in range(40)] + [f"a/{n}" for n in range(40)] + ["a//", "//x", "/"],
        "a prefix that is also a key": ["p", "p/", "p/q", *[f"p/{n:03d}" for n in range(60)], "p0", "p.", "p-"],
        "sibling prefixes": [f"s{n:04d}/{m}" for n in range(400) for m in range(2)],
        "one prefix holds most keys": [f"big/{n:05d}" for n in range(700)] + [f"small{n}/x" for n in range(30)],
        "keys sorting between prefixes": [f"ab/{n}" for n in range(30)]
        + [f"ab-{n}" for n in range(80)]
        + [f"ab.{n}/z" for n in range(30)]
        + ["ab0", "ab"],
        "unicode": [f"é/{n}" for n in range(50)] + [f"日本/{n}/x" for n in range(50)] + ["\u2028/a", "z"],
        "random": sorted({"/".join(rng.choice("ab/") for _ in range(rng.randint(1, 9))) for _ in range(900)}),
    }


@pytest.mark.parametrize("shape", list(shapes()))
@pytest.mark.parametrize("page_size", [7, 50])
@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_every_key_is_listed_exactly_once(shape: str, page_size: int, concurrency: int) -> None:
    keys = sorted({key for key in shapes()[shape] if key})
    engine = FakeEngine({"b": dict.fromkeys(keys, b"x")}, page_size)
    got = listed(engine, concurrency=concurrency)
    doubled = [key for key, count in collections.Counter(got).items() if count > 1]
    assert not doubled, doubled[:10]
    assert sorted(got) == sorted(keys)


@pytest.mark.parametrize("prefix", ["", "d0/", "d0/d0/", "a/", "p", "p/", "nothing/", "big/0"])
def test_a_prefix_lists_exactly_its_keys(prefix: str) -> None:
    keys = {key for shape in shapes().values() for key in shape if key}
    engine = FakeEngine({"b": dict.fromkeys(keys, b"x")}, 9)
    assert sorted(listed(engine, prefix)) == sorted(key for key in keys if key.startswith(prefix))


def test_a_prefix_of_one_page_costs_one_request_and_a_large_one_is_split() -> None:
    engine = FakeEngine({"b": {f"f{n % 20}/k{n}": b"x" for n in range(2000)}}, 100)
    assert len(listed(engine, "f3/")) == 100
    assert len(engine.requests) == 1, "a prefix of one page: no delimiter listing"
    engine.requests.clear()
    assert len(listed(engine)) == 2000
    delimited = [r for r in engine.requests if ("delim", "/") in r.query]
    assert delimited, "split along its sub-prefixes"
    assert len({r.key for r in engine.requests}) > 1, "the sub-prefixes are listed on their own"


def test_a_huge_folder_does_not_hold_up_the_others() -> None:
    """One folder of 5,000 keys beside 50 small ones: with pages of 100 the big one needs 50 pages in a row
    whatever is done, but the small folders are all listed by other threads meanwhile."""
    keys = [f"big/{n:05d}" for n in range(5000)] + [f"f{n:02d}/x{m}" for n in range(50) for m in range(3)]
    engine = FakeEngine({"b": dict.fromkeys(keys, b"x")}, 100)
    order = listed(engine, concurrency=8)
    assert sorted(order) == sorted(keys)
    last_small = max(index for index, key in enumerate(order) if key.startswith("f"))
    assert last_small < order.index("big/04999")


def test_list_concurrency_1_lists_page_after_page_in_key_order() -> None:
    keys = [f"{n % 7}/{n:04d}" for n in range(500)]
    engine = FakeEngine({"b": dict.fromkeys(keys, b"x")}, 50)
    stop = threading.Event()
    config = adl.build_config(FAST)
    pages = adl.list_pages(engine, "b", "", lambda what: adl.Attempts(what, config, stop))
    assert [obj.key for page in pages for obj in page] == sorted(keys)


def test_leaving_early_stops_every_listing_thread() -> None:
    engine = FakeEngine({"b": {f"f{n % 40}/k{n}": b"x" for n in range(4000)}}, 10)
    config = adl.build_config(FAST)
    stop = threading.Event()
    listing = adl.ParallelListing(engine, "b", "", lambda what: adl.Attempts(what, config, stop), 16)
    pages = iter(listing)
    next(pages)
    pages.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("adl-list-")]


class FailingOnce(FakeEngine):
    """Fails the first ListObjectsV2 request for one sub-prefix with a connection reset."""

    def __init__(self, buckets, page_size, target: str) -> None:
        super().__init__(buckets, page_size)
        self.target, self.failed = target, 0
        self.lock = threading.Lock()

    def list_level(self, bucket, prefix, token, start_after=None, delimiter=""):
        with self.lock:
            fail = prefix == self.target and not self.failed
            self.failed += fail
        if fail:
            raise ConnectionResetError("reset by the test")
        return super().list_level(bucket, prefix, token, start_after, delimiter)


def test_a_failed_page_is_tried_again_and_still_gives_its_keys_once() -> None:
    keys = [f"f{n % 30}/{n:04d}" for n in range(3000)]
    engine = FailingOnce({"b": dict.fromkeys(keys, b"x")}, 40, "f7/")
    got = listed(engine)
    assert engine.failed == 1
    assert sorted(got) == sorted(keys)


def test_a_listing_error_ends_the_iteration_with_that_error() -> None:
    engine = FakeEngine({"b": {f"f{n % 30}/{n}": b"x" for n in range(300)}}, 10)

    def denied(*args, **kwargs):
        raise adl.S3Error(403, "AccessDenied")

    engine.list_level = denied  # type: ignore[method-assign]
    with pytest.raises(adl.S3Error):
        listed(engine)
    assert not [t for t in threading.enumerate() if t.name.startswith("adl-list-")]


def test_a_stop_during_a_parallel_listing_ends_the_run_as_interrupted(tmp_path: Path, fake_engine) -> None:
    files = {f"f{n % 20}/k{n:04d}": b"x" for n in range(2000)}
    engine: FakeEngine = fake_engine({"b": files}, page_size=10)
    dl = adl.AWSDataDownloader({**FAST, "buckets": ["b"], "download_dir": str(tmp_path / "d"), "parallel_downloads": 2})
    listed_level, calls = engine.list_level, []

    def stop_at_the_twentieth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            dl.stop()
        return listed_level(*args, **kwargs)

    engine.list_level = stop_at_the_twentieth  # type: ignore[method-assign]
    with pytest.raises(adl.DownloadInterrupted) as caught:
        dl.run_full_download()
    assert caught.value.summary is not None and caught.value.summary.downloaded < len(files)
    assert len(calls) < 60, "the listing stops soon after the stop"
    assert not [t for t in threading.enumerate() if t.name.startswith("adl-list-")]


# -- against moto's server, over HTTP ---------------------------------------------------------------------------


def seed(s3: S3Server, bucket: str, keys: list[str]) -> None:
    s3.make_bucket(bucket)
    client = s3.client
    body = {key: b"" if key.endswith("/") else b"v" + key.encode() for key in keys}  # "x/" and empty: a folder
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=body[key]), keys))


@pytest.fixture(scope="module")
def wide(moto_server: S3Server) -> tuple[S3Server, list[str]]:
    """2,200 keys: 1,600 in one folder, 600 under 300 sub-prefixes, a few at the top and one with '//'."""
    keys = [f"big/{n:05d}.bin" for n in range(1600)] + [f"s{n:03d}/a/{m}.bin" for n in range(300) for m in range(2)]
    keys += ["top.bin", "a//b.bin", "s150/", "zz.bin"]
    seed(moto_server, "wide-listing", keys)
    return moto_server, keys


@pytest.mark.parametrize("engine_name", ["http", "boto3"])
def test_a_run_lists_a_bucket_of_several_pages_exactly_once_from_moto(wide, tmp_path: Path, engine_name: str) -> None:
    s3, keys = wide
    settings = {**FAST, "buckets": ["wide-listing"], "download_dir": str(tmp_path / "d"), "engine": engine_name}
    files = [key for key in keys if not key.endswith("/")]
    dry = adl.AWSDataDownloader({**settings, "endpoint_url": s3.endpoint}).run_full_download(dry_run=True)
    assert (dry.downloaded, [f.key for f in dry.failures]) == (len(files) - 1, ["a//b.bin"])  # unsafe: refused
    if engine_name == "boto3":
        return  # the downloads themselves are the other engine's test
    real = adl.AWSDataDownloader({**settings, "endpoint_url": s3.endpoint}).run_full_download()
    assert (real.downloaded, [f.key for f in real.failures]) == (len(files) - 1, ["a//b.bin"])
    for key in files:
        if key != "a//b.bin":
            assert (tmp_path / "d" / "wide-listing" / key).read_bytes() == b"v" + key.encode()


def test_a_list_page_that_fails_mid_way_is_retried_and_lists_once_from_moto(wide, tmp_path: Path) -> None:
    s3, keys = wide
    with FaultProxy(s3.endpoint) as proxy:
        proxy.reset(after=2000, times=1, where=lambda r: "list-type=2" in r.query and "start-after" in r.query)
        settings = {**FAST, "buckets": ["wide-listing"], "download_dir": str(tmp_path / "d")}
        summary = adl.AWSDataDownloader({**settings, "endpoint_url": proxy.url}).run_full_download(dry_run=True)
        lists = [r for r in proxy.requests("GET") if "list-type=2" in r.query]
    assert any(r.faults for r in lists), "the fault hit a listing page"
    assert summary.downloaded == len([key for key in keys if not key.endswith("/")]) - 1  # a//b.bin: unsafe
    assert len(lists) > 4, "listed in pieces"


# -- the page parser ---------------------------------------------------------------------------------------------


def listing_body(rng: random.Random, pretty: bool, encoded: bool) -> bytes:
    """A ListObjectsV2 answer built with ElementTree (so escaped as any XML writer escapes), in S3's layout."""
    import urllib.parse
    import xml.etree.ElementTree as ElementTree

    alphabet = ["a", "/", " ", "&", "<", ">", '"', "'", "é", "日", "+", "%", "\u2028", "]]>", "&amp;", "-"]
    root = ElementTree.Element("ListBucketResult", xmlns="http://s3.amazonaws.com/doc/2006-03-01/")
    ElementTree.SubElement(root, "Name").text = "b"
    ElementTree.SubElement(root, "Prefix")
    truncated = rng.random() < 0.5
    ElementTree.SubElement(root, "IsTruncated").text = "true" if truncated else "false"
    for _ in range(rng.randint(0, 30)):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        entry = ElementTree.SubElement(root, "Contents")
        ElementTree.SubElement(entry, "Key").text = urllib.parse.quote_plus(key, safe="/") if encoded else key
        ElementTree.SubElement(entry, "LastModified").text = "2026-11-26T07:32:03.000Z"
        ElementTree.SubElement(entry, "ETag").text = '"0123456789abcdef0123456789abcdef"'
        ElementTree.SubElement(entry, "Size").text = str(rng.choice([0, 1, 12345]))
        if rng.random() < 0.7:
            ElementTree.SubElement(entry, "StorageClass").text = rng.choice(["STANDARD", "GLACIER"])
        if rng.random() < 0.2:
            owner = ElementTree.SubElement(entry, "Owner")
            ElementTree.SubElement(owner, "ID").text = "x<y"
    for _ in range(rng.randint(0, 5)):
        common = ElementTree.SubElement(root, "CommonPrefixes")
        prefix = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) + "/"
        ElementTree.SubElement(common, "Prefix").text = urllib.parse.quote_plus(prefix, safe="/") if encoded else prefix
    if encoded:
        ElementTree.SubElement(root, "EncodingType").text = "url"
    if truncated:
        ElementTree.SubElement(root, "NextContinuationToken").text = "tok&en=="
    if pretty:
        ElementTree.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="utf-8")


@pytest.mark.parametrize("seed", range(40))
def test_the_scanned_page_equals_what_elementtree_reads(seed: int) -> None:
    rng = random.Random(seed)
    body = listing_body(rng, pretty=seed % 3 == 0, encoded=seed % 2 == 0)
    scanned = adl.scan_list_level("b", body.decode())
    assert scanned is not None, body[:300]
    assert scanned == adl.parse_list_level_xml("b", body)


@pytest.mark.parametrize(
    "body",
    [
        b"<ListBucketResult><Contents><Key><![CDATA[a<b]]></Key><Size>1</Size></Contents></ListBucketResult>",
        b"<ListBucketResult><!-- a comment --><Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>",
        b"<ListBucketResult><Contents><Key>k</Key><Size>x</Size></Contents></ListBucketResult>",
        b"<ListBucketResult><Contents><Key>k</Size></Contents></ListBucketResult>",
    ],
)
def test_a_page_the_scan_does_not_expect_goes_to_elementtree(body: bytes) -> None:
    assert adl.scan_list_level("b", body.decode()) is None


@pytest.mark.seaweedfs
def test_every_key_is_listed_once_from_seaweedfs(seaweed: S3Server, tmp_path: Path) -> None:
    """SeaweedFS 4.48 answers a delimiter listing after a key inside a folder with the folders inside that one,
    and skips every key starting with a start-after that is no key: the listing must notice the first (it lists
    that prefix page after page) and never rely on the second."""
    keys = [f"c{a}/Co Rd {b}/img/{n:03d}.png" for a in range(2) for b in range(12) for n in range(100)]
    keys += [f"flat/{n:04d}" for n in range(1100)] + ["top.bin"]
    client = seaweed.uploading_client()
    try:
        client.create_bucket(Bucket="weed-listing")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda key: client.put_object(Bucket="weed-listing", Key=key, Body=b"x"), keys))
    finally:
        client.close()
    settings = {
        **FAST,
        "buckets": ["weed-listing"],
        "download_dir": str(tmp_path / "d"),
        "endpoint_url": seaweed.endpoint,
    }
    for prefixes in ([], ["c0/"], ["flat/"]):
        summary = adl.AWSDataDownloader({**settings, "prefixes": prefixes}).run_full_download(dry_run=True)
        expected = [key for key in keys if key.startswith(tuple(prefixes) or "")]
        assert summary.downloaded == len(expected), prefixes


@pytest.mark.seaweedfs
def test_a_folder_listed_where_its_name_sorts_is_not_lost_on_seaweedfs(seaweed: S3Server, tmp_path: Path) -> None:
    """SeaweedFS 4.48 lists the folder "q/" where the name "q" sorts, so a delimiter listing names "q/" before
    "q!ab/" although "q!ab/0" sorts first byte by byte; here on its second page, after ranges of the first
    page's sub-prefixes were handed out. Taken as S3's order, a range "q/".."q!ab/" dropped the 50 keys of "q/"
    (2,203 of 2,253 listed) when the two shared a range: the split must stop there and list the rest page after page, each key once."""
    keys = [f"{n:04d}" for n in range(1001)] + [f"p{n:04d}/k" for n in range(1200)]
    keys += ["q!", "q!ab/0"] + [f"q/b/{n:03d}" for n in range(50)]
    client = seaweed.uploading_client()
    try:
        client.create_bucket(Bucket="weed-order")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda key: client.put_object(Bucket="weed-order", Key=key, Body=b"x"), keys))
    finally:
        client.close()
    settings = {**FAST, "buckets": ["weed-order"], "endpoint_url": seaweed.endpoint}
    for prefixes in ([], ["q"]):
        target = tmp_path / f"d{len(prefixes)}"
        summary = adl.AWSDataDownloader(
            {**settings, "prefixes": prefixes, "download_dir": str(target)}
        ).run_full_download()
        expected = sorted(key for key in keys if key.startswith(tuple(prefixes) or ""))
        assert summary.downloaded == len(expected) and summary.failed == 0, prefixes
        tree = target / "weed-order"
        assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()) == expected


def test_in_s3_order_wants_ascending_sub_prefixes_one_level_down_after_the_key() -> None:
    assert adl.in_s3_order("", "0999", ["p0/", "p1/", "q!ab/", "q/"])
    assert not adl.in_s3_order("", "0999", ["p0/", "q/", "q!ab/"])  # SeaweedFS: the folder where its name sorts
    assert not adl.in_s3_order("c/", "c/a/9", ["c/a/b/"])  # SeaweedFS: the folders inside the key's own
    assert not adl.in_s3_order("c/", "c/b/0", ["c/a/"])  # before the key
    assert not adl.in_s3_order("", "a", ["b/", "b/"])  # named twice
    assert adl.in_s3_order("", "a", [])
