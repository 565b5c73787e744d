"""A real origin on loopback for the proxy's integration tests.

Two servers share one L{Origin}:

  - a C{twisted.web} site (L{Origin.port}) with the endpoints a shop's app could have:
    an echo, a page, a large body streamed by a push producer, chunked and slow
    (trickled) bodies, a 500, a path that never answers, 204, 304, several
    C{Set-Cookie} headers;
  - a raw server (L{Origin.raw_port}) that answers each path with the exact bytes a
    test registered, for what C{twisted.web} cannot produce: header names in any
    letter case, repeated tracking headers, hop-by-hop response headers, a response
    cut short, broken HTTP.  It serves C{/page} like the web origin.

Both count the TCP connections they accept and know which are still open, so that
tests can prove pooling and the absence of leaked connections.
"""

from __future__ import annotations

import hashlib
import json

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

TRACKING_HEADER = b"Worker-Tracking"

# The large bodies repeat this block; its length is prime so that block boundaries
# never line up with the 64 KiB reads and writes on the way, and a reordered or
# repeated piece changes the hash.
_BLOCK = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(2047))[:65521]

PAGE = b"<!doctype html><title>page</title>" + b"<p>0123456789abcdef</p>" * 400


def pattern(size: int):
    """Yield the C{size} bytes of a large body, in blocks (the same object repeated)."""
    full, rest = divmod(size, len(_BLOCK))
    for _ in range(full):
        yield _BLOCK
    if rest:
        yield _BLOCK[:rest]


def pattern_sha256(size: int) -> str:
    """The SHA-256 of the C{size}-byte body that C{/big?size=...} serves."""
    digest = hashlib.sha256()
    for block in pattern(size):
        digest.update(block)
    return digest.hexdigest()


class ConnectionCounter(WrappingFactory):
    """Wrap a server factory and keep count of the TCP connections it accepts."""

    noisy = False

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.accepted = 0

    @property
    def open(self) -> int:
        """How many accepted connections are still open."""
        return len(self.protocols)

    def registerProtocol(self, p) -> None:
        self.accepted += 1
        super().registerProtocol(p)

    def abort_all(self) -> None:
        """Cut every open connection (test teardown)."""
        for p in list(self.protocols):
            p.transport.abortConnection()


