"""Request bodies on their way in: streamed to the origin as they arrive, at the pace the
origin reads them, and dropped cleanly when either side gives up halfway.

The origin here is a sink that hashes each body as it arrives instead of keeping it,
and that the test can make stop reading, answer early, or die halfway through a body.
"""

from __future__ import annotations

import hashlib
from io import BytesIO

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.ssl import CertificateOptions
from twisted.web.server import Request, Site
from zope.interface import implementer

from conftest import WireVisitor, eventually, raw_request, sampling_memory, sleep, twistd_tagd, within
from certificates import self_signed
from helpers import free_port
from origin import ConnectionCounter, pattern, pattern_sha256

MiB = 1 << 20
MB = 1000 * 1000
SMALL_BODY = 64 * 1024  # tagd collects bodies up to this size before forwarding them


# -- the origin: a sink for request bodies --------------------------------------------


@attrs.define
class Upload:
    """One request as the sink received it, body hashed rather than kept."""

    headers: list[tuple[bytes, bytes]]
    received: int = 0
    digest: object = attrs.field(factory=hashlib.sha256)
    complete: bool = False
    lost: Deferred = attrs.field(factory=Deferred)  # fires if the connection ends first

    def header(self, name: bytes) -> list[bytes]:
        """The values of C{name} (any case), in the order received."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the body received so far."""
        return self.digest.hexdigest()


class _SinkRequest(Request):
    """Hashes the body piece by piece as it arrives, doing what the sink is set to do."""

    def gotLength(self, length) -> None:
        self.content = BytesIO()  # stays empty: the pieces go to the digest
        sink: Sink = self.channel.site.sink
        self.upload = Upload([(n, v) for n, vs in self.requestHeaders.getAllRawHeaders() for v in vs])
        sink.uploads.append(self.upload)
        self.notifyFinish().addErrback(lambda _: self.upload.lost.callback(None))
        if sink.paused:
            sink.hold(self.channel.transport)
        if sink.answer_early:
            # A refusal before reading the body, as an origin checking a size limit sends it.
            self.channel.transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
                b"Content-Length: 9\r\n\r\ntoo large"
            )

    def handleContentChunk(self, data: bytes) -> None:
        upload = self.upload
        upload.received += len(data)
        upload.digest.update(data)
        die_after = self.channel.site.sink.die_after
        if die_after is not None and upload.received >= die_after:
            self.channel.transport.abortConnection()

    def process(self) -> None:
        self.upload.complete = True
        if self.channel.site.sink.answer_early:
            return  # answered already
        answer = b"received %d" % self.upload.received
        self.setHeader(b"Content-Length", b"%d" % len(answer))
        self.write(answer)
        self.finish()


class Sink:
    """An origin for uploads: set C{paused}, C{answer_early} or C{die_after}, then read
    what arrived in C{uploads}."""

    def __init__(self, reactor) -> None:
        site = Site(None)  # no resource: the requests answer themselves
        site.requestFactory = _SinkRequest
        site.noisy = False
        site.log = lambda request: None
        site.sink = self
        self.web = ConnectionCounter(site)
        self.uploads: list[Upload] = []
        self.paused = False
        self.answer_early = False
        self.die_after: int | None = None
        self._held = []
        self._port = reactor.listenTCP(0, self.web, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self._port.getHost().port}"

    def hold(self, transport) -> None:
        """Stop reading from C{transport} until L{resume}."""
        transport.pauseProducing()
        self._held.append(transport)

    def resume(self) -> None:
        """Read bodies again, and at once from now on."""
        self.paused = False
        held, self._held = self._held, []
        for transport in held:
            transport.resumeProducing()

    def stop(self) -> Deferred:
        """Cut every connection and stop listening."""
        self.web.abort_all()
        return self._port.stopListening()


@pytest_twisted.async_yield_fixture
async def sink(reactor):
    """The upload sink, listening on a free loopback port."""
    server = Sink(reactor)
    yield server
    await within(server.stop())


@pytest_twisted.async_fixture
async def sink_tagd(start_tagd, sink):
    """tagd in front of the sink."""
    return await start_tagd(origin=sink.url)


# -- the visitor's side: a body written at the pace tagd reads it ----------------------


@implementer(IPushProducer)
class BodyWriter:
    """Writes C{size} bytes of the test pattern to a connection as fast as it takes them,
    in chunked transfer-coding (with uneven chunk sizes) if asked."""

    def __init__(self, transport, size: int, chunked: bool = False) -> None:
        self._transport = transport
        self._blocks = pattern(size)
        self._chunked = chunked
        self.sent = 0
        self.stopped = False
        self._paused = False

    def start(self) -> None:
        self._transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self.stopped:
            block = next(self._blocks, None)
            if block is None:
                if self._chunked:
                    self._transport.write(b"0\r\n\r\n")
                self._transport.unregisterProducer()
                self.stopped = True
                return
            self.sent += len(block)
            if self._chunked:
                pieces = (block[:1], block[1:7001], block[7001:])
                self._transport.writeSequence(
                    [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p]
                )
            else:
                self._transport.write(block)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self.stopped = True


