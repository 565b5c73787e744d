"""tagd's HTTP/1.1 client for the platforms' APIs: one call, C{request}, answering with
the whole L{Answer} (status, headers, body).

Why not treq on L{twisted.web.client.Agent}: a GA4 delivery is one small POST per
visitor, and treq's and Agent's per-request work (parsing the URL twice, cookie, redirect
and decoder wrappers, an endpoint and a pool key, a body producer, a line-based parser,
a chain of Deferreds) cost about four times the CPU of a whole proxied request.  Platform
APIs need none of the wrappers: they answer neither with redirects nor, unasked, with
gzip, and set no cookies that matter.  So a URL is parsed once and its head prefix
kept, connections are kept per (scheme, host, port), and answers are parsed by llhttp
(through httptools, as the origin client does), strictly, a whole read at a time.

What it keeps of Agent's: certificate verification (L{optionsForClientTLS}, the
system's trust store), persistent connections (as many idle per host as requests may be
in flight), cancellation (closing the connection, so a timeout never leaves one
half-read), a bounded answer (L{MAX_ANSWER}), answers framed by length, by chunks or by
the connection's end.  A kept connection the platform has closed (or written to while
idle) is noticed before reuse and never used; a POST is never sent twice by this client:
the dispatcher decides about another attempt, and the platforms' deduplication makes
it harmless.
"""

from __future__ import annotations

import re
import socket
from typing import Callable, Mapping
from urllib.parse import urlsplit

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISystemHandle
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from tagd.proxy.origin import tcp_endpoint, unread_bytes
from tagd.proxy.writes import send_now

# The most of a platform's answer tagd reads: their answers are a few hundred bytes, an
# error page a few kilobytes; a body without end (a broken or hostile endpoint) must not
# fill the droplet's memory.
MAX_ANSWER = 1024 * 1024
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
# URLs whose parsed form is kept: a destination's few endpoints, many times over.
_KEPT_URLS = 256
# Header names and values tagd sends may hold no line break or other control character.
_BAD_FIELD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class AnswerTooLarge(Exception):
    """A platform's answer went past L{MAX_ANSWER}; its connection is closed."""


class PlatformProtocolError(Exception):
    """The platform sent something that is not a valid HTTP/1.1 answer."""


