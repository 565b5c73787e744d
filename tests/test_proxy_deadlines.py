"""Visitors that send slowly or connect too often: the request head's and body's deadlines
([proxy] header_timeout, body_timeout, body_min_rate) and the cap on connections
(max_connections).

The hostile visitors are raw sockets that send exactly the bytes the test chooses, when
it chooses; every deadline here is set small, and every wait is bounded.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel, formatEvent

from certificates import self_signed
from conftest import WireVisitor, eventually, raw_request, sleep, within
from origin import Echo
from tagd.admin.metrics import Metrics

KiB = 1024
MiB = 1024 * KiB


class Trickle:
    """Send C{data} to each of C{visitors} one byte at a time, a byte every C{interval}
    seconds, until L{stop} (or the data runs out)."""

    def __init__(self, visitors, data: bytes, interval: float) -> None:
        self._visitors = visitors
        self._data = data
        self._sent = 0
        self._loop = LoopingCall(self._next)
        self._loop.start(interval)

    def _next(self) -> None:
        byte = self._data[self._sent : self._sent + 1]
        if not byte:
            self.stop()
            return
        self._sent += 1
        for visitor in self._visitors:
            if not visitor.closed.called:
                visitor.send(byte)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


async def closing_time(reactor, visitor, seconds: float = 5) -> float:
    """Seconds from now until tagd closes C{visitor}'s connection (at most C{seconds})."""
    start = reactor.seconds()
    await within(visitor.closed, seconds)
    return reactor.seconds() - start


def timeout_lines(log_events) -> list[dict]:
    """The log events about visitor connections closed at a deadline."""
    return [e for e in log_events if "visitor connection closed" in e.get("log_format", "")]


def answered_408(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("tagd_requests_total", {"status": "408"}) or 0


# -- the request head ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slowloris_heads_are_cut_at_header_timeout(reactor, start_tagd, connect):
    """A hundred connections that trickle a request head a byte every 0.1 s (Twisted's idle
    timer would wait for ever) each get a 408 and are closed about header_timeout after
    they opened; a normal visitor is answered while they trickle, and afterwards, on the
    connection it kept alive meanwhile and on a new one."""
    metrics = Metrics()
    tagd = await start_tagd(header_timeout=1, metrics=metrics)
    head = raw_request(b"GET", b"/echo", headers=[(b"User-Agent", b"slow")])
    attackers, answers, opened, closed = [], [], [], {}
    for _ in range(100):
        attacker = await connect(tagd.port)
        opened.append(reactor.seconds())
        answers.append(attacker.expect())
        attacker.closed.addCallback(lambda _, i=len(attackers): closed.setdefault(i, reactor.seconds()))
        attackers.append(attacker)
    trickle = Trickle(attackers, head, interval=0.1)  # the whole head would take 5 s
    try:
        visitor = await connect(tagd.port)
        response = await within(visitor.request(b"GET", b"/echo"))
        assert response.status == 200
        assert not closed, "the attackers were closed before the visitor was answered"
        await within(gatherResults([a.closed for a in attackers]), 5)
    finally:
        trickle.stop()
    lifetimes = [closed[i] - opened[i] for i in range(len(attackers))]
    assert 0.9 <= min(lifetimes) and max(lifetimes) < 3, (min(lifetimes), max(lifetimes))
    for answer in answers:
        response = await within(answer)
        assert (response.status, response.header(b"connection")) == (408, [b"close"])
    assert answered_408(metrics) == 100
    assert not visitor.closed.called  # idle for longer than header_timeout: still kept
    assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    late = await connect(tagd.port)
    assert (await within(late.request(b"GET", b"/echo"))).status == 200


@pytest_twisted.ensureDeferred
async def test_silent_connection_gets_408_at_header_timeout(reactor, start_tagd, connect, origin):
    """A connection that sends nothing at all is answered 408 and closed header_timeout
    after it opened: the head's clock starts with the connection."""
    tagd = await start_tagd(header_timeout=0.5)
    visitor = await connect(tagd.port)
    answer = visitor.expect()
    assert 0.4 <= await closing_time(reactor, visitor) < 2
    assert (await within(answer)).status == 408
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_kept_alive_connection_idles_under_the_idle_timeout(reactor, start_tagd, connect):
    """Between requests a kept-alive connection is idle, not late: it outlives
    header_timeout and serves the next request.  That request's head has header_timeout
    from its first byte: a head begun and not finished is answered 408 that long after."""
    tagd = await start_tagd(header_timeout=0.5)
    visitor = await connect(tagd.port)
    assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    await sleep(1.2)
    assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    await sleep(1.2)
    answer = visitor.expect()
    visitor.send(b"GET /echo HT")
    assert 0.4 <= await closing_time(reactor, visitor) < 2
    assert (await within(answer)).status == 408


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_closes_after_keepalive_timeout_and_names_no_one(
    reactor, start_tagd, connect, log_events
):
    """A kept-alive connection idle for keepalive_timeout is closed, and no log line names
    the visitor's address (Twisted Web's own idle line does, once per connection)."""
    tagd = await start_tagd(keepalive_timeout=0.5, header_timeout=5)
    visitor = await connect(tagd.port)
    port = visitor.transport.getHost().port
    assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    log_events.clear()
    assert 0.3 <= await closing_time(reactor, visitor) < 2
    texts = [formatEvent(e) for e in log_events]
    assert not [t for t in texts if f"127.0.0.1:{port}" in t or str(port) in t or "Timing out" in t], texts


@pytest_twisted.ensureDeferred
async def test_keepalive_timeout_does_not_cut_a_request_being_read(reactor, start_tagd, connect):
    """keepalive_timeout is for connections idle between requests: a head paused longer
    than it, but within header_timeout, is read and answered (Twisted Web's idle timer
    runs until the whole body is in, and would have closed the connection silently)."""
    tagd = await start_tagd(keepalive_timeout=0.5, header_timeout=5)
    visitor = await connect(tagd.port)
    answer = visitor.expect()
    visitor.send(b"GET /echo HTTP/1.1\r\nHost: shop.example\r\n")
    await sleep(1.2)
    assert not visitor.closed.called
    visitor.send(b"\r\n")
    assert (await within(answer)).status == 200


async def connect_tls(reactor, port: int) -> WireVisitor:
    """A L{WireVisitor} over TLS (the certificate unchecked), connected to C{port}."""
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, CertificateOptions(verify=False))
    return await within(connectProtocol(endpoint, WireVisitor()))


