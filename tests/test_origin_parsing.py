"""The origin client's parsing of responses, byte by byte, against an in-memory transport.

The raw-socket suite (test_hostile_origin.py) proves the same rules end to end; these
pin each rule down fast and precisely: what reaches the receiver, and whether the
connection goes back to the pool.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tagd.proxy.origin import MAX_HEAD_SIZE, OriginClient, OriginConnection, OriginProtocolError


class Receiver:
    """Records what the connection tells about the response."""

    def __init__(self) -> None:
        self.head = None
        self.body = b""
        self.ended = False
        self.failure = None

    def response_head(self, code, phrase, headers):
        assert self.head is None, "a second head for one request"
        self.head = (code, phrase, headers)

    def response_data(self, data):
        assert self.head is not None and not self.ended
        self.body += data

    def read_done(self):
        pass

    def response_end(self):
        assert not self.ended and self.failure is None
        self.ended = True

    def response_failed(self, reason, retryable):
        assert not self.ended and self.failure is None
        self.failure = reason


def _exchange(method: bytes = b"GET"):
    clock = MemoryReactorClock()
    client = OriginClient(clock, "http://127.0.0.1:8000", connect_timeout=1, pool_size=4, idle_timeout=60)
    connection = OriginConnection(client)
    transport = StringTransport()
    connection.makeConnection(transport)
    receiver = Receiver()
    connection.send(receiver, method, b"%s / HTTP/1.1\r\nHost: shop\r\n\r\n" % method, None, None, reused=False)
    return client, connection, transport, receiver


def _pooled(client: OriginClient, connection: OriginConnection) -> bool:
    return connection in client._idle


def _feed(connection, *pieces: bytes) -> None:
    for piece in pieces:
        connection.dataReceived(piece)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Page: a\r\n\r\nhello"


def test_a_clean_response_is_delivered_and_the_connection_pooled():
    """The baseline: head, body and end reach the receiver, and the connection is kept."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, OK)
    assert receiver.head == (200, b"OK", [(b"X-Page", b"a"), (b"Content-Length", b"5")])
    assert receiver.body == b"hello" and receiver.ended
    assert _pooled(client, connection) and not transport.disconnecting


@pytest.mark.parametrize(
    "extra",
    [b"X", b"HTTP/1.1 200 OK\r\nSet-Cookie: stolen=1\r\nContent-Length: 8\r\n\r\nSMUGGLED"],
    ids=["garbage", "second-response"],
)
def test_bytes_after_a_complete_response_in_the_same_read_close_it(extra):
    """More than was framed, in the read that ended the response: the response itself is
    delivered, the extra never, and the connection is closed instead of pooled."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, OK + extra)
    assert receiver.ended and receiver.body == b"hello"
    assert not _pooled(client, connection) and transport.disconnecting


def test_bytes_while_idle_discard_the_connection():
    """A byte that arrives while no request is out makes the pooled connection untrusted:
    it leaves the pool at once."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, OK)
    assert _pooled(client, connection)
    _feed(connection, b"HTTP/1.1 200 OK\r\n")
    assert not _pooled(client, connection) and not connection.usable


@pytest.mark.parametrize("code", [204, 304])
def test_a_body_on_a_bodiless_status_closes_the_connection(code):
    """204 and 304 have no body, whatever their headers say: bytes after the head are
    never forwarded, and the connection is not reused."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, b"HTTP/1.1 %d X\r\nContent-Length: 8\r\n\r\nSMUGGLED" % code)
    assert receiver.head[0] == code and receiver.body == b"" and receiver.ended
    assert not _pooled(client, connection)


@pytest.mark.parametrize("code", [204, 304])
def test_a_bodiless_status_is_never_pooled_even_when_clean(code):
    """A body a buggy app sends after a 204 or 304 may come a little later, where it would
    be read as the next request's answer: such a connection is closed even when nothing
    followed the head.  A 204's Content-Length is not passed on (RFC 9110 section 8.6),
    a 304's is."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, b"HTTP/1.1 %d X\r\nContent-Length: 8\r\nETag: e\r\n\r\n" % code)
    assert receiver.ended and not _pooled(client, connection) and transport.disconnecting
    expected = [(b"ETag", b"e")] + ([(b"Content-Length", b"8")] if code == 304 else [])
    assert receiver.head[2] == expected


