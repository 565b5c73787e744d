"""The visitor-facing Twisted Web site, trimmed for a proxy's hot path.

Twisted Web's channel writes a response head as dozens of small pieces, each checked on
its own, and asks the kernel for the local address (and the transport whether it is TLS)
on every request.  A proxy answers
every request of a connection from the same socket with headers that
L{twisted.web.http_headers.Headers} has already sanitised, so the head is joined once and
the local address is looked up once per connection.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site


class ProxyRequest(Request):
    """A request handed straight to the site's one resource, its body left unparsed.

    Twisted Web would parse form bodies (and answer 400 to a multipart body it cannot
    parse) and walk the resource tree; a proxy forwards bodies untouched, and its
    resource answers every path.
    """

    _parsePOSTFormSubmission = False

    def process(self) -> None:
        self.site = self.channel.site
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())


class TagdChannel(HTTPChannel):
    """An HTTP/1.1 channel that writes each response head in one piece."""

    _host = None
    _secure = None

    def writeHeaders(self, version, code, reason, headers) -> None:
        lines = [b"%s %s %s" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s" % (name, value))
        lines.append(b"\r\n")
        self.transport.write(b"\r\n".join(lines))

    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure


class TagdSite(Site):
    """The site in front of the proxy resource; access lines are left to the metrics."""

    protocol = TagdChannel
    requestFactory = ProxyRequest
    displayTracebacks = False

    def log(self, request) -> None:
        pass
