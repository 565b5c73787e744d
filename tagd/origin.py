"""A small HTTP/1.1 client for the one origin tagd sits in front of.

Why not L{twisted.web.client.Agent}: it parses every URL, builds an endpoint and a pool
key, and wraps each body in a deferred-driven protocol for every request.  A reverse
proxy talks to one fixed origin, so that work is done once here, and each response head
is parsed in one pass into raw header pairs.  Measured on the benchmark in C{bench/},
this roughly doubled throughput.

An L{OriginClient} keeps a stack of idle persistent connections; an
L{OriginConnection} carries one exchange at a time and tells a L{ResponseReceiver}
what arrives.  The connection is also the push producer the visitor's request
pauses when the visitor reads slowly; in the other direction, a request body that is
still arriving is written as it comes, and its L{BodySource} is paused while the
connection's send buffer is full.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol as Interface
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError
from zope.interface import implementer

from tagd.writes import send_now

MAX_HEAD_SIZE = 64 * 1024
NO_BODY_CODES = (204, 304)


class VisitorStalled(Exception):
    """The visitor read nothing of the response for the stall timeout."""


class OriginProtocolError(Exception):
    """The origin sent something that is not valid HTTP/1.1."""


class ResponseReceiver(Interface):
    """What an L{OriginConnection} tells about the response to the request it carries."""

    def response_head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Status and headers have arrived; C{Content-Length} is there only if it frames the body."""

    def response_data(self, data: bytes) -> None:
        """A piece of the (de-chunked) body."""

    def read_done(self) -> None:
        """The read that brought the head, and any body bytes that came with it, has been
        handed over in full: a head held back to go out with body bytes must go now."""

    def response_end(self) -> None:
        """The body is complete."""

    def response_failed(self, reason: Failure, retryable: bool) -> None:
        """The exchange broke; C{retryable} when a reused connection died before answering."""


class BodySource(Interface):
    """A request body sent while it is still arriving: the push producer registered on
    the connection for as long as the body is being written."""

    chunked: bool  # no length was announced: the body goes out in chunked transfer-coding

    def pauseProducing(self) -> None:
        """The connection's send buffer is full."""

    def resumeProducing(self) -> None:
        """The connection's send buffer has drained."""

    def stopProducing(self) -> None:
        """The connection is gone (its L{ResponseReceiver} hears why)."""