def hang_up(visitor: WireVisitor) -> None:
    """Cut C{visitor}'s connection unless it has ended (Twisted's TLS transport fails to
    abort a connection already closed)."""
    if not visitor.closed.called:
        visitor.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_slow_head_over_tls_gets_408(reactor, start_tagd, tmp_path, logged_failures):
    """Over TLS too, a head begun and not finished within header_timeout is answered 408
    and the connection closed, with no error logged."""
    tagd = await start_tagd(listen=f"ssl:0:interface=127.0.0.1:{self_signed(tmp_path)}", header_timeout=0.5)
    visitor = await connect_tls(reactor, tagd.port)
    try:
        answer = visitor.expect()
        visitor.send(b"GET /echo HT")
        assert 0.4 <= await closing_time(reactor, visitor) < 3
        assert (await within(answer)).status == 408
    finally:
        hang_up(visitor)
    assert logged_failures == []


# -- the request body ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stalled_collected_body_gets_408(reactor, start_tagd, connect, origin, log_events):
    """A small body (collected before forwarding) of which no byte comes for body_timeout:
    408, the connection closed, and nothing reaches the origin."""
    tagd = await start_tagd(body_timeout=1)
    visitor = await connect(tagd.port)
    answer = visitor.expect(b"POST")
    visitor.send(raw_request(b"POST", b"/echo", headers=[(b"Content-Length", b"100")]) + b"x" * 10)
    assert 0.9 <= await closing_time(reactor, visitor) < 3
    assert (await within(answer)).status == 408
    assert origin.seen == []
    [line] = timeout_lines(log_events)
    assert line["reason"] == "no byte of the request body for body_timeout"


