"""The dashboard on the admin listener: the page, its counters and its live stream.

  - C{/}: one static page (C{dashboard.html}, shipped with tagd), plain JavaScript that
    needs nothing from the internet;
  - C{/stats.json}: the counters, read from the same registry C{/metrics} exposes, so
    nothing is counted twice and a look costs the visitors nothing;
  - C{/events}: Server-Sent Events, one C{data:} message of JSON per feed entry (see
    L{tagd.admin.feed}), the recent ones first, then each new one as it happens;
    C{?destination=} and C{?outcome=} filter them on the server.  A browser that
    reconnects gets the recent ones again, so the page starts its table afresh then.

A stream is cheap while its reader keeps up.  One that does not (a laptop gone to sleep,
a stalled proxy) would make tagd buffer every entry for it: once the socket's buffer is
full and L{MAX_BEHIND} more bytes wait, the connection is cut and the browser, when it
wakes, reconnects.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from prometheus_client import CollectorRegistry
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tagd.admin.feed import Entry, Feed, encode, matches
from tagd.tagging.matchkeys import coverage
from tagd.delivery.outcomes import OUTCOMES

log = Logger()

# A comment this often keeps proxies and load balancers from cutting an idle stream.
HEARTBEAT = 15.0
# Bytes a stream may have waiting beyond the socket's own buffer before it is cut.
MAX_BEHIND = 1024 * 1024
# How long a browser waits before it reconnects a stream that ended, in milliseconds.
RECONNECT_MS = 3000

_JSON = b"application/json"
# The per-destination gauges of L{stats}' C{state}, by the key each goes under.
_STATE = {
    "tagd_destination_up": "up",
    "tagd_spool_backlog_events": "backlog",
    "tagd_spool_oldest_pending_seconds": "oldest_seconds",
}


def _page() -> tuple[bytes, bytes]:
    """The page, and a Content-Security-Policy that allows its own inline script (by
    hash) and connections back to tagd, nothing else: the table shows names and messages
    that the origin and the platforms chose."""
    page = files("tagd.admin").joinpath("dashboard.html").read_bytes()
    script = re.search(rb"<script>(.*?)</script>", page, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script).digest())
    policy = (
        b"default-src 'none'; script-src 'sha256-" + digest + b"'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    return page, policy


# With a token, the page's header ends the browser's session (see L{tagd.admin.access}); without
# one there is no session, and the button would only mislead.
_LOGOUT = b'<form method="post" action="logout"><button id="logout" type="submit">Log out</button></form>'


class Page(Resource):
    """C{/}: the page, read once at start-up; C{logout} adds the button that ends a session."""

    isLeaf = True

    def __init__(self, logout: bool) -> None:
        super().__init__()
        page, self._policy = _page()
        self._page = page.replace(b"</header>", _LOGOUT + b"</header>", 1) if logout else page

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", self._policy)
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-store")
        return self._page


def stats(registry: CollectorRegistry, destinations) -> dict:
    """The counters the dashboard shows, from C{registry}'s samples: visitors' answers by
    status, requests in flight, events accepted, delivery outcomes by destination (C{dead}
    counts dead letters since start), each destination's state (C{up}: 1, or 0 while it
    is out or refuses the credentials) and backlog (events owed, the oldest's age in
    seconds), drops by reason, the spool's depth (None without a spool) and the match
    keys' coverage (L{tagd.tagging.matchkeys.coverage}); with the
    destinations and every outcome, which the page's filters and table offer."""
    counts: dict = {
        "destinations": list(destinations),
        "outcomes": list(OUTCOMES),
        "requests": {},
        "in_flight": 0,
        "accepted": 0,
        "delivered": {name: {} for name in destinations},
        "state": {name: {} for name in destinations},
        "dropped": {},
        "spool": None,
    }
    key_events: dict = {}
    keys: dict = {}
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, int(sample.value)
            if name == "tagd_requests_total":
                counts["requests"][labels["status"]] = value
            elif name == "tagd_requests_in_flight":
                counts["in_flight"] = value
            elif name == "tagd_events_accepted_total":
                counts["accepted"] = value
            elif name == "tagd_events_delivered_total":
                counts["delivered"].setdefault(labels["destination"], {})[labels["outcome"]] = value
            elif name in _STATE:
                counts["state"].setdefault(labels["destination"], {})[_STATE[name]] = value
            elif name == "tagd_tracking_dropped_total":
                counts["dropped"][labels["reason"]] = value
            elif name.startswith("tagd_spool_"):
                key = name.removeprefix("tagd_spool_").removesuffix("_events")
                counts["spool"] = {**(counts["spool"] or {}), key: value}
            elif name == "tagd_match_key_events_total":
                key_events[labels["destination"], labels["event"]] = value
            elif name == "tagd_match_keys_total":
                keys[labels["destination"], labels["event"], labels["key"]] = value
    counts["match_keys"] = coverage(key_events, keys)
    return counts


