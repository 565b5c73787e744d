"""The visitor-facing Twisted Web site, trimmed for a proxy's hot path, and able to
forward a request before its body has arrived.

Twisted Web's channel writes a response head as dozens of small pieces, each checked on
its own, and asks the kernel for the local address (and the transport whether it is TLS)
on every request.  A proxy answers
every request of a connection from the same socket with headers that
L{twisted.web.http_headers.Headers} has already sanitised, so the head is joined once and
the local address is looked up once per connection.

The head is also held back until the body's first bytes, so that head and body leave in
one send straight to the socket (L{tagd.writes.send_now}) instead of two writes queued
for the reactor's next turn: one system call instead of three (two of them
C{epoll_ctl}) for a typical page, whose head and body the origin sends together.
"""

from __future__ import annotations

from io import BytesIO

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.server import Request, Site

from tagd.config import ProxyConfig
from tagd.deadlines import RequestDeadline, RequestTimedOut
from tagd.metrics import Metrics
from tagd.proxy import SMALL_BODY, ProxyResource
from tagd.throttle import Throttle
from tagd.writes import send_now

log = Logger()

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\nDate: %s\r\n\r\n"


class ProxyRequest(Request):
    """A request handed straight to the site's one resource, its body left unparsed.

    Twisted Web would parse form bodies (and answer 400 to a multipart body it cannot
    parse) and walk the resource tree; a proxy forwards bodies untouched, and its
    resource answers every path.

    Twisted Web also collects the whole body before it hands a request on.  That stays
    so for bodies up to L{SMALL_BODY}; a larger one (by its Content-Length, or a chunked
    one once it has grown past that) is forwarded as it arrives, the request's own
    C{content} left empty.
    """

    _parsePOSTFormSubmission = False
    _upload = None  # takes the body's pieces once the request is forwarded early
    _chunked = False  # a chunked body, collected until it proves large
    _refused = False  # answered 400 at header time; nothing to forward

    def parseCookies(self) -> None:
        """Left undone: the Cookie header goes to the origin as it came, and tagging reads
        the few cookies it needs from it (L{tagd.identity})."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if len(self.requestHeaders.getRawHeaders(b"host", ())) > 1:
            # RFC 9112 section 3.2: the origin and tagging might each believe another one.
            self._refused = True
            self.channel._respondToBadRequestAndDisconnect()
            return
        if length is None:
            self._chunked = True
        elif length > SMALL_BODY:
            self._forward(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        if self._upload is not None:
            self._upload.data(data)
            return
        content = self.content
        content.write(data)
        if self._chunked and content.tell() > SMALL_BODY:
            self.content = BytesIO()
            self._forward(None)
            self._upload.data(content.getvalue())

    def _forward(self, length: int | None) -> None:
        """Start the origin request now; the request line is still the channel's alone."""
        channel = self.channel
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        resource: ProxyResource = channel.site.resource
        self._upload = resource.stream(self, length)

    def process(self) -> None:
        if self._refused:
            return
        if self._upload is not None:
            self._upload.end()
            return
        self.site = self.channel.site
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())


