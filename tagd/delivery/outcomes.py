"""What became of each event, told once: the metrics count it and the dashboard's feed
shows it.

Delivery says every outcome through one L{Outcomes}, so the dashboard's figures and
C{/metrics} cannot drift apart: there is no second place to forget.  Match-key coverage is
counted here too, of the events a platform took: an event dead-lettered or expired was
never sent, so it carried no key to anyone.
"""

from __future__ import annotations

from typing import Sequence

from tagd.delivery.destinations import Destination, Outcome
from tagd.tagging.events import Event
from tagd.admin.feed import Feed
from tagd.admin.metrics import Metrics

# An event too old for its platform's window: never sent, not a platform's answer.
EXPIRED = "expired"
# A row's end in the spool after its last try, or for a destination no longer configured.
DEAD = "dead"
# Every outcome tagd_events_delivered_total counts a destination's events under.
OUTCOMES = (*(outcome.value for outcome in Outcome), EXPIRED, DEAD)
SUCCESS = Outcome.SUCCESS.value


class Outcomes:
    """The one observer of acceptance and delivery: L{Metrics} and, when there is one, the
    dashboard's L{Feed}."""

    def __init__(self, metrics: Metrics, feed: Feed | None = None) -> None:
        self._metrics = metrics
        self._feed = feed
        self._types: dict[str, str] = {}  # each destination's type, for its match keys

    def configured(self, destinations: Sequence[Destination]) -> None:
        """C{destinations} are the ones delivered to now.  Each of their delivery series
        starts at 0 until counted (a rate alert needs a series to match before the first
        event); a series already counting keeps its count, and a removed destination's stays."""
        names = [destination.name for destination in destinations]
        for name in names:
            self._metrics.delivery_retries.labels(name)
            for outcome in OUTCOMES:
                self._metrics.deliveries.labels(name, outcome)
        # A removed destination's lane may still settle what it had leased: it stays.
        self._types.update((d.name, d.type) for d in destinations)
        if self._feed is not None:
            self._feed.destinations = tuple(names)

    def accepted(self, events: Sequence[Event]) -> None:
        """C{events} were accepted for delivery; told before anything of their delivery."""
        self._metrics.events_accepted.inc(len(events))
        if self._feed is not None:
            self._feed.accepted(events)

    def delivered(
        self, destination: str, outcome: str, events: Sequence[Event], status: int | None = None, message: str = ""
    ) -> None:
        """C{events} came to C{outcome} at C{destination}; C{status} is the platform's HTTP
        status (None when it was not asked or did not answer), C{message} its answer.
        Delivered events count for the match keys they carried."""
        self._metrics.deliveries.labels(destination, outcome).inc(len(events))
        if outcome == SUCCESS and destination in self._types:
            self._metrics.match_keys.count(destination, self._types[destination], events)
        if self._feed is not None:
            self._feed.delivered(destination, outcome, events, status, message)

    def counted(self, destination: str, outcome: str, count: int, message: str) -> None:
        """C{count} events came to C{outcome} at C{destination} without being read (rows
        dead-lettered in bulk); C{message} says why."""
        self._metrics.deliveries.labels(destination, outcome).inc(count)
        if self._feed is not None:
            self._feed.counted(destination, outcome, count, message)
