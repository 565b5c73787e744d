"""Fixtures for tests over real loopback sockets: the test origin, tagd in front of it,
a recorder for the tracking hook, and two kinds of visitor (treq, and a hand-written
HTTP/1.1 client that shows exactly what tagd puts on the wire).

Every wait is bounded: use L{within} for a Deferred and L{eventually} for a condition.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections import deque
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from helpers import ADMIN_TOML
from hostile_origin import ScriptedOrigin
from origin import Origin
from tagd.delivery.client import PlatformAgent
from tagd.delivery.spool import Spool

TIMEOUT = 10.0


def within(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    """C{d}, failing with a C{TimeoutError} if it has not fired after C{seconds}."""
    return d.addTimeout(seconds, _global_reactor)


def sleep(seconds: float) -> Deferred:
    """A Deferred that fires after C{seconds} on the reactor's clock."""
    return deferLater(_global_reactor, seconds, lambda: None)


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Wait until C{predicate()} is true; fail with what it last returned after C{timeout}."""
    deadline = _global_reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if _global_reactor.seconds() > deadline:
            raise AssertionError(f"condition still false after {timeout} s: {predicate}")
        await sleep(interval)


# -- the hand-written visitor ---------------------------------------------------------


def raw_request(
    method: bytes = b"GET",
    path: bytes = b"/",
    headers: list[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
    host: bytes | None = b"shop.example",
) -> bytes:
    """The bytes of a request; C{Host} and (for a body) C{Content-Length} are added
    unless C{headers} frame the body themselves."""
    lines = [b"%s %s %s" % (method, path, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    names = {name.lower() for name, _ in headers}
    lines += [b"%s: %s" % header for header in headers]
    if body and not names & {b"content-length", b"transfer-encoding"}:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@attrs.define
class WireResponse:
    """One response exactly as it came off the socket."""

    version: bytes
    status: int
    phrase: bytes
    headers: list[tuple[bytes, bytes]]  # names in the case they were sent, in order
    interim: list["WireResponse"] = attrs.field(factory=list)  # 1xx responses before it
    body: bytearray = attrs.field(factory=bytearray)  # empty when a sink took the bytes
    body_length: int = 0
    chunks: list[int] | None = None  # the chunk sizes, for a chunked body
    complete: bool = False  # framing satisfied (False: the connection was cut)

    def header(self, name: bytes) -> list[bytes]:
        """The values of C{name} in any letter case, in the order sent."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self) -> set[bytes]:
        """The lower-cased header names."""
        return {n.lower() for n, _ in self.headers}