@attrs.define
class Seen:
    """One request as the origin received it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    lost: Deferred = attrs.field(factory=Deferred)  # fires if the connection ends first

    def header(self, name: bytes) -> list[bytes]:
        """The values of C{name} (any case), in the order received."""
        return [v for n, v in self.headers if n.lower() == name.lower()]


@attrs.frozen
class Echo:
    """What C{/echo} answers: the request as the origin received it."""

    method: str
    uri: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str
    connections: int  # TCP connections the origin had accepted by then

    @classmethod
    def parse(cls, body: bytes) -> "Echo":
        fields = json.loads(body)
        fields["headers"] = [tuple(pair) for pair in fields["headers"]]
        return cls(**fields)


@implementer(IPushProducer)
class BlockProducer:
    """Stream C{size} bytes of L{pattern} into a request, obeying pause and resume."""

    def __init__(self, request, size: int) -> None:
        self._request = request
        self._blocks = pattern(size)
        self.sent = 0
        self.pauses = 0
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped:
            block = next(self._blocks, None)
            if block is None:
                self._request.unregisterProducer()
                self._request.finish()
                self.stopped = True
                return
            self.sent += len(block)
            self._request.write(block)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def stopProducing(self) -> None:
        self.stopped = True


def _arg(request, name: bytes, default: float) -> float:
    values = request.args.get(name)
    return float(values[0]) if values else default


class _OriginResource(Resource):
    """The web origin's endpoints, chosen by the first path segment.

    Every endpoint records the request in L{Origin.seen}, and answers with the tracking
    header when the request carries C{X-Track} (its value becomes the header's).
    """

    isLeaf = True

    def __init__(self, origin: "Origin") -> None:
        super().__init__()
        self._origin = origin

    def render(self, request):
        body = request.content.read()
        seen = Seen(
            method=request.method,
            uri=request.uri,
            headers=[
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            body=body,
        )
        self._origin.seen.append(seen)
        request.notifyFinish().addErrback(lambda _: seen.lost.callback(None))
        if seen.header(b"x-track"):
            # The request asks for a tracking header: the page marks itself as a shop's would.
            request.setHeader(TRACKING_HEADER, seen.header(b"x-track")[0])
        name = request.postpath[0].decode("ascii") if request.postpath else ""
        handler = getattr(self, "page_" + name, None)
        if handler is None:
            request.setResponseCode(404)
            return b"no such origin page\n"
        return handler(request, seen)

    def page_echo(self, request, seen: Seen) -> bytes:
        """The request as received (method, URI, headers with duplicates, body digest) and
        how many connections the origin has accepted so far."""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {
                "method": seen.method.decode("ascii"),
                "uri": seen.uri.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in seen.headers],
                "body_length": len(seen.body),
                "body_sha256": hashlib.sha256(seen.body).hexdigest(),
                "connections": self._origin.web.accepted,
            }
        ).encode("utf-8")

    def page_page(self, request, seen: Seen) -> bytes:
        """A fixed HTML page with a Content-Length (HEAD gets the headers only)."""
        request.setHeader(b"Content-Type", b"text/html")
        request.setHeader(b"ETag", b'"page-1"')
        return PAGE

    def page_big(self, request, seen: Seen):
        """C{size} bytes of L{pattern} from a push producer; chunked if C{chunked=1}."""
        size = int(_arg(request, b"size", 1 << 20))
        if not request.args.get(b"chunked"):
            request.setHeader(b"Content-Length", b"%d" % size)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        producer = BlockProducer(request, size)
        self._origin.producers.append(producer)
        seen.lost.addCallback(lambda _: producer.stopProducing())
        producer.start()
        return NOT_DONE_YET

    def page_slow(self, request, seen: Seen):
        """C{parts} pieces of C{b"slow "}, one every C{delay} seconds (chunked, or sized)."""
        parts = int(_arg(request, b"parts", 5))
        delay = _arg(request, b"delay", 0.05)
        if request.args.get(b"sized"):
            request.setHeader(b"Content-Length", b"%d" % (5 * parts))
        request.write(b"")  # the status line and headers go out now

        def trickle(left: int) -> None:
            if left == 0:
                request.finish()
                return
            request.write(b"slow ")
            self._origin.later(seen, delay, trickle, left - 1)

        self._origin.later(seen, delay, trickle, parts)
        return NOT_DONE_YET

    def page_chunks(self, request, seen: Seen):
        """A chunked body written in several pieces over a few reactor turns."""
        pieces = [b"first,", b"second,", b"x" * 10000, b",last"]
        request.write(b"")

        def more(left: list[bytes]) -> None:
            if not left:
                request.finish()
                return
            request.write(left[0])
            self._origin.later(seen, 0.01, more, left[1:])

        more(pieces)
        return NOT_DONE_YET

    def page_status(self, request, seen: Seen) -> bytes:
        """Answer with the status code in the path, e.g. C{/status/500}."""
        code = int(request.postpath[1])
        request.setResponseCode(code)
        request.setHeader(b"X-Origin-Status", b"%d" % code)
        if code in (204, 304):
            # No body and no Content-Length, as a correct origin sends them.
            request.setHeader(b"ETag", b'"page-1"')
            request.write(b"")
            request.finish()
            return NOT_DONE_YET
        return b"origin says %d\n" % code

    def page_cut(self, request, seen: Seen):
        """Announce C{promise} bytes (or a chunked body with C{chunked=1}), send only
        C{send} of them, and close the connection a moment later."""
        send = int(_arg(request, b"send", 1000))
        if not request.args.get(b"chunked"):
            request.setHeader(b"Content-Length", b"%d" % _arg(request, b"promise", 10 * send))
        request.write(b"c" * send)
        self._origin.later(seen, 0.1, request.channel.transport.loseConnection)
        return NOT_DONE_YET

    def page_never(self, request, seen: Seen):
        """Never answer (the proxy must give up on its own)."""
        return NOT_DONE_YET

    def page_cookies(self, request, seen: Seen) -> bytes:
        """Three C{Set-Cookie} headers, in a known order, around other headers."""
        headers = request.responseHeaders
        headers.addRawHeader(b"Set-Cookie", b"a=1; Path=/")
        headers.addRawHeader(b"X-Between", b"yes")
        headers.addRawHeader(b"Set-Cookie", b"b=2; Path=/; HttpOnly")
        headers.addRawHeader(b"Set-Cookie", b"c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT")
        return b"cookies\n"


class _QuietSite(Site):
    noisy = False

    def log(self, request) -> None:
        pass


class _RawOriginProtocol(Protocol):
    """Answer each request (GET-style, body ignored) with the bytes registered for its path."""

    def connectionMade(self) -> None:
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            method, uri, _ = lines[0].split(b" ", 2)
            headers = [tuple(v.strip() for v in line.split(b":", 1)) for line in lines[1:]]
            self.factory.origin.seen.append(Seen(method, uri, headers, b""))
            answer, cut = self.factory.origin.raw_answers.get(
                uri, (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False)
            )
            self.transport.write(answer)
            if cut:
                self.transport.loseConnection()
                return


class Origin:
    """The test origin: start it, point tagd at it, read what it saw."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.seen: list[Seen] = []
        self.producers: list[BlockProducer] = []
        self.raw_answers: dict[bytes, tuple[bytes, bool]] = {
            b"/page": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAGE) + PAGE, False)
        }
        # Form bodies unparsed, so that a body Twisted Web would refuse still reaches the
        # echo: the tests see what tagd forwarded, not the test origin's verdict on it.
        self.web = ConnectionCounter(_QuietSite(_OriginResource(self), parsePOSTFormSubmission=False))
        raw = Factory.forProtocol(_RawOriginProtocol)
        raw.noisy = False
        raw.origin = self
        self.raw = ConnectionCounter(raw)
        self._ports = []
        self._calls = []

    def start(self) -> None:
        """Listen on two free loopback ports."""
        self._ports = [
            self._reactor.listenTCP(0, self.web, interface="127.0.0.1"),
            self._reactor.listenTCP(0, self.raw, interface="127.0.0.1"),
        ]
        self.port = self._ports[0].getHost().port
        self.raw_port = self._ports[1].getHost().port

    def answer_raw(self, uri: bytes, response: bytes, cut: bool = False) -> None:
        """Make the raw server answer C{uri} with exactly C{response}, closing after if C{cut}."""
        self.raw_answers[uri] = (response, cut)

    def later(self, seen: Seen, delay: float, f, *args) -> None:
        """Call C{f(*args)} after C{delay}, unless the request C{seen} has been lost."""
        if seen.lost.called:
            return
        call = self._reactor.callLater(delay, f, *args)
        self._calls.append(call)

    def stop(self) -> Deferred:
        """Stop listening, cancel pending trickles and cut whatever is still connected."""
        for call in self._calls:
            if call.active():
                call.cancel()
        for counter in (self.web, self.raw):
            counter.abort_all()
        return gatherResults([port.stopListening() for port in self._ports])
