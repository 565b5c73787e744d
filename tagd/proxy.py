"""The reverse proxy: a leaf resource that forwards each request to the origin.

Requests go out on the persistent connections of an L{OriginClient}; response bodies
stream back with backpressure (the origin connection is the producer registered on
the visitor's request, so a slow visitor pauses reading from the origin).  The
tracking header is taken out of the response before the visitor sees it and handed to
the tracking hook, whose cookies join the response head and whose delivery work runs
only after the reactor has written that head to the visitor.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tagd.clientip import ClientIPResolver
from tagd.headers import request_head, split_response_headers
from tagd.origin import OriginClient, OriginConnection
from tagd.tracking import Tracked, TrackingHook, Visit

log = Logger()

_ERROR_PAGE = b"<!doctype html><title>%d %s</title><h1>%d %s</h1><p>%s</p>\n"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


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
        on_tracking: TrackingHook,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._client = client
        self._resolver = resolver
        self._client_ip_header = client_ip_header.encode("ascii")
        self._tracking_header = tracking_header.encode("ascii")
        self._response_timeout = response_timeout
        self._on_tracking = on_tracking

    def render(self, request: Request):
        _Exchange(self, request).start()
        return NOT_DONE_YET


def _target(uri: bytes) -> bytes:
    """The origin-form target (path and query) of a request-target in any form."""
    if uri.startswith(b"/"):
        return uri
    parts = urlsplit(uri)
    path = parts.path or b"/"
    return path + (b"?" + parts.query if parts.query else b"")


class _Exchange:
    """One visitor request and the origin request made for it; the origin's receiver."""

    _connection: OriginConnection | None = None
    _pending = None
    _head_seen = False
    _retried = False
    _done = False

    def __init__(self, proxy: ProxyResource, request: Request) -> None:
        self._proxy = proxy
        self._request = request

    def start(self) -> None:
        proxy, request = self._proxy, self._request
        peer = getattr(request.getClientAddress(), "host", "127.0.0.1")
        headers = request.requestHeaders
        self._client_ip = proxy._resolver.resolve(
            peer, headers.getRawHeaders(proxy._client_ip_header, (None,))[0]
        )
        self._scheme = self._visitor_scheme(peer)
        content = request.content
        content.seek(0, 2)
        self._body_length = content.tell()
        content.seek(0)
        client = proxy._client
        self._head = request_head(
            request.method,
            client.prefix + _target(request.uri),
            headers,
            peer=peer,
            client_ip=self._client_ip,
            proto=self._scheme.encode("ascii"),
            default_host=client.host,
            body_length=self._body_length,
        )
        self._timeout = proxy._reactor.callLater(proxy._response_timeout, self._timed_out)
        request.notifyFinish().addErrback(self._visitor_left)
        self._send()

    def _send(self) -> None:
        content = self._request.content if self._body_length else None
        if content is not None:
            content.seek(0)
        d = self._proxy._client.request(self, self._request.method, self._head, content, self._body_length)
        self._pending = d
        d.addCallbacks(self._attached, self._connect_failed)

    def _visitor_scheme(self, peer: str) -> str:
        request = self._request
        if self._proxy._resolver.is_trusted(peer):
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

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        if not failure.check(CancelledError):
            log.warn(
                "origin unreachable for {uri}: {reason}",
                uri=self._path(),
                reason=failure.getErrorMessage(),
            )
            self._error(502, b"Bad Gateway", b"The shop could not be reached.")

    # ResponseReceiver

    def response_head(self, code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        if self._done:
            return
        self._timeout.cancel()
        self._head_seen = True
        request = self._request
        headers, tracking = split_response_headers(raw_headers, self._proxy._tracking_header)
        request.setResponseCode(code, phrase)
        closing = request.responseHeaders.getRawHeaders(b"connection")
        if closing:
            # Twisted Web's own "Connection: close" for a visitor who asked to close.
            headers.setRawHeaders(b"Connection", closing)
        request.responseHeaders = headers
        request.defaultContentType = None
        if tracking:
            self._track(tracking, code, headers)
        request.registerProducer(self._connection, True)
        request.write(b"")  # The head goes out now, not with the first body bytes.

    def response_data(self, data: bytes) -> None:
        self._request.write(data)

    def response_end(self) -> None:
        if self._done:
            return
        self._done = True
        request = self._request
        request.unregisterProducer()
        request.finish()

    def response_failed(self, reason: Failure, retryable: bool) -> None:
        if self._done:
            return
        if retryable and not self._retried and self._request.method in _IDEMPOTENT:
            # A kept-alive connection the origin had closed meanwhile: try a fresh one once.
            self._retried = True
            self._connection = None
            self._send()
            return
        if self._head_seen:
            # The status line is already out: the only honest signal left is a cut connection.
            log.warn(
                "origin response for {uri} broke off: {reason}",
                uri=self._path(),
                reason=reason.getErrorMessage(),
            )
            self._done = True
            self._request.unregisterProducer()
            # Close after what was received is flushed: a short body is a visible cut.
            self._request.channel.transport.loseConnection()
        else:
            log.warn(
                "origin failed before answering {uri}: {reason}",
                uri=self._path(),
                reason=reason.getErrorMessage(),
            )
            self._error(502, b"Bad Gateway", b"The shop sent no valid answer.")

    # Endings

    def _timed_out(self) -> None:
        log.warn("origin gave no answer in time for {uri}", uri=self._path())
        self._abandon_origin()
        self._error(504, b"Gateway Timeout", b"The shop did not answer in time.")

    def _visitor_left(self, failure: Failure) -> None:
        if not self._done:
            self._done = True
            if self._timeout.active():
                self._timeout.cancel()
            self._abandon_origin()

    def _abandon_origin(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        elif self._connection is not None:
            self._connection.abort()

    def _error(self, code: int, phrase: bytes, text: bytes) -> None:
        if self._done:
            return
        self._done = True
        if self._timeout.active():
            self._timeout.cancel()
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
            tracked = self._proxy._on_tracking(values, visit)
            if tracked is None:
                return
            if not isinstance(tracked, Tracked):
                raise TypeError(f"tracking hook returned {type(tracked).__name__}, not Tracked")
            for cookie in tracked.set_cookies:
                headers.addRawHeader(b"Set-Cookie", cookie)
        except Exception:
            log.failure("tracking hook failed; the response was not affected")
            return
        reactor = self._proxy._reactor
        # A call in the next reactor turn would still run before the reactor writes the
        # buffered head to the socket; one more turn puts it after that write.
        reactor.callLater(0, reactor.callLater, 0, _run_safely, tracked.deliver)


def _run_safely(deliver) -> None:
    try:
        deliver()
    except Exception:
        log.failure("tracking delivery failed; the response was not affected")