def _endpoint(reactor, host: str, port: int, timeout: float):
    """A plain TCP endpoint for an IP address; name resolution (and its happy-eyeballs
    delays between attempts) only for a host name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    endpoint = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
    return endpoint(reactor, host, port, timeout=timeout)


class OriginClient:
    """Persistent HTTP/1.1 connections to one origin URL."""

    def __init__(
        self,
        reactor,
        origin: str,
        *,
        connect_timeout: float,
        pool_size: int,
        idle_timeout: float,
        stall_timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(origin)
        self._reactor = reactor
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        endpoint = _endpoint(reactor, parts.hostname, port, connect_timeout)
        if tls:
            endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
        self._endpoint = endpoint
        self.prefix = parts.path.rstrip("/").encode("ascii")
        self.host = parts.netloc.encode("ascii")
        self._pool_size = pool_size
        self._idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        self._idle: list[OriginConnection] = []
        self._connections: set[OriginConnection] = set()
        self._sweeper = LoopingCall(self._close_stale)
        self._sweeper.clock = reactor
        self._closing: Deferred | None = None

    def start(self) -> None:
        """Begin closing connections that sat idle longer than the idle timeout."""
        self._sweeper.start(max(self._idle_timeout / 4, 0.5), now=False)

    def request(
        self,
        receiver: ResponseReceiver,
        method: bytes,
        head: bytes,
        body: bytes | None,
        upload: BodySource | None = None,
    ) -> OriginConnection | None:
        """Send C{head} (and C{body}) on an idle connection, if one is kept; return it.

        C{None} means no connection was idle: call L{connect} instead.  This path is
        every request's on a busy site, so it makes no Deferred.
        """
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None and connection.connected:
                connection.send(receiver, method, head, body, upload, reused=True)
                return connection
        return None

    def connect(
        self,
        receiver: ResponseReceiver,
        method: bytes,
        head: bytes,
        body: bytes | None,
        upload: BodySource | None = None,
    ) -> Deferred[OriginConnection]:
        """Open a new connection and send the request on it.

        With C{upload}, the body follows through L{OriginConnection.write_body} and
        L{OriginConnection.end_body} once the Deferred has fired.  The Deferred fires with
        the connection once the request is on its way; cancelling it before then abandons
        the connection attempt.
        """
        connecting = self._endpoint.connect(_OriginFactory(self))

        def connected(connection: OriginConnection) -> OriginConnection:
            connection.send(receiver, method, head, body, upload, reused=False)
            return connection

        return connecting.addCallback(connected)

    def release(self, connection: OriginConnection) -> None:
        """Keep a connection whose exchange ended cleanly, or close it if the pool is full."""
        if self._closing is None and len(self._idle) < self._pool_size:
            connection.idle_since = self._reactor.seconds()
            self._idle.append(connection)
        else:
            connection.transport.loseConnection()

    def added(self, connection: OriginConnection) -> None:
        self._connections.add(connection)

    def lost(self, connection: OriginConnection) -> None:
        self._connections.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if self._closing is not None and not self._connections:
            closing, self._closing = self._closing, None
            closing.callback(None)

    def _close_stale(self) -> None:
        deadline = self._reactor.seconds() - self._idle_timeout
        # The stack's bottom holds the connections idle the longest.
        while self._idle and self._idle[0].idle_since < deadline:
            self._idle.pop(0).transport.loseConnection()

    def close(self) -> Deferred[None]:
        """Close every connection, idle or busy; fires when all are gone."""
        if self._sweeper.running:
            self._sweeper.stop()
        if not self._connections:
            return succeed(None)
        self._closing = Deferred()
        closing = self._closing
        idle, self._idle = self._idle, []
        for connection in list(self._connections):
            if connection in idle:
                connection.transport.loseConnection()
            else:
                connection.transport.abortConnection()
        return closing


class _OriginFactory(ClientFactory):
    """Builds one L{OriginConnection}; quiet, since origin connections come and go."""

    noisy = False

    def __init__(self, client: OriginClient) -> None:
        self._client = client

    def buildProtocol(self, addr) -> OriginConnection:
        return OriginConnection(self._client)


_IDLE, _HEAD, _BODY = "idle", "head", "body"


@implementer(IPushProducer)
class OriginConnection(Protocol):
    """One persistent connection to the origin, carrying one exchange at a time."""

    idle_since = 0.0
    _stall = None  # the visitor's stall timer, while the visitor is not reading

    def __init__(self, client: OriginClient) -> None:
        self._client = client
        self._receiver: ResponseReceiver | None = None
        self._state = _IDLE
        self._buffer = b""
        self._paused = False
        self._upload: BodySource | None = None

    def connectionMade(self) -> None:
        self._client.added(self)

    # Sending.

    def send(
        self,
        receiver: ResponseReceiver,
        method: bytes,
        head: bytes,
        body: bytes | None,
        upload: BodySource | None,
        reused: bool,
    ) -> None:
        self._receiver = receiver
        self._method = method
        self._reused = reused
        self._state = _HEAD
        self._buffer = b""
        self._answered = False
        self._keep_alive = True
        transport = self.transport
        send_now(transport, head if body is None else head + body)
        self._upload = upload
        if upload is not None:
            transport.registerProducer(upload, True)

    def write_body(self, data: bytes) -> None:
        """Send the next piece of a streamed body (as one chunk, if it is chunked)."""
        if not self._upload.chunked:
            self.transport.write(data)
        elif data:  # An empty chunk would end the body.
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))

    def end_body(self) -> None:
        """The streamed body is complete: close its framing; the connection may be kept again."""
        upload, self._upload = self._upload, None
        if upload.chunked:
            self.transport.write(b"0\r\n\r\n")
        self.transport.unregisterProducer()

    def abort(self) -> None:
        """Drop the exchange and the connection (the visitor left, or time ran out)."""
        self._receiver = None
        if self.transport is not None:
            self.transport.abortConnection()

    # Producer, for the visitor's request.

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()
        # A visitor who stops reading would otherwise hold this connection, and an
        # origin worker behind it, for as long as it likes.  Twisted pauses again on
        # every write while the visitor's socket stays full: the window runs from the
        # first pause, and one timer is all there is to cancel.
        if self._stall is None:
            self._stall = self._client._reactor.callLater(self._client.stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        receiver, self._receiver = self._receiver, None
        self.transport.abortConnection()
        if receiver is not None:
            receiver.response_failed(Failure(VisitorStalled()), retryable=False)

    def stopProducing(self) -> None:
        self.abort()

    # Receiving.

    def dataReceived(self, data: bytes) -> None:
        self._answered = True
        if self._state is _BODY:
            self._body_received(data)
        elif self._state is _HEAD:
            self._buffer += data
            self._head_received()
        else:
            # Nothing may come while no request is out: the connection is no longer trusted.
            self.transport.abortConnection()

    def _head_received(self) -> None:
        receiver = self._receiver
        while self._state is _HEAD:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_SIZE:
                    self._fail(OriginProtocolError("response head too large"))
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            try:
                self._parse_head(head)
            except OriginProtocolError as e:
                self._fail(e)
                return
        if self._buffer:
            rest, self._buffer = self._buffer, b""
            if self._state is _BODY:
                self._body_received(rest)
            else:
                self.transport.abortConnection()  # Bytes after a complete response.
        if receiver is not None:
            receiver.read_done()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or not status[1].isdigit() or len(status[1]) != 3:
            raise OriginProtocolError("malformed status line")
        code = int(status[1])
        if 100 <= code < 200:
            return  # Interim answers (100 Continue, 103 Early Hints) are not forwarded.
        headers = []
        chunked = close_delimited = False
        length = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in b" \t" or line[:1] in b" \t":
                raise OriginProtocolError("malformed header line")
            value = value.strip(b" \t")
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise OriginProtocolError("bad Content-Length")
                length = int(value)
                continue
            if lower == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                close_delimited = not chunked
            elif lower == b"connection" and b"close" in value.lower():
                self._keep_alive = False
            headers.append((name, value))
        if status[0] != b"HTTP/1.1":
            self._keep_alive = False
        if self._method == b"HEAD" or code in NO_BODY_CODES:
            if length is not None:
                headers.append((b"Content-Length", b"%d" % length))
            length = 0
        elif chunked or close_delimited:
            length = None
        elif length is not None:
            headers.append((b"Content-Length", b"%d" % length))
        else:
            close_delimited = True
        self._state = _BODY
        self._remaining = length
        self._chunks = _ChunkedTransferDecoder(self._chunk, self._chunks_done) if chunked else None
        if close_delimited:
            self._keep_alive = False
        receiver = self._receiver
        if receiver is not None:
            receiver.response_head(code, status[2] if len(status) > 2 else b"", headers)
        if length == 0:
            self._complete()

    def _body_received(self, data: bytes) -> None:
        if self._chunks is not None:
            try:
                self._chunks.dataReceived(data)
            except _MalformedChunkedDataError:
                self._fail(OriginProtocolError("malformed chunked body"))
            return
        remaining = self._remaining
        if remaining is None:
            self._chunk(data)
        elif len(data) < remaining:
            self._remaining = remaining - len(data)
            self._chunk(data)
        else:
            if len(data) > remaining:
                self._keep_alive = False  # The origin sent more than it announced.
                data = data[:remaining]
            self._chunk(data)
            self._complete()

    def _chunk(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.response_data(data)

    def _chunks_done(self, extra: bytes) -> None:
        if extra:
            self._keep_alive = False
        self._complete()

    def _complete(self) -> None:
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        self._chunks = None
        if self._upload is not None:
            # Answered before the whole body went out: the body is abandoned with the
            # connection (a registered producer would keep it open).
            self._upload = None
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        elif self._keep_alive and receiver is not None and self.connected:
            if self._paused:
                self.resumeProducing()
            self._client.release(self)
        else:
            self.transport.loseConnection()
        if receiver is not None:
            receiver.response_end()

    def _fail(self, reason: Exception) -> None:
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        self.transport.abortConnection()
        if receiver is not None:
            receiver.response_failed(Failure(reason), retryable=False)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._client.lost(self)
        if self._state is _BODY and self._remaining is None and self._chunks is None:
            self._complete()  # A close-delimited body ends with the connection.
            return
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        if receiver is not None:
            retryable = self._reused and not self._answered
            receiver.response_failed(reason, retryable=retryable)