class WireVisitor(Protocol):
    """A visitor that writes raw requests and parses responses byte by byte.

    Responses are matched to expectations in order, so pipelined and keep-alive
    sequences can be checked; a response whose connection is cut before its framing
    is satisfied is returned with C{complete=False}.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._expected: deque[tuple[bytes, object, Deferred]] = deque()
        self._interim: list[WireResponse] = []
        self._current: WireResponse | None = None
        self._mode = None  # "length" | "chunked" | "close" | "none"
        self._remaining = 0  # body bytes (length mode) or chunk bytes left
        self._chunk_state = "size"  # "size" | "data" | "crlf" | "trailer"
        self.received = 0
        self.closed: Deferred = Deferred()  # fires with why the connection ended

    # Using it.

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def expect(self, method: bytes = b"GET", sink=None) -> Deferred:
        """A Deferred for the next response, to a request with C{method}.

        C{sink} receives the body bytes instead of L{WireResponse.body}.
        """
        d = Deferred()
        self._expected.append((method, sink, d))
        return d

    def request(self, method: bytes = b"GET", path: bytes = b"/", sink=None, **kw) -> Deferred:
        """Send a request built by L{raw_request} and expect its response."""
        d = self.expect(method, sink)
        self.send(raw_request(method, path, **kw))
        return d

    def pause(self) -> None:
        """Stop reading from the socket (the kernel buffers fill, then tagd must wait)."""
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    # The parser.

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self._buffer and self._mode in ("length", "close"):
            data = self._body(data)  # fast path for large bodies
        self._buffer += data
        self._parse()

    def _body(self, data) -> bytes:
        """Feed the current identity body; return what is beyond it."""
        take = len(data) if self._mode == "close" else min(self._remaining, len(data))
        if take:
            self._feed(data[:take] if take < len(data) else data)
        if self._mode == "length":
            self._remaining -= take
            if self._remaining == 0:
                self._done(True)
        return data[take:]

    def _feed(self, data) -> None:
        response = self._current
        response.body_length += len(data)
        sink = self._expected[0][1]
        if sink is None:
            response.body += data
        else:
            sink(data)

    def _parse(self) -> None:
        while self._expected and self._buffer:
            if self._current is None:
                if not self._head():
                    return
            elif self._mode in ("length", "close"):
                rest = self._body(bytes(self._buffer))
                self._buffer = bytearray(rest)
            elif not self._chunked():
                return

    def _head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[: end + 4]
        version, status, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
        headers = []
        for line in lines[1:]:
            name, value = line.split(b":", 1)
            headers.append((name, value.strip()))
        response = WireResponse(version, int(status), phrase, headers)
        if 100 <= response.status < 200:
            self._interim.append(response)
            return True
        response.interim, self._interim = self._interim, []
        self._current = response
        method = self._expected[0][0]
        if method == b"HEAD" or response.status in (204, 304):
            self._mode = "none"
            self._done(True)
        elif b"chunked" in b",".join(response.header(b"transfer-encoding")).lower():
            self._mode, self._chunk_state = "chunked", "size"
            response.chunks = []
        elif response.header(b"content-length"):
            self._mode, self._remaining = "length", int(response.header(b"content-length")[0])
            if self._remaining == 0:
                self._done(True)
        else:
            self._mode = "close"
        return True

    def _chunked(self) -> bool:
        """Consume chunked framing; False when more bytes are needed."""
        buffer = self._buffer
        if self._chunk_state == "size":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buffer[:end]).split(b";")[0], 16)
            del buffer[: end + 2]
            self._current.chunks.append(size)
            self._chunk_state, self._remaining = ("trailer", 0) if size == 0 else ("data", size)
        elif self._chunk_state == "data":
            take = min(self._remaining, len(buffer))
            self._feed(bytes(buffer[:take]))
            del buffer[:take]
            self._remaining -= take
            if self._remaining:
                return False
            self._chunk_state = "crlf"
        elif self._chunk_state == "crlf":
            if len(buffer) < 2:
                return False
            assert bytes(buffer[:2]) == b"\r\n", "chunk data not followed by CRLF"
            del buffer[:2]
            self._chunk_state = "size"
        else:  # trailer section, ended by an empty line
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            del buffer[: end + 2]
            if end == 0:
                self._done(True)
        return True

    def _done(self, complete: bool) -> None:
        response, self._current, self._mode = self._current, None, None
        response.complete = complete
        _, _, d = self._expected.popleft()
        d.callback(response)

    def connectionLost(self, reason) -> None:
        if self._current is not None:
            self._done(self._mode == "close")
        while self._expected:
            self._expected.popleft()[2].errback(reason)
        self.closed.callback(reason.value)  # the exception: ConnectionDone for a clean close


# -- the tracking hook ----------------------------------------------------------------


class HookRecorder:
    """Stands in for the tracking hook: records each call, then does C{behaviour}."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], object]] = []
        self.behaviour = None
        self._waiters: list[tuple[int, Deferred]] = []

    def __call__(self, values, visit):
        self.calls.append((list(values), visit))
        waiting, self._waiters = self._waiters, []
        for count, d in waiting:
            if len(self.calls) >= count:
                d.callback(self.calls)
            else:
                self._waiters.append((count, d))
        if self.behaviour is not None:
            return self.behaviour(values, visit)

    def called(self, count: int = 1) -> Deferred:
        """A Deferred that fires with the calls once there have been C{count}."""
        d = Deferred()
        if len(self.calls) >= count:
            d.callback(self.calls)
        else:
            self._waiters.append((count, d))
        return d


# -- tagd -----------------------------------------------------------------------------


