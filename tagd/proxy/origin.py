"""A small HTTP/1.1 client for the one origin tagd sits in front of.

Why not L{twisted.web.client.Agent}: it parses every URL, builds an endpoint and a pool
key, and wraps each body in a deferred-driven protocol for every request.  A reverse
proxy talks to one fixed origin, so that work is done once here.  Measured on the
benchmark in C{bench/}, this roughly doubled throughput.  Responses are parsed by llhttp
(through httptools), strictly, a whole read at a time.

An L{OriginClient} keeps a stack of idle persistent connections; an
L{OriginConnection} carries one exchange at a time and tells a L{ResponseReceiver}
what arrives.  The connection is also the push producer the visitor's request
pauses when the visitor reads slowly; in the other direction, a request body that is
still arriving is written as it comes, and its L{BodySource} is paused while the
connection's send buffer is full.
"""

from __future__ import annotations

import ipaddress
import re
import socket
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
from twisted.internet.interfaces import IPushProducer, ISystemHandle
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from zope.interface import implementer

from tagd.proxy.writes import send_now

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


def tcp_endpoint(reactor, host: str, port: int, timeout: float):
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
        endpoint = tcp_endpoint(reactor, parts.hostname, port, connect_timeout)
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
        """Begin closing connections that sat idle longer than the idle timeout, and those
        whose response body stopped coming for the stall timeout."""
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
            if not connection.usable:
                continue
            if connection.has_unread_bytes():
                connection.discard()
                continue
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

    def forget(self, connection: OriginConnection) -> None:
        """Never hand out C{connection} again: it is being closed."""
        if connection in self._idle:
            self._idle.remove(connection)

    def lost(self, connection: OriginConnection) -> None:
        self._connections.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if self._closing is not None and not self._connections:
            closing, self._closing = self._closing, None
            closing.callback(None)

    def _close_stale(self) -> None:
        now = self._reactor.seconds()
        deadline = now - self._idle_timeout
        # The stack's bottom holds the connections idle the longest.
        while self._idle and self._idle[0].idle_since < deadline:
            self._idle.pop(0).transport.loseConnection()
        # A body that stops coming (the origin hangs mid-response) would hold the visitor,
        # the connection and the app worker for ever: like nginx's proxy_read_timeout,
        # stall_timeout of silence ends it, as a cut.
        silent_since = now - self.stall_timeout
        for connection in [c for c in self._connections if c.silent_since(silent_since)]:
            connection.read_timed_out(self.stall_timeout)

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


_IDLE, _HEAD, _BODY, _DONE = "idle", "head", "body", "done"

# Flags of the look at a pooled connection's socket; as a plain int, since combining the
# socket module's flags builds an enum member each time.
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# What a reason phrase may hold (RFC 9112 section 4: HTAB, SP, VCHAR, obs-text).
_BAD_REASON = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")