@pytest_twisted.ensureDeferred
async def test_stalled_streamed_upload_gets_408_and_the_origin_request_is_dropped(
    reactor, start_tagd, connect, origin
):
    """A large upload (streamed to the origin as it comes) that stops for body_timeout:
    408, the visitor's connection closed, and the origin request aborted, so that no
    origin connection stays held for it."""
    tagd = await start_tagd(body_timeout=1)
    visitor = await connect(tagd.port)
    answer = visitor.expect(b"PUT")
    visitor.send(raw_request(b"PUT", b"/echo", headers=[(b"Content-Length", b"%d" % MiB)]) + b"u" * (200 * KiB))
    await eventually(lambda: origin.web.open == 1)
    assert 0.9 <= await closing_time(reactor, visitor) < 3
    assert (await within(answer)).status == 408
    await eventually(lambda: origin.web.open == 0)
    assert origin.seen == []


@pytest.mark.parametrize("length", [1000, MiB], ids=["collected", "streamed"])
@pytest_twisted.ensureDeferred
async def test_trickled_body_is_cut_by_body_min_rate(reactor, start_tagd, connect, origin, log_events, length):
    """A body that trickles a byte every 0.2 s never goes quiet for body_timeout (1 s),
    but once it is that old it has come at far less than body_min_rate: 408, the
    connection closed, and no origin connection held for it."""
    tagd = await start_tagd(body_timeout=1)
    visitor = await connect(tagd.port)
    answer = visitor.expect(b"PUT")
    visitor.send(raw_request(b"PUT", b"/echo", headers=[(b"Content-Length", b"%d" % length)]))
    trickle = Trickle([visitor], b"t" * length, interval=0.2)
    try:
        assert 0.9 <= await closing_time(reactor, visitor) < 3
    finally:
        trickle.stop()
    assert (await within(answer)).status == 408
    [line] = timeout_lines(log_events)
    assert line["reason"] == "request body slower than body_min_rate"
    await eventually(lambda: origin.web.open == 0)
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_steady_upload_outlasting_body_timeout_goes_through(reactor, start_tagd, connect):
    """A body that keeps coming (8 KiB every 0.1 s) may take much longer than body_timeout
    in all: it reaches the origin whole."""
    tagd = await start_tagd(body_timeout=0.5)
    visitor = await connect(tagd.port)
    size = 160 * KiB
    answer = visitor.expect(b"POST")
    visitor.send(raw_request(b"POST", b"/echo", headers=[(b"Content-Length", b"%d" % size)]))
    for _ in range(size // (8 * KiB)):
        await sleep(0.1)
        visitor.send(b"s" * (8 * KiB))
    response = await within(answer)
    assert response.status == 200
    assert Echo.parse(bytes(response.body)).body_length == size


@pytest_twisted.ensureDeferred
async def test_a_steady_upload_past_upload_timeout_is_cut(reactor, start_tagd, connect, log_events):
    """However well it keeps coming, a body not complete within upload_timeout is given
    up (here a streamed one at 80 KiB/s), so no upload holds an origin connection without
    bound; the origin request is aborted."""
    tagd = await start_tagd(body_timeout=0.5, upload_timeout=1.5)
    visitor = await connect(tagd.port)
    size = 10 * 1024 * KiB
    answer = visitor.expect(b"POST")
    visitor.send(raw_request(b"POST", b"/echo", headers=[(b"Content-Length", b"%d" % size)]))
    started = reactor.seconds()
    while not visitor.closed.called and reactor.seconds() - started < 5:
        visitor.send(b"s" * (8 * KiB))
        await sleep(0.1)
    assert visitor.closed.called
    assert 1.3 <= reactor.seconds() - started < 3
    assert (await within(answer)).status == 408
    [line] = timeout_lines(log_events)
    assert line["reason"] == "request body not complete within upload_timeout"


class _Deaf(Protocol):
    """An origin connection that reads nothing and answers nothing."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.factory.connections.append(self)


@pytest_twisted.async_yield_fixture
async def deaf_origin(reactor):
    """An origin that accepts connections and never reads from them; yields its URL."""
    factory = Factory.forProtocol(_Deaf)
    factory.noisy = False
    factory.connections = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    for connection in factory.connections:
        connection.transport.abortConnection()
    await within(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_an_origin_reading_slowly_is_not_the_visitors_fault(reactor, start_tagd, connect, deaf_origin):
    """While the origin reads none of an upload, tagd stops reading the visitor, whose
    body then goes quiet through no fault of its own: body_timeout waits meanwhile, and
    response_timeout decides (a 504, or a cut while the visitor still sends)."""
    tagd = await start_tagd(origin=deaf_origin, body_timeout=0.5, response_timeout=2)
    visitor = await connect(tagd.port)
    size = 64 * MiB
    answer = visitor.expect(b"PUT")
    visitor.send(raw_request(b"PUT", b"/upload", headers=[(b"Content-Length", b"%d" % size)]))
    visitor.send(b"d" * size)  # far more than the sockets on the way hold
    assert 1.9 <= await closing_time(reactor, visitor, 10) < 6
    try:
        response = await within(answer)
    except (ConnectionDone, ConnectionLost):
        return
    assert response.status == 504


@pytest_twisted.ensureDeferred
async def test_stalled_body_after_the_answer_began_is_cut_without_408(reactor, start_tagd, connect, origin):
    """An origin that answers an upload at once (as some refuse one) and then waits for
    the rest: when the visitor's body stalls for body_timeout, the answer already on its
    way cannot become a 408, so the connection is cut (the visitor sees a short body),
    and the origin request is aborted."""
    origin.answer_raw(b"/early", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"e" * 10)
    tagd = await start_tagd(origin=f"http://127.0.0.1:{origin.raw_port}", body_timeout=1)
    visitor = await connect(tagd.port)
    answer = visitor.expect(b"PUT")
    visitor.send(raw_request(b"PUT", b"/early", headers=[(b"Content-Length", b"%d" % MiB)]) + b"u" * (100 * KiB))
    assert 0.9 <= await closing_time(reactor, visitor) < 3
    response = await within(answer)
    assert (response.status, bytes(response.body), response.complete) == (200, b"e" * 10, False)
    await eventually(lambda: origin.raw.open == 0)


# -- the cap on connections ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_beyond_max_connections_are_refused(start_tagd, connect, log_events):
    """With max_connections open, a new connection is closed as soon as tagd accepts it,
    unanswered; each is counted, the log says so once (with the count), the open
    connections go on being served, and once one of them closes a new visitor gets in."""
    metrics = Metrics()
    tagd = await start_tagd(max_connections=5, metrics=metrics)
    visitors = [await connect(tagd.port) for _ in range(5)]
    for visitor in visitors:
        assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    assert metrics.registry.get_sample_value("tagd_visitor_connections") == 5
    for _ in range(3):
        refused = await connect(tagd.port)
        answer = refused.request(b"GET", b"/echo")
        with pytest.raises((ConnectionDone, ConnectionLost)):
            await within(answer, 2)
    assert metrics.value("visitor_connections_refused") == 3
    [line] = [e for e in log_events if "as many as max_connections allows" in e.get("log_format", "")]
    assert (line["log_level"], line["open"], line["held"]) == (LogLevel.warn, 5, 0)
    for visitor in visitors:
        assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    visitors[0].transport.loseConnection()
    await eventually(lambda: metrics.registry.get_sample_value("tagd_visitor_connections") == 4)
    newcomer = await connect(tagd.port)
    assert (await within(newcomer.request(b"GET", b"/echo"))).status == 200


@pytest_twisted.ensureDeferred
async def test_connections_beyond_max_connections_over_tls_are_refused(reactor, start_tagd, tmp_path, logged_failures):
    """Over TLS the connection beyond max_connections is closed before its handshake, and
    the one open goes on being served, with no error logged."""
    metrics = Metrics()
    listen = f"ssl:0:interface=127.0.0.1:{self_signed(tmp_path)}"
    tagd = await start_tagd(listen=listen, max_connections=1, metrics=metrics)
    visitor = await connect_tls(reactor, tagd.port)
    refused = None
    try:
        assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
        refused = await connect_tls(reactor, tagd.port)
        answer = refused.request(b"GET", b"/echo")
        with pytest.raises((ConnectionDone, ConnectionLost)):
            await within(answer, 2)
        assert metrics.value("visitor_connections_refused") == 1
        assert (await within(visitor.request(b"GET", b"/echo"))).status == 200
    finally:
        hang_up(visitor)
        if refused is not None:
            hang_up(refused)
    assert logged_failures == []
