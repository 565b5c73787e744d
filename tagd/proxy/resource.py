"""The reverse proxy: a leaf resource that forwards each request to the origin.

Requests go out on the persistent connections of an L{OriginClient}; response bodies
stream back with backpressure (the origin connection is the producer registered on
the visitor's request, so a slow visitor pauses reading from the origin).  Request
bodies up to L{SMALL_BODY} are collected first and sent with the head; larger ones
stream to the origin while they arrive, the visitor paused whenever the origin reads
slower than the visitor sends (see L{_Upload}).  The
tracking header is taken out of the response before the visitor sees it and handed to
the tracking hook, whose cookies join the response head and whose delivery work runs
only after the reactor has written that head to the visitor.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tagd.proxy.clientip import ClientIPResolver
from tagd.proxy.headers import request_head, split_response_headers
from tagd.proxy.origin import OriginClient, OriginConnection, VisitorStalled
from tagd.proxy.paths import remove_dot_segments
from tagd.ratelimit import RateLimitedLog
from tagd.tagging.hook import Tracked, TrackingHook, Visit

if TYPE_CHECKING:
    from tagd.proxy.site import TagdChannel

log = Logger()

# The largest request body collected whole before it is forwarded; larger ones stream.
# Collecting small bodies keeps a slow visitor from holding an origin connection, and
# lets a small chunked body reach the origin with a Content-Length.
SMALL_BODY = 64 * 1024

# The other headers that name a visitor's address, which frameworks read when configured to.
CLIENT_IP_CLAIMS = (b"forwarded", b"true-client-ip", b"x-client-ip", b"x-cluster-client-ip")
_ERROR_PAGE = b"<!doctype html><title>%d %s</title><h1>%d %s</h1><p>%s</p>\n"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
# Upper bounds, in seconds, of the origin latency buckets (one more bucket takes the rest).
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProxyResource(Resource):
    """Forward every request below this resource to one origin."""

    isLeaf = True

    def __init__(
        self,
        *,
        reactor,
        client: OriginClient,
        resolver: ClientIPResolver,
        client_ip_header: str,
        tracking_header: str,
        response_timeout: float,
        on_tracking: TrackingHook | None,
        allow_underscores: bool = False,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._client = client
        self._resolver = resolver
        self._client_ip_header = client_ip_header.encode("ascii")
        # From a peer that is not a trusted proxy these headers are claims anyone can make
        # about the visitor's address: the origin must not read them either.
        self._spoofable = frozenset({self._client_ip_header.lower(), *CLIENT_IP_CLAIMS})
        self._allow_underscores = allow_underscores
        self._tracking_header = tracking_header.encode("ascii")
        self._response_timeout = response_timeout
        # Public: a configuration reload replaces the hook with one assignment, which
        # requests already past their response head never notice.
        self.on_tracking = on_tracking
        self._deliveries = _Deliveries(reactor)
        # Visitor requests not yet answered in full: shutdown waits for them.
        self.in_flight = 0
        # Answers by status code, and the origin's latency (forwarding to response head)
        # in LATENCY_BOUNDS buckets with its sum; tagd.admin.listener exports them.  Plain numbers:
        # prometheus_client's labels().inc() and observe() would cost 20 times as much.
        self.statuses: dict[int, int] = {}
        self.latency_buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0
        # Responses the origin broke off after their head, each a cut visitor connection.
        self.cut_responses = 0
        # Response heads that held a CR, LF or NUL where none belongs, written without it.
        self.forged_heads = 0
        # Every line about what visitors and the origin do wrong, at most one a minute of
        # each kind (the site's refusals and deadlines too).
        self.warnings = RateLimitedLog(log, reactor.seconds)

    @property
    def under_prefix(self) -> bool:
        """Whether the origin URL has a path that every forwarded path goes under."""
        return bool(self._client.prefix)

    def render(self, request: Request):
        _Exchange(self, request).start()
        return NOT_DONE_YET

    def stream(self, request: Request, length: int | None) -> _Upload:
        """Begin forwarding C{request} while its body is still arriving; C{length} is
        None for a chunked body.  The returned upload takes the body's pieces."""
        return _Exchange(self, request).stream(length)

    def count(self, code: int, latency: float | None = None) -> None:
        """Count an answer with status C{code}; C{latency} when the origin gave the head."""
        statuses = self.statuses
        statuses[code] = statuses.get(code, 0) + 1
        if latency is not None:
            self.latency_buckets[bisect_left(LATENCY_BOUNDS, latency)] += 1
            self.latency_sum += latency

    def cut_off(self, path: str, reason: str) -> None:
        """Count a response that broke off after its head; say so at most once a minute."""
        self.cut_responses += 1
        self.warnings.warn(
            "cut",
            "origin response for {uri} broke off: {reason}; the visitor's connection was cut "
            "({count} so far, see tagd_responses_cut_total)",
            uri=path,
            reason=reason,
            count=self.cut_responses,
        )

    def forged_head(self, dropped: int) -> None:
        """Count a response head that held line breaks or NULs where none belong, written
        without them (C{dropped} headers left out); say so at most once a minute."""
        self.forged_heads += 1
        self.warnings.warn(
            "forged head",
            "a response head held CR, LF or NUL in its reason phrase or {dropped} header(s): "
            "written without them ({count} so far)",
            dropped=dropped,
            count=self.forged_heads,
        )


