"""Tagging: the proxy's tracking hook turns tracking header values into events.

For a response that carries the tracking header, L{Tracker} decides (path, status,
speculative load, bot, in that order: cheapest first), reads the visitor's consent and
decides from it which destinations may have the events (each by its consent purpose; none
at all drops the response), parses the header, and resolves the visitor's first-party
ids.  That part is quick and runs before the response head goes out, because the cookies
it sets travel in that head.  Building the events is left for after the head is on its
way, and handing them to delivery for after that, in one call for all the responses of
that reactor turn.  Every drop is counted
by reason; a malformed header, an event out of its time window and the events past a
response's cap are logged with their reason, never with the header's content.
"""

from __future__ import annotations

import os
import random
import time
from functools import lru_cache
from itertools import chain
from typing import Callable, Collection, Sequence

from twisted.logger import Logger

from tagd.daemon.config import DestinationConfig, TrackingConfig
from tagd.tagging.consent import DEFAULT_PURPOSES, NOTHING, ConsentReader, Granted, allows
from tagd.tagging.cookiedomain import CookieScoper
from tagd.tagging.events import Event, EventSpec, TrackingHeaderError, parse_tracking_header
from tagd.tagging.filters import BotDetector, PathFilter, is_speculative, tracked_statuses
from tagd.tagging.identity import (
    PLATFORMS,
    Identity,
    event_id_cookies,
    new_event_id,
    parse_cookie_header,
    resolve_identity,
)
from tagd.admin.metrics import Metrics
from tagd.ratelimit import RateLimitedLog
from tagd.tagging.hook import Tracked, Visit

log = Logger()

# Meta drops a whole request for one event older than 7 days, and no platform takes events
# from the future: the origin's own event_time must fall inside this window.
MAX_EVENT_AGE = 7 * 24 * 3600
MAX_CLOCK_SKEW = 60
# Distinct tracking header values whose parsed events are kept: a cached page sends the
# same value to every visitor, and parsing it again would give the same immutable specs.
PARSED_HEADERS = 256
# Not page views: uptime monitors probe with HEAD, browsers preflight with OPTIONS.
UNTRACKED_METHODS = frozenset({b"HEAD", b"OPTIONS"})
def called_for(destination: DestinationConfig) -> frozenset[str]:
    """The platforms whose first-party cookies C{destination} calls for: an ad platform's
    its own (a platform not configured gains nothing from its cookies, so tagd sets none
    for it); the dry-run log those its C{platforms} setting names, so that it shows what
    they would get; any other (a webhook) none: it passes on the ids the visitor has."""
    if destination.type == "log":
        return frozenset(destination.destination.platforms)
    return frozenset({destination.type}) & PLATFORMS


def _header_parser(max_header_bytes: int) -> Callable[[bytes], tuple[EventSpec, ...]]:
    """One header value's events, cached (never an error: a malformed value is refused,
    counted and logged every time it comes).

    A closure rather than a cached method of the tracker: the tracker would refer to
    itself, and a tracker of start-up that a reload replaces would never be freed (see
    L{tagd.daemon.collection}).
    """

    @lru_cache(maxsize=PARSED_HEADERS)
    def parsed(value: bytes) -> tuple[EventSpec, ...]:
        return tuple(parse_tracking_header(value, max_header_bytes))

    return parsed


def _cookie_platforms(destinations: Collection[DestinationConfig]) -> list[tuple[str, str]]:
    """The platforms whose cookies the destinations call for, each with the purpose the
    visitor must grant for tagd to create them: the platform's own, whatever purpose a
    destination's events need, since a cookie is stored on the visitor's device for that
    platform (a Meta table that needs no consent still creates no C{_fbp} for a visitor
    who refused marketing)."""
    platforms = {platform for d in destinations for platform in called_for(d)}
    return [(platform, DEFAULT_PURPOSES[platform]) for platform in sorted(platforms)]