class Stats(Resource):
    """C{/stats.json}: what L{stats} says, read at every request (the page asks every few seconds)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, feed: Feed) -> None:
        super().__init__()
        self._registry = registry
        self._feed = feed

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", _JSON)
        request.setHeader(b"Cache-Control", b"no-store")
        return encode(stats(self._registry, self._feed.destinations)).encode("utf-8")


@implementer(IPushProducer)
class _Stream:
    """One reader of C{/events}.  The connection is its consumer: it pauses the stream
    when the socket's buffer is full, and what is written meanwhile is counted."""

    def __init__(self, request: Request, destination: str | None, outcome: str | None) -> None:
        self._request = request
        self._destination = destination
        self._outcome = outcome
        self._paused = False
        self._behind = 0
        self._cut = False

    def replay(self, entries: list[Entry]) -> None:
        """The recent entries, first thing for a new reader.  The ring bounds them, so
        they are not counted against L{MAX_BEHIND}: only what comes after them grows."""
        self._request.write(b"retry: %d\n\n" % RECONNECT_MS)
        for entry in entries:
            if matches(entry, self._destination, self._outcome):
                self._request.write(_message(encode(entry)))

    def send(self, entry: Entry, text: str) -> None:
        """The feed's subscriber: one message for each entry that passes the filters."""
        if matches(entry, self._destination, self._outcome):
            self.write(_message(text))

    def write(self, data: bytes) -> None:
        if self._cut:
            return  # The connection ends at the reactor's next turn; nothing more for it.
        self._request.write(data)
        if self._paused:
            self._behind += len(data)
            if self._behind > MAX_BEHIND:
                log.info("a dashboard stream fell behind and was closed")
                self.cut()

    def cut(self) -> None:
        """Drop the connection without waiting for the reader."""
        self._cut = True
        self._request.transport.abortConnection()

    def end(self) -> None:
        """Close the connection once what is written has been sent."""
        self._request.transport.loseConnection()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused, self._behind = False, 0

    def stopProducing(self) -> None:
        """The connection is going; L{Events} cleans up when the request's end is notified."""


class Events(Resource):
    """C{/events}: the feed as Server-Sent Events, to every reader until it goes away."""

    isLeaf = True

    def __init__(self, feed: Feed, reactor) -> None:
        super().__init__()
        self._feed = feed
        self._reactor = reactor
        self._streams: set[_Stream] = set()

    def render_GET(self, request: Request):
        destination = _argument(request, b"destination")
        outcome = _argument(request, b"outcome")
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx would hold the messages back
        stream = _Stream(request, destination, outcome)
        request.registerProducer(stream, True)
        stream.replay(self._feed.subscribe(stream.send))
        heartbeat = LoopingCall(stream.write, b": keep-alive\n\n")
        heartbeat.clock = self._reactor
        heartbeat.start(HEARTBEAT, now=False).addErrback(
            lambda failure: log.failure("a dashboard stream's keep-alive failed", failure)
        )
        self._streams.add(stream)

        def gone(_) -> None:
            self._feed.unsubscribe(stream.send)
            self._streams.discard(stream)
            if heartbeat.running:
                heartbeat.stop()

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET

    def close(self) -> None:
        """End every stream (tagd is stopping)."""
        for stream in list(self._streams):
            stream.end()


def _message(text: str) -> bytes:
    """One Server-Sent Events message with C{text} (one line of JSON) as its data."""
    return b"data: %s\n\n" % text.encode("utf-8")


def _argument(request: Request, name: bytes) -> str | None:
    """A query parameter's first value; None when absent or empty (no filter)."""
    value = (request.args.get(name) or [b""])[0]
    return value.decode("utf-8", "replace") or None
