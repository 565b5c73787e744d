"""Direct, best-effort delivery of events to the configured destinations with treq.

Each batch of events goes to every destination at once; each platform's answer is
classified by its destination and counted.  Nothing here is awaited by a visitor's
request.  This is the boundary that the durable spool takes over: L{DirectDelivery.submit}
is the one call the tracker makes.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from tagd.destinations import Describing, Destination, Outcome, OutgoingRequest
from tagd.events import Event
from tagd.metrics import Metrics

log = Logger()


@attrs.frozen
class Route:
    """A destination and how long one request to it may take."""

    destination: Destination
    timeout: float


def http_client(reactor, pool_size: int = 10) -> tuple[HTTPClient, HTTPConnectionPool]:
    """tagd's own treq client for the platforms, on a persistent pool of its own."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = pool_size
    return HTTPClient(Agent(reactor, pool=pool)), pool


class DirectDelivery:
    """Send every submitted batch to every destination, once, and count the outcome."""

    def __init__(self, *, reactor, routes: Sequence[Route], http: HTTPClient, metrics: Metrics) -> None:
        self._reactor = reactor
        self._routes = tuple(routes)
        self._http = http
        self._metrics = metrics

    def submit(self, events: Sequence[Event]) -> Deferred:
        """Start delivering C{events}; the Deferred (for tests and shutdown) fires when all answered."""
        attempts = []
        for route in self._routes:
            if isinstance(route.destination, Describing):
                for line in route.destination.describe(events):
                    log.info("{destination} (dry run): {line}", destination=route.destination.name, line=line)
                self._count(route, len(events), Outcome.SUCCESS)
                continue
            requests = route.destination.encode(events)
            self._count_unsendable(route, events, requests)
            for request in requests:
                attempts.append(ensureDeferred(self._send(route, request)))
        return DeferredList(attempts, consumeErrors=True)

    def _count_unsendable(self, route: Route, events: Sequence[Event], requests) -> None:
        """Events a destination cannot encode (GA4 without a client id) are counted, not lost silently."""
        sent = {event_id for request in requests for event_id in request.event_ids}
        unsendable = sum(1 for event in events if event.event_id not in sent)
        if unsendable:
            self._count(route, unsendable, Outcome.PERMANENT)
            log.warn(
                "{destination}: {count} event(s) cannot be sent to this platform (missing ids)",
                destination=route.destination.name,
                count=unsendable,
            )

    async def _send(self, route: Route, request: OutgoingRequest) -> None:
        destination = route.destination
        count = len(request.event_ids)
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
            self._count(route, count, Outcome.TRANSIENT)
            return
        verdict = destination.classify(response.code, body)
        self._count(route, count, verdict.outcome)
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

    def _count(self, route: Route, count: int, outcome: Outcome) -> None:
        self._metrics.deliveries.labels(route.destination.name, outcome.value).inc(count)
