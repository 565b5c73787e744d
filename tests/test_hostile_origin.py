"""An origin that sends what it should not: bytes beyond its framing, heads that would
inject headers, responses cut off, and all of those at random under concurrent visitors.

The origin is L{hostile_origin.ScriptedOrigin}: every byte and every pause is the test's.
Visitors are raw sockets whose received bytes are all kept and read strictly (L{read_reply}),
so that whatever tagd passes on is seen exactly as a browser would get it.  Each answer
the origin means for a request names the request's path in its body; a response no
request asked for (L{SMUGGLED}) sets the cookie C{stolen} and carries the body
C{SMUGGLED}; headers a hostile origin tries to slip in carry the word C{injected}.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable

import attrs
import pytest
import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol

from conftest import eventually, raw_request, sleep, within
from hostile_origin import SMUGGLED, Await, Close, Hold, Received, Reset, Send, Wait, honest, marker, ok

INJECTED = b"injected"
FOREIGN = (b"SMUGGLED", b"stolen", INJECTED)  # none of these may ever reach a visitor
NO_BODY = (204, 304)

# -- reading tagd's responses strictly ---------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) ([\t\x20-\x7e\x80-\xff]*)")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})(;[^\r\n]*)?")


class Malformed(AssertionError):
    """tagd sent a visitor something that is not a valid HTTP/1.1 response."""


@attrs.define
class Reply:
    """One response as a visitor received it."""

    status_line: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool  # its framing was satisfied (False: the connection ended first)
    chunked: bool = False

    def header(self, name: bytes) -> list[bytes]:
        """The values of C{name}, in any letter case."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "cut off"
        return f"<{self.status_line!r} {self.headers!r} body {self.body[:120]!r} ({state})>"


