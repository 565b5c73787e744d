"""The two Twisted servers the benchmark runs in processes of their own.

C{stock PORT ORIGIN_PORT}: Twisted's stock L{ReverseProxyResource}, the baseline that the
target "tagd >= 3x stock" is measured against.  It gets the same quiet logging as tagd
(no access line per request, no factory start/stop lines), so that the comparison is about
proxying and not about who writes more log lines.

C{shop PORT PAGE_SIZE}: the example shop from L{tagd.demo.shop}, the origin used only when
nginx is not installed (it is much slower than nginx, so the proxies' figures are then
capped by it).

Each runs on its own process so that no server shares a CPU-bound reactor with another.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.proxy import ProxyClientFactory, ReverseProxyResource
from twisted.web.server import Site

HOST = "127.0.0.1"


class _QuietSite(Site):
    """A site without per-request access lines, like tagd's own."""

    def log(self, request) -> None:
        pass


class _QuietProxyClientFactory(ProxyClientFactory):
    """The stock client factory without a start/stop log line per proxied request."""

    noisy = False


class _QuietReverseProxyResource(ReverseProxyResource):
    """The stock resource, handing its quiet factory down to the children it creates."""

    proxyClientFactoryClass = _QuietProxyClientFactory

    def getChild(self, path, request):
        # The stock getChild builds a plain ReverseProxyResource, which would be noisy again.
        child = super().getChild(path, request)
        child.proxyClientFactoryClass = self.proxyClientFactoryClass
        return child


def stock_proxy(port: int, origin_port: int) -> None:
    """Twisted's stock reverse proxy: one new origin connection per request, HTTP/1.0."""
    resource = _QuietReverseProxyResource(HOST, origin_port, b"")
    reactor.listenTCP(port, _QuietSite(resource), interface=HOST)


def shop_origin(port: int, page_size: int) -> None:
    """The demo shop with padded pages, as a fallback origin."""
    from tagd.demo.shop import shop_resource

    reactor.listenTCP(port, _QuietSite(shop_resource(b"Worker-Tracking", page_size)), interface=HOST)


def main(argv: list[str]) -> int:
    """Start one server and run the reactor until the benchmark terminates the process."""
    servers = {"stock": stock_proxy, "shop": shop_origin}
    if len(argv) != 3 or argv[0] not in servers:
        print("usage: twisted_servers.py stock PORT ORIGIN_PORT | shop PORT PAGE_SIZE", file=sys.stderr)
        return 2
    # Errors go to stderr, which the benchmark keeps in a log file and shows if we die.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    servers[argv[0]](int(argv[1]), int(argv[2]))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
