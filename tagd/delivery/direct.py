"""Delivery to the platforms: what the dispatcher and the direct fallback share, and the
direct, best-effort delivery used when the spool cannot be opened.

Both send through an L{IAgent} (tagd's own, L{tagd.delivery.client.PlatformAgent}), read
the answers with C{treq.collect} (L{exchange}), and keep events the platform would refuse
for their age out of every request (L{expired}), so that the fallback sends exactly what
the dispatcher would, only without retries.

L{DirectDelivery} sends each batch of events to every destination at once; each
platform's answer is classified by its destination and counted.  Nothing here is awaited
by a visitor's request: L{DirectDelivery.submit} is the one call made for the events
the tracker hands over (see L{tagd.delivery.service}).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Collection, Mapping, Sequence, TypeVar

import attrs
import treq
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, fail
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from tagd.delivery.client import BytesProducer, abandon
from tagd.delivery.destinations import Describing, Destination, Outcome, OutgoingRequest, Selective, Verdict
from tagd.tagging.events import Event
from tagd.delivery.outcomes import EXPIRED, Outcomes

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
        "pinterest": 7 * DAY,  # unconfirmed: Pinterest documents no figure; Meta's
        "snapchat": 37 * DAY,
        "reddit": 7 * DAY,
        "microsoft": 7 * DAY,  # unconfirmed: from third-party notes on Microsoft's documentation
    }
)
# An event this close to its platform's limit is expired too: it could cross the limit
# while the request travels, or by the difference between our clock and the platform's.
AGE_MARGIN = 60.0


def expired(destination: Destination, event: Event, now: float) -> bool:
    """Whether C{destination}'s platform would refuse C{event} for its age at C{now}
    (epoch seconds), allowing for L{AGE_MARGIN}."""
    window = PLATFORM_MAX_AGE.get(destination.type)
    return window is not None and event.event_time < now - window + AGE_MARGIN


T = TypeVar("T")
# The most of a platform's answer tagd reads: their answers are a few hundred bytes, an
# error page a few kilobytes; a body without end (a broken or hostile endpoint) must not
# fill the droplet's memory.
MAX_ANSWER = 1024 * 1024


class AnswerTooLarge(Exception):
    """A platform's answer went past L{MAX_ANSWER}; its connection is closed."""


class _Collector:
    """Where C{treq.collect} puts an answer's body: at most C{limit} bytes of it."""

    __slots__ = ("parts", "size", "limit")

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise AnswerTooLarge()
        self.parts.append(data)


def read_answer(response: IResponse, limit: int = MAX_ANSWER) -> Deferred[bytes]:
    """A platform's answer body, at most C{limit} bytes, read by C{treq.collect}; past
    the limit L{AnswerTooLarge} is raised, and treq closes the connection.  Cancelling
    it (a timeout while the body trickles) closes the connection too."""
    collector = _Collector(limit)
    collected = treq.collect(response, collector)
    reading: Deferred[bytes] = Deferred(lambda _: abandon(response))
    collected.addCallbacks(lambda _: reading.callback(b"".join(collector.parts)), reading.errback)
    return reading


# Twisted's Headers of the header fields tagd sends, kept: a destination's are the same
# for every request, and agents only read them (Agent copies before it adds its own).
_KEPT_HEADERS = 256
_headers: dict[tuple[tuple[str, str], ...], Headers] = {}


def request_headers(fields: Mapping[str, str]) -> Headers:
    """A request's header fields as Twisted's L{Headers}; a line break is refused
    (L{Headers} would make it a space, leaving a token or a value garbled, not refused)."""
    key = tuple(fields.items())
    headers = _headers.get(key)
    if headers is None:
        headers = Headers()
        for name, value in key:
            if "\n" in value or "\r" in value:
                raise ValueError("a header holds a line break")
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        if len(_headers) >= _KEPT_HEADERS:
            _headers.clear()
        _headers[key] = headers
    return headers


def exchange(agent: IAgent, request: OutgoingRequest) -> Deferred[tuple[IResponse, bytes]]:
    """Send C{request} and read its whole answer (L{read_answer}): one Deferred for both,
    so that one timeout covers both, and cancelling it closes the connection."""
    try:
        headers = request_headers(request.headers)
        method, url = request.method.encode("ascii"), request.url.encode("ascii")
    except ValueError:  # UnicodeEncodeError too
        return fail()
    return agent.request(method, url, headers, BytesProducer(request.body)).addCallback(_read)