def _head(head: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """The status line, code and header pairs of a head (without its blank line)."""
    lines = head.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise Malformed(f"bare CR or LF in the response head: {head[:300]!r}")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise Malformed(f"bad status line: {lines[0][:300]!r}")
    headers = []
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise Malformed(f"bad header line: {line[:300]!r}")
        headers.append((match[1], match[2]))
    return lines[0], int(status[1]), headers


def _chunked(data: bytes, start: int, eof: bool) -> tuple[bytes, bool, int] | None:
    """Decode a chunked body from C{data[start:]}: (body, complete, end), or None for
    more data."""
    body, at = b"", start
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return (body, False, len(data)) if eof else None
        size = _CHUNK_SIZE.fullmatch(data[at:end])
        if size is None:
            raise Malformed(f"bad chunk size line: {data[at:end][:100]!r}")
        length = int(size[1], 16)
        if length == 0:
            trailer = data.find(b"\r\n\r\n", end)
            if trailer < 0:
                return (body, False, len(data)) if eof else None
            return body, True, trailer + 4
        if len(data) < end + 2 + length + 2:
            return (body + data[end + 2 : end + 2 + length], False, len(data)) if eof else None
        if data[end + 2 + length : end + 4 + length] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        body += data[end + 2 : end + 2 + length]
        at = end + 4 + length


def read_reply(data: bytes, method: bytes, eof: bool, clean: bool) -> tuple[Reply, int] | None:
    """The first response in C{data} and where it ends; None when more bytes are needed.

    C{eof}: the connection has ended (C{clean}: with a FIN, not a reset), so a response
    still open is returned as cut off.  Interim (1xx) responses are skipped.
    """
    at = 0
    while True:
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            if eof and data[at:]:
                return Reply(data[at:], 0, [], b"", complete=False), len(data)
            return None
        status_line, status, headers = _head(data[at:end])
        at = end + 4
        if status >= 200:
            break
    reply = Reply(status_line, status, headers, b"", complete=True)
    encodings = reply.header(b"transfer-encoding")
    lengths = reply.header(b"content-length")
    if method == b"HEAD" or status in NO_BODY:
        return reply, at
    if encodings:
        if encodings != [b"chunked"] or lengths:
            raise Malformed(f"framing tagd must not send: {reply!r}")
        decoded = _chunked(data, at, eof)
        if decoded is None:
            return None
        reply.body, reply.complete, used = decoded
        reply.chunked = True
        return reply, used
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise Malformed(f"bad Content-Length from tagd: {reply!r}")
        length = int(lengths[0])
        if len(data) - at >= length:
            reply.body = data[at : at + length]
            return reply, at + length
        if not eof:
            return None
        reply.body, reply.complete = data[at:], False
        return reply, len(data)
    if not eof:
        return None
    reply.body, reply.complete = data[at:], clean  # ended by the close
    return reply, len(data)


class Visitor(Protocol):
    """A visitor on a raw socket that keeps every byte tagd sends it."""

    def __init__(self) -> None:
        self.data = b""
        self.read = 0  # how much of C{data} the replies taken so far cover
        self.closed: Deferred = Deferred()  # fires with why the connection ended
        self.reason: Exception | None = None  # the same, once it has
        self._more: Deferred | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._wake()

    def connectionLost(self, reason) -> None:
        self.reason = reason.value
        self.closed.callback(reason.value)
        self._wake()

    def _wake(self) -> None:
        if self._more is not None and not self._more.called:  # (called: timed out)
            more, self._more = self._more, None
            more.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def reply(self, method: bytes = b"GET", timeout: float = 5.0) -> Deferred[Reply | None]:
        """The next response, or None if the connection ended with no more bytes."""
        return within(Deferred.fromCoroutine(self._reply(method)), timeout)

    async def _reply(self, method: bytes) -> Reply | None:
        while True:
            eof = self.reason is not None
            clean = isinstance(self.reason, ConnectionDone)
            parsed = read_reply(self.data[self.read :], method, eof, clean)
            if parsed is not None:
                reply, used = parsed
                self.read += used
                return reply
            if eof:
                return None
            self._more = Deferred()
            await self._more

    async def ask(self, method: bytes, path: bytes, timeout: float = 5.0) -> Reply | None:
        """Send one request and read its response."""
        self.send(raw_request(method, path))
        return await self.reply(method, timeout)

    def foreign(self) -> list[bytes]:
        """Which of the bytes that belong to no answer of this visitor's have reached it."""
        return [word for word in FOREIGN if word in self.data]


@pytest.fixture
def visit(connect):
    """Open a L{Visitor} connection to a port: C{visitor = await visit(port)}."""
    return lambda port: connect(port, Visitor())


@pytest_twisted.async_fixture
async def proxy(scripted_origin, start_tagd):
    """tagd in front of the scripted origin (a short response timeout: a test that fails
    by waiting fails quickly)."""
    return await start_tagd(origin=scripted_origin.url, response_timeout=2)


# -- what the visitor must get -----------------------------------------------------------


def assert_answers(reply: Reply | None, path: bytes, method: bytes = b"GET") -> None:
    """C{reply} is the origin's honest answer to C{path}, complete."""
    assert reply is not None, f"no answer to {path!r}: the connection ended"
    assert (reply.status, reply.complete) == (200, True), reply
    assert reply.body == (b"" if method == b"HEAD" else marker(path)), reply


def assert_bad_gateway(reply: Reply | None, method: bytes = b"GET") -> None:
    """C{reply} is tagd's own complete 502 (the head alone, for HEAD)."""
    assert reply is not None, "no 502: the connection ended without a response"
    assert reply.status_line == b"HTTP/1.1 502 Bad Gateway", reply
    assert len(reply.header(b"content-length")) == 1, reply
    if method != b"HEAD":
        assert reply.header(b"content-length") == [b"%d" % len(reply.body)], reply
    assert reply.complete, reply


async def assert_usable_or_closed(visitor: Visitor) -> None:
    """The visitor's connection answers a next request, or has been closed cleanly."""
    visitor.send(raw_request(b"GET", b"/next"))
    reply = await visitor.reply()
    if reply is None:
        assert isinstance(visitor.reason, ConnectionDone), visitor.reason
    else:
        assert_answers(reply, b"/next")


async def assert_still_serving(visit, port: int) -> None:
    """A new visitor gets an honest answer: tagd is up and its pool is sound."""
    visitor = await visit(port)
    assert_answers(await visitor.ask(b"GET", b"/after"), b"/after")


# -- A: bytes beyond the framing never reach another visitor -----------------------------


def _no_body(code: bytes) -> Callable[[Received], bytes]:
    return lambda request: b"HTTP/1.1 %s\r\nETag: \"x\"\r\n\r\n" % code


def _chunked_answer(request: Received) -> bytes:
    body = marker(request.path)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


# name: (the first request's method, its framed answer, the status the visitor gets)
FRAMED = {
    "head": (b"HEAD", ok, 200),  # the head a GET would get, its body's length announced
    "204": (b"GET", _no_body(b"204 No Content"), 204),
    "304": (b"GET", _no_body(b"304 Not Modified"), 304),
    "chunked": (b"GET", _chunked_answer, 200),
    "content-length": (b"GET", ok, 200),
}


def _first_answer_is_exact(reply: Reply | None, method: bytes, status: int) -> None:
    assert reply is not None and reply.complete, reply
    assert reply.status == status, reply
    expected = b"" if method == b"HEAD" or status in NO_BODY else marker(b"/first")
    assert reply.body == expected, reply


@pytest.mark.parametrize("second", ["new-visitor", "pipelined"])
@pytest.mark.parametrize("framed", FRAMED)
@pytest_twisted.ensureDeferred
async def test_extra_bytes_in_the_same_write_are_dropped_with_the_connection(
    scripted_origin, proxy, visit, logged_failures, framed, second
):
    """The origin follows a complete answer, in the same write, with a smuggled response
    (a body on HEAD, 204 or 304; bytes after the chunked terminator; a body longer than
    its Content-Length).  The first visitor gets exactly the framed answer, the next
    request (from a new visitor, or pipelined behind the first) gets its own answer on a
    new origin connection, and nobody sees the smuggled one."""
    method, answer, status = FRAMED[framed]
    scripted_origin.script([Await(), Send(lambda request: answer(request) + SMUGGLED)])
    first = await visit(proxy.port)
    if second == "pipelined":
        first.send(raw_request(method, b"/first") + raw_request(b"GET", b"/second"))
        _first_answer_is_exact(await first.reply(method), method, status)
        assert_answers(await first.reply(), b"/second")
        visitors = [first]
    else:
        _first_answer_is_exact(await first.ask(method, b"/first"), method, status)
        other = await visit(proxy.port)
        assert_answers(await other.ask(b"GET", b"/second"), b"/second")
        visitors = [first, other]
    assert [r.path for r in scripted_origin.received] == [b"/first", b"/second"]
    assert scripted_origin.received[1].connection == 1, "the connection carrying extra bytes was reused"
    assert [v.foreign() for v in visitors] == [[]] * len(visitors)
    assert [v.data[v.read :] for v in visitors] == [b""] * len(visitors)  # nothing after the answers
    await within(scripted_origin.connections[0].lost, 2)
    assert logged_failures == []


@pytest.mark.parametrize("framed", FRAMED)
@pytest_twisted.ensureDeferred
async def test_extra_bytes_arriving_later_are_dropped_with_the_connection(
    scripted_origin, proxy, visit, logged_failures, framed
):
    """The smuggled response comes 5 ms after the framed answer, while the connection
    sits idle in the pool: tagd closes that connection, the next visitor's request goes
    out on a new one and gets its own answer; nobody sees the smuggled one."""
    method, answer, status = FRAMED[framed]
    scripted_origin.script([Await(), Send(answer), Wait(0.005), Send(SMUGGLED)])
    first = await visit(proxy.port)
    _first_answer_is_exact(await first.ask(method, b"/first"), method, status)
    await within(scripted_origin.connections[0].lost, 2)
    other = await visit(proxy.port)
    assert_answers(await other.ask(b"GET", b"/second"), b"/second")
    assert scripted_origin.received[1].connection == 1, "the connection carrying extra bytes was reused"
    assert first.foreign() == other.foreign() == []
    assert first.data[first.read :] == b""
    assert logged_failures == []


@pytest.mark.parametrize("framed", ["head", "204", "304"])
@pytest_twisted.ensureDeferred
async def test_a_late_whole_response_after_a_bodiless_answer_reaches_no_one(
    scripted_origin, proxy, visit, logged_failures, framed
):
    """The buggy app's body comes 50 ms after a bodiless answer (HEAD, 204, 304), and it is
    a whole response with a cookie, while the next visitor asks at once: that visitor
    gets its own answer on a new connection, never the late one, since a connection that
    gave a bodiless answer is never reused.  (Were it reused, the late response would be
    indistinguishable from the answer to the next request.)"""
    method, answer, status = FRAMED[framed]
    scripted_origin.script([Await(), Send(answer), Wait(0.05), Send(SMUGGLED)])
    first = await visit(proxy.port)
    _first_answer_is_exact(await first.ask(method, b"/first"), method, status)
    other = await visit(proxy.port)
    assert_answers(await other.ask(b"GET", b"/second"), b"/second")
    assert scripted_origin.received[1].connection == 1, "a connection that gave a bodiless answer was reused"
    assert first.foreign() == other.foreign() == []
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_a_connection_answered_before_the_body_went_out_is_not_reused(
    scripted_origin, proxy, visit, logged_failures
):
    """The origin refuses an upload (413) from its head alone and ends the answer only
    after tagd has sent the whole body, which it never reads: were the connection kept,
    the next visitor's request would follow the unread body, and an origin reading it
    would see the request the body smuggles (here GET /smuggled), with the next
    visitor's cookies.  tagd does not reuse a connection whose answer began before its
    request body had gone out.  (An origin that answers after the whole body went out and
    leaves it unread, keeping the connection, fools any proxy.)"""
    refusal = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n\r\n"
    scripted_origin.script([Await(), Send(refusal), Wait(0.3), Send(b"refused")])
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: shop\r\nX-Note: "
    body = smuggled + b"a" * (150_000 - len(smuggled))
    first = await visit(proxy.port)
    first.send(raw_request(b"POST", b"/upload", headers=[(b"Content-Length", b"%d" % len(body))]) + body[:70_000])
    await sleep(0.1)  # the refusal's head is on its way back while the body still goes out
    first.send(body[70_000:])
    reply = await first.reply(b"POST")
    assert reply is not None and reply.status == 413
    other = await visit(proxy.port)
    assert_answers(await other.ask(b"GET", b"/second"), b"/second")
    assert [r.path for r in scripted_origin.received if r.path != b"/smuggled"] == [b"/upload", b"/second"]
    assert scripted_origin.received[-1].connection == 1, "the connection with an unread body was reused"
    assert other.foreign() == [] and b"/smuggled" not in other.data
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_a_body_that_stops_coming_is_cut_after_response_timeout(reactor, scripted_origin, start_tagd, visit):
    """An origin that hangs mid-body would hold the visitor, the connection and its app
    worker for ever: after response_timeout without a byte of the body, the visitor's
    connection is cut (the answer never looks complete) and the origin's is closed."""
    tagd = await start_tagd(
        origin=scripted_origin.url, response_timeout=1, pool_idle_timeout=1
    )
    scripted_origin.script([Await(), Send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100), Hold()])
    visitor = await visit(tagd.port)
    started = reactor.seconds()
    reply = await visitor.ask(b"GET", b"/hang", timeout=5)
    assert reply is None or not reply.complete
    assert 0.9 <= reactor.seconds() - started < 3
    await within(scripted_origin.connections[0].lost, 2)


