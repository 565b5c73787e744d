"""When things go wrong: an unreachable or silent origin, a visitor who leaves, an
origin that breaks off, and what tagd's connections look like afterwards."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import CertificateOptions

from certificates import self_signed
from conftest import WireVisitor, eventually, raw_request, within
from helpers import free_port
from origin import PAGE


async def _answer_or_cut(visitor, path: bytes):
    """The response to C{path}, or None if the connection ended before any arrived."""
    try:
        return await within(visitor.request(b"GET", path))
    except (ConnectionDone, ConnectionLost):
        return None


async def _still_answers(connect, port: int) -> None:
    """A new visitor connection to tagd gets C{/page}: the daemon is up and serving."""
    visitor = await connect(port)
    response = await within(visitor.request(b"GET", b"/page"))
    assert (response.status, bytes(response.body)) == (200, PAGE)


def _short_error_page(response, code: int) -> None:
    assert response.status == code
    assert response.header(b"content-type") == [b"text/html; charset=utf-8"]
    assert b"%d" % code in response.body
    assert len(response.body) < 512


@pytest_twisted.ensureDeferred
async def test_refused_origin_gives_502(start_tagd, connect):
    """With nothing listening at the origin's address, visitors get a short 502 page,
    and the same visitor connection goes on being answered."""
    tagd = await start_tagd(origin=f"http://127.0.0.1:{free_port()}")
    visitor = await connect(tagd.port)
    for _ in range(2):
        _short_error_page(await within(visitor.request(b"GET", b"/page")), 502)


@pytest_twisted.ensureDeferred
async def test_silent_origin_gives_504_and_is_abandoned(reactor, start_tagd, origin, connect):
    """An origin that does not answer within response_timeout gets the visitor a 504,
    and tagd drops the origin request (the origin sees its connection lost)."""
    tagd = await start_tagd(response_timeout=0.5)
    visitor = await connect(tagd.port)
    began = reactor.seconds()
    response = await within(visitor.request(b"GET", b"/never"))
    took = reactor.seconds() - began
    _short_error_page(response, 504)
    assert 0.4 < took < 3, took
    await within(origin.seen[0].lost, 5)
    await eventually(lambda: origin.web.open == 0)


@pytest_twisted.ensureDeferred
async def test_slow_body_is_not_cut_by_response_timeout(start_tagd, connect):
    """response_timeout bounds the wait for the answer to begin, not the body: a body
    trickling in for twice that long arrives whole."""
    tagd = await start_tagd(response_timeout=0.5)
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/slow?parts=10&delay=0.1"))
    assert response.status == 200
    assert response.complete
    assert bytes(response.body) == b"slow " * 10


@pytest.mark.parametrize(
    "path, wait_for",
    [
        (b"/never", "request"),
        (b"/slow?parts=200&delay=0.02", "body"),
    ],
    ids=["before-the-answer", "during-the-body"],
)
@pytest_twisted.ensureDeferred
async def test_visitor_leaving_aborts_the_origin_request(tagd, origin, connect, path, wait_for):
    """A visitor who disconnects, whether still waiting for the answer or in the middle
    of the body, makes tagd drop the origin request: the origin sees its connection
    lost instead of sending on to nobody."""
    visitor = await connect(tagd.port)
    visitor.expect(b"GET")
    visitor.send(raw_request(b"GET", path))
    if wait_for == "request":
        await eventually(lambda: origin.seen)
    else:
        await eventually(lambda: visitor.received > 300)  # the head and some body
    visitor.transport.abortConnection()
    await within(origin.seen[0].lost, 5)
    await eventually(lambda: origin.web.open == 0)


@pytest.mark.parametrize(
    "path",
    [b"/cut?send=1000&promise=5000", b"/cut?send=1000&chunked=1"],
    ids=["content-length", "chunked"],
)
@pytest_twisted.ensureDeferred
async def test_origin_breaking_off_cuts_the_visitor(tagd, connect, path):
    """When the origin's connection ends before the body it announced is complete, the
    visitor's connection is cut: the response never looks finished."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", path))
    assert response.status == 200
    assert not response.complete
    assert response.body_length <= 1000
    await within(visitor.closed)
    await _still_answers(connect, tagd.port)


@pytest_twisted.ensureDeferred
async def test_origin_breaking_off_cuts_a_visitor_on_tls(reactor, start_tagd, origin, tmp_path):
    """The same cut for a visitor on TLS, whose transport closes only once no producer is
    registered on it: the visitor is not left holding a response that never ends."""
    tagd = await start_tagd(listen=f"ssl:0:interface=127.0.0.1:{self_signed(tmp_path)}")
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", tagd.port, CertificateOptions(verify=False))
    visitor = await within(connectProtocol(endpoint, WireVisitor()))
    response = await within(visitor.request(b"GET", b"/cut?send=1000&promise=5000"))
    assert response.status == 200 and not response.complete
    await within(visitor.closed)