@attrs.define
class Tagd:
    """A running tagd: the loopback port visitors connect to."""

    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def proxy_toml(values: dict) -> str:
    """A C{[proxy]} table with C{values} (strings, numbers, lists of strings), and an
    admin listener on a free port."""
    return (
        "[proxy]\n" + "".join(f"{key} = {json.dumps(v)}\n" for key, v in values.items()) + ADMIN_TOML
    )


def _listener(service) -> StreamServerEndpointService:
    """The visitor listener in tagd's service tree."""
    (listener,) = [s for s in service if isinstance(s, StreamServerEndpointService)]
    return listener


def _install_hook(service, hook) -> None:
    """Make C{hook} the tracking hook of the proxy resource that C{service} serves.

    C{build_service} wires in the default hook and takes no other, so the test reaches
    into the resource it built.
    """
    proxy = _listener(service).factory.resource
    assert hasattr(proxy, "on_tracking"), "the proxy resource no longer has on_tracking"
    proxy.on_tracking = hook


def _listening_port(service) -> Deferred:
    """The port the service tree's visitor listener is bound to (it may be port 0)."""
    listener = _listener(service)
    d = Deferred()

    def got(port):
        d.callback(port.getHost().port)
        return port  # the service keeps using this result when it stops

    listener._waitingForPort.addCallback(got)
    return d


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    return _global_reactor


@pytest_twisted.async_yield_fixture
async def origin(reactor):
    """The test origin, listening on free loopback ports."""
    server = Origin(reactor)
    server.start()
    yield server
    await within(server.stop())


@pytest_twisted.async_yield_fixture
async def scripted_origin(reactor):
    """An origin that sends exactly the bytes the test scripts (L{hostile_origin}); request
    it before C{start_tagd}, so that tagd is stopped first."""
    server = ScriptedOrigin(reactor)
    server.start()
    yield server
    await within(server.stop())


@pytest.fixture
def hook():
    """A recorder installed as the tracking hook of every tagd the test starts."""
    return HookRecorder()


@pytest_twisted.async_yield_fixture
async def start_tagd(reactor, origin, hook):
    """Start tagd in front of the origin: C{await start_tagd(response_timeout=0.5, ...)}.

    Keys are C{[proxy]} keys; the listener is on a free loopback port.  C{metrics} is a
    L{tagd.admin.metrics.Metrics} for tagd to count in (a fresh one if not given).  Everything
    started is stopped, and its connections closed, when the test ends.
    """
    # Imported here, so that a broken tagd fails these tests and not every test's collection.
    from tagd.daemon.config import parse_config
    from tagd.daemon.tap import build_service

    started = []

    async def start(metrics=None, **proxy) -> Tagd:
        values = {
            "listen": "tcp:0:interface=127.0.0.1",
            "origin": f"http://127.0.0.1:{origin.port}",
            "pool_size": 4,
            "connect_timeout": 2,
            "response_timeout": 5,
            **proxy,
        }
        service = build_service(parse_config(proxy_toml(values), "(test)"), reactor, metrics)
        _install_hook(service, hook)
        service.startService()
        started.append(service)
        return Tagd(await within(_listening_port(service)))

    yield start
    for service in started:
        await within(service.stopService())


@pytest_twisted.async_fixture
async def tagd(start_tagd):
    """tagd with the test defaults, in front of the web origin."""
    return await start_tagd()


@pytest_twisted.async_fixture
async def raw_tagd(start_tagd, origin):
    """tagd in front of the raw origin, which answers with bytes the test chooses."""
    return await start_tagd(origin=f"http://127.0.0.1:{origin.raw_port}")


@pytest_twisted.async_yield_fixture
async def connect(reactor):
    """Open a L{WireVisitor} connection: C{visitor = await connect(tagd.port)}; or a
    connection of another protocol with a C{closed} Deferred: C{connect(port, Visitor())}."""
    visitors = []

    async def open_connection(port: int, protocol=None):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        visitor = await within(connectProtocol(endpoint, WireVisitor() if protocol is None else protocol))
        visitors.append(visitor)
        return visitor

    yield open_connection
    for visitor in visitors:
        if not visitor.closed.called:
            visitor.transport.abortConnection()
            await within(visitor.closed)