@pytest.mark.parametrize("framed", FRAMED)
@pytest_twisted.ensureDeferred
async def test_stale_bytes_after_the_next_request_are_never_its_answer(
    scripted_origin, proxy, visit, logged_failures, framed
):
    """The rest of an over-long answer only comes once the next request has gone out on
    the same connection, just before that request's real answer: tagd cannot have known,
    but the stale bytes are no response, so the next visitor gets a 502 (or its own
    answer, from a new connection), never the stale bytes."""
    method, answer, status = FRAMED[framed]
    scripted_origin.script(
        [Await(), Send(answer), Await(), Send(lambda request: b"SMUGGLED" + ok(request))]
    )
    first = await visit(proxy.port)
    _first_answer_is_exact(await first.ask(method, b"/first"), method, status)
    other = await visit(proxy.port)
    reply = await other.ask(b"GET", b"/second")
    if reply is not None and reply.status == 502:
        assert scripted_origin.received[1].connection == 0, "a 502 for an answer that was fine"
        assert_bad_gateway(reply)
    else:
        assert_answers(reply, b"/second")
    assert first.foreign() == other.foreign() == []
    await assert_still_serving(visit, proxy.port)
    assert logged_failures == []


# -- B: a head that would inject, or that cannot be framed, is a 502 ---------------------

