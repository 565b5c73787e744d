"""The way out: what the visitor receives, and persistent connections on both sides."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone

from conftest import eventually, raw_request, within
from origin import PAGE, TRACKING_HEADER, Echo


@pytest_twisted.ensureDeferred
async def test_head_response_has_the_get_headers_and_no_body(tagd, connect):
    """HEAD gets the status and headers a GET would get, Content-Length included, the
    tracking header removed, and not one body byte: the next response on the same
    connection parses cleanly."""
    visitor = await connect(tagd.port)
    head = await within(visitor.request(b"HEAD", b"/page", headers=[(b"X-Track", b"v")]))
    get = await within(visitor.request(b"GET", b"/page"))
    assert head.status == get.status == 200
    assert head.header(b"content-length") == get.header(b"content-length") == [b"%d" % len(PAGE)]
    assert head.header(b"etag") == get.header(b"etag")
    assert not head.names() & {b"transfer-encoding", TRACKING_HEADER.lower()}
    assert bytes(head.body) == b"" and bytes(get.body) == PAGE


@pytest.mark.parametrize("code", [204, 304])
@pytest_twisted.ensureDeferred
async def test_no_body_statuses(tagd, connect, code):
    """204 and 304 come through with their headers (not the tracking header) and no body
    or body framing, and the connection stays usable."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"GET", b"/status/%d" % code, headers=[(b"X-Track", b"v")])
    )
    after = await within(visitor.request(b"GET", b"/page"))
    assert response.status == code
    assert response.header(b"x-origin-status") == [b"%d" % code]
    assert response.header(b"etag") == [b'"page-1"']
    assert not response.names() & {b"transfer-encoding", b"content-length", TRACKING_HEADER.lower()}
    assert (after.status, bytes(after.body)) == (200, PAGE)


@pytest_twisted.ensureDeferred
async def test_chunked_response(tagd, connect):
    """A chunked origin response reaches an HTTP/1.1 visitor in valid chunked framing,
    and an HTTP/1.0 visitor as a body ended by the connection's close."""
    expected = b"first,second," + b"x" * 10000 + b",last"
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/chunks"))
    assert response.header(b"transfer-encoding") == [b"chunked"]
    assert response.header(b"content-length") == []
    assert response.complete and response.chunks[-1] == 0
    assert bytes(response.body) == expected

    old = await connect(tagd.port)
    response = await within(old.request(b"GET", b"/chunks", version=b"HTTP/1.0"))
    assert response.header(b"transfer-encoding") == []
    assert bytes(response.body) == expected
    await within(old.closed)


@pytest_twisted.ensureDeferred
async def test_origin_error_status_passes_through(tagd, connect):
    """A 500 from the origin is the origin's 500: status, headers and body."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/status/500"))
    assert response.status == 500
    assert response.header(b"x-origin-status") == [b"500"]
    assert bytes(response.body) == b"origin says 500\n"


@pytest_twisted.ensureDeferred
async def test_repeated_set_cookie_kept_in_order(tagd, connect):
    """Several Set-Cookie headers all reach the visitor, in the origin's order."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/cookies"))
    assert response.header(b"set-cookie") == [
        b"a=1; Path=/",
        b"b=2; Path=/; HttpOnly",
        b"c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
    ]
    assert response.header(b"x-between") == [b"yes"]


@pytest_twisted.ensureDeferred
async def test_keep_alive_to_visitor_and_one_pooled_origin_connection(tagd, origin, connect):
    """Sequential and pipelined requests on one visitor connection are all answered on
    it, and tagd carries them all over a single persistent origin connection."""
    visitor = await connect(tagd.port)
    for i in range(5):
        response = await within(visitor.request(b"GET", b"/page?n=%d" % i))
        assert (response.status, bytes(response.body)) == (200, PAGE)
    pipelined = [visitor.expect(b"GET") for _ in range(3)]
    visitor.send(b"".join(raw_request(b"GET", b"/echo?p=%d" % i) for i in range(3)))
    for i, answer in enumerate(pipelined):
        echo = Echo.parse((await within(answer)).body)
        assert (echo.uri, echo.connections) == (f"/echo?p={i}", 1)
    assert not visitor.closed.called
    assert origin.web.accepted == 1


@pytest_twisted.ensureDeferred
async def test_visitors_share_the_pooled_origin_connection(tagd, origin, connect):
    """Visitors arriving one after another on their own connections are all served over
    the same origin connection."""
    for _ in range(5):
        visitor = await connect(tagd.port)
        response = await within(visitor.request(b"GET", b"/page"))
        assert response.status == 200
    assert origin.web.accepted == 1


@pytest_twisted.ensureDeferred
async def test_close_delimited_origin_response(raw_tagd, origin, connect):
    """An origin response whose body ends with the connection (HTTP/1.0, no length)
    reaches an HTTP/1.1 visitor complete, in chunked framing, on a connection that stays
    open; the next request goes over a new origin connection."""
    body = bytes(range(256)) * 200
    origin.answer_raw(b"/closing", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body, cut=True)
    visitor = await connect(raw_tagd.port)
    for _ in range(2):
        response = await within(visitor.request(b"GET", b"/closing"))
        assert response.complete and response.header(b"transfer-encoding") == [b"chunked"]
        assert bytes(response.body) == body
    assert origin.raw.accepted == 2


@pytest_twisted.ensureDeferred
async def test_origin_connection_close_is_honoured(raw_tagd, origin, connect):
    """An origin answer with C{Connection: close} is not followed by another request on
    that connection: tagd closes it and opens a new one."""
    origin.answer_raw(b"/once", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nonce")
    visitor = await connect(raw_tagd.port)
    for _ in range(2):
        response = await within(visitor.request(b"GET", b"/once"))
        assert bytes(response.body) == b"once"
        assert response.header(b"connection") == []
    assert origin.raw.accepted == 2
    await eventually(lambda: origin.raw.open == 0)


async def _asking_to_close(connect, tagd):
    """A visitor that sends C{Connection: close}, and the answer it gets."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/page", headers=[(b"Connection", b"close")]))
    return visitor, response


@pytest_twisted.ensureDeferred
async def test_visitor_connection_close_is_honoured(tagd, connect):
    """A visitor that asks for C{Connection: close} gets its full answer and then tagd
    closes the connection."""
    visitor, response = await _asking_to_close(connect, tagd)
    assert (response.status, bytes(response.body)) == (200, PAGE)
    assert isinstance(await within(visitor.closed), ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_answer_to_connection_close_says_close(tagd, connect):
    """The answer to a visitor's C{Connection: close} says C{Connection: close} too
    (RFC 9112, section 9.6), so the visitor knows the connection ends with it."""
    _, response = await _asking_to_close(connect, tagd)
    assert response.header(b"connection") == [b"close"]
