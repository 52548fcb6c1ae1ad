"""Progress a new user can read (issue 12, points 4, 5 and 7), each checked by running the tool as the user did.

- The terminal bar fills with bytes as they arrive, large objects and their parts included, in the README's shape.
- In Jupyter the widget fills with bytes too; without ipywidgets the text bar comes once, with no TqdmWarning.
- ``--verbose`` logs one line per object and none of botocore's event-alias noise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, MiB, S3Server, run_on_terminal, write_config
from faultproxy import FaultProxy, KiB

#: The README's bar line: bytes for the percentage, bar and elapsed<remaining; files for the counter and rate.
BAR_LINE = re.compile(
    r"Downloading: +(?P<percent>\d+)%\|[^|]*\| (?P<done>\d+)/(?P<total>\d+) "
    r"\[\d\d:\d\d<(?P<remaining>[\d:?]+), (?P<rate>[\d.?]+)files/s, "
    r"Success=(?P<success>\d+), Failed=(?P<failed>\d+), Speed=[\d.]+ MB/s\]$"
)

#: Run before the downloader in a subprocess: a Jupyter kernel as tqdm.autonotebook and in_notebook() see one
#: (ipykernel.zmqshell loaded, IPython.get_ipython() a ZMQInteractiveShell), without IPython or ipykernel installed.
KERNEL = """
import sys, types
zmqshell = types.ModuleType("ipykernel.zmqshell")
ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
zmqshell.ZMQInteractiveShell = ZMQInteractiveShell
ipykernel = types.ModuleType("ipykernel")
ipykernel.zmqshell = zmqshell
ipython = types.ModuleType("IPython")
_shell = ZMQInteractiveShell()
ipython.get_ipython = lambda: _shell
display = types.ModuleType("IPython.display")
display.display = lambda *objects, **kwargs: None
ipython.display = display
sys.modules.update({"ipykernel": ipykernel, "ipykernel.zmqshell": zmqshell, "IPython": ipython,
                    "IPython.display": display})
"""

#: ipywidgets as tqdm.notebook uses it, recording every value its bar and texts are given.
WIDGETS = """
EVENTS = []
class _Widget:
    def __init__(self, *args, children=(), min=0, max=1, **kwargs):
        self.children, self.min, self.max, self.bar_style = list(children), min, max, ""
        self.layout, self.style = types.SimpleNamespace(), types.SimpleNamespace()
    def close(self):
        pass
class FloatProgress(_Widget):
    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "value":
            EVENTS.append(["bar", value, self.max])
class HTML(_Widget):
    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "value":
            EVENTS.append(["text", value])
