"""A fault-injecting HTTP proxy for tests: put it between the downloader and an S3 endpoint (moto).

The proxy is a reverse proxy: the downloader is pointed at ``proxy.url`` as its S3 endpoint, the proxy forwards
every request to the upstream endpoint and sends the answer back, unless a :class:`Rule` matches the request.
A rule can

- ``reset``: send the headers and ``after`` bytes of the body, then close with SO_LINGER 0 (the client sees RST);
- ``truncate``: send ``after`` bytes of a body whose Content-Length promises more, then close normally;
- ``error``: answer ``status`` (500 InternalError, 503 SlowDown, 404 NoSuchKey, 403 AccessDenied, ...) with an
  S3 XML error body, without asking the upstream;
- ``delay``: wait ``delay_s`` seconds before the response headers;
- ``slow``: send the body ``chunk`` bytes per ``interval_s`` seconds (from byte ``after`` on);
- ``stall``: send ``after`` bytes of the body, then send nothing more until ``rule.release()`` (or the proxy stops);
- ``flip``: invert one byte of the body, at offset ``after`` of the response body;
- ``hook``: only call ``rule.hook(request)`` (any rule's hook runs before the request is forwarded).

A rule matches on ``method`` (None: any), ``key`` (a substring of the decoded path ``/bucket/key``), ``path``
(the exact decoded path), ``where`` (any predicate of the :class:`ProxyRequest`), lets the first ``skip`` matching
requests through, then hits the next ``times`` matching ones (None: all of them). Every matching rule applies.

The proxy records every request (method, path, query, headers, status, body bytes it sent to the client), so a
test can assert how many bytes a re-run fetched, or that every ranged GET carried If-Match. It answers every
response with ``Connection: close`` and serves one request per client connection; it reads each upstream body
whole before answering (keep test objects to tens of MiB).

Example::

    from faultproxy import KiB, FaultProxy

    with FaultProxy(s3.endpoint) as proxy:
        proxy.reset(key="big.bin", after=100 * KiB, times=1)   # the first GET of big.bin dies after 100 KiB
        proxy.error(key="small.txt", status=503, times=2)      # two SlowDowns, then the real answer
        proxy.slow(key="huge.bin", chunk=64 * KiB, interval_s=0.05)   # ~1.3 MiB/s, for interrupt tests
        code, out, err = run_cli("--buckets", "b", "--endpoint-url", proxy.url)
        assert proxy.bytes_sent(method="GET", key="big.bin") < 2 * len(body)
        assert all("if-match" in r.headers for r in proxy.requests("GET", key="big.bin") if r.range)

A CLI started as a subprocess uses the same in-process proxy through ``--endpoint-url proxy.url``. To run the
proxy in a process of its own::

    python tests/faultproxy.py http://127.0.0.1:5000 --rules rules.json   # prints its URL, serves until SIGTERM

where ``rules.json`` is a list of rule objects (``[{"action": "reset", "key": "big.bin", "after": 102400,
"times": 1}]``); on exit it prints the request statistics as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * KiB

ACTIONS = ("reset", "truncate", "error", "delay", "slow", "stall", "flip", "hook")

#: Default S3 error code and message for each status an ``error`` rule may answer.
S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    404: ("NoSuchKey", "The specified key does not exist."),
    403: ("AccessDenied", "Access Denied"),
    412: ("PreconditionFailed", "At least one of the pre-conditions you specified did not hold"),
    400: ("InvalidRequest", "Invalid Request"),
}

#: Headers that describe one connection, never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

#: Body bytes written per socket send (and the granularity of slow/stall/reset positions beyond ``after``).
SEND_CHUNK = 64 * KiB


@dataclass
class ProxyRequest:
    """One request the proxy served, and what it sent back."""

    method: str
    target: str  #: the raw request target, as the client sent it ("/bucket/a%20b?partNumber=1")
    path: str  #: decoded path without the query ("/bucket/a b")
    query: str  #: raw query string ("" when none)
    headers: dict[str, str]  #: request headers, lower-cased names
    status: int = 0  #: status sent to the client (0: none sent yet)
    bytes_sent: int = 0  #: response body bytes written to the client
    faults: list[str] = field(default_factory=list)  #: actions of the rules that hit this request

    @property
    def range(self) -> tuple[int, int | None] | None:
        """(first, last) byte of the request's Range header, last None when open-ended; None without one."""
        value = self.headers.get("range", "")
        if not value.startswith("bytes="):
            return None
        first, _, last = value[len("bytes=") :].partition("-")
        return int(first or 0), int(last) if last else None


