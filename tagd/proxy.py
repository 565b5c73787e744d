"""The reverse proxy: a leaf resource that forwards each request to the origin.

Requests go out through one L{Agent} on a persistent L{HTTPConnectionPool}; response
bodies stream back with backpressure (the origin connection is the producer registered
on the visitor's request).  The tracking header is taken out of the response before the
visitor sees it, and handed to the tracking hook after the headers are sent.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tagd.clientip import ClientIPResolver
from tagd.headers import forwarded_request_headers, split_response_headers
from tagd.tracking import TrackingHook, Visit

log = Logger()

_ERROR_PAGE = (
    b"<!doctype html><title>%d %s</title><h1>%d %s</h1><p>%s</p>\n"
)


class ProxyResource(Resource):
    """Forward every request below this resource to one origin."""

    isLeaf = True

    def __init__(
        self,
        *,
        reactor,
        agent: IAgent,
        origin: str,
        resolver: ClientIPResolver,
        client_ip_header: str,
        tracking_header: str,
        response_timeout: float,
        on_tracking: TrackingHook,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._agent = agent
        self._origin = origin.rstrip("/").encode("ascii")
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
    """One visitor request and the origin request made for it."""

    def __init__(self, proxy: ProxyResource, request: Request) -> None:
        self._proxy = proxy
        self._request = request
        self._response_started = False
        self._origin_transport = None
        self._visitor_gone = False

    def start(self) -> None:
        proxy, request = self._proxy, self._request
        peer = getattr(request.getClientAddress(), "host", "127.0.0.1")
        headers = request.requestHeaders
        client_ip = proxy._resolver.resolve(
            peer, headers.getRawHeaders(proxy._client_ip_header, [None])[0]
        )
        self._client_ip = client_ip
        self._scheme = self._visitor_scheme(peer)
        host = headers.getRawHeaders(b"host", [None])[0]
        outgoing = forwarded_request_headers(
            headers,
            peer=peer,
            client_ip=client_ip,
            proto=self._scheme.encode("ascii"),
            host=host,
        )
        content = request.content
        content.seek(0, 2)
        has_body = content.tell() > 0
        content.seek(0)
        body = FileBodyProducer(content) if has_body else None
        d = proxy._agent.request(
            request.method, proxy._origin + _target(request.uri), outgoing, body
        )
        d.addTimeout(proxy._response_timeout, proxy._reactor)
        d.addCallbacks(self._got_response, self._origin_failed)
        d.addErrback(self._unexpected)
        self._pending = d
        request.notifyFinish().addErrback(self._visitor_left)

    def _visitor_scheme(self, peer: str) -> str:
        request = self._request
        if self._proxy._resolver.is_trusted(peer):
            claimed = request.requestHeaders.getRawHeaders(b"x-forwarded-proto", [b""])[0]
            if claimed in (b"http", b"https"):
                return claimed.decode("ascii")
        return "https" if request.isSecure() else "http"

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        request = self._request
        headers, tracking = split_response_headers(response.headers, self._proxy._tracking_header)
        request.setResponseCode(response.code, response.phrase)
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            # The client keeps Content-Length apart from the other headers; put it back
            # so that the visitor gets the origin's framing instead of chunks.
            headers.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        request.responseHeaders = headers
        request.defaultContentType = None
        self._response_started = True
        response.deliverBody(_BodyRelay(self))
        if tracking:
            self._proxy._reactor.callLater(0, self._hand_over, tracking, response.code)

    def _hand_over(self, values: list[bytes], status: int) -> None:
        request = self._request
        visit = Visit(
            client_ip=self._client_ip,
            scheme=self._scheme,
            method=request.method,
            uri=request.uri,
            host=request.requestHeaders.getRawHeaders(b"host", [None])[0],
            request_headers=request.requestHeaders,
            status=status,
        )
        try:
            self._proxy._on_tracking(values, visit)
        except Exception:
            log.failure("tracking hook failed; the response was not affected")

    def _origin_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._visitor_gone:
            return
        if failure.check(TimeoutError, CancelledError):
            log.warn("origin gave no answer in time for {uri}", uri=self._path())
            self._error(504, b"Gateway Timeout", b"The shop did not answer in time.")
        else:
            reason = failure.getErrorMessage() if failure.check(ConnectError, DNSLookupError) else failure.type.__name__
            log.warn("origin unreachable for {uri}: {reason}", uri=self._path(), reason=reason)
            self._error(502, b"Bad Gateway", b"The shop could not be reached.")

    def _path(self) -> str:
        return self._request.uri.split(b"?", 1)[0].decode("latin-1")

    def _error(self, code: int, phrase: bytes, text: bytes) -> None:
        request = self._request
        body = _ERROR_PAGE % (code, phrase, code, phrase, text)
        request.setResponseCode(code, phrase)
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/html; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
        request.write(body)
        request.finish()

    def _unexpected(self, failure: Failure) -> None:
        log.failure("proxying {uri} failed", failure, uri=self._path())
        if not self._visitor_gone and not self._request.finished:
            self._request.channel.transport.abortConnection()

    def _visitor_left(self, failure: Failure) -> None:
        self._visitor_gone = True
        if self._pending is not None:
            self._pending.cancel()
        elif self._origin_transport is not None:
            self._origin_transport.stopProducing()

    # Called by _BodyRelay.
    def body_started(self, transport) -> None:
        self._origin_transport = transport
        self._request.registerProducer(transport, True)

    def body_ended(self, reason: Failure) -> None:
        self._origin_transport = None
        request = self._request
        if self._visitor_gone:
            return
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:
            # The status line is already out: the only honest signal left is a cut connection.
            log.warn(
                "origin response for {uri} broke off: {reason}",
                uri=self._path(),
                reason=reason.type.__name__,
            )
            request.channel.transport.abortConnection()


class _BodyRelay(Protocol):
    """Copy an origin response body to the visitor as it arrives."""

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange
        self._write = exchange._request.write

    def connectionMade(self) -> None:
        self._exchange.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._write(data)

    def connectionLost(self, reason: Failure) -> None:
        self._exchange.body_ended(reason)