TRACKING = b'{"event_name":"PageView","event_id":"injected"}'
_ENDING = b"Content-Length: 5\r\n\r\nhello"


def _trickled(data: bytes, piece: int = 2048) -> list:
    """C{data} in writes of C{piece} bytes, a millisecond apart."""
    steps = []
    for at in range(0, len(data), piece):
        steps += [Send(data[at : at + piece]), Wait(0.001)]
    return steps


_BIG_HEAD = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Big-%03d: %s\r\n" % (i, b"b" * 990) for i in range(100))

BAD_HEADS = {
    "bare-lf-in-reason": b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\n" + _ENDING,
    "bare-lf-in-headers": b"HTTP/1.1 200 OK\r\nX-A: 1\nSet-Cookie: injected=1\r\n" + _ENDING,
    "bare-lf-before-tracking": b"HTTP/1.1 200 OK\r\nX-A: 1\nWorker-Tracking: " + TRACKING + b"\r\n" + _ENDING,
    "obs-fold-space": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Set-Cookie: injected=1\r\n" + _ENDING,
    "obs-fold-tab": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tSet-Cookie: injected=1\r\n" + _ENDING,
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: 1\x00injected\r\n" + _ENDING,
    "cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: 1\rSet-Cookie: injected=1\r\n" + _ENDING,
    "space-in-name": b"HTTP/1.1 200 OK\r\nBad Name: injected\r\n" + _ENDING,
    "slash-in-name": b"HTTP/1.1 200 OK\r\nBad/Name: injected\r\n" + _ENDING,
    "parenthesis-in-name": b"HTTP/1.1 200 OK\r\nBad(Name): injected\r\n" + _ENDING,
    "non-ascii-name": b"HTTP/1.1 200 OK\r\nBad\xe9Name: injected\r\n" + _ENDING,
    "status-99": b"HTTP/1.1 99 X\r\n" + _ENDING,
    "status-099": b"HTTP/1.1 099 X\r\n" + _ENDING,
    "status-600": b"HTTP/1.1 600 X\r\n" + _ENDING,
    "status-2000": b"HTTP/1.1 2000 OK\r\n" + _ENDING,
    "unrequested-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n" + SMUGGLED,
    "head-over-64k": _BIG_HEAD + _ENDING,
    "content-length-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    "content-length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 1,2\r\n\r\nhello",
    "content-length-twice": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "content-length-hex": b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\nhello",
    "chunked-and-length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
}