def upload_head(size: int | None, headers=()) -> bytes:
    """A PUT's head announcing C{size} body bytes, or a chunked body for None."""
    framing = (b"Transfer-Encoding", b"chunked") if size is None else (b"Content-Length", b"%d" % size)
    return raw_request(b"PUT", b"/upload", headers=[framing, *headers])


def upload(visitor, size: int, chunked: bool = False, headers=()):
    """Send a PUT with C{size} pattern bytes; return the response Deferred and the writer."""
    answer = visitor.expect(b"PUT")
    visitor.send(upload_head(None if chunked else size, headers=headers))
    writer = BodyWriter(visitor.transport, size, chunked)
    writer.start()
    return answer, writer


async def answer_or_cut(answer: Deferred, seconds: float = 10):
    """The response, or None if the connection ended before a whole one arrived."""
    try:
        response = await within(answer, seconds)
    except (ConnectionDone, ConnectionLost):
        return None
    return response if response.complete else None


async def closing_answer(visitor, answer: Deferred):
    """The response to an upload, or None if the connection was cut first; a response says
    C{Connection: close}, and either way the visitor's connection ends."""
    response = await answer_or_cut(answer)
    if response is not None:
        assert response.header(b"connection") == [b"close"]
    await within(visitor.closed)
    return response


async def origin_request_dropped(sink: Sink) -> None:
    """The sink's first upload ends unfinished, its connection lost, and no connection to
    the sink stays open.  The sink is resumed first: a paused origin notices a closed
    connection only once it reads again."""
    sink.resume()
    await within(sink.uploads[0].lost, 5)
    assert not sink.uploads[0].complete
    await eventually(lambda: sink.web.open == 0)


async def still_serves(connect, port: int) -> None:
    """A new visitor connection to tagd gets an answer: the daemon is up and serving."""
    visitor = await connect(port)
    response = await within(visitor.request(b"GET", b"/"))
    assert (response.status, bytes(response.body)) == (200, b"received 0")


async def stalled(writer: BodyWriter) -> int:
    """Wait until the visitor's writes have stopped moving; return how much was sent."""
    while True:
        before = writer.sent
        await sleep(0.5)
        if writer.sent == before:
            return before


# -- tests ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_body_is_streamed_to_the_origin(sink_tagd, sink, connect):
    """The origin receives all of a large upload that the visitor has sent so far, before
    the visitor has finished sending it."""
    visitor = await connect(sink_tagd.port)
    answer = visitor.expect(b"POST")
    visitor.send(
        raw_request(b"POST", b"/upload", headers=[(b"Content-Length", b"%d" % (8 * MiB))])
        + b"u" * MiB
    )
    await eventually(lambda: sink.uploads and sink.uploads[0].received == MiB, timeout=1)
    assert sink.uploads[0].sha256 == hashlib.sha256(b"u" * MiB).hexdigest()
    assert not sink.uploads[0].complete
    visitor.transport.abortConnection()
    with pytest.raises(ConnectionLost):
        await within(answer)


@pytest_twisted.ensureDeferred
async def test_slow_origin_pauses_the_visitor(sink_tagd, sink, connect):
    """While the origin reads nothing of a large upload, tagd stops reading it from the
    visitor: the visitor is held after a bounded number of bytes (socket buffers), not
    the whole body.  Once the origin reads, the body arrives byte for byte."""
    size = 128 * MiB
    sink.paused = True
    visitor = await connect(sink_tagd.port)
    answer, writer = upload(visitor, size)
    await eventually(lambda: sink.uploads)
    held_at = await within(Deferred.fromCoroutine(stalled(writer)))
    assert sink.uploads[0].received < held_at
    assert held_at < 24 * MiB, f"tagd took {held_at / MiB:.0f} MiB from the visitor meanwhile"
    sink.resume()
    response = await within(answer, 60)
    assert (response.status, bytes(response.body)) == (200, b"received %d" % size)
    (seen,) = sink.uploads
    assert seen.sha256 == pattern_sha256(size)
    assert seen.header(b"content-length") == [b"%d" % size]