widgets = types.ModuleType("ipywidgets")
widgets.FloatProgress, widgets.HTML, widgets.HBox = FloatProgress, HTML, _Widget
sys.modules["ipywidgets"] = widgets
"""

#: A notebook cell: the Python API, as the README shows it, then what the widgets were shown.
CELL = """
sys.path.insert(0, {repo!r})
from aws_data_downloader import AWSDataDownloader
summary = AWSDataDownloader({settings!r}).run_full_download()
print(json.dumps({{"downloaded": summary.downloaded, "events": globals().get("EVENTS")}}))
"""


def run_cell(tmp_path: Path, env: dict[str, str], settings: dict[str, object], *, widgets: bool) -> tuple[dict, str]:
    """Run the downloader from a simulated notebook cell; returns (its printed JSON, its stderr)."""
    prelude = KERNEL + (WIDGETS if widgets else 'sys.modules["ipywidgets"] = None\n')
    script = "import json\n" + prelude + CELL.format(repo=str(REPO), settings=settings)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    stderr = result.stderr.decode()  # not text=True: universal newlines would turn the bar's "\r" into "\n"
    assert result.returncode == 0, (result.stdout, stderr)
    return json.loads(result.stdout.decode().strip().splitlines()[-1]), stderr


def frames(text: str) -> list[str]:
    """Every bar frame drawn (each redraw starts with a carriage return), in order."""
    pieces = re.split(r"[\r\n]+", text)
    return [piece.strip() for piece in pieces if piece.strip().startswith("Downloading:")]


def percentages_in_flight(shown: list[str], total: int) -> list[int]:
    """The percentages of the frames drawn while no object had finished yet."""
    found = []
    for frame in shown:
        match = BAR_LINE.search(frame)
        if match and match["done"] == "0" and match["total"] == str(total):
            found.append(int(match["percent"]))
    return found


# -- point 4: the bar fills with bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("route", ["stream", "parts"])
def test_the_terminal_bar_advances_with_the_bytes_of_a_large_object(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, route: str
) -> None:
    s3.make_bucket("bar-bkt")
    if route == "stream":  # below multipart_threshold_mb: one GET
        s3.put("bar-bkt", "big.bin", os.urandom(3 * MiB))
        proxy.slow(key="big.bin", chunk=64 * KiB, interval_s=0.05)  # 48 chunks: at least 2.4 s
    else:  # a multipart upload above the threshold: a ranged GET per upload part (5 + 1 MiB), one at a time
        s3.put_multipart("bar-bkt", "big.bin", os.urandom(6 * MiB))
        proxy.slow(key="big.bin", chunk=128 * KiB, interval_s=0.05)  # 48 chunks: at least 2.4 s
    settings = {"multipart_threshold_mb": 4, "parallel_downloads": 1}
    argv = ["--buckets", "bar-bkt", "--download-dir", "data", "--endpoint-url", proxy.url]
    argv += ["--config", write_config(tmp_path, settings)]
    screen, out, code = run_on_terminal(argv, tmp_path, s3.env())
    assert code == 0, screen
    assert "Downloaded:       1" in out

    shown = frames(screen)
    in_flight = percentages_in_flight(shown, total=1)
    partial = [percent for percent in in_flight if 0 < percent < 100]
    assert len(set(partial)) >= 2, shown  # it moved, more than once, before the one file was done
    assert partial == sorted(partial), shown
    remaining = [m["remaining"] for m in map(BAR_LINE.search, shown) if m and m["done"] == "0"]
    assert any(eta != "?" for eta in remaining), shown  # an ETA from the bytes, while files/s still knows none
    final = BAR_LINE.search(shown[-1])
    assert final, shown[-1]
    assert (final["percent"], final["done"], final["total"]) == ("100", "1", "1"), shown[-1]
    assert (final["success"], final["failed"]) == ("1", "0"), shown[-1]
    ranged = [request.range is not None for request in proxy.requests("GET", key="big.bin")]
    assert ranged and (all(ranged) if route == "parts" else not any(ranged)), ranged


def test_the_bar_counts_only_the_bytes_still_to_fetch(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    """An object already on disk is skipped: the bar's bytes are those of the objects it fetches."""
    s3.make_bucket("skip-bkt")
    s3.put("skip-bkt", "done.bin", os.urandom(2 * MiB))
    s3.put("skip-bkt", "new.bin", os.urandom(1 * MiB))
    argv = ["--buckets", "skip-bkt", "--download-dir", "data", "--endpoint-url", proxy.url]
    screen, _out, code = run_on_terminal([*argv, "--prefixes", "done"], tmp_path, s3.env())
    assert code == 0, screen
    held = proxy.stall(key="new.bin")  # new.bin sends nothing until the screen showed the skip

    def release_once_shown(screen: str) -> None:
        if sum(" 1/2 [" in frame for frame in frames(screen)) >= 2:
            held.release()

    try:
        screen, out, code = run_on_terminal(argv, tmp_path, s3.env(), release_once_shown)
    finally:
        held.release()
    assert code == 0, screen
    assert "Skipped:          1" in out and "Downloaded:       1" in out
    shown = frames(screen)
    waiting = [m for m in map(BAR_LINE.search, shown) if m and m["done"] == "1"][:2]
    # 1 of 2 files, and 0% of the bytes to fetch: not the 2 MiB of 3 (67%) that were already on disk.
    assert [m["percent"] for m in waiting] == ["0", "0"], shown
    assert BAR_LINE.search(shown[-1])["percent"] == "100", shown


def test_progress_lines_without_a_terminal_carry_the_bytes(
    s3: S3Server, proxy: FaultProxy, tmp_path: Path, run_cli
) -> None:
    s3.make_bucket("line-bkt")
    s3.put("line-bkt", "big.bin", os.urandom(2 * MiB))
    proxy.slow(key="big.bin", chunk=64 * KiB, interval_s=0.05)  # at least 1.6 s
    config = write_config(tmp_path, {"progress_interval_s": 0.2})
    code, out, err = run_cli(
        "--buckets", "line-bkt", "--download-dir", "data", "--endpoint-url", proxy.url, "--config", config
    )
    assert code == 0, (out, err)
    assert "\r" not in err and "Downloading" not in err
    lines = [line for line in err.splitlines() if " - INFO - Progress: 0 of 1 files done (" in line]
    fetched = [re.search(r"\), ([\d.]+) (B|KB|MB) of 2.0 MB fetched at [\d.]+ MB/s$", line) for line in lines]
    assert fetched and all(fetched), lines
    in_mb = [float(m[1]) / {"B": MiB, "KB": KiB, "MB": 1}[m[2]] for m in fetched if m]
    assert any(0 < mb < 2 for mb in in_mb), lines  # bytes of the object in flight, before it is done
    assert "Downloaded:       1" in out