# The first chunk size is broken, and comes in the same write as the head: nothing of
# the body can have been passed on before the error is seen.
BAD_CHUNK_SIZES = {
    "letters": b"zz",
    "negative": b"-5",
    "hex-prefix": b"0x5",
    "plus": b"+5",
    "leading-space": b" 5",
    "trailing-space": b"5 ",
    "bare-lf": b"5\nhello",
    "over-64-bits": b"10000000000000000",
    "empty": b"",
}


async def _refused(scripted_origin, proxy, visit, hook, logged_failures, steps) -> None:
    """The origin answers C{/first} with C{steps} and keeps the connection open: the
    visitor gets a 502 that carries nothing injected, tagd closes the origin connection,
    the visitor's connection goes on (or was closed cleanly), tagd still serves, and
    nothing was tracked or logged as a failure."""
    scripted_origin.script([Await(), *steps, Hold()])
    visitor = await visit(proxy.port)
    assert_bad_gateway(await visitor.ask(b"GET", b"/first"))
    assert visitor.foreign() == []
    await within(scripted_origin.connections[0].lost, 2)
    await assert_usable_or_closed(visitor)
    await assert_still_serving(visit, proxy.port)
    assert hook.calls == []
    assert logged_failures == []


@pytest.mark.parametrize("answer", BAD_HEADS.values(), ids=BAD_HEADS)
@pytest_twisted.ensureDeferred
async def test_malformed_head_gives_502(scripted_origin, proxy, visit, hook, logged_failures, answer):
    """A head that would inject a header line, hide one (the tracking header too), carry
    a status that is no status, switch protocols unasked, exceed 64 KiB, or frame its
    body ambiguously is refused: a complete 502 with nothing of the origin's head."""
    await _refused(scripted_origin, proxy, visit, hook, logged_failures, [Send(answer)])


