"""The admin listener: C{/metrics} for Prometheus, C{/healthz} for monitors and the
dashboard for people (C{/}, with C{/stats.json} and the live C{/events}; see
L{tagd.admin.dashboard}), on an endpoint of its own (C{[admin] listen}, loopback by default),
never on the visitors' port.

C{/metrics} is tagd's registry in Prometheus' text format.  The counts the proxy keeps per
request (answers by status, origin latency) and the spool's depth are read from plain
numbers only when scraped, by the collectors below: nothing on the hot path, and no SQLite
call on a scrape.

C{/healthz} answers 200 C{ok} while tagd serves visitors and can keep what it accepts, and
503 with the reason otherwise: shutdown has started, the spool cannot be written, or the
spool could not be opened at start-up (events then go straight to the platforms, best
effort, and are lost if a platform is down).  Without destinations there is nothing to keep
and only serving counts.

With C{[admin] token} set, every request needs C{Authorization: Bearer TOKEN} or the
cookie of a session a browser gets by logging in (see L{tagd.admin.access}).

The listener is not essential to the shop: when its endpoint cannot be bound (another
program on port 9100, say), tagd logs why and goes on proxying without it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from tagd.admin.access import Access
from tagd.daemon.config import AdminConfig
from tagd.admin.dashboard import Events, Page, Stats
from tagd.admin.feed import Feed
from tagd.admin.metrics import Metrics
from tagd.proxy.resource import LATENCY_BOUNDS, ProxyResource
from tagd.delivery.spool import Spool

log = Logger()

_TEXT = b"text/plain; charset=utf-8"


class ProxyCollector:
    """The proxy's own counts, as Prometheus metrics when scraped."""

    def __init__(self, proxy: ProxyResource) -> None:
        self._proxy = proxy

    def collect(self) -> Iterator:
        proxy = self._proxy
        requests = CounterMetricFamily(
            "tagd_requests",
            "Visitor requests answered, by status code (tagd's own 502 and 504 included).",
            labels=["status"],
        )
        for code, count in sorted(proxy.statuses.items()):
            requests.add_metric([str(code)], count)
        yield requests
        buckets, total = [], 0
        for bound, count in zip([*LATENCY_BOUNDS, float("inf")], proxy.latency_buckets):
            total += count
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(
            "tagd_origin_latency_seconds",
            "Seconds from forwarding a request to the origin's response head.",
            buckets=buckets,
            sum_value=proxy.latency_sum,
        )
        yield CounterMetricFamily(
            "tagd_responses_cut",
            "Responses the origin broke off after their head: the visitor's connection was cut.",
            value=proxy.cut_responses,
        )
        yield CounterMetricFamily(
            "tagd_response_heads_cleaned",
            "Response heads written without a reason phrase or header that held CR, LF or NUL.",
            value=proxy.forged_heads,
        )
        yield GaugeMetricFamily(
            "tagd_requests_in_flight", "Visitor requests not yet answered in full.", value=proxy.in_flight
        )


