"""The visitor-facing Twisted Web site, trimmed for a proxy's hot path, and able to
forward a request before its body has arrived.

Twisted Web's channel writes a response head as dozens of small pieces, each checked on
its own, and asks the kernel for the local address (and the transport whether it is TLS)
on every request.  A proxy answers
every request of a connection from the same socket with headers that
L{twisted.web.http_headers.Headers} has already sanitised, so the head is joined once and
the local address is looked up once per connection.

The head is also held back until the body's first bytes, so that head and body leave in
one send straight to the socket (L{tagd.proxy.writes.send_now}) instead of two writes queued
for the reactor's next turn: one system call instead of three (two of them
C{epoll_ctl}) for a typical page, whose head and body the origin sends together.
"""

from __future__ import annotations

import re
from io import BytesIO

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.server import Request, Site

from tagd.daemon.config import ProxyConfig
from tagd.proxy.deadlines import RequestDeadline, RequestTimedOut
from tagd.proxy.headers import asks_to_close, transfer_coding_refusal
from tagd.admin.metrics import Metrics
from tagd.proxy.paths import target_refusal
from tagd.proxy.resource import SMALL_BODY, ProxyResource
from tagd.proxy.writes import send_now

# Methods tagd refuses: CONNECT would ask the origin for a tunnel, and TRACE would echo
# the request back, cookies and all, where a page's script could read them (cross-site
# tracing).  What a refused one is told in Allow: the standard methods tagd forwards.
REFUSED_METHODS = frozenset({b"CONNECT", b"TRACE"})
FORWARDED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_TRANSFER_ENCODING = b"transfer-encoding:"
# A Host header's value (RFC 9110 section 7.2): a registered name or IPv4 address, or an
# IPv6 literal in brackets, and an optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?\Z")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\nDate: %s\r\n\r\n"


class ProxyRequest(Request):
    """A request handed straight to the site's one resource, its body left unparsed.

    Twisted Web would walk the resource tree (and, unless the site says otherwise, parse
    form bodies); a proxy forwards bodies untouched, and its resource answers every path.

    Twisted Web also collects the whole body before it hands a request on.  That stays
    so for bodies up to L{SMALL_BODY}; a larger one (by its Content-Length, or a chunked
    one once it has grown past that) is forwarded as it arrives, the request's own
    C{content} left empty.
    """

    _upload = None  # takes the body's pieces once the request is forwarded early
    _chunked = False  # a chunked body, collected until it proves large
    _refused = False  # answered at header time (see refuse); nothing to forward

    def parseCookies(self) -> None:
        """Left undone: the Cookie header goes to the origin as it came, and tagging reads
        the few cookies it needs from it (L{tagd.tagging.identity})."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if self._refused:
            return
        hosts = self.requestHeaders.getRawHeaders(b"host", ())
        if len(hosts) > 1:
            # RFC 9112 section 3.2: the origin and tagging might each believe another one.
            self.refuse(400, "two Host headers")
            return
        if hosts and not _HOST.match(hosts[0]):
            # The origin, and the URL tagging reports to the platforms, would take it as is.
            self.refuse(400, "a Host that is no host name or address")
            return
        if not hosts and self.channel._version == b"HTTP/1.1":
            self.refuse(400, "an HTTP/1.1 request without Host")  # RFC 9112 section 3.2
            return
        channel = self.channel
        if channel._command.upper() in REFUSED_METHODS:  # frameworks read methods in any case
            self.refuse(405, "CONNECT or TRACE, which tagd does not forward", b"Allow: " + FORWARDED_METHODS)
            return
        refusal = target_refusal(channel._path, channel.site.resource.under_prefix)
        if refusal is not None:
            self.refuse(400, refusal)
            return
        if length is None:
            self._chunked = True
        elif length > SMALL_BODY:
            self._forward(length)

    def refuse(self, code: int, reason: str, *headers: bytes) -> None:
        """Answer C{code} while the request is still being read, and close the connection:
        what the visitor sends after it could not be told from a next request.

        C{reason} goes to the log, at most once a minute (a peer can send these at will);
        C{headers} are more header lines for the answer.
        """
        if self._refused:
            return
        self._refused = True
        # Else the channel would follow the answer with a 100 Continue for a visitor who asks.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        channel.site.resource.count(code)
        channel.site.resource.warnings.warn(
            reason, "visitor request refused with {code}: {reason}", code=code, reason=reason
        )
        lines = [b"HTTP/1.1 %d %s" % (code, RESPONSES[code]), *headers]
        lines += [b"Date: " + datetimeToString(), b"Content-Length: 0", b"Connection: close"]
        channel.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        channel.loseConnection()

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


def _forges_lines(part: bytes) -> bool:
    return b"\r" in part or b"\n" in part or b"\0" in part


def _clean_head(version: bytes, code: bytes, reason: bytes, headers) -> tuple[bytes, int]:
    """The response head without the lines that would break out of their place: a reason
    phrase with CR, LF or NUL becomes the status code's own, such a header is left out."""
    if _forges_lines(reason):
        reason = RESPONSES.get(int(code), b"Unknown")
    lines = [b"%s %s %s" % (version, code, reason)]
    dropped = 0
    for name, values in headers.getAllRawHeaders():
        for value in values:
            if _forges_lines(name) or _forges_lines(value):
                dropped += 1
            else:
                lines.append(b"%s: %s" % (name, value))
    lines.append(b"\r\n")
    return b"\r\n".join(lines), dropped