@pytest_twisted.ensureDeferred
async def test_head_over_64k_trickled_gives_502(scripted_origin, proxy, visit, hook, logged_failures):
    """A head over 64 KiB sent in 2 KiB writes, a millisecond apart, is refused as the
    one sent in a single write is."""
    steps = _trickled(_BIG_HEAD + _ENDING)
    await _refused(scripted_origin, proxy, visit, hook, logged_failures, steps)


@pytest.mark.parametrize("size", BAD_CHUNK_SIZES.values(), ids=BAD_CHUNK_SIZES)
@pytest_twisted.ensureDeferred
async def test_malformed_first_chunk_size_gives_502(scripted_origin, proxy, visit, hook, logged_failures, size):
    """A chunked answer whose first chunk size is not 1*HEXDIG (or overflows 64 bits)
    is refused with a 502: the error is in the same read as the head, so no part of the
    answer has gone to the visitor yet."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\nhello\r\n0\r\n\r\n" % size
    await _refused(scripted_origin, proxy, visit, hook, logged_failures, [Send(answer)])


# -- C: a cut-off answer never looks complete --------------------------------------------

CUT_BODIES = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"c" * 100,
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"c" * 100 + b"\r\n",
}


@pytest.mark.parametrize("ending", [Close(), Reset()], ids=["fin", "reset"])
@pytest.mark.parametrize("framing", CUT_BODIES)
@pytest_twisted.ensureDeferred
async def test_cut_off_body_is_cut_off_for_the_visitor(
    scripted_origin, proxy, visit, logged_failures, framing, ending
):
    """The origin closes or resets in the middle of a body it framed: the visitor gets
    fewer bytes than announced (no chunked terminator), and its connection ends at once."""
    scripted_origin.script([Await(), Send(CUT_BODIES[framing]), Wait(0.02), ending])
    visitor = await visit(proxy.port)
    reply = await visitor.ask(b"GET", b"/cut")
    assert reply is not None and reply.status == 200, reply
    assert not reply.complete, reply
    assert len(reply.body) <= 100
    assert b"0\r\n\r\n" not in visitor.data
    await within(visitor.closed, 2)
    await assert_still_serving(visit, proxy.port)
    assert logged_failures == []


CLOSE_DELIMITED = b"%s 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"d" * 3000


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
@pytest_twisted.ensureDeferred
async def test_close_delimited_body_ended_by_fin_is_complete(
    scripted_origin, proxy, visit, logged_failures, version
):
    """A body framed by neither length nor chunks ends with the origin's clean close: the
    visitor gets all of it, in tagd's own framing, properly ended."""
    scripted_origin.script([Await(), Send(CLOSE_DELIMITED % version), Wait(0.02), Close()])
    visitor = await visit(proxy.port)
    reply = await visitor.ask(b"GET", b"/close")
    assert reply is not None and reply.complete, reply
    assert (reply.status, reply.body) == (200, b"d" * 3000)
    await assert_usable_or_closed(visitor)
    assert logged_failures == []


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
@pytest_twisted.ensureDeferred
async def test_close_delimited_body_ended_by_reset_is_cut_off(
    scripted_origin, proxy, visit, logged_failures, version
):
    """The same body ended by a reset instead of a FIN may be missing its end: the
    visitor never sees it complete, and its connection ends at once."""
    scripted_origin.script([Await(), Send(CLOSE_DELIMITED % version), Wait(0.02), Reset()])
    visitor = await visit(proxy.port)
    reply = await visitor.ask(b"GET", b"/close")
    assert reply is not None and reply.status == 200, reply
    assert not reply.complete, reply
    await within(visitor.closed, 2)
    await assert_still_serving(visit, proxy.port)
    assert logged_failures == []


