"""Delivery to the platforms: what the dispatcher and the direct fallback share, and the
direct, best-effort delivery used when the spool cannot be opened.

Both deliver through tagd's own treq client (L{http_client}) and keep events the platform
would refuse for their age out of every request (L{expired}), so that the fallback sends
exactly what the dispatcher would, only without retries.

L{DirectDelivery} sends each batch of events to every destination at once; each
platform's answer is classified by its destination and counted.  Nothing here is awaited
by a visitor's request: L{DirectDelivery.submit} is the one call made for the events
the tracker hands over (see L{tagd.pipeline}).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from tagd.destinations import Describing, Destination, Outcome, OutgoingRequest
from tagd.events import Event
from tagd.feed import Feed
from tagd.metrics import Metrics

log = Logger()

DAY = 86400.0
# How old an event a platform still takes, by destination type (PLATFORMS.md).  Meta and
# TikTok refuse a whole request for one event older than this, so such events must never
# reach a batch.  A platform fact, the same for every destination of a type, hence one
# table here; a type that is absent (webhook, log) takes events of any age.  Not to be
# confused with the tracker's own limit on the event times it accepts from the origin.
PLATFORM_MAX_AGE: Mapping[str, float] = MappingProxyType(
    {
        "meta": 7 * DAY,
        "ga4": 72 * 3600.0,
        "tiktok": 7 * DAY,  # unconfirmed: TikTok's documentation gives no figure
    }
)
# An event this close to its platform's limit is expired too: it could cross the limit
# while the request travels, or by the difference between our clock and the platform's.
AGE_MARGIN = 60.0
# The outcome counted for an event past its platform's window: never sent, never retried.
EXPIRED = "expired"


def expired(destination: Destination, event: Event, now: float) -> bool:
    """Whether C{destination}'s platform would refuse C{event} for its age at C{now}
    (epoch seconds), allowing for L{AGE_MARGIN}."""
    window = PLATFORM_MAX_AGE.get(destination.type)
    return window is not None and event.event_time < now - window + AGE_MARGIN


@attrs.frozen
class Route:
    """A destination, how long one request to it may take, and how many may be in flight
    at once (None: as many as the dispatcher allows every destination that does not say)."""

    destination: Destination
    timeout: float
    concurrency: int | None = None


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's factory for connections to the platforms, without Twisted's "Starting
    factory" and "Stopping factory" lines, which it would log at info for every
    connection opened and closed: noise at the rate of the traffic, saying nothing."""

    noisy = False


def http_client(reactor, pool_size: int = 10) -> tuple[HTTPClient, HTTPConnectionPool]:
    """tagd's own treq client for the platforms, on a persistent pool of its own."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = pool_size
    pool._factory = _QuietClientFactory  # the pool's documented hook for its factory
    return HTTPClient(Agent(reactor, pool=pool)), pool


class DirectDelivery:
    """Send every submitted batch to every destination, once, and count the outcome;
    events past a platform's age window are counted as expired instead (see L{expired})."""

    def __init__(
        self, *, reactor, routes: Sequence[Route], http: HTTPClient, metrics: Metrics, feed: Feed | None = None
    ) -> None:
        self._reactor = reactor
        self._routes = tuple(routes)
        self._http = http
        self._metrics = metrics
        self._feed = feed

    def submit(self, events: Sequence[Event]) -> Deferred:
        """Start delivering C{events}; the Deferred (for tests and shutdown) fires when all answered."""
        attempts = []
        now = self._reactor.seconds()
        for route in self._routes:
            fresh = self._fresh(route, events, now)
            if isinstance(route.destination, Describing):
                for line in route.destination.describe(fresh):
                    log.info("{destination} (dry run): {line}", destination=route.destination.name, line=line)
                self._count(route, fresh, Outcome.SUCCESS.value)
                continue
            requests = route.destination.encode(fresh)
            self._count_unsendable(route, fresh, requests)
            for request in requests:
                carried = [fresh[position] for position in request.positions]
                attempts.append(ensureDeferred(self._send(route, request, carried)))
        return DeferredList(attempts, consumeErrors=True)

    def _fresh(self, route: Route, events: Sequence[Event], now: float) -> list[Event]:
        """The events the route's platform still takes; the others are counted as expired,
        as the dispatcher counts them, and never sent: Meta and TikTok would refuse the
        whole request for one of them."""
        fresh: list[Event] = []
        stale: list[Event] = []
        for event in events:
            (stale if expired(route.destination, event, now) else fresh).append(event)
        if stale:
            self._count(route, stale, EXPIRED)
            log.info(
                "{destination}: {count} event(s) expired, older than the platform takes",
                destination=route.destination.name,
                count=len(stale),
            )
        return fresh

    def _count_unsendable(self, route: Route, events: Sequence[Event], requests) -> None:
        """Events a destination cannot encode (GA4 without a client id) are counted, not lost silently."""
        sent = {position for request in requests for position in request.positions}
        unsendable = [event for position, event in enumerate(events) if position not in sent]
        if unsendable:
            self._count(route, unsendable, Outcome.PERMANENT.value, message="an identifier the platform requires is missing")
            log.warn(
                "{destination}: {count} event(s) cannot be sent to this platform (missing ids)",
                destination=route.destination.name,
                count=len(unsendable),
            )

    async def _send(self, route: Route, request: OutgoingRequest, events: Sequence[Event]) -> None:
        destination = route.destination
        count = len(events)
        try:
            response = await self._http.request(
                request.method,
                request.url,
                data=request.body,
                headers=dict(request.headers),
                timeout=route.timeout,
                reactor=self._reactor,
            )
            body = await treq.content(response)
        except Exception as e:
            # The exception text may quote the URL, and with it a token: name the type only.
            log.warn(
                "{destination}: no answer from {url}: {error}",
                destination=destination.name,
                url=request.log_url,
                error=type(e).__name__,
            )
            self._count(route, events, Outcome.TRANSIENT.value, message=f"no answer: {type(e).__name__}")
            return
        verdict = destination.classify(response.code, body)
        self._count(route, events, verdict.outcome.value, response.code, verdict.message)
        if verdict.outcome is Outcome.SUCCESS:
            log.debug(
                "{destination}: {count} event(s) delivered ({status})",
                destination=destination.name,
                count=count,
                status=response.code,
            )
        else:
            log.warn(
                "{destination}: {count} event(s) not delivered, {outcome}: {message}",
                destination=destination.name,
                count=count,
                outcome=verdict.outcome.value,
                message=verdict.message,
            )

    def _count(
        self, route: Route, events: Sequence[Event], outcome: str, status: int | None = None, message: str = ""
    ) -> None:
        """Count C{events}' outcome, and tell the dashboard's feed."""
        name = route.destination.name
        self._metrics.deliveries.labels(name, outcome).inc(len(events))
        if self._feed is not None:
            self._feed.delivered(name, outcome, events, status, message)