class TagdChannel(HTTPChannel):
    """An HTTP/1.1 channel that writes each response head in one piece, with the body's
    first bytes when they are at hand, and holds the visitor to the deadlines of
    L{tagd.deadlines}.

    A held head goes out with the next write, when the request is done (a response
    without a body), or when L{release_head} says that no body bytes are at hand.
    """

    _host = None
    _secure = None
    _held = b""  # the response head, not yet written

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        site.connections += 1
        self._deadline = RequestDeadline(site.reactor, site.config, self)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline.read(len(data)):
            super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._deadline.head_done()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._deadline.body_done()
        super().allContentReceived()

    def loseConnection(self) -> None:
        self._deadline.closing()
        super().loseConnection()

    def connectionLost(self, reason) -> None:
        self._deadline.stop()
        self.site.connections -= 1
        super().connectionLost(reason)

    def hold_body(self) -> None:
        """Stop reading the visitor while the origin takes its body slower than it comes;
        the body's deadline waits meanwhile."""
        self._deadline.held()
        self.transport.pauseProducing()

    def release_body(self) -> None:
        """Read the body again, unless the channel paused reading itself until its own
        writes drain (it resumes then)."""
        self._deadline.released()
        if not self._waitingForTransport:
            self.transport.resumeProducing()

    def deadline_passed(self, reason: str) -> None:
        """The request's head or body is late: its exchange ends now (aborting the origin
        request of a streamed upload), the visitor gets a 408 unless part of an answer is
        already out, and the connection closes."""
        requests, self.requests = self.requests, []
        answer_begun = bool(requests) and requests[-1].startedWriting and not self._held
        self._held = b""
        for request in requests:
            request.connectionLost(Failure(RequestTimedOut(reason)))
        if not answer_begun:
            self.transport.write(_TIMED_OUT % datetimeToString())
        self.site.timed_out(reason, answer_begun)
        self.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        if not self.requests:
            # The rest of a body whose request was answered early (the origin refused
            # or broke off an upload): the connection is closing, but a TLS transport
            # may still deliver what was in flight.
            return
        super().rawDataReceived(data)

    def writeHeaders(self, version, code, reason, headers) -> None:
        lines = [b"%s %s %s" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s" % (name, value))
        lines.append(b"\r\n")
        self._held = b"\r\n".join(lines)

    def write(self, data: bytes) -> None:
        held = self._held
        if held:
            self._held = b""
            data = held + data
        send_now(self.transport, data)

    def writeSequence(self, iovec) -> None:
        self.write(b"".join(iovec))

    def release_head(self) -> None:
        """Write a held response head now: no body bytes are at hand to join it."""
        if self._held:
            self.write(b"")

    def requestDone(self, request) -> None:
        self.release_head()
        self._deadline.request_done()
        super().requestDone(request)

    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure


class _Refused(Protocol):
    """A connection beyond C{max_connections}: closed as soon as it is accepted.

    Cheaper than a C{503}, and no less clear: an answer written before the request is read
    would often be lost anyway, to the reset the kernel sends when it closes a socket
    with unread bytes, and it would cost a channel, a timer and a write for each refused
    connection during the flood the cap is there for.
    """

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class TagdSite(Site):
    """The site in front of the proxy resource; access lines are left to the metrics.

    It counts the visitor connections open and refuses new ones beyond C{max_connections}
    (see L{_Refused}), so that a flood of connections cannot use up tagd's file
    descriptors, which the origin, the spool and the platforms need too.
    """

    protocol = TagdChannel
    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(self, resource: ProxyResource, config: ProxyConfig, metrics: Metrics, *, reactor) -> None:
        super().__init__(resource, reactor=reactor)
        self.config = config
        self.connections = 0
        self._refused_total = metrics.visitor_connections_refused
        metrics.visitor_connections.set_function(lambda: self.connections)
        self._refusals = Throttle(reactor.seconds)
        self._timeouts = Throttle(reactor.seconds)

    def buildProtocol(self, addr):
        if self.connections < self.config.max_connections:
            return super().buildProtocol(addr)
        self._refused_total.inc()
        count = self._refusals()
        if count:
            log.warn(
                "{open} visitor connections open, as many as max_connections allows: {count} "
                "new one(s) refused since the last such line (said once a minute at most; "
                "all counted in tagd_visitor_connections_refused_total)",
                open=self.connections,
                count=count,
            )
        return _Refused()

    def timed_out(self, reason: str, answer_begun: bool) -> None:
        """Count the 408 (unless an answer had begun instead) of a request given up at a
        deadline, and log it once a minute at most."""
        if not answer_begun:
            self.resource.count(408)
        count = self._timeouts()
        if count:
            log.info(
                "visitor connection closed, {reason}: {count} such since the last line "
                "(said once a minute at most)",
                reason=reason,
                count=count,
            )

    def log(self, request) -> None:
        pass