@pytest.mark.parametrize(
    "size, framing",
    [(SMALL_BODY, "content-length"), (SMALL_BODY + 1, "chunked"), (8 * MiB, "chunked")],
    ids=["64KiB-collected", "64KiB+1-streamed", "8MiB-streamed"],
)
@pytest_twisted.ensureDeferred
async def test_chunked_upload_reaches_the_origin_byte_exact(sink_tagd, sink, connect, size, framing):
    """A chunked upload arrives whole and unchanged.  Up to 64 KiB tagd collects it and
    sends it with a Content-Length (what origins handle best); a longer one streams on in
    chunks of tagd's own framing."""
    visitor = await connect(sink_tagd.port)
    answer, _ = upload(visitor, size, chunked=True)
    response = await within(answer, 30)
    assert (response.status, bytes(response.body)) == (200, b"received %d" % size)
    (seen,) = sink.uploads
    assert seen.complete and seen.sha256 == pattern_sha256(size)
    if framing == "chunked":
        assert (seen.header(b"transfer-encoding"), seen.header(b"content-length")) == ([b"chunked"], [])
    else:
        assert (seen.header(b"transfer-encoding"), seen.header(b"content-length")) == ([], [b"%d" % size])


@pytest_twisted.ensureDeferred
async def test_streamed_uploads_keep_both_connections_alive(sink_tagd, sink, connect):
    """Two large uploads, one after the other on one visitor connection, both arrive, and
    the second goes out on the origin connection the first one used."""
    visitor = await connect(sink_tagd.port)
    for size in (3 * MiB, 5 * MiB + 7):
        answer, _ = upload(visitor, size)
        response = await within(answer, 30)
        assert (response.status, bytes(response.body)) == (200, b"received %d" % size)
    assert [u.sha256 for u in sink.uploads] == [pattern_sha256(3 * MiB), pattern_sha256(5 * MiB + 7)]
    assert sink.web.accepted == 1


@pytest_twisted.ensureDeferred
async def test_request_sent_right_after_a_streamed_upload(sink_tagd, sink, connect):
    """A visitor that sends its next request before the answer to its upload (pipelining)
    gets both answers, in order."""
    size = 2 * MiB  # fits in the socket buffers while the origin reads nothing
    sink.paused = True
    visitor = await connect(sink_tagd.port)
    answer, writer = upload(visitor, size)
    await eventually(lambda: writer.stopped)
    after = visitor.request(b"GET", b"/after")
    sink.resume()
    response = await within(answer)
    assert (response.status, bytes(response.body)) == (200, b"received %d" % size)
    response = await within(after)
    assert (response.status, bytes(response.body)) == (200, b"received 0")
    assert sink.uploads[0].sha256 == pattern_sha256(size)


@pytest.mark.parametrize("origin_reading", [True, False], ids=["origin-reading", "origin-paused"])
@pytest_twisted.ensureDeferred
async def test_visitor_leaving_mid_upload_aborts_the_origin_request(
    sink_tagd, sink, connect, logged_failures, origin_reading
):
    """A visitor who disconnects halfway through an upload makes tagd drop the origin
    request, whether the origin was reading or had stopped: the origin sees its
    connection lost, none is left open, and tagd goes on serving."""
    sink.paused = not origin_reading
    visitor = await connect(sink_tagd.port)
    _, writer = upload(visitor, 64 * MiB)
    await eventually(lambda: sink.uploads and (sink.uploads[0].received > MiB or not origin_reading))
    visitor.transport.abortConnection()
    await origin_request_dropped(sink)
    await still_serves(connect, sink_tagd.port)
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_origin_dying_mid_upload_gives_502_or_a_cut(sink_tagd, sink, connect, logged_failures):
    """When the origin's connection dies halfway through an upload, the visitor gets a
    502 (or, when it is still sending, a cut connection), and its connection ends; tagd
    logs no error and goes on serving."""
    sink.die_after = 2 * MiB
    visitor = await connect(sink_tagd.port)
    answer, _ = upload(visitor, 64 * MiB)
    response = await closing_answer(visitor, answer)
    assert response is None or response.status == 502
    assert 2 * MiB <= sink.uploads[0].received < 64 * MiB
    sink.die_after = None
    await still_serves(connect, sink_tagd.port)
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_upload_to_an_unreachable_origin_gives_502(start_tagd, connect, logged_failures):
    """With nothing listening at the origin's address, a large upload gets a 502 (or a
    cut, while the visitor is still sending), and the visitor's connection ends."""
    tagd = await start_tagd(origin=f"http://127.0.0.1:{free_port()}")
    visitor = await connect(tagd.port)
    answer, _ = upload(visitor, 64 * MiB)
    response = await closing_answer(visitor, answer)
    assert response is None or response.status == 502
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_origin_refusing_an_upload_early(sink_tagd, sink, connect, logged_failures):
    """An origin that answers 413 without reading the body: the visitor gets that answer
    with Connection: close and its connection ends (the rest of its body could not be
    told from a next request); tagd closes the origin connection too."""
    sink.answer_early = True
    visitor = await connect(sink_tagd.port)
    answer, _ = upload(visitor, 64 * MiB)
    response = await closing_answer(visitor, answer)
    assert response is None or (response.status, bytes(response.body)) == (413, b"too large")
    await eventually(lambda: sink.web.open == 0)
    sink.answer_early = False
    await still_serves(connect, sink_tagd.port)
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_origin_refusing_uploads_early_over_tls(reactor, start_tagd, sink, tmp_path, logged_failures):
    """Early refusals to visitors on TLS, which goes on delivering what the visitor sent
    while the connection shuts down: whether the rest of the body was still on its way or
    already in, each visitor gets the whole 413, and tagd logs no error."""
    keys = self_signed(tmp_path)
    tagd = await start_tagd(origin=sink.url, listen=f"ssl:0:interface=127.0.0.1:{keys}")
    sink.answer_early = True
    for size in range(100_000, 1_000_000, 50_000):
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", tagd.port, CertificateOptions(verify=False))
        visitor = await within(connectProtocol(endpoint, WireVisitor()))
        answer, _ = upload(visitor, size)
        response = await within(answer)
        assert (response.status, bytes(response.body), response.complete) == (413, b"too large", True), size
        visitor.transport.abortConnection()
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_origin_not_reading_an_upload_gives_504(start_tagd, sink, connect):
    """An origin that stops reading an upload for longer than response_timeout gets the
    visitor a 504 (or a cut, while it is still sending) and is abandoned."""
    tagd = await start_tagd(origin=sink.url, response_timeout=0.5)
    sink.paused = True
    visitor = await connect(tagd.port)
    answer, _ = upload(visitor, 64 * MiB)
    response = await answer_or_cut(answer)
    if response is not None:
        assert response.status == 504
    await origin_request_dropped(sink)