@pytest_twisted.ensureDeferred
async def test_origin_closing_right_after_a_short_body_cuts_the_visitor(raw_tagd, origin, connect):
    """An origin that sends 5 of 500 announced bytes and closes at once: the visitor gets
    no complete response and its connection ends; tagd keeps serving."""
    origin.answer_raw(b"/short", b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\nhello", cut=True)
    visitor = await connect(raw_tagd.port)
    response = await _answer_or_cut(visitor, b"/short")
    assert response is None or not response.complete
    await within(visitor.closed)
    await _still_answers(connect, raw_tagd.port)


@pytest.mark.parametrize(
    "answer",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 100_000,
        # Parsed whole before any of it goes on, the read that brought the head: a 502.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    ],
    ids=["no-status-line", "bad-content-length", "endless-head", "broken-chunks"],
)
@pytest_twisted.ensureDeferred
async def test_origin_speaking_broken_http(raw_tagd, origin, connect, logged_failures, answer):
    """An origin that answers with something that is not HTTP gets the visitor a 502;
    tagd logs no error and keeps serving.  (A fault after the head went out cuts the
    visitor's connection instead: test_hostile_origin.py.)"""
    origin.answer_raw(b"/broken", answer)
    visitor = await connect(raw_tagd.port)
    response = await _answer_or_cut(visitor, b"/broken")
    _short_error_page(response, 502)
    await _still_answers(connect, raw_tagd.port)
    await eventually(lambda: origin.raw.open <= 1)
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_origin_closing_pooled_connections_is_not_fatal(tagd, origin, connect):
    """When the origin closes the connections tagd keeps in its pool (a restart, an idle
    timeout), the next GET is still answered."""
    visitor = await connect(tagd.port)
    assert (await within(visitor.request(b"GET", b"/page"))).status == 200
    origin.web.abort_all()
    response = await within(visitor.request(b"GET", b"/page"))
    assert (response.status, bytes(response.body)) == (200, PAGE)


@pytest_twisted.ensureDeferred
async def test_pool_keeps_at_most_pool_size_and_closes_idle_connections(start_tagd, origin, connect):
    """Six concurrent requests need six origin connections; afterwards tagd keeps at most
    pool_size of them, and closes those too once they sat idle for pool_idle_timeout."""
    tagd = await start_tagd(pool_size=2, pool_idle_timeout=1)
    visitors = [await connect(tagd.port) for _ in range(6)]
    answers = [v.request(b"GET", b"/slow?parts=3&delay=0.1") for v in visitors]
    for response in await within(gatherResults(answers)):
        assert response.complete and bytes(response.body) == b"slow " * 3
    assert origin.web.accepted == 6
    await eventually(lambda: origin.web.open <= 2, timeout=0.5)
    assert origin.web.open == 2  # kept for the next visitors, until idle too long
    await eventually(lambda: origin.web.open == 0, timeout=5)
    assert (await within(visitors[0].request(b"GET", b"/page"))).status == 200


@pytest_twisted.ensureDeferred
async def test_tagd_survives_a_storm_of_failures_without_leaking(
    start_tagd, origin, connect, logged_failures
):
    """Timeouts, broken-off bodies, visitors vanishing before, during and after their
    requests, malformed requests and origin errors, all at once: tagd logs no error,
    still answers, and holds no more origin connections than its pool allows."""
    tagd = await start_tagd(response_timeout=0.5, pool_size=2)
    answered = [b"/never", b"/cut?send=100", b"/status/500", b"/page"] * 3
    abandoned = [  # (request, whether it reaches the origin before the visitor leaves)
        (raw_request(b"GET", b"/slow?parts=100&delay=0.02"), True),
        (raw_request(b"GET", b"/never"), True),
        (raw_request(b"POST", b"/echo", headers=[(b"Content-Length", b"100000")], body=b"x"), False),
        (b"NOT HTTP AT ALL\r\n\r\n", False),
    ] * 3
    outcomes = []
    for path in answered:
        visitor = await connect(tagd.port)
        outcomes.append(visitor.request(b"GET", path))
    leaving = []
    for request, _ in abandoned:
        visitor = await connect(tagd.port)
        visitor.send(request)
        leaving.append(visitor)
    arriving = len(answered) + sum(reaches for _, reaches in abandoned)
    await eventually(lambda: len(origin.seen) == arriving)
    for visitor in leaving:
        visitor.transport.abortConnection()
    for outcome in outcomes:
        try:
            await within(outcome)
        except (ConnectionDone, ConnectionLost):
            pass
    await _still_answers(connect, tagd.port)
    await eventually(lambda: origin.web.open <= 2)
    assert logged_failures == []