@dataclass
class Rule:
    """One fault: which requests it hits (method, key/path, where, skip, times) and what it does to them."""

    action: str  #: one of ACTIONS
    method: str | None = "GET"  #: HTTP method to match; None matches any
    key: str | None = None  #: substring of the decoded path ("/bucket/key"); None matches any
    path: str | None = None  #: exact decoded path; None matches any
    times: int | None = None  #: hit only this many matching requests (after ``skip``); None: all of them
    skip: int = 0  #: let this many matching requests through untouched first
    after: int = 0  #: body offset where reset/truncate/stall cut, slow starts, or flip flips
    status: int = 500  #: for "error"
    code: str | None = None  #: S3 error code for "error"; default from S3_ERRORS
    message: str | None = None  #: S3 error message for "error"; default from S3_ERRORS
    delay_s: float = 0.0  #: for "delay": seconds before the response headers
    chunk: int = 64 * KiB  #: for "slow": bytes sent per interval
    interval_s: float = 0.05  #: for "slow": seconds between chunks
    where: Callable[[ProxyRequest], bool] | None = None  #: extra predicate on the request
    hook: Callable[[ProxyRequest], None] | None = None  #: called before the request is forwarded
    #: Matching requests seen so far (including skipped ones) and how many the rule hit.
    seen: int = 0
    hits: int = 0
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")

    def matches(self, request: ProxyRequest) -> bool:
        if self.method is not None and request.method.upper() != self.method.upper():
            return False
        if self.key is not None and self.key not in request.path:
            return False
        if self.path is not None and request.path != self.path:
            return False
        return self.where is None or bool(self.where(request))

    def release(self) -> None:
        """Let a ``stall`` rule's held responses continue (and stop it stalling new ones)."""
        self._released.set()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        allowed = {f.name for f in dataclasses.fields(cls)} - {"where", "hook", "seen", "hits", "_released"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown rule fields {sorted(unknown)}")
        return cls(**data)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # server_close joins the handler threads: stop() leaves nothing running
    block_on_close = True
    proxy: FaultProxy


class _Cut(Exception):
    """The response was ended on purpose (reset/truncate); nothing more to send."""


class _Handler(socketserver.BaseRequestHandler):
    """Serves one request on one client connection, then closes it."""

    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        sock: socket.socket = self.request
        proxy._track(sock, True)
        try:
            proxy._serve(sock)
        except (_Cut, OSError, http.client.HTTPException):
            pass  # ended on purpose, or the client or the upstream went away: nothing more to send
        finally:
            proxy._track(sock, False)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.close()


class FaultProxy:
    """A threaded reverse proxy on 127.0.0.1 that forwards to ``upstream`` and injects faults by rule.

    Use it as a context manager (``with FaultProxy(url) as proxy``) or call start()/stop(). Rules may be added
    and cleared at any time; all methods are thread-safe.
    """

    def __init__(self, upstream: str, *, port: int = 0, upstream_timeout_s: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or 80
        self._upstream_timeout = upstream_timeout_s
        self._port = port
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[ProxyRequest] = []
        self._sockets: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """The endpoint URL to give the downloader (``--endpoint-url``)."""
        assert self._server is not None, "start the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop accepting, end every held or slowed response, and join the handler threads."""
        if self._server is None:
            return
        self._closing.set()
        self._server.shutdown()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(30)
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- rules ----------------------------------------------------------------------------------------------

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Remove every rule (held ``stall`` responses are released)."""
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:
            rule.release()

    def reset(self, key: str | None = None, *, after: int = 0, times: int | None = None, **match: Any) -> Rule:
        """Send ``after`` body bytes, then reset the connection (RST)."""
        return self.add_rule(Rule("reset", key=key, after=after, times=times, **match))

    def truncate(self, key: str | None = None, *, after: int = 0, times: int | None = None, **match: Any) -> Rule:
        """Send ``after`` body bytes of the promised Content-Length, then close normally."""
        return self.add_rule(Rule("truncate", key=key, after=after, times=times, **match))

    def error(self, key: str | None = None, *, status: int = 500, times: int | None = None, **match: Any) -> Rule:
        """Answer ``status`` with an S3 XML error body (500 InternalError, 503 SlowDown, 404, 403, ...)."""
        return self.add_rule(Rule("error", key=key, status=status, times=times, **match))

    def delay(self, key: str | None = None, *, seconds: float, times: int | None = None, **match: Any) -> Rule:
        """Wait ``seconds`` before sending the response headers."""
        return self.add_rule(Rule("delay", key=key, delay_s=seconds, times=times, **match))

    def slow(
        self,
        key: str | None = None,
        *,
        chunk: int = 64 * KiB,
        interval_s: float = 0.05,
        after: int = 0,
        times: int | None = None,
        **match: Any,
    ) -> Rule:
        """Send the body ``chunk`` bytes every ``interval_s`` seconds, from body byte ``after`` on."""
        return self.add_rule(
            Rule("slow", key=key, chunk=chunk, interval_s=interval_s, after=after, times=times, **match)
        )

    def stall(self, key: str | None = None, *, after: int = 0, times: int | None = None, **match: Any) -> Rule:
        """Send ``after`` body bytes, then hold the rest until ``rule.release()`` or the proxy stops."""
        return self.add_rule(Rule("stall", key=key, after=after, times=times, **match))

    def flip(self, key: str | None = None, *, at: int | None = None, times: int | None = None, **match: Any) -> Rule:
        """Invert one byte of the body: at offset ``at`` of the response body (default: its middle)."""
        return self.add_rule(Rule("flip", key=key, after=-1 if at is None else at, times=times, **match))

    def on_request(
        self, hook: Callable[[ProxyRequest], None], key: str | None = None, *, times: int | None = None, **match: Any
    ) -> Rule:
        """Call ``hook(request)`` before matching requests are forwarded (e.g. to delete or replace the key)."""
        return self.add_rule(Rule("hook", key=key, hook=hook, times=times, **match))

    # -- statistics -----------------------------------------------------------------------------------------

    def requests(self, method: str | None = None, key: str | None = None) -> list[ProxyRequest]:
        """Requests served so far, oldest first, optionally only one method and/or paths containing ``key``."""
        with self._lock:
            log = list(self._log)
        return [
            r for r in log if (method is None or r.method.upper() == method.upper()) and (key is None or key in r.path)
        ]

    def count(self, method: str | None = None, key: str | None = None) -> int:
        return len(self.requests(method, key))

    def bytes_sent(self, method: str | None = None, key: str | None = None) -> int:
        """Response body bytes sent to clients, optionally for one method and/or paths containing ``key``."""
        return sum(r.bytes_sent for r in self.requests(method, key))

    def bytes_by_path(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for r in self.requests():
            totals[r.path] = totals.get(r.path, 0) + r.bytes_sent
        return totals

    def bytes_by_method(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for r in self.requests():
            totals[r.method] = totals.get(r.method, 0) + r.bytes_sent
        return totals

    def open_connections(self) -> int:
        """Client connections the proxy is serving now (a handler has not finished with them yet)."""
        with self._lock:
            return len(self._sockets)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until every client connection has been served or abandoned (e.g. after the client was killed), so
        the byte counts no longer move; AssertionError after ``timeout`` (a hang guard)."""
        deadline = time.monotonic() + timeout
        while self.open_connections():
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy still serves {self.open_connections()} connections after {timeout}s")
            time.sleep(0.01)

    def reset_stats(self) -> None:
        """Forget the requests served so far (rules and their counters stay)."""
        with self._lock:
            self._log.clear()

    def stats(self) -> dict[str, Any]:
        """Everything counted, as plain JSON-able data."""
        return {
            "requests": len(self.requests()),
            "bytes_by_path": self.bytes_by_path(),
            "bytes_by_method": self.bytes_by_method(),
            "requests_by_method": {m: self.count(m) for m in {r.method for r in self.requests()}},
        }

    # -- serving --------------------------------------------------------------------------------------------

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def _matching_rules(self, request: ProxyRequest) -> list[Rule]:
        """The rules that hit this request; counts each match (under the lock, so counts are exact)."""
        hit = []
        with self._lock:
            for rule in self._rules:
                if not rule.matches(request):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                rule.hits += 1
                hit.append(rule)
                request.faults.append(rule.action)
        return hit

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        request_line = rfile.readline(65537).decode("latin-1").rstrip("\r\n")
        if not request_line:
            return
        method, target, _version = request_line.split(" ", 2)
        headers = http.client.parse_headers(rfile)
        split = urllib.parse.urlsplit(target)
        request = ProxyRequest(
            method=method,
            target=target,
            path=urllib.parse.unquote(split.path),
            query=split.query,
            headers={name.lower(): value for name, value in headers.items()},
        )
        if "100-continue" in request.headers.get("expect", "").lower():
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_request_body(rfile, request.headers)
        with self._lock:
            self._log.append(request)
        rules = self._matching_rules(request)
        for rule in rules:
            if rule.hook is not None:
                rule.hook(request)
        for rule in rules:
            if rule.action == "delay":
                self._closing.wait(rule.delay_s)
        error = next((r for r in rules if r.action == "error"), None)
        if error is not None:
            code, message = S3_ERRORS.get(error.status, (str(error.status), "Injected error"))
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{error.code or code}</Code><Message>{error.message or message}</Message>"
                f"<Resource>{request.path}</Resource><RequestId>faultproxy</RequestId></Error>"
            ).encode()
            head_only = method.upper() == "HEAD"
            self._send_head(
                sock,
                request,
                error.status,
                http.client.responses.get(error.status, "Error"),
                [("Content-Type", "application/xml"), ("x-amz-request-id", "faultproxy")],
                len(xml),
            )
            if not head_only:
                self._send_body(sock, request, xml, [])
            return
        status, reason, response_headers, response_body = self._forward(method, target, headers, body)
        if method.upper() == "HEAD":
            length = int(next((v for k, v in response_headers if k.lower() == "content-length"), "0"))
            kept = [(k, v) for k, v in response_headers if k.lower() != "content-length"]
            self._send_head(sock, request, status, reason, kept, length)
            return
        self._send_head(sock, request, status, reason, response_headers, len(response_body))
        self._send_body(sock, request, response_body, rules)

    def _read_request_body(self, rfile: Any, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            pieces = []
            while True:
                size = int(rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(pieces)
                pieces.append(rfile.read(size))
                rfile.readline(3)
        length = int(headers.get("content-length") or 0)
        return rfile.read(length) if length else b""

    def _forward(
        self, method: str, target: str, headers: Any, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream (Host header kept, so a signature stays valid) and read the whole answer."""
        connection = http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=self._upstream_timeout
        )
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            forwarded = {k: v for k, v in forwarded.items() if k.lower() != "content-length"}
            if body or method.upper() in ("PUT", "POST"):
                forwarded["Content-Length"] = str(len(body))
            forwarded["Connection"] = "close"
            connection.request(method, target, body=body or None, headers=forwarded)
            response = connection.getresponse()
            data = response.read()
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in HOP_BY_HOP and (method.upper() == "HEAD" or k.lower() != "content-length")
            ]
            return response.status, response.reason, kept, data
        finally:
            connection.close()

    def _send_head(
        self,
        sock: socket.socket,
        request: ProxyRequest,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        length: int,
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines += [f"Content-Length: {length}", "Connection: close", "", ""]
        request.status = status
        sock.sendall("\r\n".join(lines).encode("latin-1"))

    def _send_body(self, sock: socket.socket, request: ProxyRequest, body: bytes, rules: list[Rule]) -> None:
        flips = [r for r in rules if r.action == "flip"]
        if flips and body:
            data = bytearray(body)
            for rule in flips:
                at = len(data) // 2 if rule.after < 0 else min(rule.after, len(data) - 1)
                data[at] ^= 0xFF
            body = bytes(data)
        cuts = [r for r in rules if r.action in ("reset", "truncate")]
        cut = min(cuts, key=lambda r: r.after) if cuts else None
        end = min(len(body), cut.after) if cut else len(body)
        slow = next((r for r in rules if r.action == "slow"), None)
        stall = next((r for r in rules if r.action == "stall"), None)
        offset = 0
        while offset < end:
            if stall is not None and offset >= stall.after:
                while not stall._released.wait(0.05):
                    if self._closing.is_set():
                        raise _Cut()
            size = SEND_CHUNK
            if slow is not None and offset >= slow.after:
                size = slow.chunk
                if self._closing.wait(slow.interval_s):
                    return
            for limit in (stall.after if stall else None, slow.after if slow else None):
                if limit is not None and offset < limit:
                    size = min(size, limit - offset)
            piece = body[offset : min(end, offset + size)]
            sock.sendall(piece)
            offset += len(piece)
            with self._lock:
                request.bytes_sent += len(piece)
        if cut is not None and cut.after < len(body):
            if cut.action == "reset":
                _wait_until_delivered(sock)  # a RST discards what the client has not read yet
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            raise _Cut()


def _wait_until_delivered(sock: socket.socket, timeout: float = 30.0) -> None:
    """Wait until the client has acknowledged every byte sent (Linux: the send queue is empty), then a little;
    ``timeout`` only guards against a client that stopped reading."""
    deadline = time.monotonic() + timeout
    try:
        import fcntl
        import termios

        while time.monotonic() < deadline:
            unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            if unsent == 0:
                break
            time.sleep(0.005)
    except (ImportError, OSError):
        pass
    time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """Run the proxy in a process of its own: print its URL, serve until SIGTERM/SIGINT, print stats."""
    parser = argparse.ArgumentParser(description="Fault-injecting HTTP proxy in front of an S3 endpoint.")
    parser.add_argument("upstream", help="the S3 endpoint to forward to, e.g. http://127.0.0.1:5000")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--rules", help="JSON file: a list of rule objects (fields of faultproxy.Rule)")
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, port=args.port)
    if args.rules:
        with open(args.rules, encoding="utf-8") as handle:
            for data in json.load(handle):
                proxy.add_rule(Rule.from_dict(data))
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with proxy:
        print(proxy.url, flush=True)
        while not done.wait(0.2):
            pass
    print(json.dumps(proxy.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
