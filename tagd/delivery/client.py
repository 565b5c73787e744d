"""tagd's agent for the platforms' APIs: an L{IAgent}, the interface treq is built on, so
that answers are read with C{treq.collect} and any C{treq.HTTPClient} can be built over it.

Why not Twisted's L{twisted.web.client.Agent} beneath: a GA4 delivery is one small POST
per visitor, and treq's C{HTTPClient} on Agent costs about 330 us of CPU per POST, where a
whole proxied request costs about 150: Agent's per-request work (parsing the URL again,
an endpoint and a pool key, a cooperator running the body producer, a line-based parser,
a chain of Deferreds) about 210 of it, and C{HTTPClient}'s layers over any agent (its
cookie, redirect and decoder wrappers) about 120 (C{bench/platform_client_cpu.py}); this
agent with C{treq.collect} costs about 48.  So tagd calls the agent itself.  Platform APIs
need none of those: they answer neither with redirects nor, unasked, with gzip, and set no
cookies that matter.  So a URI is parsed once and its head prefix kept, connections are
kept per (scheme, host, port), a body of bytes (L{BytesProducer}) is written at once,
and answers are parsed by llhttp (through httptools, as the origin client does),
strictly, a whole read at a time.

What it keeps of Agent's: certificate verification (L{optionsForClientTLS}, the
system's trust store), persistent connections (as many idle per host as requests may be
in flight), cancellation (closing the connection, so a timeout never leaves one
half-read), answers framed by length, by chunks or by the connection's end (then
C{PotentialDataLoss}, as Agent), a body protocol that pauses the connection until it is
given, and the connection closed when that protocol gives up (C{loseConnection}, which
C{treq.collect} calls when its collector raises).  A kept connection the platform has
closed (or written to while idle) is noticed before reuse and never used; a POST is never
sent twice by this agent: the dispatcher decides about another attempt, and the
platforms' deduplication makes it harmless.
"""

from __future__ import annotations

import re
import socket
from typing import Callable
from urllib.parse import urlsplit

import attrs
from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer, ISystemHandle
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer

from tagd.proxy.origin import tcp_endpoint, unread_bytes
from tagd.proxy.writes import send_now

# An answer's head (status line and headers), at most, and its headers, at most: a
# platform's are a kilobyte and a dozen or two.
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
# Seconds a connection may sit idle in the pool and still be used: platforms close idle
# connections after a minute or more, and a connection they closed is never reused.
IDLE_TIMEOUT = 50.0
# Seconds a new connection may take (name resolution, TCP, TLS); a request's own
# timeout usually ends it earlier.
CONNECT_TIMEOUT = 30.0
# Seconds the platforms get to answer a clean close on shutdown, before a reset.
CLOSE_GRACE = 1.0
# URIs whose parsed form is kept: a destination's few endpoints, many times over.
_KEPT_URIS = 256
# A URI's target may hold no line break or other control character, nor may a header's
# value: Twisted's L{Headers} has turned line breaks into spaces, the others it keeps.
_BAD_FIELD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The framing is the agent's own: a caller's would contradict it.  (L{Headers} gives
# names in this case.)
_FRAMING = (b"Content-Length", b"Transfer-Encoding", b"Host")
_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}


class PlatformProtocolError(Exception):
    """The platform sent something that is not a valid HTTP/1.1 answer."""


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, as the platforms' are: L{PlatformAgent} sends
    its bytes with the head, running no producer; any other agent gets them written at
    once by C{startProducing}."""

    __slots__ = ("body", "length")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IConsumer)
class _Gathering:
    """Where another producer's body goes: the agent sends a body whole, with its length
    (platform requests are kilobytes), so that no request is ever sent chunked."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@implementer(IClientRequest)
@attrs.frozen
class _SentRequest:
    method: bytes
    absoluteURI: bytes
    headers: Headers