class Answer:
    """A platform's whole answer.  C{headers} is built when first read: only throttles
    (C{Retry-After}) and Meta (its version warning) look at them."""

    __slots__ = ("code", "body", "_raw", "_headers")

    def __init__(self, code: int, raw: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.code = code
        self.body = body
        self._raw = raw
        self._headers: Headers | None = None

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            headers = Headers()
            for name, value in self._raw:
                headers.addRawHeader(name, value.strip(b" \t"))
            self._headers = headers
        return self._headers


class _Target:
    """A URL, parsed: where to connect, and the start of every request's head to it."""

    __slots__ = ("key", "host", "port", "tls", "prefix")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http or https URL")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (self.tls, self.host, self.port)
        path = parts.path or "/"
        target = f"{path}?{parts.query}" if parts.query else path
        netloc = parts.netloc.rpartition("@")[2]  # never the user info (a webhook's key)
        if _BAD_FIELD.search(target) or " " in target:
            raise ValueError("the URL holds a space or a control character")
        self.prefix = f"{{}} {target} HTTP/1.1\r\nHost: {netloc}\r\n"


def _fields(headers: Mapping[str, str]) -> str:
    """The header lines of C{headers}; none may break a line (a header of its own)."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if lines.count("\n") != len(headers) or _BAD_FIELD.search(lines.replace("\r\n", "")):
        raise ValueError("a header holds a line break or a control character")
    return lines


class _Request:
    """One request on its way: its bytes, and what to cancel to give it up."""

    __slots__ = ("data", "deferred", "connection", "connecting")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.deferred: Deferred[Answer] = Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: Deferred | None = None

    def _cancel(self, deferred: Deferred) -> None:
        # The Deferred fails with CancelledError once this returns; what the connection
        # then reports (aborted) goes nowhere.
        if self.connection is not None:
            self.connection.abandon(self)
        elif self.connecting is not None:
            self.connecting.cancel()


class PlatformClient:
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
        max_answer: int = MAX_ANSWER,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.pool_size = pool_size
        self._tls = tls
        self.max_answer = max_answer
        self._idle_timeout = idle_timeout
        self._targets: dict[str, _Target] = {}
        self._endpoints: dict[tuple, object] = {}
        self._idle: dict[tuple, list[_Connection]] = {}
        self._connections: set[_Connection] = set()
        self._closing: Deferred | None = None  # fires once every connection is gone
        self._closed = False

    def request(self, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] = {}) -> Deferred[Answer]:
        """Send one request (never C{HEAD}: its answer would be read for a body); the
        Deferred fires with the whole answer, or fails (no answer: the connection failed
        or closed early, the answer was invalid or past L{MAX_ANSWER}).  Cancelling it
        closes the connection."""
        target = self._targets.get(url)
        try:
            if target is None:
                target = self._target(url)
            head = target.prefix.format(method) + _fields(headers) + f"Content-Length: {len(body)}\r\n\r\n"
            data = head.encode("latin-1") + body
        except ValueError:  # UnicodeEncodeError too
            return fail()
        request = _Request(data)
        connection = self._idle_connection(target.key)
        if connection is not None:
            connection.send(request)
        else:
            self._connect(target, request)
        return request.deferred

    def _target(self, url: str) -> _Target:
        target = _Target(url)
        if len(self._targets) >= _KEPT_URLS:
            self._targets.clear()
        self._targets[url] = target
        return target

    def _idle_connection(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        deadline = self._reactor.seconds() - self._idle_timeout
        while idle:
            connection = idle.pop()
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
            idle.append(connection)
        else:
            connection.transport.loseConnection()

    def lost(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
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

    def __init__(self, client: PlatformClient, key: tuple) -> None:
        self._client = client
        self._key = key

    def buildProtocol(self, addr) -> _Connection:
        return _Connection(self._client, self._key)


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
    chunk sizes); this adds the bounds (head, header count, answer size) and refuses
    anything but an HTTP/1.x answer.  The connection goes back to the pool only when the
    answer allows it and the read that completed it held nothing more.
    """

    idle_since = 0.0
    _socket = None

    def __init__(self, client: PlatformClient, key: tuple) -> None:
        self._client = client
        self.key = key
        self._request: _Request | None = None
        self._parser = HttpResponseParser(self)
        self._max_answer = client.max_answer

    def connectionMade(self) -> None:
        self._client.added(self)
        self._socket = _socket_of(self.transport)

    def send(self, request: _Request) -> None:
        request.connection = self
        self._request = request
        self._received = 0  # bytes of the answer so far, head and body
        self._head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._done = False
        self._reusable = False
        self._close_delimited = False
        send_now(self.transport, request.data)

    def abandon(self, request: _Request) -> None:
        """Give up C{request} (cancelled): the connection goes with it."""
        if self._request is request:
            self._request = None
            self.transport.abortConnection()

    def discard(self) -> None:
        """Close a kept connection that can no longer be trusted, at once."""
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
            elif isinstance(reason, (PlatformProtocolError, AnswerTooLarge)):
                self._fail(reason)
                return
            elif isinstance(reason, HttpParserError):
                self._fail(PlatformProtocolError(str(reason) or type(reason).__name__))
                return
            else:
                raise reason from None  # tagd's own fault, for Twisted to log
        if self._done:
            self._complete(keep=self._reusable)
        elif self._head is None and self._received > MAX_HEAD:
            self._fail(PlatformProtocolError("answer head too large"))
        elif self._received - self._size > MAX_HEAD + self._size:
            # Chunk sizes, extensions and trailers: no more of them than of the body.
            self._fail(PlatformProtocolError("chunked framing or trailers too large"))

    def on_message_begin(self) -> None:
        if self._done:
            raise _ExtraBytes()
        self._headers: list[tuple[bytes, bytes]] = []
        self._length = False
        self._chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None:
            return  # a trailer of a chunked body
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise PlatformProtocolError("too many headers")
        size = len(name)  # compared first: most headers are neither of these two
        if size == 14 and name.lower() == b"content-length":
            self._length = True  # llhttp has checked it: digits, given once
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
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise PlatformProtocolError("unsupported HTTP version")
        headers = self._headers
        if self._received > MAX_HEAD and sum(len(n) + len(v) + 4 for n, v in headers) > MAX_HEAD:
            raise PlatformProtocolError("answer head too large")  # it came in one read
        bodiless = code in (204, 304)
        self._close_delimited = not (bodiless or self._chunked or self._length)
        self._reusable = parser.should_keep_alive() and not self._close_delimited
        self._head = (code, headers)
        self._done = bodiless

    def on_body(self, data: bytes) -> None:
        if self._done:
            raise _ExtraBytes()
        self._size += len(data)
        if self._size > self._max_answer:
            raise AnswerTooLarge()
        self._body.append(data)

    def on_message_complete(self) -> None:
        if self._head is not None:
            self._done = True

    def _complete(self, keep: bool) -> None:
        """The answer is complete, and so is the read that brought its end: the
        connection goes back to the pool (C{keep}) or is closed, then the answer is told."""
        request, self._request = self._request, None
        if keep:
            self._client.release(self)
        else:
            self.transport.loseConnection()
        code, headers = self._head
        if not request.deferred.called:
            request.deferred.callback(Answer(code, headers, b"".join(self._body)))

    def _fail(self, reason: Exception) -> None:
        request, self._request = self._request, None
        self.transport.abortConnection()
        if request is not None and not request.deferred.called:
            request.deferred.errback(Failure(reason))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._client.lost(self)
        request = self._request
        if request is None or request.deferred.called:
            self._request = None
            return
        if self._head is not None and self._close_delimited and reason.check(ConnectionDone):
            self._complete(keep=False)  # an answer framed by the connection's end
            return
        self._request = None
        lost = ResponseFailed if self._received else ResponseNeverReceived
        request.deferred.errback(Failure(lost([reason])))