@pytest_twisted.async_yield_fixture
async def http(reactor):
    """A treq client with its own connection pool, closed after the test."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield HTTPClient(Agent(reactor, pool=pool))
    await within(pool.closeCachedConnections())


@pytest_twisted.async_yield_fixture
async def platforms(reactor):
    """tagd's agent for the platforms, its connections closed after the test."""
    client = PlatformAgent(reactor)
    yield client
    await within(client.close())


@pytest.fixture
def logged_failures():
    """The failures logged while the test runs (tagd logs each with C{log.failure})."""
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


# -- tracking end to end: fake platforms, and tagd sending to them ----------------------
#
# The fakes are served by a Site that writes no access lines: a request line to a fake
# carries its token (Meta's access_token, GA4's api_secret), and the tests that look for
# tokens in the log must only ever find what tagd itself logged.

FAKE_META_TOKEN = "meta-token"
FAKE_GA4_SECRET = "ga-secret"
FAKE_TIKTOK_TOKEN = "tt-token"


def serve_quietly(fake):
    """Serve C{fake} on a free loopback port, with no access log (see above)."""
    from twisted.web.server import Site

    from fakes import Served

    class QuietSite(Site):
        noisy = False

        def log(self, request) -> None:
            pass

    return Served(fake, _global_reactor.listenTCP(0, QuietSite(fake), interface="127.0.0.1"))


async def _serving(fake):
    served = serve_quietly(fake)
    try:
        yield served
    finally:
        await within(Deferred.fromCoroutine(served.stop()))


@pytest_twisted.async_yield_fixture
async def fake_meta():
    """A fake Meta Conversions API for pixel 1234 and token meta-token, on loopback."""
    from fakes import FakeMeta

    async for served in _serving(FakeMeta(pixel_id="1234", access_token=FAKE_META_TOKEN)):
        yield served


@pytest_twisted.async_yield_fixture
async def fake_ga4():
    """A fake GA4 Measurement Protocol for stream G-TEST and secret ga-secret, on loopback."""
    from fakes import FakeGA4

    async for served in _serving(FakeGA4(measurement_id="G-TEST", api_secret=FAKE_GA4_SECRET)):
        yield served


@pytest_twisted.async_yield_fixture
async def fake_tiktok():
    """A fake TikTok Events API for pixel CTEST123 and token tt-token, on loopback."""
    from fakes import FakeTikTok

    async for served in _serving(FakeTikTok(pixel_code="CTEST123", access_token=FAKE_TIKTOK_TOKEN)):
        yield served


def toml_table(header: str, values: dict) -> str:
    """One TOML table (C{[name]} or C{[[name]]}) of strings, numbers, booleans and lists."""
    return header + "\n" + "".join(f"{key} = {json.dumps(v)}\n" for key, v in values.items())


@attrs.define
class TrackingTagd:
    """A running tagd with destinations: its port and the metrics it counts in."""

    port: int
    metrics: object  # tagd.admin.metrics.Metrics

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def dropped(self, reason: str) -> float:
        """C{tagd_tracking_dropped_total{reason=...}}."""
        return self.metrics.value("tracking_dropped", reason=reason)

    def delivered(self, destination: str, outcome: str = "success") -> float:
        """C{tagd_events_delivered_total{destination=..., outcome=...}}."""
        return self.metrics.value("events_delivered", destination=destination, outcome=outcome)


def platform_destinations(meta, ga4, tiktok, extra: dict | None = None, **common) -> list[dict]:
    """C{[[destinations]]} tables for the three fakes; C{common} adds keys to each,
    C{extra[type]} to one."""
    extra = extra or {}
    return [
        {"type": "meta", "name": "meta", "pixel_id": "1234", "access_token": FAKE_META_TOKEN,
         "api_version": "v24.0", "endpoint": meta.base, **common, **extra.get("meta", {})},
        {"type": "ga4", "name": "ga4", "measurement_id": "G-TEST", "api_secret": FAKE_GA4_SECRET,
         "endpoint": ga4.base, **common, **extra.get("ga4", {})},
        {"type": "tiktok", "name": "tiktok", "pixel_code": "CTEST123",
         "access_token": FAKE_TIKTOK_TOKEN, "endpoint": tiktok.base, **common, **extra.get("tiktok", {})},
    ]  # fmt: skip