# -- D: any of it, at random, under visitors sharing the pool -----------------------------

_REASONS = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error", 204: b"No Content", 304: b"Not Modified"}
_INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
_UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
_CLEAN = ("none", "interim")  # valid answers: they must come through as they are
_ANY_ANSWER = (*_CLEAN, "bare-lf-reason", "bare-lf-header", "upgrade")
_FRAMED_END = ("smuggled-after", "late-garbage")  # need an end that is not the close


@attrs.frozen
class Plan:
    """How the origin answers one visitor's request."""

    method: bytes
    status: int
    framing: str  # "length", "chunked", "close" (ended by the origin's close), "none" (204, 304)
    corruption: str
    pad: int  # body bytes after the marker
    chunk: int  # chunk size of a chunked body
    writes: tuple[int, ...]  # the sizes of the writes the answer is cut into (the rest is one more)
    pause: float  # between those writes
    cut: int  # where a truncated answer ends, within its body
    garbage: bytes  # the chunk size line of a broken chunk
    bad_chunk: int  # which chunk gets it

    @property
    def late(self) -> bool:
        """Bytes follow the answer after a pause: a request sent meanwhile may meet them."""
        return self.corruption == "late-garbage"

    @property
    def has_body(self) -> bool:
        return self.method != b"HEAD" and self.status not in NO_BODY

    def body(self, path: bytes) -> bytes:
        """The body the visitor should get."""
        return marker(path) + b"." * self.pad if self.has_body else b""

    def steps(self, request: Received) -> list:
        """The origin's steps for C{request}."""
        body = marker(request.path) + b"." * self.pad
        status_line = b"HTTP/1.1 %d %s" % (self.status, _REASONS[self.status])
        headers = [b"X-Plan: " + self.corruption.encode("ascii")]
        if self.corruption == "bare-lf-reason":
            status_line += b"\nX-Injected: injected"
        if self.corruption == "bare-lf-header":
            headers.append(b"X-A: 1\nX-Injected: injected")
        if self.framing == "length":
            headers.append(b"Content-Length: %d" % len(body))
        elif self.framing == "chunked":
            headers.append(b"Transfer-Encoding: chunked")
        head = status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        payload = b""
        if self.has_body and self.framing == "chunked":
            pieces = [body[at : at + self.chunk] for at in range(0, len(body), self.chunk)]
            sizes = [b"%x" % len(piece) for piece in pieces]
            if self.corruption == "chunk-garbage":
                sizes[self.bad_chunk % len(sizes)] = self.garbage
            payload = b"".join(b"%s\r\n%s\r\n" % pair for pair in zip(sizes, pieces)) + b"0\r\n\r\n"
        elif self.has_body:
            payload = body
        answer = (_INTERIM if self.corruption == "interim" else b"") + head + payload
        ending = [Close()] if self.framing == "close" else []
        if self.corruption == "upgrade":
            answer, ending = _UPGRADE + SMUGGLED, [Hold()]
        elif self.corruption.startswith("truncate"):
            answer = answer[: len(answer) - len(payload) + self.cut % len(payload)]
            ending = [Reset()] if self.corruption == "truncate-reset" else [Close()]
        elif self.corruption == "chunk-garbage":
            ending = [Close()]  # a size beyond the bytes sent must not leave it waiting
        elif self.corruption == "late-garbage":
            ending = [Wait(0.005), Send(b"SMUGGLED"), *ending]
        elif self.corruption == "late-response":
            ending = [Wait(0.005), Send(SMUGGLED), *ending]  # a whole one, after a bodiless answer
        steps = []
        for size in self.writes:
            if size < len(answer):
                steps += [Send(answer[:size]), Wait(self.pause)]
                answer = answer[size:]
        if self.corruption == "smuggled-after":
            answer += SMUGGLED  # in the same write as the answer's last bytes
        return [*steps, Send(answer), *ending]


