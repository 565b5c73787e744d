"""The spool's rows not written yet: accepted events in memory, leased and settled there
before the file sees them.

In the healthy case an event is delivered within milliseconds of the group-commit tick
that offers it, and writing it to SQLite (inserted, marked in flight, deleted) would be
all the spool's work for a row that lives a few milliseconds.  So the spool keeps each
accepted event here, already in the intake journal (L{tagd.delivery.intake}): a tick
offers what was accepted since the previous one, which the dispatcher leases from memory,
and the next tick writes what is still owed of it, each delivery in the state it reached
here (in flight, retried, dead...), and skips what nobody is owed.

Keys are handed out in order and rows leave from the oldest only, one or more ticks'
worth at a time, so the rows held are exactly the keys from L{Held.low} up, and finding
one is an index.  Used on the reactor thread only.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Iterable, Sequence

import attrs

from tagd.tagging.events import Event

# A delivery's state while held: NEW (never leased, or released: leasable from memory),
# LEASED (in flight), or a tuple (status, attempts, next_at, last_error) once a settlement
# other than an acknowledgement gave it one (an acknowledged delivery is gone).
NEW = "new"
LEASED = "leased"
PENDING, DEAD, EXPIRED = "pending", "dead", "expired"


@attrs.frozen
class Lease:
    """A delivery the dispatcher now holds: C{key} names it in L{Spool.ack} and friends."""

    key: int
    event: Event
    attempts: int


class Row:
    """One accepted event and the state of each delivery still held for it."""

    __slots__ = ("key", "event", "created", "body", "states", "owing")

    def __init__(self, key: int, event: Event, created: float, body: str, destinations: Sequence[str]) -> None:
        self.key = key
        self.event = event
        self.created = created
        self.body = body  # the event's JSON, for the file
        self.states: dict[str, object] = dict.fromkeys(destinations, NEW)
        self.owing = len(destinations)  # destinations still owed the event


def is_owed(state: object) -> bool:
    """Whether a delivery in C{state} may still be sent (the file's pending or in flight)."""
    return state is NEW or state is LEASED or state[0] == PENDING  # type: ignore[index]


def fields(row: Row, state: object) -> tuple[str, int, float, str | None]:
    """A delivery's (status, attempts, next_at, last_error), as the file keeps them."""
    if state is NEW:
        return PENDING, 0, row.created, None
    if state is LEASED:
        return "inflight", 0, row.created, None
    return state  # type: ignore[return-value]


# Settlements: the state an owed delivery takes (None: acknowledged, gone), as the
# spool's SQL statements of the same names change a row of the file.


def acknowledged(row: Row, state: object) -> object:
    return None


def released(row: Row, state: object) -> object:
    return NEW if state is LEASED else state


def retried(next_at: float, error: str) -> Callable[[Row, object], object]:
    return lambda row, state: (PENDING, fields(row, state)[1] + 1, next_at, error)


def postponed(next_at: float, error: str) -> Callable[[Row, object], object]:
    return lambda row, state: (PENDING, fields(row, state)[1], next_at, error)


def given_up(error: str) -> Callable[[Row, object], object]:
    def dead(row: Row, state: object) -> object:
        _, attempts, next_at, _ = fields(row, state)
        return DEAD, attempts + 1, next_at, error

    return dead


def expired(row: Row, state: object) -> object:
    return (EXPIRED, *fields(row, state)[1:])


@attrs.frozen
class _Tick:
    """The rows one tick offered: the keys below C{until}, and the journal segments they are in."""

    until: int
    segments: list[str]


@attrs.frozen
class Write:
    """What a write of the ripe ticks puts in the file (see L{Held.to_write})."""

    until: int  # every key below is in the file once it committed
    ticks: int
    events: list[tuple[int, str, float, str]]  # (key, event_id, created, body)
    deliveries: list[tuple[int, str, str, int, float, str | None]]  # as the deliveries table
    due: dict[str, float]  # by destination, the earliest next_at of a pending delivery written
    owed: int  # events written that are still owed
    segments: list[str]  # the journal segments the write covers


class Held:
    """The spool's rows in memory, from the oldest key not yet written (L{low}) up.

    Keys below L{offered_to} have been offered to the dispatcher; keys below
    L{writing_to} are being written, and stay as they are (neither leased nor settled
    here) until the write ends.
    """

    def __init__(self, first_key: int) -> None:
        self._rows: list[Row] = []
        self.low = first_key
        self.writing_to = first_key
        self.offered_to = first_key
        self._ticks: list[_Tick] = []  # offered, oldest first
        self._ripe = 0  # how many of the oldest ticks a tick has passed since: may be written
        self._cursor: dict[str, int] = {}  # by destination, the first key it has not leased from
        self.owed = 0  # events held that are still owed to some destination

    @property
    def end(self) -> int:
        """The key the next accepted event gets."""
        return self.low + len(self._rows)

    @property
    def settled(self) -> int:
        """Rows held that no destination is owed any more: they leave at the next write,
        and stay here for as long as writes fail."""
        return len(self._rows) - self.owed

    @property
    def waiting(self) -> int:
        """Events accepted since the last tick, not offered yet."""
        return self.end - self.offered_to

    @property
    def ripe(self) -> bool:
        """Whether some offered rows have waited a tick, and are to be written."""
        return self._ripe > 0

    @property
    def unripe(self) -> bool:
        """Whether some rows are offered or accepted that the next tick makes ripe."""
        return len(self._ticks) > self._ripe or self.end > self.offered_to

    def accept(self, rows: Iterable[Row]) -> None:
        """Hold C{rows}, whose keys follow on from L{end}."""
        for row in rows:
            self._rows.append(row)
            self.owed += 1

    def offer(self, segments: list[str]) -> int:
        """Offer the rows accepted since the last tick, kept in the journal C{segments};
        returns how many."""
        count = self.end - self.offered_to
        if count or segments:
            self._ticks.append(_Tick(self.end, segments))
            self.offered_to = self.end
        return count

    def ripen(self) -> None:
        """A tick passed: every row offered so far may be written."""
        self._ripe = len(self._ticks)

    def to_write(self) -> Write:
        """What the ripe ticks owe, now being written: every event some delivery of which is
        still held (owed, or dead or expired, which the file keeps), each delivery in its state."""
        ticks = self._ticks[: self._ripe]
        until = ticks[-1].until
        events, deliveries, due, owed = [], [], {}, 0
        for row in self._rows[: until - self.low]:
            states = row.states
            if not states:
                continue  # Acknowledged by every destination: never written at all.
            key = row.key
            events.append((key, row.event.event_id, row.created, row.body))
            owed += row.owing > 0
            for destination, state in states.items():
                status, attempts, next_at, error = fields(row, state)
                deliveries.append((key, destination, status, attempts, next_at, error))
                if status == PENDING and next_at < due.get(destination, math.inf):
                    due[destination] = next_at
        self.writing_to = until
        return Write(until, len(ticks), events, deliveries, due, owed, [s for tick in ticks for s in tick.segments])

    def written(self, write: Write) -> None:
        """The write committed: its rows are the file's now."""
        del self._rows[: write.until - self.low]
        self.low = self.writing_to = write.until
        del self._ticks[: write.ticks]
        self._ripe -= write.ticks
        self.owed -= write.owed

    def unwritten(self) -> None:
        """The write failed: its rows stay here, leasable again."""
        self.writing_to = self.low
        self._cursor.clear()

    def split(self, keys: Iterable[int]) -> tuple[list[int], list[int], list[int]]:
        """C{keys} as (in the file, being written, held); keys never handed out are dropped."""
        stored, writing, here = [], [], []
        low, writing_to, end = self.low, self.writing_to, self.end
        for key in keys:
            if key < low:
                stored.append(key)
            elif key < writing_to:
                writing.append(key)
            elif key < end:
                here.append(key)
        return stored, writing, here

    def lease(self, destination: str, limit: int, now: float, leases: list[Lease]) -> None:
        """Add to C{leases}, up to C{limit} in all, the offered rows C{destination} has not
        leased, in key order, now in flight."""
        rows, low = self._rows, self.low
        start = max(self._cursor.get(destination, low), self.writing_to)
        index, end = start - low, self.offered_to - low
        while index < end and len(leases) < limit:
            row = rows[index]
            if row.created > now:
                break
            index += 1
            states = row.states
            if states.get(destination) is NEW:
                states[destination] = LEASED
                leases.append(Lease(row.key, row.event, 0))
        self._cursor[destination] = low + index

    def change(self, destination: str, keys: Sequence[int], settle: Callable[[Row, object], object]) -> tuple[int, int]:
        """Settle the owed deliveries to C{destination} of the held C{keys} (see L{split});
        returns how many changed, and how many events stopped being owed to anyone."""
        rows, low = self._rows, self.low
        changed = resolved = 0
        for key in keys:
            row = rows[key - low]
            state = row.states.get(destination)
            if state is None or not is_owed(state):
                continue
            changed += 1
            after = settle(row, state)
            if after is None:
                del row.states[destination]
            else:
                row.states[destination] = after
                if after is NEW and key < self._cursor.get(destination, low):
                    self._cursor[destination] = key
            if after is None or not is_owed(after):
                row.owing -= 1
                if not row.owing:
                    resolved += 1
                    self.owed -= 1
        return changed, resolved

    def abandon(self, keep: Collection[str], error: str) -> tuple[dict[str, int], int]:
        """Pending (not in flight) deliveries to destinations not in C{keep} become dead
        with C{error}; returns their number by destination, and the events no longer owed."""
        counts: dict[str, int] = {}
        resolved = 0
        for row in self._rows:
            for destination, state in row.states.items():
                if destination in keep or state is LEASED or not is_owed(state):
                    continue
                _, attempts, next_at, _ = fields(row, state)
                row.states[destination] = (DEAD, attempts, next_at, error)
                counts[destination] = counts.get(destination, 0) + 1
                row.owing -= 1
                if not row.owing:
                    resolved += 1
                    self.owed -= 1
        return counts, resolved

    def retry_dead(self, destinations: Collection[str] | None, now: float) -> tuple[int, int]:
        """Dead deliveries (to C{destinations}, or to any when None) pending again from
        C{now} with no attempts; returns how many, and how many events are owed again."""
        changed = revived = 0
        for row in self._rows:
            for destination, state in row.states.items():
                if state is NEW or state is LEASED or state[0] != DEAD:  # type: ignore[index]
                    continue
                if destinations is not None and destination not in destinations:
                    continue
                row.states[destination] = (PENDING, 0, now, state[3])  # type: ignore[index]
                changed += 1
                if not row.owing:
                    revived += 1
                    self.owed += 1
                row.owing += 1
        return changed, revived

    def depth(self) -> dict[tuple[str, str], int]:
        """Deliveries held by (destination, status)."""
        depth: dict[tuple[str, str], int] = {}
        for row in self._rows:
            for destination, state in row.states.items():
                status = fields(row, state)[0]
                depth[destination, status] = depth.get((destination, status), 0) + 1
        return depth

    def backlog(self) -> dict[str, tuple[int, float]]:
        """By destination, the deliveries held that are owed, and the oldest one's acceptance."""
        backlog: dict[str, tuple[int, float]] = {}
        for row in self._rows:
            for destination, state in row.states.items():
                if is_owed(state):
                    owed, oldest = backlog.get(destination, (0, row.created))
                    backlog[destination] = (owed + 1, min(oldest, row.created))
        return backlog

    def next_due(self, destination: str) -> float | None:
        """When the earliest pending delivery held for C{destination} is due, or None."""
        due = [
            fields(row, state)[2]
            for row in self._rows
            if (state := row.states.get(destination)) is not None and fields(row, state)[0] == PENDING
        ]
        return min(due, default=None)

    def dead_letters(
        self, destination: str | None, limit: int
    ) -> list[tuple[str, str | None, str, int, str | None, float]]:
        """The newest C{limit} dead deliveries held, newest first, as
        (event_id, event_name, destination, attempts, last_error, created)."""
        letters = []
        for row in reversed(self._rows):
            for name, state in row.states.items():
                if (destination is None or name == destination) and state is not NEW and state is not LEASED:
                    status, attempts, _, error = state  # type: ignore[misc]
                    if status == DEAD:
                        letters.append((row.event.event_id, row.event.event_name, name, attempts, error, row.created))
            if len(letters) >= limit:
                break
        return letters[:limit]