def destinations_toml(destinations: list[dict]) -> str:
    """One C{[[destinations]]} table for each of C{destinations}."""
    return "".join(toml_table("[[destinations]]", d) for d in destinations)


def threaded_platforms() -> tuple:
    """The fake Meta, GA4 and TikTok each served from a thread (L{helpers.ThreadedPlatform}),
    in that order, on ports of their own; each is down until its C{up()}."""
    from fakes import FakeGA4, FakeMeta, FakeTikTok
    from helpers import ThreadedPlatform

    return (
        ThreadedPlatform("meta", FakeMeta(pixel_id="1234", access_token=FAKE_META_TOKEN)),
        ThreadedPlatform("ga4", FakeGA4(measurement_id="G-TEST", api_secret=FAKE_GA4_SECRET)),
        ThreadedPlatform("tiktok", FakeTikTok(pixel_code="CTEST123", access_token=FAKE_TIKTOK_TOKEN)),
    )


def process_config(
    port: int,
    origin_url: str,
    spool_path,
    platforms,
    *,
    proxy: dict | None = None,
    spool: dict | None = None,
    delivery: dict | None = None,
    **destination,
) -> str:
    """The configuration of a tagd run as a process: listening on loopback port C{port}, in
    front of C{origin_url}, its spool at C{spool_path}, sending to the three
    L{threaded_platforms}.  C{proxy}, C{spool} and C{delivery} add keys to those tables
    (the spool is polled every 0.1 s), C{destination} to each C{[[destinations]]} table."""
    listen = f"tcp:{port}:interface=127.0.0.1"
    return (
        toml_table("[proxy]", {"listen": listen, "origin": origin_url, **(proxy or {})})
        + ADMIN_TOML
        + toml_table("[spool]", {"path": str(spool_path), **(spool or {})})
        + toml_table("[delivery]", {"poll_interval": 0.1, **(delivery or {})})
        + destinations_toml(platform_destinations(*platforms, **destination))
    )


@pytest_twisted.async_yield_fixture
async def start_tracking_tagd(reactor, origin, fake_meta, fake_ga4, fake_tiktok, tmp_path):
    """Start tagd with C{[[destinations]]} pointing at the three fakes and metrics of its own.

    C{await start_tracking_tagd(raw=True, proxy={...}, tracking={...}, destinations=[...])}:
    C{raw} puts it in front of the raw origin instead of the web origin, C{proxy},
    C{tracking} and C{spool} are keys of those tables, C{destinations} replaces the three platform
    tables, and C{platform} adds keys to them by type (C{{"meta": {"test_event_code": ...}}}).
    No hook recorder is installed: the real tracker runs.
    """
    from tagd.daemon.config import Config, parse_config
    from tagd.admin.metrics import Metrics
    from tagd.daemon.tap import build_service

    started = []

    async def start(*, raw=False, proxy=None, tracking=None, spool=None, destinations=None, platform=None):
        port = origin.raw_port if raw else origin.port
        values = {
            "listen": "tcp:0:interface=127.0.0.1",
            "origin": f"http://127.0.0.1:{port}",
            "pool_size": 4,
            "connect_timeout": 2,
            "response_timeout": 5,
            **(proxy or {}),
        }
        if destinations is None:
            destinations = platform_destinations(fake_meta, fake_ga4, fake_tiktok, platform)
        text = toml_table("[proxy]", values) + ADMIN_TOML + toml_table("[tracking]", tracking or {})
        if "spool" in attrs.fields_dict(Config):
            # With durable delivery each tagd keeps its own spool in the test's folder, so
            # that no event outlives its test.
            text += toml_table("[spool]", {"path": str(tmp_path / f"spool-{len(started)}.sqlite3"), **(spool or {})})
        text += destinations_toml(destinations)
        metrics = Metrics()
        service = build_service(parse_config(text, "(test)"), reactor, metrics)
        service.startService()
        started.append(service)
        return TrackingTagd(await within(_listening_port(service)), metrics)

    yield start
    for service in started:
        await within(service.stopService())


@pytest_twisted.async_fixture
async def tracking_tagd(start_tracking_tagd):
    """tagd in front of the web origin, sending to the three fakes, with the default
    C{[tracking]} settings."""
    return await start_tracking_tagd()