@st.composite
def plans(draw) -> Plan:
    """One request's plan: a valid answer, or one corrupted in a way that fits it."""
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
    status = draw(st.sampled_from([200, 200, 404, 500, 204, 304]))
    framing = "none" if status in NO_BODY else draw(st.sampled_from(["length", "chunked", "close"]))
    choices = list(_ANY_ANSWER)
    if framing != "close":
        choices += _FRAMED_END
    if method == b"HEAD" or status in NO_BODY:
        # A buggy app's late body after a bodiless answer, as a whole response: the one
        # late arrival a proxy can rule out, by never reusing such a connection.
        choices.append("late-response")
    else:
        choices += ["truncate-reset"] + (["truncate-fin"] if framing != "close" else [])
        if framing == "chunked":
            choices.append("chunk-garbage")
    return Plan(
        method=method,
        status=status,
        framing=framing,
        corruption=draw(st.sampled_from(["none", *choices])),
        pad=draw(st.integers(0, 3000)),
        chunk=draw(st.integers(1, 2000)),
        writes=tuple(draw(st.lists(st.integers(1, 600), max_size=3))),
        pause=draw(st.sampled_from([0, 0.001, 0.003])),
        cut=draw(st.integers(0, 10_000)),
        garbage=draw(st.sampled_from(list(BAD_CHUNK_SIZES.values()))),
        bad_chunk=draw(st.integers(0, 5)),
    )


_MARKERS = re.compile(rb"path=(/e[0-9]+/v[0-9]+);")


def check(plan: Plan, path: bytes, reply: Reply | None, visitor: Visitor, strict: bool) -> None:
    """The invariant for one visitor: its own answer (cut off only by a closed
    connection), a 502, or a closed connection; never a byte of any other response."""
    assert visitor.foreign() == [], visitor.data[:600]
    assert set(_MARKERS.findall(visitor.data)) <= {path}, visitor.data[:600]
    expected = plan.body(path)
    if strict and plan.corruption in _CLEAN:
        assert reply is not None and reply.complete, reply
        assert (reply.status, reply.body) == (plan.status, expected), reply
    if reply is None:
        return
    if reply.status == 502:
        assert_bad_gateway(reply, plan.method)
    elif reply.complete:
        assert (reply.status, reply.body) == (plan.status, expected), reply
    else:
        assert reply.status == plan.status and expected.startswith(reply.body), reply


_examples = itertools.count()


@settings(
    max_examples=60,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # each example takes real time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(plans(), min_size=3, max_size=4))
@pytest_twisted.ensureDeferred
async def test_hostile_answers_never_reach_another_visitor(
    scripted_origin, proxy, visit, logged_failures, example
):
    """hypothesis draws, for each of 3-4 visitors asking at once through one tagd (one
    pool, kept from example to example), how the origin answers: valid answers with
    bodies naming the request, or ones with bytes past their end, bodies on HEAD, 204 or
    304 (at once, or as a whole response 5 ms later), bare LFs, broken chunk sizes, truncation, smuggled responses.  Each visitor gets
    its own answer, a 502, or a closed connection; the valid answers arrive as sent,
    unless bytes came late on a connection the pool may have handed on; and no visitor
    ever gets a byte of a response meant for someone else."""
    n = next(_examples)
    paths = [b"/e%d/v%d" % (n, i) for i in range(len(example))]
    by_path = dict(zip(paths, example))
    scripted_origin.respond = lambda r: by_path[r.path].steps(r) if r.path in by_path else honest(r)
    visitors = [await visit(proxy.port) for _ in example]
    asking = [Deferred.fromCoroutine(v.ask(m.method, path)) for v, m, path in zip(visitors, example, paths)]
    try:
        try:
            replies = await within(gatherResults(asking, consumeErrors=True), 8)
        except FirstError as error:
            raise error.subFailure.value from None  # a malformed response, or a timeout
        strict = not any(plan.late for plan in example)
        for plan, path, reply, visitor in zip(example, paths, replies, visitors):
            check(plan, path, reply, visitor, strict)
        assert logged_failures == []
    finally:
        await eventually(lambda: scripted_origin.busy == 0)
        # Before the next example: tagd has dropped every connection that got bytes late.
        late = {r.connection for r in scripted_origin.received if r.path in by_path and by_path[r.path].late}
        await eventually(lambda: all(scripted_origin.connections[i].lost.called for i in late))
        for visitor in visitors:
            visitor.transport.abortConnection()