@pytest_twisted.ensureDeferred
async def test_expect_continue_streamed_upload(sink_tagd, sink, connect):
    """A visitor that sends C{Expect: 100-continue} and waits for it before a large body
    gets one 100 Continue (the origin's own is not passed on) and then the origin's
    answer to the whole body."""
    size = 4 * MiB
    visitor = await connect(sink_tagd.port)
    answer = visitor.expect(b"PUT")
    visitor.send(upload_head(size, headers=[(b"Expect", b"100-continue")]))
    await eventually(lambda: visitor.received)  # the 100 Continue
    BodyWriter(visitor.transport, size).start()
    response = await within(answer, 30)
    assert [r.status for r in response.interim] == [100]
    assert (response.status, bytes(response.body)) == (200, b"received %d" % size)
    assert sink.uploads[0].sha256 == pattern_sha256(size)


@pytest_twisted.ensureDeferred
async def test_broken_chunked_upload_aborts_the_origin_request(sink_tagd, sink, connect):
    """A chunked upload that turns into garbage after tagd began streaming it gets the
    visitor a 400 and its connection closed, and the origin request is dropped."""
    visitor = await connect(sink_tagd.port)
    visitor.expect(b"PUT")
    visitor.send(upload_head(None) + b"%x\r\n%s\r\n" % (2 * SMALL_BODY, b"c" * 2 * SMALL_BODY))
    await eventually(lambda: sink.uploads and sink.uploads[0].received == 2 * SMALL_BODY)
    visitor.send(b"not a chunk size\r\n")
    await within(sink.uploads[0].lost, 5)
    await within(visitor.closed)
    assert not sink.uploads[0].complete


# -- memory, with tagd as users run it --------------------------------------------------



@pytest_twisted.async_yield_fixture
async def tagd_process(sink, tmp_path):
    """A twistd-run tagd in front of the sink; yields (pid, port)."""
    async with twistd_tagd(sink.url, tmp_path) as started:
        yield started


@pytest_twisted.ensureDeferred
async def test_large_upload_keeps_tagd_memory_flat(tagd_process, sink, connect):
    """A 200 MB upload goes through a twistd-run tagd to an origin that reads nothing for a
    second and then reads at full speed; tagd's resident memory grows by less than 5 MB,
    so it never holds the body, and the body arrives byte for byte."""
    size = 200 * MB
    pid, port = tagd_process
    visitor = await connect(port)
    assert (await within(visitor.request(b"GET", b"/"))).status == 200  # warmed up
    with sampling_memory(pid) as memory:
        sink.paused = True
        answer, _ = upload(visitor, size)
        await sleep(1.0)
        sink.resume()
        response = await within(answer, 60)
    assert (response.status, bytes(response.body)) == (200, b"received %d" % size)
    assert sink.uploads[-1].sha256 == pattern_sha256(size)
    assert memory.growth < 5 * MB, f"tagd grew by {memory.growth / MB:.1f} MB"