def unread_bytes(sock: socket.socket | None) -> bool:
    """Whether a kept connection's socket holds bytes (or a close) that the reactor has
    not read yet; never for a connection without a plain socket."""
    if sock is None:
        return False
    try:
        return sock.recv(1, _PEEK) is not None
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _head_size(phrase: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """About the size of a parsed response head on the wire: its lines and their CRLFs."""
    return 15 + len(phrase) + sum(len(name) + len(value) + 4 for name, value in headers)


class _ExtraBytes(Exception):
    """The origin sent bytes after a complete response, in the same read."""


@implementer(IPushProducer)
class OriginConnection(Protocol):
    """One persistent connection to the origin, carrying one exchange at a time.

    Responses are parsed by llhttp (through httptools), strict: no bare LF, no obs-fold,
    no invalid header names or characters, no conflicting framing.  The connection goes
    back to the pool only once the read that completed a response held nothing more, and
    never after a HEAD, 204 or 304, whose buggy bodies trail the head.
    """

    idle_since = 0.0
    usable = True  # false once the connection can no longer carry an exchange
    _reusable = False  # the response in hand allows the connection to be kept
    _close_delimited = False  # the response in hand ends when the origin closes
    _bodiless = False  # the response in hand has no body: HEAD, 204, 304
    _head = None  # the response head parsed in this read, to be handed on after it
    _stall = None  # the visitor's stall timer, while the visitor is not reading

    def __init__(self, client: OriginClient) -> None:
        self._client = client
        self._receiver: ResponseReceiver | None = None
        self._state = _IDLE
        self._paused = False
        self._upload: BodySource | None = None
        self._parser = HttpResponseParser(self)
        self._seconds = client._reactor.seconds
        self._last_read = 0.0

    def connectionMade(self) -> None:
        self._client.added(self)
        # The socket to look at before a reuse: a plain TCP connection's only, as TLS
        # records may be pending legitimately (session tickets), and what reaches the
        # reactor is caught anyway.
        transport = self.transport
        handle = transport.getHandle() if ISystemHandle.providedBy(transport) else None
        self._socket = handle if isinstance(handle, socket.socket) else None

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
        self._head_size = self._framing_size = 0
        self._answered = False
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

    # Receiving: llhttp calls the on_* methods while it parses a read.

    def dataReceived(self, data: bytes) -> None:
        if self._state is _IDLE:
            # Nothing may come while no request is out: the connection is no longer trusted.
            self.discard()
            return
        self._answered = True
        self._last_read = self._seconds()
        if self._state is _HEAD:
            if not self._head_size and not data.startswith(b"HTTP/"[: len(data)]):
                # llhttp takes RTSP/ and ICE/ status lines too, with their own versions.
                self._fail(OriginProtocolError("not an HTTP response"))
                return
            self._head_size += len(data)
        receiver = self._receiver
        # The whole read is parsed before any of it is handed on, so that a fault anywhere
        # in it gives a 502 rather than a response cut after a head that was fine.
        self._pieces = pieces = []
        try:
            self._parser.feed_data(data)
        except HttpParserError as error:
            reason = error.__context__ if isinstance(error, HttpParserCallbackError) else error
            if isinstance(reason, _ExtraBytes) or self._state is _DONE:
                self._reusable = False
            elif isinstance(reason, (OriginProtocolError, HttpParserError)):
                self._head = None
                self._fail(OriginProtocolError(str(reason) or type(reason).__name__))
                return
            else:
                raise reason from None  # tagd's own fault, for Twisted to log
        if self._state is _HEAD and self._head_size > MAX_HEAD_SIZE:
            self._fail(OriginProtocolError("response head too large"))
            return
        if self._state is _BODY and self._chunked:
            # Chunk sizes, extensions and trailers, which the parser holds while they
            # last, are bounded like a head: reads that bring no body byte add up.
            self._framing_size = 0 if pieces else self._framing_size + len(data)
            if self._framing_size > MAX_HEAD_SIZE:
                self._fail(OriginProtocolError("chunked framing or trailers too large"))
                return
        if receiver is not None:
            head, self._head = self._head, None
            if head is not None:
                receiver.response_head(*head)
            for piece in pieces:
                if self._receiver is not receiver:
                    break  # The exchange ended meanwhile (the visitor left).
                receiver.response_data(piece)
        if self._state is _DONE:
            self._complete()
        if receiver is not None:
            receiver.read_done()

    def on_message_begin(self) -> None:
        if self._state is _DONE:
            raise _ExtraBytes()
        self._phrase = b""
        self._headers = []
        self._length = None
        self._chunked = False

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state is not _HEAD:
            return  # A trailer of a chunked body: not forwarded.
        value = value.strip(b" \t")
        lower = name.lower()
        if lower == b"content-length":
            self._length = value  # llhttp has checked it: digits, given once
        elif lower == b"transfer-encoding":
            if value.lower() != b"chunked" or self._chunked:
                raise OriginProtocolError("unsupported transfer coding")
            self._chunked = True
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        if not 100 <= code <= 599:
            raise OriginProtocolError("status code out of range")
        if code == 101:
            raise OriginProtocolError("unrequested protocol switch")
        if code < 200:
            return  # Interim answers (100 Continue, 103 Early Hints) are not forwarded.
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise OriginProtocolError("unsupported HTTP version")
        phrase = self._phrase
        if _BAD_REASON.search(phrase):
            raise OriginProtocolError("invalid character in the reason phrase")
        headers = self._headers
        if self._head_size > MAX_HEAD_SIZE and _head_size(phrase, headers) > MAX_HEAD_SIZE:
            # Measured only when the bytes read since the request went out pass the limit:
            # a head over it implies that, and most responses never get there.
            raise OriginProtocolError("response head too large")
        head_only = self._method == b"HEAD"
        if self._length is not None and code != 204:  # RFC 9110 8.6: a 204 has none
            headers.append((b"Content-Length", self._length))
        self._bodiless = bodiless = head_only or code in NO_BODY_CODES
        self._close_delimited = not (bodiless or self._chunked or self._length is not None)
        # Not reused: a connection whose answer came before the whole request body went
        # out (the origin may leave the rest unread, to be taken for the start of the next
        # request), and one with a bodiless answer (HEAD, 204, 304), which buggy apps
        # follow with a body, sometimes a little later, that would be taken for the next
        # request's answer.
        self._reusable = parser.should_keep_alive() and not (
            bodiless or self._close_delimited or self._upload is not None
        )
        self._state = _BODY
        self._head = (code, phrase, headers)
        if head_only:
            self._state = _DONE  # Whatever follows is a body the origin should not have sent.

    def on_body(self, data: bytes) -> None:
        if self._state is _DONE:
            raise _ExtraBytes()
        self._pieces.append(data)

    def on_message_complete(self) -> None:
        if self._state is _BODY:
            self._state = _DONE
        elif self._state is _DONE:
            raise _ExtraBytes()

    def _complete(self) -> None:
        """The response is complete and the read that brought its end is parsed in full."""
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        if self._upload is not None:
            # Answered before the whole body went out: the body is abandoned with the
            # connection (a registered producer would keep it open).
            self._upload = None
            self.usable = False
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        elif self._reusable and receiver is not None and self.connected:
            if self._paused:
                self.resumeProducing()
            self._client.release(self)
        elif self._bodiless:
            # A reset, not a close: whatever late body follows is dropped, and tagd keeps
            # no TIME_WAIT socket for each such answer (visitors choose how many).
            self.usable = False
            self.transport.abortConnection()
        else:
            self.usable = False
            self.transport.loseConnection()
        if receiver is not None:
            receiver.response_end()

    def _fail(self, reason: Exception) -> None:
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        self.usable = False
        self.transport.abortConnection()
        if receiver is not None:
            receiver.response_failed(Failure(reason), retryable=False)

    def discard(self) -> None:
        """Close a connection that can no longer be trusted, at once and for good."""
        self.usable = False
        self._client.forget(self)
        self.transport.abortConnection()

    def silent_since(self, moment: float) -> bool:
        """Whether a response body is due and nothing of it came since C{moment}, though
        tagd is reading (a paused connection waits on its visitor instead)."""
        return self._state is _BODY and not self._paused and self._last_read < moment

    def read_timed_out(self, seconds: float) -> None:
        """End an exchange whose body stopped coming: the visitor's connection is cut."""
        self._fail(OriginProtocolError(f"no byte of the response body for {seconds:g} s"))

    def has_unread_bytes(self) -> bool:
        """Whether the origin sent something (or closed) since the last exchange ended,
        which the reactor has not read yet: such a connection is not reused (nginx checks
        the same way)."""
        return unread_bytes(self._socket)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.usable = False
        self._client.lost(self)
        if self._state is _BODY and self._close_delimited and reason.check(ConnectionDone):
            self._complete()  # A close-delimited body ends with the connection, cleanly.
            return
        if self._state is _DONE:
            self._complete()  # A HEAD answered; whatever followed it is gone with the connection.
            return
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        if receiver is not None:
            retryable = self._reused and not self._answered
            receiver.response_failed(reason, retryable=retryable)