@pytest.mark.parametrize("trailing", [b"", b"SMUGGLED"], ids=["no-body", "body"])
def test_a_head_response_ends_at_its_head_and_is_never_pooled(trailing):
    """A HEAD's answer ends with its head; a buggy body trailing it may come later, so the
    connection is closed either way, and its Content-Length is passed on."""
    client, connection, transport, receiver = _exchange(b"HEAD")
    _feed(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n" + trailing)
    assert receiver.head == (200, b"OK", [(b"Content-Length", b"8")])
    assert receiver.body == b"" and receiver.ended
    assert not _pooled(client, connection) and transport.disconnecting


def test_bytes_after_a_chunked_terminator_close_the_connection():
    """The chunked body ends at its terminator; what follows is not this response's."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200")
    assert receiver.body == b"hello" and receiver.ended
    assert not _pooled(client, connection)


def test_interim_answers_are_skipped_and_trailers_dropped():
    """100 Continue and 103 Early Hints are not forwarded; the final answer is.  A chunked
    body's trailers are not headers of the response."""
    client, connection, transport, receiver = _exchange()
    _feed(
        connection,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    assert receiver.head == (200, b"OK", []) and receiver.body == b"hello" and receiver.ended
    assert _pooled(client, connection)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\nSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\nSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\x00c\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\rc\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 99 X\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1,2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nWorker-Tracking: {}\nX: y\r\n\r\n",
    ],
)
def test_malformed_heads_fail_the_exchange_before_any_head(response):
    """Each of these breaks RFC 9112 in a way a proxy must not pass on: the receiver gets
    a failure (a 502 for the visitor) and no head, and the connection is aborted."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, response)
    assert receiver.head is None
    assert receiver.failure is not None and receiver.failure.check(OriginProtocolError)
    assert transport.disconnecting and not _pooled(client, connection)


def test_a_malformed_chunk_in_the_read_of_the_head_fails_before_the_head():
    """A whole read is parsed before any of it is handed on: a broken chunk in the read
    that brought the head fails the exchange with no head passed on (a 502)."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    assert receiver.head is None and receiver.failure.check(OriginProtocolError)
    assert not _pooled(client, connection)


def test_a_malformed_chunk_in_a_later_read_fails_mid_body():
    """Once the head is out, a broken chunk can only cut the visitor's connection."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"zz\r\n")
    assert receiver.head is not None and receiver.body == b"hello"
    assert receiver.failure.check(OriginProtocolError)
    assert not _pooled(client, connection)


@pytest.mark.parametrize("piece", [1, 1000, MAX_HEAD_SIZE + 100], ids=["bytewise", "kilobytes", "one-read"])
def test_a_head_over_the_limit_fails_however_it_arrives(piece):
    """A head over 64 KiB is refused, sent at once or trickled, one value or many lines."""
    client, connection, transport, receiver = _exchange()
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * (MAX_HEAD_SIZE + 10) + b"\r\n\r\n"
    for start in range(0, len(head), piece):
        connection.dataReceived(head[start : start + piece])
        if receiver.failure is not None:
            break
    assert receiver.head is None and receiver.failure.check(OriginProtocolError)


@pytest.mark.parametrize(
    "start, filler",
    [
        (b"5\r\nhello\r\n0\r\nX-Trailer: ", b"a"),  # one endless trailer value
        (b"5\r\nhello\r\n0\r\n", b"X: y\r\n"),  # endless trailer lines
        (b"5;ext=", b"e"),  # an endless chunk extension
    ],
    ids=["trailer-value", "trailer-lines", "chunk-extension"],
)
def test_endless_chunked_framing_fails_once_past_the_head_limit(start, filler):
    """What a chunked body holds besides its data (sizes, extensions, trailers) is kept by
    the parser while it lasts: reads that bring no body byte add up to the head's limit,
    and past it the exchange fails, so an origin cannot grow tagd's memory that way."""
    client, connection, transport, receiver = _exchange()
    _feed(connection, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + start)
    for _ in range(2 * MAX_HEAD_SIZE // 4096 + 2):
        if receiver.failure is not None:
            break
        connection.dataReceived(filler * (4096 // len(filler)))
    assert receiver.failure is not None and receiver.failure.check(OriginProtocolError)
    assert transport.disconnecting


def test_many_header_lines_over_the_limit_fail():
    """Many small header lines add up to the same limit."""
    client, connection, transport, receiver = _exchange()
    line = b"X-Many: " + b"v" * 100 + b"\r\n"
    _feed(connection, b"HTTP/1.1 200 OK\r\n" + line * (MAX_HEAD_SIZE // len(line) + 2) + b"\r\n")
    assert receiver.head is None and receiver.failure.check(OriginProtocolError)


def test_a_close_delimited_body_ends_cleanly_only_with_a_fin():
    """Without Content-Length or chunking the body ends when the origin closes: complete
    on a clean close, a failure (a cut for the visitor) on a reset."""
    from twisted.internet.error import ConnectionDone, ConnectionLost
    from twisted.python.failure import Failure

    for reason, complete in ((ConnectionDone(), True), (ConnectionLost(), False)):
        client, connection, transport, receiver = _exchange()
        _feed(connection, b"HTTP/1.1 200 OK\r\n\r\npart")
        connection.connectionLost(Failure(reason))
        assert receiver.body == b"part"
        assert receiver.ended is complete and (receiver.failure is None) is complete


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40), st.sampled_from([b"GET", b"HEAD"]))
def test_any_bytes_give_one_outcome_and_no_reuse_unless_clean(data, piece, method):
    """Whatever bytes an origin sends, in whatever pieces, the receiver hears at most one
    head and exactly one end or failure at most, never raises, and the connection is
    pooled only after a complete response with nothing after it."""
    client, connection, transport, receiver = _exchange(method)
    for start in range(0, len(data), piece):
        connection.dataReceived(data[start : start + piece])
    assert not (receiver.ended and receiver.failure is not None)
    if _pooled(client, connection):
        assert receiver.ended and method == b"GET"
