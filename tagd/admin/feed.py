"""The live feed behind the dashboard: a bounded ring of recent entries and the streams
that follow it.

Two kinds of entry, both plain JSON-ready dicts with a sequence number C{id}, a C{time}
(epoch seconds) and an C{outcome}:

  - an event accepted for delivery (by the spool, or sent at once by a tagd without one):
    its name, its id and the destinations it is owed to, with the outcome C{accepted};
  - a delivery's result for one destination: the outcome (C{success}, C{transient},
    C{throttle}, C{auth}, C{permanent}, C{expired}, C{dead}), the platform's HTTP status, how many
    events, the first of their ids and names, and the platform's answer, clipped.  Dead
    letters made without a delivery (a destination removed from the configuration) are
    counted only, with the reason as the message.

An entry names events by their id and name only.  It never holds what the event knows of
the visitor (IP address, user agent, cookies, click ids, user data, hashed or not) nor a
request's URL, which may carry a platform's token: the dashboard is an operator's view of
the traffic, not a copy of it.

L{Feed.publish} runs on the delivery path, so it does little: an append to a bounded
deque, and, only while somebody watches, one JSON encoding shared by every stream.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from typing import Callable, Iterable, Sequence

from twisted.logger import Logger

from tagd.tagging.events import Event

log = Logger()

# Entries kept for a stream that connects: enough to fill a screen with context.
RECENT = 200
# A batch may hold a thousand events; an entry names this many of them and counts the rest.
MAX_NAMED_EVENTS = 20
# A platform's answer can be a long document; the dashboard shows its start.
MAX_MESSAGE = 300
ACCEPTED = "accepted"

Entry = dict
# A stream: called with each new entry and its JSON text.
Subscriber = Callable[[Entry, str], None]


def matches(entry: Entry, destination: str | None, outcome: str | None) -> bool:
    """Whether C{entry} passes a stream's filters (C{None}: any).  An accepted event
    belongs to every destination it is owed to."""
    if outcome is not None and entry["outcome"] != outcome:
        return False
    if destination is None:
        return True
    return destination in entry.get("destinations", ()) or entry.get("destination") == destination


def encode(entry: Entry) -> str:
    """An entry as one line of JSON (no newline inside, as a C{data:} line requires)."""
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)


class Feed:
    """The last L{RECENT} entries, and the streams to tell of new ones.

    @param clock: the time of an entry, in epoch seconds (the reactor's C{seconds}).
    @param destinations: the configured destinations' names, in order: every accepted
        event is owed to each of them, and the dashboard offers them as a filter.
    """

    def __init__(self, clock: Callable[[], float], destinations: Sequence[str] = (), size: int = RECENT) -> None:
        self.destinations = tuple(destinations)
        self._clock = clock
        self._recent: deque[Entry] = deque(maxlen=size)
        self._subscribers: set[Subscriber] = set()
        self._ids = itertools.count(1)

    # -- what happens -------------------------------------------------------------------

    def accepted(self, events: Iterable[Event]) -> None:
        """C{events} were accepted for delivery: one entry each."""
        for event in events:
            self.publish(
                {
                    "outcome": ACCEPTED,
                    "event_name": event.event_name,
                    "event_id": event.event_id,
                    "destinations": list(self.destinations),
                }
            )

    def delivered(
        self,
        destination: str,
        outcome: str,
        events: Sequence[Event],
        status: int | None = None,
        message: str = "",
    ) -> None:
        """C{events} came to C{outcome} at C{destination}; C{status} is the platform's
        HTTP status (None when it did not answer or was not asked) and C{message} its
        answer, which never contains a token (see L{tagd.delivery.destinations.Verdict})."""
        self._settled(destination, outcome, len(events), events[:MAX_NAMED_EVENTS], status, message)

    def counted(self, destination: str, outcome: str, count: int, message: str) -> None:
        """C{count} events came to C{outcome} at C{destination} without being sent or
        read (the rows of a destination no longer configured are dead-lettered in the
        spool, in bulk): the entry counts them, names none, and has no HTTP status;
        C{message} says why."""
        self._settled(destination, outcome, count, (), None, message)

    def _settled(
        self, destination: str, outcome: str, count: int, named: Sequence[Event], status: int | None, message: str
    ) -> None:
        self.publish(
            {
                "outcome": outcome,
                "destination": destination,
                "status": status,
                "count": count,
                "event_ids": [event.event_id for event in named],
                "event_names": sorted({event.event_name for event in named}),
                "message": message[:MAX_MESSAGE],
            }
        )

    def publish(self, entry: Entry) -> None:
        """Keep C{entry} (numbered and timed) and hand it to every stream.

        It runs on the tracking and delivery paths: a stream that fails is logged and
        dropped, and never stops an event on its way."""
        entry["id"] = next(self._ids)
        entry["time"] = round(self._clock(), 3)
        self._recent.append(entry)
        if self._subscribers:
            text = encode(entry)
            for subscriber in list(self._subscribers):
                try:
                    subscriber(entry, text)
                except Exception:
                    log.failure("a dashboard stream failed and is closed")
                    self.unsubscribe(subscriber)

    # -- who watches --------------------------------------------------------------------

    def recent(self) -> list[Entry]:
        """The entries kept, oldest first."""
        return list(self._recent)

    def subscribe(self, subscriber: Subscriber) -> list[Entry]:
        """Tell C{subscriber} of every new entry from now on; the kept ones are returned,
        so that nothing falls between them and the first new one."""
        self._subscribers.add(subscriber)
        return self.recent()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop telling C{subscriber}; unknown ones are ignored (a stream ends once)."""
        self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        """How many streams follow the feed."""
        return len(self._subscribers)