class SpoolCollector:
    """The spool's depth from its in-memory counts, so that a scrape never waits on SQLite."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def collect(self) -> Iterator:
        spool = self._spool
        yield GaugeMetricFamily(
            "tagd_spool_undelivered_events",
            "Events accepted and still owed to a destination: in memory, pending or in flight.",
            value=spool.undelivered,
        )
        yield GaugeMetricFamily(
            "tagd_spool_buffered_events",
            "Events accepted and still owed that are not written to the spool file yet (in memory and its intake journal).",
            value=spool.buffered,
        )
        yield GaugeMetricFamily(
            "tagd_spool_healthy", "1 while the spool file can be written, else 0.", value=int(spool.healthy)
        )


@attrs.frozen
class Health:
    """What C{/healthz} checks.

    C{serving} tells whether the visitor listener runs (it stops first at shutdown);
    C{spool} is tagd's spool, None when it could not be opened; C{spool_wanted} is false
    when no destination is configured, so that no spool is needed.
    """

    serving: Callable[[], bool]
    spool: Spool | None
    spool_wanted: bool

    def problem(self) -> str | None:
        """Why tagd is not healthy, or None when it is."""
        if not self.serving():
            return "shutting down: new visitors are not accepted"
        if self.spool_wanted:
            if self.spool is None:
                return (
                    "no spool: it could not be opened at start-up, events go straight to the "
                    "platforms, best effort (see the log)"
                )
            if not self.spool.healthy:
                return f"the spool cannot be written: {self.spool.last_error}"
        return None


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


class _Health(Resource):
    isLeaf = True

    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", _TEXT)
        problem = self._health.problem()
        if problem is None:
            return b"ok\n"
        request.setResponseCode(503)
        return problem.encode("utf-8") + b"\n"


class AdminRoot(Resource):
    """The admin paths, behind the token when one is set (C{/login} and C{/logout}
    excepted, which begin and end a browser's session).  C{events} is the live stream,
    which the service ends at stop."""

    def __init__(self, metrics: Metrics, health: Health, feed: Feed, token: str, reactor) -> None:
        super().__init__()
        self._access = Access(token, reactor)
        self.events = Events(feed, reactor)
        self.putChild(b"", Page(logout=bool(token)))
        self.putChild(b"metrics", _Metrics(metrics))
        self.putChild(b"healthz", _Health(health))
        self.putChild(b"stats.json", Stats(metrics.registry, feed))
        self.putChild(b"events", self.events)
        self._open = {b"login": self._access.login(), b"logout": self._access.logout()} if token else {}

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path in self._open:
            return self._open[path]
        if not self._access.allows(request):
            return self._access.refusal(path)
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class AdminRequest(Request):
    """A request to the admin listener, which answers HEAD on every path with GET's head,
    Content-Length included, and no body.

    The resource renders a GET; the method turns back to HEAD as the head is written, so
    that Twisted sends no body.  Left to Twisted, a HEAD whose resource returns a body is
    answered the same but logs a warning each time: a line per probe of an uptime check.
    """

    _rendering_head = False

    def render(self, resrc) -> None:
        if self.method == b"HEAD":
            self.method, self._rendering_head = b"GET", True
        super().render(resrc)

    def write(self, data: bytes) -> None:
        if self._rendering_head:
            self.method, self._rendering_head = b"HEAD", False
        super().write(data)


class AdminSite(Site):
    """The admin site: no access lines, since a scrape every few seconds would drown the log."""

    requestFactory = AdminRequest
    noisy = False
    displayTracebacks = False

    def log(self, request) -> None:
        pass


class AdminService(Service):
    """Serves the admin site on C{listen}; a failure to listen is logged, not fatal.

    C{port} is the listening port once bound.  At stop, after the port closes, the
    dashboard's streams are ended too: they would otherwise keep their connections open.
    """

    port = None

    def __init__(self, reactor, listen: str, root: AdminRoot) -> None:
        self._reactor = reactor
        self._listen = listen
        self._root = root
        self._site = AdminSite(root, reactor=reactor)
        self._listening: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        endpoint = serverFromString(self._reactor, self._listen)
        self._listening = endpoint.listen(self._site).addCallbacks(self._listened, self._failed)

    def _listened(self, port) -> None:
        self.port = port
        address = port.getHost()
        where = f"{address.host}:{address.port}" if hasattr(address, "port") else str(address)
        log.info("admin listener on {where}: the dashboard, /metrics, /healthz", where=where)

    def _failed(self, failure) -> None:
        log.error(
            "admin listener cannot listen on {listen}: {reason}; the dashboard, /metrics and "
            "/healthz are not served, visitors still are",
            listen=self._listen,
            reason=failure.getErrorMessage(),
        )

    def stopService(self) -> Deferred | None:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        return listening.addCallback(lambda _: self.port and self.port.stopListening()).addCallback(
            lambda _: self._root.events.close()
        )


def build_admin(
    config: AdminConfig,
    reactor,
    metrics: Metrics,
    *,
    proxy: ProxyResource,
    health: Health,
    feed: Feed,
) -> AdminService:
    """The admin listener for C{config}, its collectors registered on C{metrics}, its
    dashboard following C{feed}."""
    metrics.registry.register(ProxyCollector(proxy))
    if health.spool is not None:
        metrics.registry.register(SpoolCollector(health.spool))
    root = AdminRoot(metrics, health, feed, config.token, reactor)
    return AdminService(reactor, config.listen, root)
