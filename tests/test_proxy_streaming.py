"""Large bodies: streamed through byte for byte, at the pace of the visitor."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import pytest_twisted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread

from conftest import eventually, sleep, within
from origin import pattern_sha256
from tagd.proxy.origin import OriginClient, OriginConnection

MiB = 1 << 20


@pytest.mark.parametrize(
    "query, size",
    [(b"", 64 * MiB), (b"&chunked=1", 16 * MiB)],
    ids=["64MiB-content-length", "16MiB-chunked"],
)
@pytest_twisted.ensureDeferred
async def test_large_download_is_byte_identical(tagd, connect, query, size):
    """A large body, sized or chunked, reaches the visitor with the same bytes."""
    digest = hashlib.sha256()
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"GET", b"/big?size=%d%s" % (size, query), sink=digest.update), 30
    )
    assert response.status == 200 and response.complete
    assert response.body_length == size
    assert digest.hexdigest() == pattern_sha256(size)


@pytest_twisted.ensureDeferred
async def test_slow_visitor_pauses_the_origin(tagd, origin, connect):
    """While the visitor reads nothing, tagd stops reading from the origin, so the origin
    is paused after a bounded number of bytes (socket buffers, not the body); once the
    visitor reads again, the whole body arrives intact."""
    size = 64 * MiB
    digest = hashlib.sha256()
    visitor = await connect(tagd.port)
    visitor.pause()
    answer = visitor.request(b"GET", b"/big?size=%d" % size, sink=digest.update)
    await eventually(lambda: origin.producers and origin.producers[0].paused)
    producer = origin.producers[0]
    await sleep(0.5)
    stalled_at = producer.sent
    await sleep(0.5)
    assert producer.sent == stalled_at, "the origin kept sending to a visitor that reads nothing"
    assert producer.pauses >= 1
    assert stalled_at < 24 * MiB, f"{stalled_at} bytes left the origin for a stalled visitor"
    visitor.resume()
    response = await within(answer, 30)
    assert response.body_length == size
    assert digest.hexdigest() == pattern_sha256(size)


def _head_then_rest(port: int) -> tuple[float, bytes]:
    """In a thread: ask for a page whose body the origin starts a second after its head;
    when did the whole head arrive, and what came with it?"""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"GET /slow?parts=1&delay=1.0 HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        started, received = time.monotonic(), b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
        return time.monotonic() - started, received


@pytest_twisted.ensureDeferred
async def test_a_head_without_body_bytes_goes_out_at_once(tagd):
    """tagd sends a response head together with the body bytes that came with it; when
    none did (a stream, a slow page), the head goes out on its own at once, not with
    the body a second later."""
    waited, received = await within(deferToThread(_head_then_rest, tagd.port))
    assert received.startswith(b"HTTP/1.1 200 ")
    assert waited < 0.5, f"the head took {waited:.2f} s"
    assert received.endswith(b"\r\n\r\n"), received  # the body is still to come


def test_repeated_pauses_keep_one_stall_timer():
    """Twisted pauses the origin connection again on every write while the visitor's
    socket stays full.  The stall window runs from the first pause, and the resume that
    follows cancels it: no timer is left to cut the connection later (under another
    visitor's exchange, once the connection is back in the pool)."""
    clock = MemoryReactorClock()
    client = OriginClient(clock, "http://127.0.0.1:8000", connect_timeout=1, pool_size=1, idle_timeout=60, stall_timeout=5)
    connection = OriginConnection(client)
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.pauseProducing()
    clock.advance(3)
    connection.pauseProducing()
    connection.resumeProducing()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert not transport.disconnecting

    connection.pauseProducing()
    clock.advance(4)
    connection.pauseProducing()
    clock.advance(1)  # five seconds after the first pause
    assert transport.disconnecting