@implementer(IPushProducer)
class _BodyTransport:
    """The transport an answer's body protocol is given: stopping it or losing it closes
    the connection, unless the answer was read whole and its connection kept for another."""

    disconnecting = False

    def __init__(self, response: _Response) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        self._response.pause(True)

    def resumeProducing(self) -> None:
        self._response.pause(False)

    def stopProducing(self) -> None:
        abandon(self._response)

    loseConnection = stopProducing


@implementer(IResponse)
class _Response:
    """A platform's answer, given when its head is in; its body is kept until a protocol
    is given (L{deliverBody}).  C{headers} is built when first read: only throttles
    (C{Retry-After}) and Meta (its version warning) look at them."""

    __slots__ = (
        "code", "phrase", "version", "length", "previousResponse",
        "_raw", "_headers", "_sent", "_connection", "_parts", "_protocol", "_end", "_paused", "_given_up",
    )  # fmt: skip

    def __init__(self, connection: _Connection, sent: tuple, version, code: int, phrase: bytes, raw: list, length) -> None:
        self.code = code
        self.phrase = phrase
        self.version = version
        self.length = length
        self.previousResponse = None
        self._raw = raw
        self._headers: Headers | None = None
        self._sent = sent
        self._connection: _Connection | None = connection  # until it carries another
        self._parts: list[bytes] = []
        self._protocol = None
        self._end: Failure | None = None  # why the body ended, once it has
        self._paused = False
        self._given_up = False  # by its protocol: no more of the body is wanted

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            headers = Headers()
            for name, value in self._raw:
                headers.addRawHeader(name, value.strip(b" \t"))
            self._headers = headers
        return self._headers

    @property
    def request(self) -> IClientRequest:
        method, uri, headers = self._sent
        return _SentRequest(method, uri, Headers() if headers is None else headers)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol) -> None:
        if self._protocol is not None or self._parts is None:
            raise RuntimeError("the body was already delivered")
        protocol.makeConnection(_BodyTransport(self))
        parts, self._parts = self._parts, None
        self._protocol = protocol
        for data in parts:
            if self._given_up:
                break  # the protocol gave up (its transport lost), the body with it
            protocol.dataReceived(data)
        if self._end is not None:
            protocol.connectionLost(self._end)
        elif self._paused:
            self._paused = False
            self.pause(False)

    # The connection's reports.

    def received(self, data: bytes) -> None:
        if self._parts is not None:
            self._parts.append(data)
            if not self._paused:  # no protocol yet: no more reads until there is one
                self._paused = True
                self.pause(True)
        elif not self._given_up:
            self._protocol.dataReceived(data)

    def ended(self, reason: Failure) -> None:
        if self._end is None:
            self._end = reason
            if self._protocol is not None:
                self._protocol.connectionLost(reason)

    def pause(self, paused: bool) -> None:
        connection = self._connection
        if connection is not None and connection.serving is self:
            connection.pause_reads(paused)

    def abandon(self) -> None:
        """Close the connection, unless it carries another exchange by now; the body's
        protocol hears of it when the connection is gone, as with Agent."""
        connection, self._connection = self._connection, None
        self._given_up = True
        if connection is not None and (connection.serving is self or connection.idle_after is self):
            connection.discard()


def abandon(response: IResponse) -> None:
    """Close the connection of an answer of L{PlatformAgent}'s that is no longer wanted
    (a timeout while its body trickles): neither L{IResponse} nor C{treq.collect} has a
    call for it.  The answer of another agent is left to that agent."""
    if isinstance(response, _Response):
        response.abandon()