def _read(response: IResponse) -> tuple[IResponse, bytes] | Deferred[tuple[IResponse, bytes]]:
    if response.length == 0:
        return response, b""  # no body: treq.collect would read none either
    return read_answer(response).addCallback(lambda body: (response, body))


def judged(destination: Destination, request: OutgoingRequest, status: int, body: bytes) -> Verdict:
    """The destination's verdict on an answer to C{request}.  An answer that speaks event
    by event but not for each of the request's events (a list too short, or empty) is no
    answer for the rest: transient, so that no event counts as delivered unseen."""
    verdict = destination.classify(status, body)
    if verdict.answered is not None and verdict.answered != len(request.positions):
        return Verdict(
            Outcome.TRANSIENT,
            f"{verdict.message}; the answer speaks for {verdict.answered} of {len(request.positions)} event(s)",
        )
    return verdict


def by_unsendable_reason(
    destination: Destination, items: Sequence[T], event_of: Callable[[T], Event]
) -> dict[str, list[T]]:
    """C{items} (events, or spool rows) that no request of C{destination} carries, grouped
    by why: the reason a L{Selective} destination gives, else a missing identifier (GA4
    sends no event without its client id)."""
    groups: dict[str, list[T]] = {}
    for item in items:
        reason = destination.refusal(event_of(item)) if isinstance(destination, Selective) else None
        reason = reason or f"{destination.type} cannot send this event: an identifier it requires is missing"
        groups.setdefault(reason, []).append(item)
    return groups


@attrs.frozen
class Route:
    """A destination, how long one request to it may take, and how many may be in flight
    at once (None: as many as the dispatcher allows every destination that does not say)."""

    destination: Destination
    timeout: float
    concurrency: int | None = None


class DirectDelivery:
    """Send every submitted batch to every destination, once, and count the outcome;
    events past a platform's age window are counted as expired instead (see L{expired})."""

    def __init__(
        self, *, reactor, routes: Sequence[Route], http: IAgent, outcomes: Outcomes
    ) -> None:
        self._reactor = reactor
        self._routes = tuple(routes)
        self._http = http
        self._outcomes = outcomes

    def submit(self, events: Sequence[Event], allowed: Collection[str] | None = None) -> Deferred:
        """Start delivering C{events} to the destinations named in C{allowed} (every one
        when C{None}); the Deferred (for tests and shutdown) fires when all answered."""
        attempts = []
        now = self._reactor.seconds()
        for route in self._routes:
            if allowed is not None and route.destination.name not in allowed:
                continue
            fresh = self._fresh(route, events, now)
            if isinstance(route.destination, Describing):
                for line in route.destination.describe(fresh):
                    log.info("{destination} (dry run): {line}", destination=route.destination.name, line=line)
                self._outcomes.delivered(route.destination.name, Outcome.SUCCESS.value, fresh)
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
            self._outcomes.delivered(route.destination.name, EXPIRED, stale)
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
        for reason, group in by_unsendable_reason(route.destination, unsendable, lambda event: event).items():
            self._outcomes.delivered(route.destination.name, Outcome.PERMANENT.value, group, message=reason)
            log.warn(
                "{destination}: {count} event(s) cannot be sent to this platform: {reason}",
                destination=route.destination.name,
                count=len(group),
                reason=reason,
            )

    async def _send(self, route: Route, request: OutgoingRequest, events: Sequence[Event]) -> None:
        destination = route.destination
        count = len(events)
        try:
            response, body = await exchange(self._http, request).addTimeout(route.timeout, self._reactor)
        except Exception as e:
            # The exception text may quote the URL, and with it a token: name the type only.
            log.warn(
                "{destination}: no answer from {url}: {error}",
                destination=destination.name,
                url=request.log_url,
                error=type(e).__name__,
            )
            self._outcomes.delivered(route.destination.name, Outcome.TRANSIENT.value, events, message=f"no answer: {type(e).__name__}")
            return
        verdict = judged(destination, request, response.code, body)
        refused = dict(verdict.refused)
        if refused:
            # A partial success (Pinterest): the refused events are the platform's verdict on them.
            for index, event in enumerate(events):
                if index in refused:
                    self._outcomes.delivered(route.destination.name, Outcome.PERMANENT.value, [event], response.code, refused[index])
            events = [event for index, event in enumerate(events) if index not in refused]
            count = len(events)
        self._outcomes.delivered(route.destination.name, verdict.outcome.value, events, response.code, verdict.message)
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