class TagdChannel(HTTPChannel):
    """An HTTP/1.1 channel that writes each response head in one piece, with the body's
    first bytes when they are at hand, and holds the visitor to the deadlines of
    L{tagd.proxy.deadlines}.

    A held head goes out with the next write, when the request is done (a response
    without a body), or when L{release_head} says that no body bytes are at hand.
    """

    _host = None
    _secure = None
    _held = b""  # the response head, not yet written
    _idle_abort = None  # closes the connection for good if an idle close is not taken

    def headerReceived(self, line: bytes) -> bool:
        """Refuse a Transfer-Encoding other than plain chunked before Twisted Web reads it.

        Twisted Web ignores C{identity}, so that the body after it is read as a next
        request (or a chunked line after it wins), and answers other codings 400 where
        RFC 9112 wants 501.  The lines read so far count with this one, as one list.
        """
        if _CONTROL.search(line):
            # RFC 9110 section 5.5: no field holds a control character but HTAB; the
            # origin, or a framework's CGI layer, might read one as the end of a line.
            self.requests[-1].refuse(400, "a header line with a control character")
            return False
        if line[: len(_TRANSFER_ENCODING)].lower() == _TRANSFER_ENCODING:
            request = self.requests[-1]
            earlier = request.requestHeaders.getRawHeaders(b"transfer-encoding", [])
            refusal = transfer_coding_refusal(b",".join([*earlier, line[len(_TRANSFER_ENCODING) :]]))
            if refusal is not None:
                request.refuse(*refusal)
                return False
        return super().headerReceived(line)

    def checkPersistence(self, request, version: bytes) -> bool:
        """Whether the connection stays open after this request's response.

        Twisted Web reads only the first Connection line and splits it at spaces, so
        C{close, X-Foo} would keep the connection open; RFC 9110 section 7.6.1 makes it a
        list of tokens, on as many lines as the visitor likes.
        """
        if version != b"HTTP/1.1":
            return False
        connection = request.requestHeaders.getRawHeaders(b"connection")
        if connection is not None and asks_to_close(connection):
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

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
        if self._idle_abort is not None and self._idle_abort.active():
            self._idle_abort.cancel()
        self._deadline.stop()
        self.site.connections -= 1
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        """Close a connection idle for C{keepalive_timeout}, as Twisted Web does, but
        without its line: it names the peer's address, personal data, and would come
        once for every visitor who leaves a connection open.

        While a request is being read, its head's and body's deadlines rule instead
        (Twisted Web's idle timer runs until the whole body is in): the timer starts again.
        """
        if self._deadline.reading:
            self.resetTimeout()
            return
        self.loseConnection()
        self._idle_abort = self.callLater(self.abortTimeout, self.transport.abortConnection)

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
        self.site.timed_out(reason, answer_begun)
        if answer_begun:
            # Part of an answer is out: only a reset keeps it from looking complete (to an
            # HTTP/1.0 visitor, say, whose answer ends with the connection).
            self.transport.abortConnection()
            return
        self.transport.write(_TIMED_OUT % datetimeToString())
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
        head = b"\r\n".join(lines)
        # Each line ends in the one CRLF the join put there: any other CR, LF or NUL came
        # in a name, value or reason phrase and would let it forge lines of its own.
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines) or b"\0" in head:
            head, dropped = _clean_head(version, code, reason, headers)
            self.site.resource.forged_head(dropped)
        self._held = head

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

    Form bodies are the origin's to parse, or to refuse: Twisted Web would parse every
    small one, and answer 400 to a multipart body it cannot parse.

    It counts the visitor connections open and refuses new ones beyond C{max_connections}
    (see L{_Refused}), so that a flood of connections cannot use up tagd's file
    descriptors, which the origin, the spool and the platforms need too.
    """

    protocol = TagdChannel
    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(self, resource: ProxyResource, config: ProxyConfig, metrics: Metrics, *, reactor) -> None:
        super().__init__(
            resource, timeout=config.keepalive_timeout, parsePOSTFormSubmission=False, reactor=reactor
        )
        self.config = config
        self.connections = 0
        self._refused_total = metrics.visitor_connections_refused
        metrics.visitor_connections.set_function(lambda: self.connections)

    def buildProtocol(self, addr):
        if self.connections < self.config.max_connections:
            return super().buildProtocol(addr)
        self._refused_total.inc()
        self.resource.warnings.warn(
            "connections",
            "{open} visitor connections open, as many as max_connections allows: a new one "
            "refused (each counted in tagd_visitor_connections_refused_total)",
            open=self.connections,
        )
        return _Refused()

    def timed_out(self, reason: str, answer_begun: bool) -> None:
        """Count the 408 (unless an answer had begun instead) of a request given up at a
        deadline, and log it once a minute at most."""
        if not answer_begun:
            self.resource.count(408)
        self.resource.warnings.info("deadline", "visitor connection closed, {reason}", reason=reason)

    def log(self, request) -> None:
        pass