class _Target:
    """A URI, parsed: where to connect, and the start of every request's head to it."""

    __slots__ = ("key", "host", "port", "tls", "line", "host_line")

    def __init__(self, uri: bytes) -> None:
        parts = urlsplit(uri.decode("ascii"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http or https URI")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (self.tls, self.host, self.port)
        path = parts.path or "/"
        target = f"{path}?{parts.query}" if parts.query else path
        netloc = parts.netloc.rpartition("@")[2]  # never the user info (a webhook's key)
        if _BAD_FIELD.search(target.encode()) or " " in target:
            raise ValueError("the URI holds a space or a control character")
        self.line = f" {target} HTTP/1.1\r\n".encode()
        self.host_line = f"Host: {netloc}\r\n".encode()


def _fields(headers: Headers | None, target: _Target) -> bytes:
    """The header lines of C{headers}, with the host's unless they give it; none may
    hold a control character, nor frame the message (the agent does)."""
    if headers is None:
        return target.host_line
    parts: list[bytes] = []
    host = target.host_line
    for name, values in headers.getAllRawHeaders():
        if name in _FRAMING:
            if name != b"Host":
                raise ValueError("the agent frames the body itself")
            host = b""
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    joined = b"".join(parts)
    lines = len(parts) // 4
    if joined.count(b"\n") != lines or joined.count(b"\r") != lines or _CONTROL.search(joined):
        raise ValueError("a header holds a line break or a control character")
    return host + joined


class _Request:
    """One request on its way: what it sends, and what to cancel to give it up."""

    __slots__ = ("head", "body", "sent", "deferred", "connection", "connecting")

    def __init__(self, head: bytes, body: bytes, sent: tuple) -> None:
        self.head = head
        self.body = body
        self.sent = sent  # method, URI, headers: the answer's C{request}
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: Deferred | None = None

    def _cancel(self, deferred: Deferred) -> None:
        # The Deferred fails with CancelledError once this returns; what the connection
        # then reports (aborted) goes nowhere.
        if self.connection is not None:
            self.connection.abandon(self)
        elif self.connecting is not None:
            self.connecting.cancel()


@implementer(IAgent)
class PlatformAgent:
    """Persistent HTTP/1.1 connections to the platforms, kept per (scheme, host, port).

    @param pool_size: idle connections kept per host, at most: as many as requests to it
        may be in flight, so that none is opened afresh (a TLS handshake) per request.
    @param tls: the TLS options for a host name; by default the system's trust store.
    """

    def __init__(
        self,
        reactor,
        pool_size: int = 10,
        *,
        tls: Callable[[str], object] = optionsForClientTLS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.pool_size = pool_size
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._targets: dict[bytes, _Target] = {}
        self._methods: set[bytes] = set()
        self._endpoints: dict[tuple, object] = {}
        self._idle: dict[tuple, list[_Connection]] = {}
        self._connections: set[_Connection] = set()
        self._closing: Deferred | None = None  # fires once every connection is gone
        self._closed = False

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        """Send one request (never C{HEAD}: its answer would be read for a body); the
        Deferred fires with the answer once its head is in, or fails (no answer: the
        connection failed or closed early, the answer was invalid).  Cancelling it
        closes the connection."""
        target = self._targets.get(uri)
        try:
            if target is None:
                target = self._target(uri)
            if method not in self._methods:
                self._method(method)
            head = method + target.line + _fields(headers, target)
        except ValueError:  # UnicodeDecodeError too
            return fail()
        sent = (method, uri, headers)
        if type(bodyProducer) is BytesProducer:
            request = _Request(head + b"Content-Length: %d\r\n\r\n" % bodyProducer.length, bodyProducer.body, sent)
        elif bodyProducer is None:
            framing = b"Content-Length: 0\r\n\r\n" if method in (b"POST", b"PUT", b"PATCH") else b"\r\n"
            request = _Request(head + framing, b"", sent)
        else:
            return self._produced(bodyProducer).addCallback(
                lambda body: self.request(method, uri, headers, BytesProducer(body))
            )
        connection = self._idle_connection(target.key)
        if connection is not None:
            connection.send(request)
        else:
            self._connect(target, request)
        return request.deferred

    def _target(self, uri: bytes) -> _Target:
        target = _Target(uri)
        if len(self._targets) >= _KEPT_URIS:
            self._targets.clear()
        self._targets[uri] = target
        return target

    def _method(self, method: bytes) -> None:
        if not _TOKEN.fullmatch(method) or method == b"HEAD":
            raise ValueError("not a method this agent sends")
        if len(self._methods) < 16:
            self._methods.add(method)

    def _produced(self, producer: IBodyProducer) -> Deferred[bytes]:
        """The whole body of another producer (C{FileBodyProducer}, as treq uses), of
        the length it gave, if it gave one."""
        gathering = _Gathering()
        producing = Deferred(lambda _: producer.stopProducing())
        producer.startProducing(gathering).chainDeferred(producing)

        def whole(_) -> bytes:
            body = b"".join(gathering.parts)
            if producer.length is not UNKNOWN_LENGTH and producer.length != len(body):
                raise ValueError("the body is not of the length its producer gave")
            return body

        return producing.addCallback(whole)

    def _idle_connection(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        deadline = self._reactor.seconds() - self._idle_timeout
        while idle:
            connection = idle.pop()
            connection.idle = False
            if connection.idle_since < deadline or connection.has_unread_bytes():
                connection.discard()
                continue
            return connection
        return None

    def _connect(self, target: _Target, request: _Request) -> None:
        endpoint = self._endpoints.get(target.key)
        if endpoint is None:
            endpoint = tcp_endpoint(self._reactor, target.host, target.port, CONNECT_TIMEOUT)
            if target.tls:
                endpoint = wrapClientTLS(self._tls(target.host), endpoint)
            self._endpoints[target.key] = endpoint
        request.connecting = connecting = endpoint.connect(_Factory(self, target.key))

        def connected(connection: _Connection) -> None:
            request.connecting = None
            connection.send(request)

        def failed(failure: Failure) -> None:
            request.connecting = None
            if not request.deferred.called:
                request.deferred.errback(failure)

        connecting.addCallbacks(connected, failed)

    # The connections' reports.

    def added(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def release(self, connection: _Connection) -> None:
        """Keep a connection whose exchange ended cleanly, or close it if enough are kept."""
        idle = self._idle.setdefault(connection.key, [])
        if not self._closed and len(idle) < self.pool_size:
            connection.idle_since = self._reactor.seconds()
            connection.idle = True
            idle.append(connection)
        else:
            connection.transport.loseConnection()

    def lost(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if connection.idle:
            connection.idle = False
            self._idle[connection.key].remove(connection)
        if self._closing is not None and not self._connections:
            closing, self._closing = self._closing, None
            closing.callback(None)

    def close(self) -> Deferred[None]:
        """Close every connection (idle ones cleanly, busy ones at once); fires when all
        are gone, within L{CLOSE_GRACE} seconds: a TLS peer that never answers the
        close cannot hold up shutdown.  Requests made afterwards still go, each on a
        connection of its own."""
        self._closed = True
        idle = {connection for kept in self._idle.values() for connection in kept}
        for connection in idle:
            connection.idle = False
        self._idle.clear()
        if not self._connections:
            return succeed(None)
        self._closing = closing = Deferred()
        for connection in list(self._connections):
            if connection in idle:
                connection.transport.loseConnection()
            else:
                connection.transport.abortConnection()
        if self._connections:
            cutting = self._reactor.callLater(CLOSE_GRACE, self._abort_all)
            closing.addBoth(lambda result: cutting.cancel() if cutting.active() else None)
        return closing

    def _abort_all(self) -> None:
        for connection in list(self._connections):
            connection.transport.abortConnection()


class _Factory(ClientFactory):
    """Builds the connection of one connection attempt; quiet, since platform
    connections come and go (Twisted would log two lines for each)."""

    noisy = False

    def __init__(self, agent: PlatformAgent, key: tuple) -> None:
        self._agent = agent
        self._key = key

    def buildProtocol(self, addr) -> _Connection:
        return _Connection(self._agent, self._key)


class _ExtraBytes(Exception):
    """Bytes after a complete answer, in the same read."""


def _socket_of(transport) -> socket.socket | None:
    """The TCP socket beneath C{transport}, itself or under its TLS, if there is one."""
    while transport is not None:
        handle = transport.getHandle() if ISystemHandle.providedBy(transport) else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


class _Connection(Protocol):
    """One persistent connection to a platform, carrying one exchange at a time.

    llhttp checks the framing (no bare LF, no obs-fold, no conflicting lengths, valid
    chunk sizes); this adds the bounds (head, header count) and refuses anything but an
    HTTP/1.x answer.  The answer is given when a read completes its head, its body as
    reads bring it; the connection goes back to the pool only when the answer allows it
    and the read that completed it held nothing more.
    """

    idle_since = 0.0
    idle = False  # in the pool
    _socket = None
    serving: _Response | None = None  # the answer whose body is on its way
    _reads_paused = False
    idle_after: _Response | None = None  # the answer read whole before the pool took it

    def __init__(self, agent: PlatformAgent, key: tuple) -> None:
        self._agent = agent
        self.key = key
        self._request: _Request | None = None
        self._parser = HttpResponseParser(self)

    def connectionMade(self) -> None:
        self._agent.added(self)
        self._socket = _socket_of(self.transport)

    def send(self, request: _Request) -> None:
        request.connection = self
        self._request = request
        self.serving = self.idle_after = None
        self._received = 0  # bytes of the answer so far, head and body
        self._head: tuple | None = None
        self._body: list[bytes] = []  # of this read
        self._size = 0
        self._done = False
        self._reusable = False
        self._close_delimited = False
        if request.body:
            send_now(self.transport, request.head + request.body)
        else:
            send_now(self.transport, request.head)

    def abandon(self, request: _Request) -> None:
        """Give up C{request} (cancelled): the connection goes with it."""
        if self._request is request:
            self._request = None
            self.transport.abortConnection()

    def pause_reads(self, paused: bool) -> None:
        """Stop reading while an answer's body has nowhere to go (or its protocol asks)."""
        if paused != self._reads_paused:
            self._reads_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def discard(self) -> None:
        """Close a connection that can no longer be trusted, at once."""
        self._request = None
        self.transport.abortConnection()

    def has_unread_bytes(self) -> bool:
        """Whether the platform sent something (or closed) since the last exchange ended,
        which the reactor has not read yet."""
        return unread_bytes(self._socket)

    # Receiving: llhttp calls the on_* methods while it parses a read.

    def dataReceived(self, data: bytes) -> None:
        if self._request is None:
            # Nothing may come while no request is out: the connection is not trusted.
            self.transport.abortConnection()
            return
        if not self._received and not data.startswith(b"HTTP/"[: len(data)]):
            self._fail(PlatformProtocolError("not an HTTP answer"))  # llhttp takes RTSP/ and ICE/ too
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserError as error:
            reason = error.__context__ if isinstance(error, HttpParserCallbackError) else error
            if isinstance(reason, _ExtraBytes):
                self._reusable = False
            elif isinstance(reason, PlatformProtocolError):
                self._fail(reason)
                return
            elif isinstance(reason, HttpParserError):
                self._fail(PlatformProtocolError(str(reason) or type(reason).__name__))
                return
            else:
                raise reason from None  # tagd's own fault, for Twisted to log
        if self._done:
            self._complete()
        elif self._head is None:
            if self._received > MAX_HEAD:
                self._fail(PlatformProtocolError("answer head too large"))
        elif self._received - self._size > MAX_HEAD + self._size:
            # Chunk sizes, extensions and trailers: no more of them than of the body.
            self._fail(PlatformProtocolError("chunked framing or trailers too large"))
        else:
            self._deliver()

    def on_message_begin(self) -> None:
        if self._done:
            raise _ExtraBytes()
        self._headers: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        self._length = UNKNOWN_LENGTH
        self._chunked = False

    def on_status(self, phrase: bytes) -> None:
        self._phrase = phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None:
            return  # a trailer of a chunked body
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise PlatformProtocolError("too many headers")
        size = len(name)  # compared first: most headers are neither of these two
        if size == 14 and name.lower() == b"content-length":
            self._length = int(value)  # llhttp has checked it: digits, given once
        elif size == 17 and name.lower() == b"transfer-encoding":
            if value.strip(b" \t").lower() != b"chunked" or self._chunked:
                raise PlatformProtocolError("unsupported transfer coding")  # gzip: never asked for
            self._chunked = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        if not 100 <= code <= 599 or code == 101:
            raise PlatformProtocolError("status code out of range")
        if code < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the answer follows
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise PlatformProtocolError("unsupported HTTP version")
        headers = self._headers
        if self._received > MAX_HEAD and sum(len(n) + len(v) + 4 for n, v in headers) > MAX_HEAD:
            raise PlatformProtocolError("answer head too large")  # it came in one read
        bodiless = code in (204, 304)
        self._close_delimited = not (bodiless or self._chunked or self._length is not UNKNOWN_LENGTH)
        self._reusable = parser.should_keep_alive() and not self._close_delimited
        self._head = (version, code, self._phrase, headers, 0 if bodiless else self._length)
        self._done = bodiless

    def on_body(self, data: bytes) -> None:
        if self._done:
            raise _ExtraBytes()
        self._size += len(data)
        self._body.append(data)

    def on_message_complete(self) -> None:
        if self._head is not None:
            self._done = True

    def _deliver(self) -> None:
        """Give the answer once its head is in, then the body this read brought."""
        response = self.serving
        if response is None:
            version, code, phrase, headers, length = self._head
            request = self._request
            self.serving = response = _Response(self, request.sent, version, code, phrase, headers, length)
            if not request.deferred.called:
                request.deferred.callback(response)
        body, self._body = self._body, []
        for data in body:
            response.received(data)

    def _complete(self) -> None:
        """The answer is complete, and so is the read that brought its end: the
        connection goes back to the pool (when the answer allows) or is closed, then the
        answer is told, so that what it sets off finds the connection kept."""
        request, self._request = self._request, None
        response, self.serving = self.serving, None
        body = self._body
        if response is None:  # all of it in this read: given whole
            version, code, phrase, headers, _ = self._head
            response = _Response(self, request.sent, version, code, phrase, headers, self._size)
            response._parts = body
            response._end = _DONE
        self.idle_after = response
        if self._reads_paused:  # the rest came in the read that was under way
            self.pause_reads(False)
        if self._reusable:
            self._agent.release(self)
        else:
            self.transport.loseConnection()
        if response._parts is body:
            if not request.deferred.called:
                request.deferred.callback(response)
        else:
            for data in body:
                response.received(data)
            response.ended(_DONE)

    def _fail(self, reason: Exception) -> None:
        request, self._request = self._request, None
        self.transport.abortConnection()
        failure = Failure(reason)
        response, self.serving = self.serving, None
        if response is not None:
            response.ended(Failure(ResponseFailed([failure])))
        elif request is not None and not request.deferred.called:
            request.deferred.errback(failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._agent.lost(self)
        self.idle_after = None
        request, self._request = self._request, None
        response, self.serving = self.serving, None
        if response is not None:
            if request is not None and self._close_delimited and reason.check(ConnectionDone):
                response.ended(Failure(PotentialDataLoss()))  # an answer framed by the connection's end
            else:
                response.ended(Failure(ResponseFailed([reason])))
        elif request is not None and not request.deferred.called:
            lost = ResponseFailed if self._received else ResponseNeverReceived
            request.deferred.errback(Failure(lost([reason])))


# How a body ended whole (the same each time: nothing of the answer's own is in it).
_DONE = Failure(ResponseDone("Response body fully received"))