def test_the_notebook_widget_fills_with_bytes(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    s3.make_bucket("widget-bkt")
    s3.put("widget-bkt", "big.bin", os.urandom(2 * MiB))
    proxy.slow(key="big.bin", chunk=64 * KiB, interval_s=0.05)  # at least 1.6 s
    settings = {"buckets": ["widget-bkt"], "download_dir": "data", "endpoint_url": proxy.url}
    shown, stderr = run_cell(tmp_path, s3.env(), settings, widgets=True)
    assert shown["downloaded"] == 1, stderr
    assert "TqdmWarning" not in stderr and "Downloading" not in stderr  # the widget, not a text bar
    bar = [(value, maximum) for kind, value, maximum in (e for e in shown["events"] if e[0] == "bar")]
    texts = [event[1] for event in shown["events"] if event[0] == "text"]
    assert any(0 < value < maximum == 2 * MiB for value, maximum in bar), bar  # moving before the file is done
    assert bar[-1] == (2 * MiB, 2 * MiB), bar
    final = texts[-1].replace("\u2007", " ").strip()  # tqdm.notebook pads with figure spaces
    assert final.startswith("1/1 [") and "files/s, Success=1, Failed=0, Speed=" in final, texts


# -- point 5: a notebook without ipywidgets -------------------------------------------------------------------


def test_a_notebook_without_ipywidgets_gets_one_clean_text_bar(s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    s3.make_bucket("nb-bkt")
    for index in range(3):
        s3.put("nb-bkt", f"img/{index}.png", bytes([index]) * 2000)
    proxy.slow(key="img/", chunk=500, interval_s=0.1)  # one object after the other, each over several frames
    settings = {"buckets": ["nb-bkt"], "download_dir": "data", "endpoint_url": proxy.url, "parallel_downloads": 1}
    shown, stderr = run_cell(tmp_path, s3.env(), settings, widgets=False)
    assert shown["downloaded"] == 3, stderr
    assert "TqdmWarning" not in stderr and "IProgress" not in stderr, stderr
    drawn = frames(stderr)
    assert drawn and all(line.startswith("Downloading:") for line in re.split(r"[\r\n]+", stderr) if line), stderr
    final = [frame for frame in drawn if " 3/3 " in frame]
    assert len(final) == 1, drawn  # the final frame once, not once more on close
    assert BAR_LINE.search(final[0]) and final[0] == drawn[-1], drawn
    assert stderr.endswith(drawn[-1] + "\n") and stderr.count("\n") == 1, repr(stderr)


# -- point 7: --verbose -------------------------------------------------------------------------------------------


def test_verbose_logs_one_line_per_object_without_botocore_event_aliases(
    s3: S3Server, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.make_bucket("dbg-bkt")
    s3.put("dbg-bkt", "small.png", b"s" * 2000)  # the small-object loop
    s3.put("dbg-bkt", "medium.bin", b"m" * (300 * KiB))  # one streamed GET
    s3.put_multipart("dbg-bkt", "large.bin", os.urandom(6 * MiB))  # ranged parts
    config = write_config(tmp_path, {"multipart_threshold_mb": 1, "multipart_chunksize_mb": 1})
    argv = ["--buckets", "dbg-bkt", "--download-dir", "data", "--config", config, "--verbose", *s3.args()]
    code, out, err = run_cli(*argv)
    assert code == 0, (out, err)
    assert "Changing event name" not in err
    # Keys and region from the environment are read without botocore (tests/test_session.py), which says so.
    assert " - DEBUG - Credentials (environment) and region (us-east-1) settled without botocore" in err

    line = re.compile(
        r" - DEBUG - Object dbg-bkt/(?P<key>\S+): (?P<outcome>[^,]+), (?P<size>[\d,]+) B, path=(?P<path>\w+), "
        r"checksum=(?P<checksum>\S+), attempts=(?P<attempts>\d+), (?P<seconds>[\d.]+) s$"
    )
    objects = {m["key"]: m for m in map(line.search, err.splitlines()) if m}
    assert sorted(objects) == ["large.bin", "medium.bin", "small.png"], err
    assert {key: m["path"] for key, m in objects.items()} == {
        "small.png": "loop",
        "medium.bin": "stream",
        "large.bin": "parts",
    }
    assert objects["medium.bin"]["size"] == f"{300 * KiB:,}"
    for match in objects.values():
        assert match["outcome"] == "downloaded" and match["attempts"] == "1", match.string
        assert re.fullmatch(r"(md5|md5-multipart|crc32|crc32c|crc64nvme|sha1|sha256):\S+", match["checksum"]), (
            match.string
        )
    log_text = (tmp_path / "aws_downloader.log").read_text()
    assert "DEBUG - aws_data_downloader - Object dbg-bkt/large.bin: downloaded" in log_text
    assert "Changing event name" not in log_text

    # The region from ~/.aws/config now: botocore's chain decides (the same keys, env ones win over the file).
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    Path(os.environ["AWS_CONFIG_FILE"]).write_text("[default]\nregion = us-east-1\n")
    code, out, err = run_cli(*argv)  # everything is on disk now
    assert code == 0, (out, err)
    assert " - DEBUG - Looking for credentials via: env" in err  # botocore's own debug lines stay
    assert "Changing event name" not in err
    skipped = [m for m in map(line.search, err.splitlines()) if m]
    assert len(skipped) == 3 and all(m["path"] == "skipped" and m["attempts"] == "0" for m in skipped), err
    assert all(m["outcome"] == "skipped (already downloaded)" for m in skipped), err