@pytest.fixture
def log_events():
    """Every log event emitted while the test runs, as the event dicts."""
    events = []

    def observe(event):
        events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


class _OneResponse(Protocol):
    """Collects the bytes of one response framed by C{Content-Length} (or by the close)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        end = self.data.find(b"\r\n\r\n")
        if end < 0 or self.done.called:
            return
        length = 0
        for line in bytes(self.data[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if len(self.data) >= end + 4 + length:
            self.done.callback(bytes(self.data))

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


async def exchange(port: int, request: bytes) -> bytes:
    """Send C{request} on a new connection to C{port}; the exact bytes of the response."""
    endpoint = TCP4ClientEndpoint(_global_reactor, "127.0.0.1", port, timeout=5)
    protocol = await within(connectProtocol(endpoint, _OneResponse()))
    try:
        protocol.transport.write(request)
        return await within(protocol.done)
    finally:
        protocol.transport.abortConnection()


# -- directories this process cannot write ---------------------------------------------


def _writable(directory: Path) -> bool:
    """Whether this process can create a file in C{directory}."""
    probe = directory / "probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def make_read_only():
    """Make a directory unwritable for this process, and writable again after the test.

    Permission bits do it for a normal user; root ignores them, so for root the directory
    is also made immutable (ext4 and most Linux file systems), or the test is skipped.
    """
    changed: list[Path] = []

    def make(directory: Path) -> None:
        directory.chmod(0o555)
        changed.append(directory)
        if _writable(directory) and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
        if _writable(directory):
            pytest.skip("this process can write to any directory here (root without chattr)")

    yield make
    for directory in changed:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
        directory.chmod(0o755)


# -- a tagd run by twistd, for tests that watch the process itself ---------------------


def resident_memory(pid: int) -> int:
    """The resident set size of process C{pid}, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


@attrs.define
class MemoryPeak:
    """The resident memory of a process when sampling began, and the most seen since."""

    pid: int
    baseline: int
    peak: int

    def sample(self) -> None:
        """Take one sample."""
        self.peak = max(self.peak, resident_memory(self.pid))

    @property
    def growth(self) -> int:
        """How many bytes the peak is above the baseline."""
        return self.peak - self.baseline


@contextlib.contextmanager
def sampling_memory(pid: int, interval: float = 0.05):
    """Sample the resident memory of process C{pid} every C{interval} seconds while the
    block runs, and once more at its end; yields the L{MemoryPeak}."""
    first = resident_memory(pid)
    memory = MemoryPeak(pid, baseline=first, peak=first)
    sampler = LoopingCall(memory.sample)
    sampler.start(interval)
    try:
        yield memory
    finally:
        sampler.stop()
    memory.sample()


@contextlib.asynccontextmanager
async def twistd_tagd(origin_url: str, tmp_path):
    """A twistd-run tagd in front of C{origin_url}; yields (pid, port)."""
    from helpers import TWISTD, running, tagd_up

    config = tmp_path / "tagd.toml"
    config.write_text(proxy_toml({"listen": "tcp:0:interface=127.0.0.1", "origin": origin_url}))
    log = tmp_path / "tagd.log"
    with running([TWISTD, "-n", "tagd", "--config", str(config)], cwd=tmp_path, log=log) as process:
        port, _ = await eventually(lambda: tagd_up(process, log), timeout=20, interval=0.1)
        yield process.pid, port


# -- a real systemd --------------------------------------------------------------------


@pytest.fixture(scope="session")
def systemd_container():
    """Debian bookworm booted with a real systemd as its PID 1 (L{container.Container}),
    one for the whole session; without one the test skips, or fails where
    C{$TAGD_REQUIRE_SYSTEMD} is set, with one line naming why."""
    from container import booted

    container = booted()
    yield container
    container.close()


@pytest_twisted.async_yield_fixture
async def open_spool(reactor, path):
    """Open a spool (at the module's C{path} unless told otherwise); every spool opened is
    closed after the test."""
    opened = []

    def opener(where: Path = path, **options) -> Spool:
        spool = Spool.open(str(where), reactor=reactor, **options)
        opened.append(spool)
        return spool

    yield opener
    for spool in opened:
        await within(spool.close())