class Tracker:
    """The tracking hook of a proxy with destinations configured.

    C{submit} hands a response's events to delivery with the names of the destinations
    the visitor's consent allows; delivery counts as accepted those it takes (a full spool
    refuses some, and counts them as dropped).
    """

    def __init__(
        self,
        *,
        config: TrackingConfig,
        submit: Callable[[Sequence[Event], Sequence[str]], object],
        metrics: Metrics,
        destinations: Collection[DestinationConfig],
        clock: Callable[[], float] = time.time,
        rand=None,
    ) -> None:
        self._config = config
        self._destinations = tuple((d.name, d.consent_purpose) for d in destinations)
        # With first_party_cookies off tagd may set no cookie, so it creates no id either.
        self._cookie_purposes = _cookie_platforms(destinations) if config.first_party_cookies else []
        # By granted purposes (a handful of distinct values): the destinations allowed, the
        # platforms whose ids tagd may create, and the withheld counters of the others.
        self._decisions: dict[Granted, tuple[tuple[str, ...], frozenset[str], tuple]] = {}
        self._consent = ConsentReader(
            honor_gpc=config.honor_gpc,
            source=config.consent_source,
            consent_cookie=config.consent_cookie,
            consent_values=config.consent_values,
        )
        self._scopes = CookieScoper(config.cookie_domain)
        self._withheld = {name: metrics.consent_withheld.labels(name) for name, _ in self._destinations}
        self._submit = submit
        # Each delivery's events, by the destinations allowed, until the hand-over.
        self._gathered: dict[tuple[str, ...], list[list[Event]]] = {}
        self._metrics = metrics
        self._clock = clock
        # Ids need to be unique, not secret (a cookie shows them to the page anyway): a
        # per-process generator seeded from the OS is as unique and much cheaper than
        # asking the OS every time.
        self._rand = rand if rand is not None else random.Random(os.urandom(32))
        self._parsed = _header_parser(config.max_header_bytes)
        self._paths = PathFilter(config.include_paths, config.exclude_paths)
        self._statuses = tracked_statuses(config.track_statuses)
        self._bots = BotDetector(config.extra_bots, config.allow_bots)
        self._drops_said = RateLimitedLog(log, clock)

    def __call__(self, values: list[bytes], visit: Visit) -> Tracked | None:
        headers = visit.request_headers
        user_agent = headers.getRawHeaders(b"user-agent", (b"",))[0].decode("latin-1")
        reason = self._refusal(visit, user_agent)
        if reason is not None:
            self._metrics.tracking_dropped.labels(reason).inc()
            return None
        cookies = parse_cookie_header(headers.getRawHeaders(b"cookie", ()))
        granted = self._consent.granted(headers, cookies)
        allowed, create_for, withheld = self._decision(granted)
        if not allowed:
            self._metrics.tracking_dropped.labels("consent").inc()
            return None
        specs = self._parse(values, visit)
        if not specs:
            return None
        now = self._clock()
        secure = visit.scheme == "https"
        scope = self._scopes.scope(visit.host)
        identity = resolve_identity(
            cookies=cookies,
            query=visit.uri.partition(b"?")[2],
            now=now,
            secure=secure,
            rand=self._rand,
            create_for=create_for,
            scope=scope,
        )
        event_ids = [spec.event_id or new_event_id(self._rand) for spec in specs]
        set_cookies = list(identity.set_cookies)
        # The event-id cookies are for the page's pixels, which a visitor who granted no
        # purpose does not run: only destinations needing no consent have the events then.
        if self._config.event_id_cookie and granted != NOTHING:
            set_cookies += self._event_id_cookies(specs, event_ids, secure, now, scope.domain)

        def deliver() -> None:
            events = self._events(specs, event_ids, visit, user_agent, identity, now, granted)
            if events:
                # Match keys are counted on delivery (L{tagd.delivery.outcomes.Outcomes.delivered}).
                for counter in withheld:
                    counter.inc(len(events))
                self._gathered.setdefault(allowed, []).append(events)

        return Tracked(set_cookies=tuple(set_cookies), deliver=deliver, hand_over=self._hand_over)

    def _hand_over(self) -> None:
        """Submit the events that the deliveries run since the last hand-over gathered: those
        allowed the same destinations in one call (a spool pays for each call: its
        journal's write, its timer).  Should that call fail, each response's events are
        submitted on their own, so that one response that cannot be stored costs no other
        its events."""
        gathered, self._gathered = self._gathered, {}
        for allowed, responses in gathered.items():
            try:
                self._submit(responses[0] if len(responses) == 1 else list(chain.from_iterable(responses)), allowed)
            except Exception:
                if len(responses) == 1:
                    log.failure("tracking delivery failed; the response was not affected")
                    continue
                for events in responses:
                    try:
                        self._submit(events, allowed)
                    except Exception:
                        log.failure("tracking delivery failed; the response was not affected")

    def _decision(self, granted: Granted) -> tuple[tuple[str, ...], frozenset[str], tuple]:
        """The destinations C{granted} allows, the platforms whose ids tagd may create, and
        the counters of the events withheld from each destination it does not allow."""
        decision = self._decisions.get(granted)
        if decision is None:
            allowed = tuple(name for name, purpose in self._destinations if allows(granted, purpose))
            create_for = frozenset(p for p, purpose in self._cookie_purposes if allows(granted, purpose))
            withheld = tuple(self._withheld[name] for name, _purpose in self._destinations if name not in allowed)
            decision = self._decisions[granted] = (allowed, create_for, withheld)
        return decision

    def _event_id_cookies(
        self,
        specs: Sequence[EventSpec],
        event_ids: Sequence[str],
        secure: bool,
        now: float,
        domain: str | None,
    ) -> list[bytes]:
        """The cookies that give the page the event ids, so its pixel can send the same ones.

        The configured name holds the first event's id, for pages written for one event;
        C{<name>_<event_name>} holds each event's own, so that with several events the
        pixel code for each can pick its id.  Event names are letters, digits and C{_}, so
        the name stays a cookie token; of two events with one name, the first one's id is
        kept, as under the configured name: one cookie holds one id.
        """
        name = self._config.event_id_cookie
        values = {name: event_ids[0]}
        for spec, event_id in zip(specs, event_ids):
            values.setdefault(f"{name}_{spec.event_name}", event_id)
        return event_id_cookies(values, secure, now=now, domain=domain)

    def _refusal(self, visit: Visit, user_agent: str) -> str | None:
        """Why this response is not tracked at all, or None; cheapest checks first."""
        if visit.method in UNTRACKED_METHODS:
            return "method"
        if not self._paths.allows(visit.uri):
            return "path"
        if visit.status not in self._statuses:
            return "status"
        if is_speculative(visit.request_headers):
            return "prefetch"
        if self._bots.is_bot(user_agent):
            return "bot"
        return None

    def _parse(self, values: list[bytes], visit: Visit) -> list[EventSpec]:
        """The events of every well-formed value, in order, up to the response's cap: the
        origin may send the header any number of times, each value with events of its own."""
        specs: list[EventSpec] = []
        for value in values:
            try:
                specs.extend(self._parsed(value))
            except TrackingHeaderError as e:
                self._drop("malformed", f"a value ignored: {e}", visit)
        cap = self._config.max_events_per_response
        if len(specs) > cap:
            surplus = len(specs) - cap
            why = f"{surplus} event(s) past max_events_per_response ({cap}) dropped"
            self._drop("too_many_events", why, visit, surplus)
            del specs[cap:]
        return specs

    def _drop(self, reason: str, why: str, visit: Visit, count: int = 1) -> None:
        """Count C{count} drops under C{reason}, and say why in one line a minute at most per
        reason, whatever varies: a broken origin would log every view."""
        self._metrics.tracking_dropped.labels(reason).inc(count)
        self._drops_said.warn(
            reason,
            'tracking header on {path}: {why} (all counted in tagd_tracking_dropped_total{{reason="{reason}"}})',
            times=count,
            path=visit.uri.partition(b"?")[0].decode("latin-1"),
            why=why,
            reason=reason,
        )

    def _events(
        self,
        specs: Sequence[EventSpec],
        event_ids: Sequence[str],
        visit: Visit,
        user_agent: str,
        identity: Identity,
        now: float,
        granted: Granted,
    ) -> list[Event]:
        referrer = visit.request_headers.getRawHeaders(b"referer", (None,))[0]
        source_url = visit.url()
        events = []
        for spec, event_id in zip(specs, event_ids):
            event_time = spec.event_time or int(now)
            if not now - MAX_EVENT_AGE <= event_time <= now + MAX_CLOCK_SKEW:
                self._drop("event_time", "an event dropped: event_time outside the last 7 days", visit)
                continue
            events.append(
                Event(
                    event_name=spec.event_name,
                    event_id=event_id,
                    event_time=event_time,
                    source_url=source_url,
                    client_ip=visit.client_ip,
                    user_agent=user_agent,
                    referrer=referrer.decode("latin-1") if referrer else None,
                    custom_data=spec.custom_data,
                    contents=spec.contents,
                    user_data=spec.user_data,
                    fbp=identity.fbp,
                    fbc=identity.fbc,
                    ttclid=identity.ttclid,
                    ttp=identity.ttp,
                    ga_client_id=identity.ga_client_id,
                    ga_session_id=identity.ga_session_id,
                    epik=identity.epik,
                    scclid=identity.scclid,
                    scid=identity.scid,
                    rdt_cid=identity.rdt_cid,
                    rdt_uuid=identity.rdt_uuid,
                    msclkid=identity.msclkid,
                    uetvid=identity.uetvid,
                    consent=granted,
                )
            )
        return events