def _target(uri: bytes) -> bytes:
    """The origin-form target (path and query) of a request-target in any form."""
    if uri.startswith(b"/"):
        return uri
    parts = urlsplit(uri)
    path = parts.path or b"/"
    return path + (b"?" + parts.query if parts.query else b"")


def _origin_target(prefix: bytes, uri: bytes) -> bytes:
    """The target sent to the origin: the visitor's, under the origin URL's path prefix.

    Under a prefix the path's dot segments are resolved first (C{%2e} too), so that
    C{/../admin} cannot climb out of it; the query goes as sent.  Without a prefix the
    path goes as sent, dot segments and all: the origin has its whole namespace and
    resolves them itself, as it would with no proxy in front.
    """
    target = _target(uri)
    if not prefix:
        return target
    path, question, query = target.partition(b"?")
    return prefix + remove_dot_segments(path) + question + query


class _Exchange:
    """One visitor request and the origin request made for it; the origin's receiver."""

    _connection: OriginConnection | None = None
    _pending = None
    _head_seen = False
    _retried = False
    _done = False
    _body: bytes | None = None
    _upload: _Upload | None = None
    _timeout = None

    def __init__(self, proxy: ProxyResource, request: Request) -> None:
        self._proxy = proxy
        self._request = request

    def start(self) -> None:
        """Forward a request whose body, if any, has been received whole."""
        body = self._request.content.getvalue()
        self._prepare(len(body))
        self._body = body or None
        self._arm()
        self._send()

    def stream(self, length: int | None) -> _Upload:
        """Forward a request whose body is still arriving (chunked when C{length} is None)."""
        upload = self._upload = _Upload(self, self._request.channel, chunked=length is None)
        self._prepare(length)
        self._send()
        return upload

    def _prepare(self, body_length: int | None) -> None:
        proxy, request = self._proxy, self._request
        peer = getattr(request.getClientAddress(), "host", "127.0.0.1")
        headers = request.requestHeaders
        self._client_ip = proxy._resolver.resolve(
            peer, headers.getRawHeaders(proxy._client_ip_header, (None,))[0]
        )
        trusted = proxy._resolver.is_trusted(peer)
        self._scheme = self._visitor_scheme(trusted)
        client = proxy._client
        self._head = request_head(
            request.method,
            _origin_target(client.prefix, request.uri),
            headers,
            peer=peer,
            client_ip=self._client_ip,
            proto=self._scheme.encode("ascii"),
            default_host=client.host,
            body_length=body_length,
            drop=frozenset() if trusted else proxy._spoofable,
            allow_underscores=proxy._allow_underscores,
            # The headers naming the visitor's address, which no underscored name may stand in for either.
            guarded=proxy._spoofable,
        )
        proxy.in_flight += 1
        self._started = proxy._reactor.seconds()
        request.notifyFinish().addCallbacks(self._answered, self._visitor_left)

    def _send(self) -> None:
        client, method = self._proxy._client, self._request.method
        connection = client.request(self, method, self._head, self._body, self._upload)
        if connection is not None:
            self._attached(connection)
            return
        d = client.connect(self, method, self._head, self._body, self._upload)
        self._pending = d
        d.addCallbacks(self._attached, self._connect_failed)

    def _visitor_scheme(self, trusted: bool) -> str:
        request = self._request
        if trusted:
            claimed = request.requestHeaders.getRawHeaders(b"x-forwarded-proto", (b"",))[0]
            if claimed in (b"http", b"https"):
                return claimed.decode("ascii")
        return "https" if request.isSecure() else "http"

    def _attached(self, connection: OriginConnection) -> None:
        self._pending = None
        if self._done:
            connection.abort()
        else:
            self._connection = connection
            if self._upload is not None:
                self._upload.attach(connection)

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        # The visitor left while tagd was connecting: nothing is wrong with the origin.
        if not failure.check(CancelledError, ConnectingCancelledError):
            self._proxy.warnings.warn(
                "unreachable",
                "origin unreachable for {uri}: {reason}",
                uri=self._path(),
                reason=failure.getErrorMessage(),
            )
            self._error(502, b"Bad Gateway", b"The shop could not be reached.")

    # ResponseReceiver

    def response_head(self, code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        if self._done:
            return
        self._disarm()
        self._head_seen = True
        proxy = self._proxy
        proxy.count(code, proxy._reactor.seconds() - self._started)
        request = self._request
        headers, tracking = split_response_headers(raw_headers, self._proxy._tracking_header)
        request.setResponseCode(code, phrase)
        closing = request.responseHeaders.getRawHeaders(b"connection")
        if closing:
            # Twisted Web's own "Connection: close" for a visitor who asked to close.
            headers.setRawHeaders(b"Connection", closing)
        if not headers.hasHeader(b"date"):
            # Twisted Web's own Date was dropped with its headers; RFC 9110 wants one.
            headers.setRawHeaders(b"Date", [datetimeToString()])
        request.responseHeaders = headers
        request.defaultContentType = None
        self._close_if_uploading()
        if tracking and self._proxy.on_tracking is not None:
            self._track(tracking, code, headers)
        request.registerProducer(self._connection, True)
        # The channel holds the head, to send it with the body bytes of this same read.
        request.write(b"")

    def response_data(self, data: bytes) -> None:
        self._request.write(data)

    def read_done(self) -> None:
        if not self._done:
            self._request.channel.release_head()

    def response_end(self) -> None:
        if self._done:
            return
        self._end()
        request = self._request
        request.unregisterProducer()
        request.finish()

    def response_failed(self, reason: Failure, retryable: bool) -> None:
        if self._done:
            return
        if retryable and not self._retried and self._request.method in _IDEMPOTENT and self._replayable():
            # A kept-alive connection the origin had closed meanwhile: try a fresh one once.
            self._retried = True
            self._connection = None
            if self._upload is not None:
                self._upload.detach()
            self._send()
            return
        if reason.check(VisitorStalled):
            self._proxy.warnings.info(
                "stalled", "visitor stopped reading {uri}; connection closed", uri=self._path()
            )
            self._end()
            self._request.unregisterProducer()
            self._request.channel.transport.abortConnection()
        elif self._head_seen:
            # The status line is already out: the only honest signal left is a cut
            # connection, a reset, which no framing of the visitor's can take for an end.
            self._proxy.cut_off(self._path(), reason.getErrorMessage())
            self._end()
            self._request.unregisterProducer()
            self._request.channel.transport.abortConnection()
        else:
            self._proxy.warnings.warn(
                "no valid answer",
                "origin failed before answering {uri}: {reason}",
                uri=self._path(),
                reason=reason.getErrorMessage(),
            )
            self._error(502, b"Bad Gateway", b"The shop sent no valid answer.")

    def _replayable(self) -> bool:
        """Whether the request can be sent again: none of a streamed body is gone yet."""
        return self._upload is None or not self._upload.sent

    # The upload's progress, for the timeout: it runs while tagd waits on the origin.

    def origin_stalled(self) -> None:
        """The origin stopped reading the body."""
        self._arm()

    def origin_flowing(self) -> None:
        """The origin reads the body again."""
        self._disarm()

    def body_received(self) -> None:
        """The visitor has sent the whole body: the origin's answer is due now."""
        self._arm()

    def _arm(self) -> None:
        if self._done or self._head_seen or (self._timeout is not None and self._timeout.active()):
            return
        proxy = self._proxy
        self._timeout = proxy._reactor.callLater(proxy._response_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()

    # Endings

    def _timed_out(self) -> None:
        self._proxy.warnings.warn("no answer in time", "origin gave no answer in time for {uri}", uri=self._path())
        self._abandon_origin()
        self._error(504, b"Gateway Timeout", b"The shop did not answer in time.")

    def _answered(self, _) -> None:
        self._proxy.in_flight -= 1

    def _visitor_left(self, failure: Failure) -> None:
        self._proxy.in_flight -= 1
        if not self._done:
            self._end()
            self._abandon_origin()

    def _end(self) -> None:
        """The exchange is over for the visitor: no timeout, no more body to forward."""
        self._done = True
        self._disarm()
        if self._upload is not None:
            self._upload.stop()

    def _close_if_uploading(self) -> None:
        """Answering while the visitor still sends a body: the rest of that body cannot be
        told from a next request, so the visitor's connection ends with this answer."""
        upload = self._upload
        if upload is not None and not upload.complete:
            self._request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self._request.channel.persistent = False

    def _abandon_origin(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        elif self._connection is not None:
            self._connection.abort()

    def _error(self, code: int, phrase: bytes, text: bytes) -> None:
        if self._done:
            return
        self._close_if_uploading()
        self._end()
        self._proxy.count(code)
        request = self._request
        body = _ERROR_PAGE % (code, phrase, code, phrase, text)
        request.setResponseCode(code, phrase)
        request.responseHeaders.setRawHeaders(b"Date", [datetimeToString()])
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/html; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
        request.write(body)
        request.finish()

    def _path(self) -> str:
        return self._request.uri.split(b"?", 1)[0].decode("latin-1")

    def _track(self, values: list[bytes], status: int, headers) -> None:
        request = self._request
        visit = Visit(
            client_ip=self._client_ip,
            scheme=self._scheme,
            method=request.method,
            uri=_target(request.uri),
            host=request.requestHeaders.getRawHeaders(b"host", (None,))[0],
            request_headers=request.requestHeaders,
            status=status,
        )
        try:
            tracked = self._proxy.on_tracking(values, visit)
            if tracked is None:
                return
            if not isinstance(tracked, Tracked):
                raise TypeError(f"tracking hook returned {type(tracked).__name__}, not Tracked")
            for cookie in tracked.set_cookies:
                headers.addRawHeader(b"Set-Cookie", cookie)
        except Exception:
            log.failure("tracking hook failed; the response was not affected")
            return
        self._proxy._deliveries.add(tracked)


class _Deliveries:
    """Runs the tracking hooks' delivery work after the visitors' heads are written: two
    reactor turns later, all of one turn's together, each hook's hand-over once after them.

    A call in the next turn would still run before the reactor writes a head that had to
    be queued (its socket was full); one more turn puts it after that write.  One pair
    of timed calls per turn, not per tracked response: under load a turn answers several,
    and the tracker hands their events to the spool in one call.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._gathering: list[Tracked] = []

    def add(self, tracked: Tracked) -> None:
        self._gathering.append(tracked)
        if len(self._gathering) == 1:
            self._reactor.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        batch, self._gathering = self._gathering, []
        self._reactor.callLater(0, self._run, batch)

    def _run(self, batch: list[Tracked]) -> None:
        # A reload may have replaced the hook between two of these responses: each hook's once.
        hand_overs: dict = {}
        for tracked in batch:
            try:
                tracked.deliver()
            except Exception:
                log.failure("tracking delivery failed; the response was not affected")
            if tracked.hand_over is not None:
                hand_overs[tracked.hand_over] = None
        for hand_over in hand_overs:
            try:
                hand_over()
            except Exception:
                log.failure("tracking delivery failed; the response was not affected")


@implementer(IPushProducer)
class _Upload:
    """A request body forwarded to the origin while the visitor is still sending it.

    The visitor's socket is the only buffer: pieces wait here just until an origin
    connection is attached, and the visitor is not read while more than L{SMALL_BODY}
    waits or while the origin connection's send buffer is full (this is the producer
    registered there), so tagd holds about one socket read of the body at a time.
    """

    complete = False  # the visitor has sent the whole body
    sent = False  # part of it went out on the current connection, so it cannot be replayed
    _connection: OriginConnection | None = None
    _origin_full = False
    _holding = False
    _stopped = False

    def __init__(self, exchange: _Exchange, channel: TagdChannel, chunked: bool) -> None:
        self.chunked = chunked
        self._exchange = exchange
        self._channel = channel
        self._waiting: list[bytes] = []
        self._waiting_size = 0

    # From the visitor's request.

    def data(self, data: bytes) -> None:
        """A piece of the body has arrived."""
        if self._stopped:
            return
        connection = self._connection
        if connection is None:
            self._waiting.append(data)
            self._waiting_size += len(data)
        else:
            self.sent = True
            connection.write_body(data)
        if self._origin_full or self._waiting_size > SMALL_BODY:
            # Again on every piece: the channel resumes reading when its own writes drain.
            self._hold()

    def end(self) -> None:
        """The whole body has arrived."""
        if self._stopped:
            return
        self.complete = True
        if self._connection is not None:
            self._connection.end_body()
        self._release()
        self._exchange.body_received()

    # From the exchange.

    def attach(self, connection: OriginConnection) -> None:
        """The request is on its way on C{connection}: what waits goes out now."""
        self._connection = connection
        if self._waiting:
            self.sent = True
            connection.write_body(b"".join(self._waiting))
            self._waiting, self._waiting_size = [], 0
        if self.complete:
            connection.end_body()
        elif not self._origin_full:
            self._release()

    def detach(self) -> None:
        """The connection died before any of the body went out on it; another follows."""
        self._connection = None
        self._origin_full = False

    def stop(self) -> None:
        """The exchange is over: whatever more arrives is dropped."""
        self._stopped = True
        self._connection = None
        self._waiting = []

    # Producer, for the origin connection.

    def pauseProducing(self) -> None:
        if not (self.complete or self._stopped):
            self._origin_full = True
            self._hold()
            self._exchange.origin_stalled()

    def resumeProducing(self) -> None:
        if not (self.complete or self._stopped):
            self._origin_full = False
            self._release()
            self._exchange.origin_flowing()

    def stopProducing(self) -> None:
        """The origin connection is gone; the exchange hears why from the connection."""

    # The visitor's side.

    def _hold(self) -> None:
        self._holding = True
        self._channel.hold_body()

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._channel.release_body()
