"""Large bodies: streamed through byte for byte, at the pace of the visitor."""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted

from conftest import eventually, sleep, within
from origin import pattern_sha256

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
