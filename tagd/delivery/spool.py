"""The durable spool: every accepted (event, destination) delivery, in one SQLite file.

The spool is what makes rule 2 hold ("an accepted event is never silently lost") without
breaking rule 1 ("the visitor never waits for tagging"):

  - L{Spool.enqueue} runs on the reactor thread for every tracked request and never waits
    for the disk: it keeps the event in memory (L{tagd.delivery.held}), and appends it to
    the intake journal (one C{write(2)} into the page cache, see L{tagd.delivery.intake}),
    so that the event outlives the process.
  - Deliver before writing: every C{flush_interval} seconds, or as soon as L{FLUSH_AT}
    events wait, a tick offers what was accepted since the last one to the dispatcher,
    which leases it from memory, and writes to the file, in one transaction, what the
    previous tick offered and is still owed, each delivery in the state it reached (in
    flight, retried, dead...).  An event delivered within a tick never touches SQLite;
    its journal segment is removed all the same.
  - All SQLite work runs on one dedicated thread that owns the connection (SQLite's own
    same-thread check enforces it); the reactor only sees Deferreds.
  - Every row is a delivery of one event to one destination, with its status, attempts, next
    attempt time and last error.  The dispatcher leases due rows (they become C{inflight}),
    then acks, retries, releases, dead-letters or expires them.  Opening the spool puts every
    C{inflight} row back to C{pending}: whatever a crash or C{kill -9} interrupted is sent
    again, with the same C{event_id}, so platforms deduplicate.

Durability: the file is in WAL mode with C{synchronous=FULL}.  A committed group survives a
process crash or C{kill -9} (NORMAL would give that too), and FULL also makes it survive an
OS crash or power loss: each commit syncs the WAL.  With NORMAL an OS crash could lose every
commit since the last checkpoint, possibly minutes of events.  The price, one fsync per
transaction, is paid on the spool's thread once per group commit (at most 1 / flush_interval
per second, and none when nothing is owed), never by a visitor.  Events not yet written
are in the intake journal, which L{Spool.open} replays, pending to every destination:
they survive a process crash or C{kill -9} (an event delivered from memory in the two
ticks before is then delivered again: at least once), though not an OS crash or power
loss in the moments before the kernel writes them out (the journal is never synced; that
would make the reactor wait for the disk).

Bound: at most C{max_events} events may be undelivered (in memory, pending or in flight).
When the spool is full, the policy is "refuse newest": L{Spool.enqueue} accepts what fits
and refuses the rest, returning how many it accepted, so that the caller counts and logs
each refused event.  Dead and expired rows stay for inspection and do not count, save
while group commits fail: then every row in memory counts, delivered or not, until it is
written (or found owed to nobody), so that memory stays bounded too.  The
count is kept in memory, and recounted from the file now and then (L{Spool.recount}), since
another process may make dead letters owed again.

The file holds personal data (C{Event.user_data}, IP addresses), so it is created with mode
0600, and no message or log line of this module ever contains event contents.

Other processes (the C{tagd spool} commands) use the functions at the end of this module
while the daemon runs: they run the same queries on a connection of their own, wait for
the daemon's writer instead of failing, and never put C{inflight} rows back to C{pending}
(those belong to the running dispatcher).
"""

from __future__ import annotations

import json
import math
import os
import queue
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence
from urllib.parse import quote

import attrs
from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    FirstError,
    ensureDeferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from tagd.tagging.events import Event
from tagd.delivery.held import (
    PENDING,
    Held,
    Lease,
    Row,
    Write,
    acknowledged,
    expired,
    given_up,
    postponed,
    released,
    retried,
)
from tagd.delivery.jsontext import json_text, json_value
from tagd.delivery.intake import UNREADABLE, Journal, discard, entry_line, read_segment

log = Logger()

FLUSH_AT = 500  # buffered events that start a group commit before the interval is up
# Seconds a lease trusts what the spool knows of the file's due rows (see Spool._lease_stored),
# at most: how soon dead letters that another process revived are leased.
LOOK_AGAIN = 1.0
RETRY_WRITE_AFTER = 1.0  # seconds between attempts to write the buffer once a write failed
LOG_EVERY = 60.0  # while writes fail, at most one log line per this many seconds
MAX_ERROR = 500  # characters of an error message kept with a delivery
BUSY_TIMEOUT = 5.0  # seconds to wait for a lock held by another process (the CLI, say)
SCHEMA_VERSION = 1

_SCHEMA = (
    # AUTOINCREMENT: an id is never reused, so a key the dispatcher holds can never come to
    # name a later event.
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL,
        created REAL NOT NULL,
        body TEXT NOT NULL
    )""",
    """CREATE TABLE deliveries (
        event INTEGER NOT NULL REFERENCES events (id),
        destination TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'inflight', 'dead', 'expired')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_error TEXT,
        PRIMARY KEY (event, destination)
    ) WITHOUT ROWID""",
    # Without rowid, the index entries end with the primary key: leasing reads due rows
    # of one destination in (next_at, event) order straight from this index.
    "CREATE INDEX deliveries_due ON deliveries (destination, status, next_at)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

# A delivery is "owed" while it may still be sent; only owed rows change status.  The unary
# plus keeps SQLite from picking the leasing index for lookups by key: those use the primary
# key, whatever the backlog.
_OWED = "+status IN ('pending', 'inflight')"
_KEYS = "event IN (SELECT value FROM json_each(?))"
_ACK = f"DELETE FROM deliveries WHERE destination = ? AND {_OWED} AND {_KEYS}"
_INFLIGHT = f"UPDATE deliveries SET status = 'inflight' WHERE destination = ? AND {_OWED} AND {_KEYS}"
_RELEASE = f"UPDATE deliveries SET status = 'pending' WHERE destination = ? AND {_OWED} AND {_KEYS}"
_EXPIRE = f"UPDATE deliveries SET status = 'expired' WHERE destination = ? AND {_OWED} AND {_KEYS}"
_RETRY = (
    "UPDATE deliveries SET status = 'pending', attempts = attempts + 1, next_at = ?, last_error = ?"
    f" WHERE destination = ? AND {_OWED} AND {_KEYS}"
)
# A failure of the destination, not of the row: pending again from C{next_at}, the error
# kept, no attempt counted.
_POSTPONE = (
    "UPDATE deliveries SET status = 'pending', next_at = ?, last_error = ?"
    f" WHERE destination = ? AND {_OWED} AND {_KEYS}"
)
_DEAD = (
    "UPDATE deliveries SET status = 'dead', attempts = attempts + 1, last_error = ?"
    f" WHERE destination = ? AND {_OWED} AND {_KEYS}"
)
# A delivery to a destination that is no longer configured: dead, with no attempt counted.
_ABANDON = f"UPDATE deliveries SET status = 'dead', last_error = ? WHERE destination = ? AND {_OWED} AND {_KEYS}"
_UNCONFIGURED = (
    "SELECT destination, event FROM deliveries"
    " WHERE status = 'pending' AND destination NOT IN (SELECT value FROM json_each(?))"
)
# Rows of the destinations in a JSON list, or of all when it is NULL.
_AMONG = "(? IS NULL OR destination IN (SELECT value FROM json_each(?)))"
_DEAD_EVENTS = f"SELECT DISTINCT event FROM deliveries WHERE status = 'dead' AND {_AMONG}"
_RETRY_DEAD = (
    "UPDATE deliveries SET status = 'pending', attempts = 0, next_at = ?"
    f" WHERE status = 'dead' AND {_AMONG} AND {_KEYS}"
)
_ALL_OWED_EVENTS = f"SELECT COUNT(DISTINCT event) FROM deliveries WHERE {_OWED}"
_OWED_EVENTS = f"{_ALL_OWED_EVENTS} AND {_KEYS}"
_OWED_ROWS = f"SELECT event FROM deliveries WHERE destination = ? AND {_OWED} AND {_KEYS}"
_NO_LONGER_OWED = (
    "SELECT COUNT(*) FROM json_each(?) AS k"
    f" WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE event = k.value AND {_OWED})"
)
_FORGET_FINISHED = (
    "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))"
    " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event = events.id)"
)
_DUE = (
    "SELECT d.event, d.attempts, e.body FROM deliveries d JOIN events e ON e.id = d.event"
    " WHERE d.destination = ? AND d.status = 'pending' AND d.next_at <= ?"
    " ORDER BY d.next_at, d.event LIMIT ?"
)
_DEPTH = "SELECT destination, status, COUNT(*) FROM deliveries GROUP BY destination, status"
# Keys grow with time (AUTOINCREMENT), so the smallest owed key of a destination is its
# oldest owed event.
_BACKLOG = (
    "SELECT b.destination, b.owed, e.created FROM"
    " (SELECT destination, COUNT(*) AS owed, MIN(event) AS oldest FROM deliveries"
    "  WHERE status IN ('pending', 'inflight') GROUP BY destination) AS b"
    " JOIN events e ON e.id = b.oldest"
)
_DEAD_LETTERS = (
    "SELECT e.event_id, CASE WHEN json_valid(e.body) THEN json_extract(e.body, '$.event_name') END,"
    " d.destination, d.attempts, d.last_error, e.created"
    " FROM deliveries d JOIN events e ON e.id = d.event"
    " WHERE d.status = 'dead' AND (? IS NULL OR d.destination = ?)"
    " ORDER BY d.event DESC LIMIT ?"
)

# What an SQLite result code means for whoever reads the log or /healthz.
_REASONS = {
    "SQLITE_FULL": "the disk is full",
    "SQLITE_READONLY": "the file or its directory is read-only",
    "SQLITE_CANTOPEN": "the file cannot be opened or created (does its directory exist, and may tagd write there?)",
    "SQLITE_NOTADB": "the file is not a SQLite database or is damaged (move it aside to start an empty spool)",
    "SQLITE_CORRUPT": "the file is damaged (move it aside to start an empty spool)",
    "SQLITE_BUSY": "another process holds the file locked",
    "SQLITE_IOERR": "the disk reported an I/O error",
    "SQLITE_PERM": "permission denied",
}


class SpoolError(Exception):
    """The spool cannot be opened or written; the message says why, never what was in it."""


@attrs.frozen
class Backlog:
    """What the file owes one destination: deliveries pending or in flight, and when the
    oldest of their events was accepted (epoch seconds)."""

    owed: int
    oldest: float


@attrs.frozen
class DeadLetter:
    """A delivery given up on, and why (for C{tagd spool dead})."""

    event_id: str
    event_name: str | None
    destination: str
    attempts: int
    last_error: str | None
    created: float


def _plain(value: Any) -> Any:
    """JSON for the mappings an L{Event} may hold besides plain dicts."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} cannot be stored in the spool")


def event_to_json(event: Event) -> str:
    """The event as a JSON object of all its fields (L{event_from_json} restores it exactly).

    Non-finite numbers are refused: the tracking header cannot carry them, and the stored
    text must stay JSON that SQLite's own functions can read.  Only the custom data and the
    contents may hold floats (see L{tagd.delivery.jsontext.json_text}).
    """
    # By hand rather than attrs.asdict: this runs for every tracked event, on the reactor.
    fields = {
        "event_name": event.event_name,
        "event_id": event.event_id,
        "event_time": event.event_time,
        "source_url": event.source_url,
        "client_ip": event.client_ip,
        "user_agent": event.user_agent,
        "referrer": event.referrer,
        "custom_data": event.custom_data,
        "contents": event.contents,
        "user_data": event.user_data,
        "fbp": event.fbp,
        "fbc": event.fbc,
        "ttclid": event.ttclid,
        "ttp": event.ttp,
        "ga_client_id": event.ga_client_id,
        "ga_session_id": event.ga_session_id,
        "epik": event.epik,
        "scclid": event.scclid,
        "scid": event.scid,
        "rdt_cid": event.rdt_cid,
        "rdt_uuid": event.rdt_uuid,
        "msclkid": event.msclkid,
        "uetvid": event.uetvid,
        "consent": None if event.consent is None else sorted(event.consent),
    }
    return json_text(fields, default=_plain, numbers=(event.custom_data, event.contents))


def event_from_json(text: str) -> Event:
    """The L{Event} that L{event_to_json} wrote, with its tuples restored from JSON lists."""
    fields = json_value(text)
    fields["contents"] = tuple(fields["contents"])
    fields["user_data"] = {key: tuple(values) for key, values in fields["user_data"].items()}
    # Rows written before events carried consent have none: no record was read for them.
    consent = fields.pop("consent", None)
    return Event(**fields, consent=None if consent is None else frozenset(consent))


def _reason(error: sqlite3.Error) -> str:
    """Why an SQLite call failed, for people: SQLite's messages never quote row contents."""
    name = getattr(error, "sqlite_errorname", "")
    hint = _REASONS.get("_".join(name.split("_")[:2]))
    return f"{hint} ({error})" if hint else str(error)


def _clip(error: str) -> str:
    return error[:MAX_ERROR]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; the write lock is taken at once, so it never fails half-way on it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # SQLite rolls some failures (a full disk among them) back by itself.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _create_private(path: str) -> None:
    """Create the file readable by its owner only, and tighten an existing file's mode.

    SQLite gives the WAL and shared-memory files the mode of the database file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _prepare(db: sqlite3.Connection) -> None:
    """Set the file up.

    Rows left C{inflight} by a crash go back to C{pending}: they are sent again.
    """
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise SpoolError(f"the file cannot be put in WAL mode (it stays in {mode!r} mode)")
    db.execute("PRAGMA synchronous = FULL")
    with _transaction(db):
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in _SCHEMA:
                db.execute(statement)
        elif version != SCHEMA_VERSION:
            raise SpoolError(f"the file has schema version {version}, this tagd knows {SCHEMA_VERSION}")
        db.execute("UPDATE deliveries SET status = 'pending' WHERE status = 'inflight'")


def _owed(db: sqlite3.Connection) -> int:
    """The number of events the file still owes to some destination (pending or in flight)."""
    return db.execute(_ALL_OWED_EVENTS).fetchone()[0]


_INSERT_EVENT = "INSERT INTO events (id, event_id, created, body) VALUES (?, ?, ?, ?)"
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (event, destination, status, attempts, next_at, last_error) VALUES (?, ?, ?, ?, ?, ?)"
)
# The last event key ever handed out (AUTOINCREMENT keeps it, even once that event is gone).
_LAST_KEY = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
# A write also covers the keys it skips (delivered from memory): a journal segment left
# behind (see discard) replays none of them at the next start.
_COVER_KEYS = (
    "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'events' AND seq < ?1",
    "INSERT INTO sqlite_sequence (name, seq) SELECT 'events', ?1"
    " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events')",
)


def _store(
    db: sqlite3.Connection,
    events: Sequence[tuple[int, str, float, str]],
    deliveries: Sequence[tuple[int, str, str, int, float, str | None]],
    last_key: int,
) -> None:
    """Insert events, (key, event_id, created, body) each, and their deliveries, each a row
    of the deliveries table; every key up to C{last_key} counts as written from then on."""
    db.executemany(_INSERT_EVENT, events)
    db.executemany(_INSERT_DELIVERY, deliveries)
    for statement in _COVER_KEYS:
        db.execute(statement, (last_key,))


def _write(db: sqlite3.Connection, write: Write) -> list[str]:
    """A group commit: what the ripe ticks still owe, in one transaction; then the journal
    segments it covers are removed (returns why any could not be)."""
    with _transaction(db):
        _store(db, write.events, write.deliveries, write.until - 1)
    return discard(write.segments)


@attrs.frozen
class _Recovered:
    """What opening found: events owed, the next key to hand out, and the journal's replay."""

    owed: int
    next_key: int
    replayed: int
    unreadable: int  # lines
    set_aside: list[str]  # segments that could not be read, and where they went
    problems: list[str]  # segments that could not be removed


def _set_aside(path: str) -> str:
    """Rename a segment that cannot be read out of the journal, and say where it went.

    Left in place it would be read again at a later start, once readable, and its keys,
    which this start hands out anew, would clash with the new events.  A segment that
    cannot be moved either stops the spool from opening, for the same reason.
    """
    aside = path + UNREADABLE
    try:
        os.rename(path, aside)
    except OSError as e:
        raise SpoolError(
            f"the intake journal's {os.path.basename(path)} can be neither read nor moved aside ({e.strerror})"
        ) from None
    return f"moved aside as {os.path.basename(aside)}; its events are lost"


def _recover(db: sqlite3.Connection, segments: Sequence[str]) -> _Recovered:
    """Set the file up, and insert the events of the journal C{segments} that it lacks:
    those accepted by a process that died before writing them, pending to every
    destination (a delivery made from memory meanwhile is made again)."""
    _prepare(db)
    last = db.execute(_LAST_KEY).fetchone()[0]
    entries, unreadable, read, aside = [], 0, [], []
    for path in segments:
        try:
            found, bad = read_segment(path)
        except OSError as e:
            aside.append(f"{os.path.basename(path)} cannot be read ({e.strerror}), {_set_aside(path)}")
            continue
        entries += found
        unreadable += bad
        read.append(path)
    lacking = [entry for entry in entries if entry.key > last]
    next_key = max([last, *(entry.key for entry in lacking)]) + 1
    if lacking:
        with _transaction(db):
            _store(
                db,
                [(e.key, e.event_id, e.created, e.body) for e in lacking],
                [(e.key, name, PENDING, 0, e.created, None) for e in lacking for name in e.destinations],
                next_key - 1,
            )
    return _Recovered(
        owed=_owed(db),
        next_key=next_key,
        replayed=len(lacking),
        unreadable=unreadable,
        set_aside=aside,
        problems=discard(read),
    )


def _keep(db: sqlite3.Connection, destination: str, keys: Sequence[int], sql: str, *params: Any) -> tuple[int, int]:
    """Run C{sql}, which leaves the rows it changes owed (in flight, released, retried), on
    the rows of C{destination} and C{keys}; returns the rows changed, and 0: no event
    stops being owed, so there is nothing to count or forget."""
    return db.execute(sql, (*params, destination, json.dumps(list(keys)))).rowcount, 0


def _end(db: sqlite3.Connection, destination: str, keys: Sequence[int], sql: str, *params: Any) -> tuple[int, int]:
    """Run C{sql}, which ends owed rows (acknowledged, dead, expired), on the rows of
    C{destination} and C{keys}; returns the rows changed, and how many events stopped being
    owed to any destination.

    Only the events of the rows it ends can stop being owed: they are read first, and
    after the change those with no owed row left are counted, and forgotten once no row
    refers to them.  Lookups by key only, whatever the backlog.
    """
    ending = [event for (event,) in db.execute(_OWED_ROWS, (destination, json.dumps(list(keys))))]
    if not ending:
        return 0, 0
    ending_json = json.dumps(ending)
    changed = db.execute(sql, (*params, destination, ending_json)).rowcount
    resolved = db.execute(_NO_LONGER_OWED, (ending_json,)).fetchone()[0]
    db.execute(_FORGET_FINISHED, (ending_json,))
    return changed, resolved


def _apply(db: sqlite3.Connection, keys: Sequence[int], sql: str, *params: Any) -> tuple[int, int]:
    """Run C{sql}, which may make rows owed again, on the rows of C{keys}, inside the
    caller's transaction.

    Returns the rows changed, and how many of the events stopped being owed to any
    destination (the spool's bound counts those).  An event row goes once no delivery
    refers to it.
    """
    keys_json = json.dumps(list(keys))
    before = db.execute(_OWED_EVENTS, (keys_json,)).fetchone()[0]
    changed = db.execute(sql, (*params, keys_json)).rowcount
    after = db.execute(_OWED_EVENTS, (keys_json,)).fetchone()[0]
    db.execute(_FORGET_FINISHED, (keys_json,))
    return changed, before - after


def _change(db: sqlite3.Connection, apply: Callable[..., tuple[int, int]], *args: Any) -> tuple[int, int]:
    """C{apply(db, *args)} (L{_keep} or L{_end}) in a transaction of its own."""
    with _transaction(db):
        return apply(db, *args)


def _lease(db: sqlite3.Connection, destination: str, limit: int, now: float) -> tuple[list[Lease], int, float | None]:
    """Take up to C{limit} due rows, oldest first, and mark them C{inflight}; returns the
    leases, the events that stopped being owed, and, when fewer than C{limit} were due,
    when the file's next pending row of C{destination} is due (infinity: none), else None.

    A stored event that no longer decodes is dead-lettered here, so that one bad row can
    never block its destination.
    """
    leases, resolved = [], 0
    with _transaction(db):
        due = db.execute(_DUE, (destination, now, limit)).fetchall()
        for key, attempts, body in due:
            try:
                leases.append(Lease(key, event_from_json(body), attempts))
            except Exception as e:
                error = f"the stored event cannot be read ({type(e).__name__})"
                resolved += _end(db, destination, [key], _DEAD, error)[1]
        if leases:
            _keep(db, destination, [lease.key for lease in leases], _INFLIGHT)
        later = None
        if len(due) < limit:
            later = _next_due(db, destination)
            later = math.inf if later is None else later
    return leases, resolved, later


def _retry_dead(db: sqlite3.Connection, destinations: Collection[str] | None, now: float) -> tuple[int, int]:
    """Dead rows (of C{destinations}, or of all when None) back to pending, with a fresh
    attempt count."""
    names = None if destinations is None else json.dumps(list(destinations))
    with _transaction(db):
        keys = [key for (key,) in db.execute(_DEAD_EVENTS, (names, names))]
        return _apply(db, keys, _RETRY_DEAD, now, names, names)


def _abandon(db: sqlite3.Connection, keep: Sequence[str], error: str) -> tuple[dict[str, int], int]:
    """Pending deliveries to any destination not in C{keep} become dead letters with C{error};
    returns their number by destination, and how many events stopped being owed."""
    with _transaction(db):
        orphans: dict[str, list[int]] = {}
        for destination, event in db.execute(_UNCONFIGURED, (json.dumps(list(keep)),)).fetchall():
            orphans.setdefault(destination, []).append(event)
        counts, resolved = {}, 0
        for destination, keys in orphans.items():
            counts[destination], ended = _end(db, destination, keys, _ABANDON, error)
            resolved += ended
        return counts, resolved


def _next_due(db: sqlite3.Connection, destination: str) -> float | None:
    return db.execute(
        "SELECT MIN(next_at) FROM deliveries WHERE destination = ? AND status = 'pending'", (destination,)
    ).fetchone()[0]


def _depth(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
    rows = db.execute(_DEPTH)
    return {(destination, status): count for destination, status, count in rows}


def _backlog(db: sqlite3.Connection) -> dict[str, Backlog]:
    return {destination: Backlog(owed, created) for destination, owed, created in db.execute(_BACKLOG)}


def _dead_letters(db: sqlite3.Connection, destination: str | None, limit: int) -> list[DeadLetter]:
    rows = db.execute(_DEAD_LETTERS, (destination, destination, limit))
    return [DeadLetter(*row) for row in rows]


def _left_behind(problems: Sequence[str]) -> None:
    """Log the journal segments that could not be removed (harmless, see L{discard})."""
    if problems:
        log.warn(
            "spool: cannot remove intake journal segments, which later starts skip: {problems}",
            problems="; ".join(problems),
        )


def _first_failure(failure: Failure) -> Failure:
    """The failure of the first of several calls that failed, as that call gave it."""
    return failure.value.subFailure if failure.check(FirstError) else failure


class Spool:
    """A durable queue of deliveries; build it with L{Spool.open}.

    Methods are called on the reactor thread.  Every method that reads or changes the file
    returns a Deferred, which fails with L{SpoolError} when SQLite does.
    """

    def __init__(self, path: str, reactor, max_events: int, flush_interval: float) -> None:
        self.path = path
        self.healthy = True  # False while group commits fail; see last_error
        self.last_error: str | None = None
        self.commits = 0  # group commits written so far
        # Called when rows become leasable (a tick offered them, or a write put pending
        # ones in the file), so the dispatcher leases them at once instead of at its next poll.
        self.on_offer: Callable[[], None] = lambda: None
        self._reactor = reactor
        self._max_events = max_events
        self._flush_interval = flush_interval
        self._undelivered = 0
        self._held = Held(1)  # set by open() from the file
        self._journal = Journal(path)
        self._destination_lists: dict[tuple[str, ...], str] = {}  # their JSON, for journal lines
        self._journal_logged_at: float | None = None  # the last error line about it
        self._journal_failing = False  # an error line said so, and no line since that it works
        # By destination, a time before which the file holds no due pending row of it
        # (see _lease_stored); every change that may make one due lowers it.
        self._stored_due: dict[str, float] = {}
        self._stored_changes = 0  # changes that may have made rows due in the file, ever
        self._timer = None
        self._lock = DeferredLock()  # one write (or recount, or change of many rows) at a time, in order
        self._writer: Deferred | None = None  # the write a tick queued, until it ends
        self._write_waiters: list[Deferred] = []  # settlements of rows being written
        self._retry_at = 0.0  # while writes fail, no tick writes before this time
        self._logged_at: float | None = None
        self._closing: Deferred | None = None
        self._closed = False
        self._db: sqlite3.Connection | None = None  # touched on the spool's thread only
        self._pool = ThreadPool(1, 1, name="tagd-spool")
        # Daemon: a process that exits without close() must not hang on this thread, and
        # it loses nothing committed by doing so (that is the kill -9 case).
        self._pool.threadFactory = partial(threading.Thread, daemon=True)
        self._pool.start()

    @classmethod
    def open(
        cls, path: str, *, reactor, max_events: int = 100_000, flush_interval: float = 0.05
    ) -> Spool:
        """Open or create the spool at C{path}, or raise L{SpoolError} saying why not.

        Blocks its caller until the file is ready (start-up only): the daemon learns at
        once whether it has a spool, and proxies without one when it has not.
        """
        path = os.fspath(path)
        spool = cls(path, reactor, max_events, flush_interval)
        try:
            recovered = spool._wait(spool._connect)
        except BaseException as e:
            spool._pool.stop()
            spool._journal.unlock()
            if isinstance(e, SpoolError):
                raise SpoolError(f"cannot open the spool {path}: {e}") from None
            raise
        spool._undelivered, spool._held = recovered.owed, Held(recovered.next_key)
        if recovered.replayed or recovered.unreadable:
            log.warn(
                "spool: {count} event(s) accepted before tagd last stopped without closing the "
                "spool were written from its intake journal{unreadable}",
                count=recovered.replayed,
                unreadable=f"; {recovered.unreadable} line(s) could not be read and are lost"
                if recovered.unreadable
                else "",
            )
        if recovered.set_aside:
            log.error("spool: intake journal: {segments}", segments="; ".join(recovered.set_aside))
        _left_behind(recovered.problems)
        return spool

    @property
    def undelivered(self) -> int:
        """Events accepted and still owed to some destination: in memory, pending or in flight."""
        return self._undelivered

    @property
    def buffered(self) -> int:
        """Events accepted and owed that are not in the file yet (in memory and the intake journal)."""
        return self._held.owed

    # On the spool's thread.

    def _connect(self) -> _Recovered:
        """Create the connection here, so that it belongs to this thread (SQLite checks)."""
        try:
            try:
                locked = self._journal.lock()
            except OSError as e:
                raise SpoolError(f"cannot take its lock file {self._journal.lock_path}: {e.strerror}") from None
            if not locked:
                raise SpoolError("another process has it open (is a second tagd running with this configuration?)")
            _create_private(self.path)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except OSError as e:
            raise SpoolError(e.strerror) from None
        except sqlite3.Error as e:
            raise SpoolError(_reason(e)) from None
        try:
            return self._call(_recover, self._journal.leftovers())
        except BaseException:
            self._db.close()
            raise

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """C{fn(connection, *args)}, with SQLite's errors turned into L{SpoolError}s that say why."""
        try:
            return fn(self._db, *args)
        except sqlite3.Error as e:
            raise SpoolError(_reason(e)) from None

    # On the reactor thread.

    def _wait(self, fn: Callable[[], Any]) -> Any:
        """Run C{fn} on the spool's thread and block until it returns (start-up only)."""
        results: queue.SimpleQueue = queue.SimpleQueue()
        self._pool.callInThreadWithCallback(lambda ok, value: results.put((ok, value)), fn)
        ok, value = results.get()
        if not ok:
            value.raiseException()
        return value

    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """Run C{fn(connection, *args)} on the spool's thread.

        The thread runs calls in the order they were made, and their results reach the
        reactor in that order: what the reactor does with a result (the rows it holds, a
        count) sees every earlier call's result already handled.
        """
        if self._closed:
            return fail(SpoolError("the spool is closed"))
        return deferToThreadPool(self._reactor, self._pool, self._call, fn, *args)

    def _counted(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """Run a status change that returns (result, events resolved); keep the bound's count."""

        def count(outcome: tuple[Any, int]) -> Any:
            result, resolved = outcome
            self._undelivered -= resolved
            return result

        return self._run(fn, *args).addCallback(count)

    def enqueue(self, events: Sequence[Event], destinations: Sequence[str]) -> int:
        """Accept C{events} for delivery to every destination; return how many were accepted.

        Never waits for the disk: the events wait in memory for the next tick, and are
        appended to the intake journal (L{tagd.delivery.intake}), which outlives the process.  When
        the spool is full, the newest are refused (the last of C{events}): the caller counts
        C{len(events) - accepted} as dropped, queue full.
        """
        if self._closing is not None:
            raise SpoolError("the spool is closed")
        targets = tuple(dict.fromkeys(destinations))
        if not targets:
            raise ValueError("an event needs at least one destination")
        room = max(0, self._max_events - self._undelivered)
        if not self.healthy:
            # Rows delivered from memory leave it with the next write: while writes fail
            # they stay, and count, or memory would grow with every event delivered.
            room = max(0, room - self._held.settled)
        now = self._reactor.seconds()
        first = self._held.end
        rows = [Row(key, event, now, event_to_json(event), targets) for key, event in enumerate(events[:room], first)]
        if rows:
            self._journal_append(rows, targets)
            self._held.accept(rows)
            self._undelivered += len(rows)
            if self._held.waiting >= FLUSH_AT:
                # At once, but with the dispatcher told later: it would otherwise lease and
                # send from within this call, inside a visitor's response.
                self._tick(self._told_later)
            else:
                self._schedule(self._flush_interval)
        return len(rows)

    def _journal_append(self, rows: Sequence[Row], targets: tuple[str, ...]) -> None:
        """Put C{rows} in the intake journal; when the kernel refuses, they wait in memory
        only, as the log says (once a minute at most)."""
        names = self._destination_lists.get(targets)
        if names is None:
            names = self._destination_lists[targets] = json.dumps(list(targets))
        try:
            self._journal.append(b"".join(entry_line(row.key, row.created, names, row.body) for row in rows))
            if self._journal_failing:
                self._journal_failing = False
                log.info("spool: appending to the intake journal again")
        except OSError as e:
            now = self._reactor.seconds()
            if self._journal_logged_at is None or now - self._journal_logged_at >= LOG_EVERY:
                self._journal_logged_at, self._journal_failing = now, True
                log.error(
                    "spool: cannot append to the intake journal beside {path}, so events wait for "
                    "their group commit in memory only, and a crash would lose them: {reason}",
                    path=self.path,
                    reason=e.strerror or str(e),
                )

    # The group-commit tick.

    def _told_later(self) -> None:
        self._reactor.callLater(0, self.on_offer)

    def _tick(self, tell: Callable[[], None] | None = None) -> None:
        """What was offered at the previous tick and is still owed goes to the file (the
        write runs on the spool's thread); what was accepted since is offered."""
        self._cancel_timer()
        self._held.ripen()
        offered = self._held.offer(self._journal.seal())
        if self._writer is None and self._held.ripe and (self.healthy or self._reactor.seconds() >= self._retry_at):
            self._writer = self._lock.run(lambda: ensureDeferred(self._write()))
            self._writer.addBoth(self._writer_done)
        self._next_tick()
        if offered:
            (tell or self.on_offer)()

    def _writer_done(self, result: object) -> None:
        self._writer = None
        if isinstance(result, Failure):
            log.failure("spool: a group commit stopped", result)
        self._next_tick()

    def _next_tick(self) -> None:
        """Tick again after the flush interval while rows wait for one, or once writes may
        be retried."""
        if self._closing is not None:
            return
        if self._held.unripe:
            self._schedule(self._flush_interval)
        elif self._held.ripe and self._writer is None:
            self._schedule(max(0.0, self._retry_at - self._reactor.seconds()))

    def _schedule(self, delay: float) -> None:
        """Tick in C{delay} seconds, or sooner if already due to."""
        if self._timer is None or not self._timer.active():
            self._timer = self._reactor.callLater(delay, self._tick)
        elif self._timer.getTime() > self._reactor.seconds() + delay:
            self._timer.reset(delay)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    async def _write(self) -> None:
        """Write every ripe tick's rows still owed, one transaction at a time; when the
        file cannot be written, they stay in memory and L{healthy} turns false."""
        held = self._held
        while held.ripe:
            write = held.to_write()
            for destination, at in write.due.items():
                self._may_be_due(destination, at)
            try:
                if write.events:
                    problems = await self._run(_write, write)
                else:
                    problems = discard(write.segments)  # Nothing owed: no transaction at all.
            except Exception as e:
                held.unwritten()
                self._written()
                self._write_failed(str(e) if isinstance(e, SpoolError) else type(e).__name__, write.owed)
                return
            held.written(write)
            self._written()
            _left_behind(problems)
            self.commits += bool(write.events)
            self._write_succeeded(write.owed)
            if write.due:
                self.on_offer()

    def _written(self) -> None:
        """A write ended: the settlements of its rows go on, now on the file or in memory."""
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _write_failed(self, reason: str, count: int) -> None:
        """Keep the rows, try again later, and say so at most once a minute."""
        self.healthy, self.last_error = False, reason
        now = self._reactor.seconds()
        self._retry_at = now + RETRY_WRITE_AFTER
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.error(
                "spool: cannot write {count} event(s), keeping them in memory and retrying: {reason}",
                count=count,
                reason=reason,
            )

    def _write_succeeded(self, count: int) -> None:
        if not self.healthy:
            log.info("spool: writing again, {count} delayed event(s) written", count=count)
        self.healthy, self.last_error, self._logged_at = True, None, None

    def flush(self) -> Deferred:
        """Write everything accepted and still owed to the file now, in one transaction.

        Never fails: when the file cannot be written the events stay in memory, L{healthy}
        turns false, and the write is tried again every L{RETRY_WRITE_AFTER} seconds.
        """
        self._cancel_timer()
        self._held.offer(self._journal.seal())
        self._held.ripen()
        return self._lock.run(lambda: ensureDeferred(self._write())).addBoth(self._flushed)

    def _flushed(self, result: object) -> object:
        self._next_tick()
        return result

    def close(self) -> Deferred:
        """Write everything owed, close the file and stop the spool's thread; later calls
        fail with L{SpoolError}."""
        if self._closing is None:
            self._closing = ensureDeferred(self._close())
        return self._closing

    async def _close(self) -> None:
        await self.flush()
        self._cancel_timer()
        self._journal.seal()
        if self._held.owed:
            log.error(
                "spool: {count} event(s) could not be written before closing: {reason}; those "
                "in its intake journal are written when tagd next opens the spool",
                count=self._held.owed,
                reason=self.last_error,
            )
        try:
            await self._run(lambda db: db.close())
        finally:
            self._closed = True
            self._pool.stop()
            self._journal.unlock()

    def recount(self) -> Deferred:
        """Count the undelivered events anew, from the file and memory; fires with the count.

        The count is kept in memory, changed by what this process does, and another
        process changes the file behind its back: C{tagd spool retry-dead} makes dead
        letters owed again, uncounted, and delivering them then takes them off the count a
        second time.  Left alone, the count would drift below the truth for good, and the
        bound loosen with it.

        The count is exact: it runs under the write lock, so every accepted event is either
        in the file or in memory, none in a write on its way between them; and on the
        spool's thread, whose results reach the reactor in the order it ran them, so the
        changes it sees have already adjusted the count it replaces, and those it does not
        see adjust the new one.  Memory is counted when the file's count arrives.
        """
        return self._lock.run(lambda: ensureDeferred(self._recount()))

    async def _recount(self) -> int:
        owed = await self._run(_owed)
        counted, self._undelivered = self._undelivered, owed + self._held.owed
        if counted != self._undelivered:
            log.info(
                "spool: {count} undelivered event(s) recounted from the file where {counted} were "
                "counted (another process, such as tagd spool retry-dead, changed what is owed)",
                count=self._undelivered,
                counted=counted,
            )
        return self._undelivered

    # For the dispatcher.

    def lease(self, destination: str, limit: int, now: float) -> Deferred:
        """Up to C{limit} due deliveries to C{destination} as L{Lease}s, now C{inflight}.

        Oldest first: the file's due rows in the order they became due (new rows in
        enqueue order, a retried row from its C{next_at}), a cost the same with a large
        backlog as with a small one; then the rows offered from memory, in enqueue order.
        The file is not asked at all while the spool knows it holds nothing due for
        C{destination} (see L{_lease_stored}).
        """
        if self._closed:
            return fail(SpoolError("the spool is closed"))
        if now < self._stored_due.get(destination, -math.inf):
            leases: list[Lease] = []
            self._held.lease(destination, limit, now, leases)
            return succeed(leases)
        return self._lease_stored(destination, limit, now)

    def _lease_stored(self, destination: str, limit: int, now: float) -> Deferred:
        """Lease from the file, then top up from memory.

        When the file had fewer than C{limit} rows due, it says when its next one is, and
        until then leases skip the file: everything this process does that may make a row
        due there lowers that time first (L{_may_be_due}), and a lease asked for meanwhile
        runs after that change on the spool's thread.  Only another process (C{tagd spool
        retry-dead}) changes the file behind the spool's back, so the file is asked at
        least every L{LOOK_AGAIN} seconds all the same.

        A file that cannot be leased from (read-only, locked, damaged) changed nothing, and
        stops no delivery from memory: the lease fails only when memory offers nothing.
        """
        changes = self._stored_changes

        def top_up(result: tuple[list[Lease], int, float | None]) -> list[Lease]:
            leases, resolved, later = result
            self._undelivered -= resolved
            if later is not None and self._stored_changes == changes:
                self._stored_due[destination] = min(later, now + LOOK_AGAIN)
            self._held.lease(destination, limit, now, leases)
            return leases

        def from_memory(failure: Failure) -> list[Lease] | Failure:
            leases: list[Lease] = []
            self._held.lease(destination, limit, now, leases)
            return leases or failure

        return self._run(_lease, destination, limit, now).addCallbacks(top_up, from_memory)

    def _may_be_due(self, destination: str | None, at: float = -math.inf) -> None:
        """Rows of C{destination} (of every one, for None) may be due in the file from C{at} on."""
        self._stored_changes += 1
        if destination is None:
            self._stored_due.clear()
        elif at < self._stored_due.get(destination, -math.inf):
            self._stored_due[destination] = at

    def _settle(
        self,
        destination: str,
        keys: Sequence[int],
        settle: Callable[[Row, object], object],
        stored: Callable[[list[int]], Deferred],
    ) -> Deferred:
        """Settle the deliveries to C{destination} of C{keys}: in memory those held, with
        C{stored(keys)} those in the file, and those being written once the write ends (in
        the file or in memory, as it went); fires with the number changed."""
        if self._closed:
            return fail(SpoolError("the spool is closed"))
        in_file, writing, here = self._held.split(keys)
        changed, resolved = self._held.change(destination, here, settle) if here else (0, 0)
        self._undelivered -= resolved
        if not in_file and not writing:
            return succeed(changed)
        parts = [succeed(changed)]
        if in_file:
            parts.append(stored(in_file))
        if writing:
            waiter = Deferred()
            self._write_waiters.append(waiter)
            parts.append(waiter.addCallback(lambda _: self._settle(destination, writing, settle, stored)))
        return gatherResults(parts, consumeErrors=True).addCallbacks(sum, _first_failure)

    def ack(self, destination: str, keys: Sequence[int]) -> Deferred:
        """Delivered: forget these deliveries (and each event once nothing else is owed for it)."""
        return self._settle(
            destination, keys, acknowledged, lambda stored: self._counted(_change, _end, destination, stored, _ACK)
        )

    def retry(self, destination: str, keys: Sequence[int], next_at: float, error: str) -> Deferred:
        """A failed attempt: pending again from C{next_at}, one more attempt counted.

        C{error} is kept for people: it must not contain personal data.
        """
        error = _clip(error)
        return self._settle(destination, keys, retried(next_at, error), self._keeping(destination, next_at, _RETRY, next_at, error))

    def postpone(self, destination: str, keys: Sequence[int], next_at: float, error: str) -> Deferred:
        """The destination failed, not these rows: pending again from C{next_at}, with
        C{error} kept (as for L{retry}) and no attempt counted."""
        error = _clip(error)
        return self._settle(
            destination, keys, postponed(next_at, error), self._keeping(destination, next_at, _POSTPONE, next_at, error)
        )

    def release(self, destination: str, keys: Sequence[int]) -> Deferred:
        """Not attempted after all (cancelled, throttled): pending again, as it was."""
        return self._settle(destination, keys, released, self._keeping(destination, -math.inf, _RELEASE))

    def _keeping(self, destination: str, due: float, sql: str, *params: Any) -> Callable[[list[int]], Deferred]:
        """A change of stored rows that leaves them owed, pending from C{due} (when known)."""

        def change(stored: list[int]) -> Deferred:
            self._may_be_due(destination, due)
            return self._counted(_change, _keep, destination, stored, sql, *params)

        return change

    def dead(self, destination: str, keys: Sequence[int], error: str) -> Deferred:
        """Given up on (a permanent failure, the attempt counted); C{error} as for L{retry}."""
        error = _clip(error)
        return self._settle(
            destination, keys, given_up(error), lambda stored: self._counted(_change, _end, destination, stored, _DEAD, error)
        )

    def expire(self, destination: str, keys: Sequence[int]) -> Deferred:
        """Too old for the platform to take: kept as C{expired}, never sent."""
        return self._settle(
            destination, keys, expired, lambda stored: self._counted(_change, _end, destination, stored, _EXPIRE)
        )

    def abandon(self, keep: Sequence[str], error: str) -> Deferred:
        """Pending deliveries to destinations not in C{keep} become dead letters with
        C{error}, so that they stop counting against L{undelivered}'s bound; fires with
        their number by destination.

        Rows in flight are left to whoever leased them.  L{retry_dead} (C{tagd spool
        retry-dead}) makes them pending again once their destination is back.
        """
        self._held.offer(self._journal.seal())
        self._held.ripen()
        return self._lock.run(lambda: ensureDeferred(self._abandon(keep, _clip(error))))

    async def _abandon(self, keep: Sequence[str], error: str) -> dict[str, int]:
        """Everything held is written first, so that the file shows the dead letters as
        soon as this fires (C{tagd spool dead}); what could not be written is dead-lettered
        in memory.  Under the lock: no row is on its way to the file meanwhile."""
        await self._write()
        self._next_tick()
        counts, resolved = self._held.abandon(keep, error)
        self._undelivered -= resolved
        stored = await self._counted(_abandon, keep, error)
        for destination, count in stored.items():
            counts[destination] = counts.get(destination, 0) + count
        return counts

    def retry_dead(self, destinations: Collection[str] | None = None) -> Deferred:
        """Dead deliveries (of C{destinations}, or of all when None) pending again with no
        attempts; fires with their number."""
        return self._lock.run(lambda: ensureDeferred(self._retry_dead(destinations)))

    async def _retry_dead(self, destinations: Collection[str] | None) -> int:
        now = self._reactor.seconds()
        changed, revived = self._held.retry_dead(destinations, now)
        self._undelivered += revived
        self._may_be_due(None)
        return changed + await self._counted(_retry_dead, destinations, now)

    def next_due(self, destination: str) -> Deferred:
        """When the next pending delivery to C{destination} is due (a time), or None."""

        def earliest(stored: float | None) -> float | None:
            times = [at for at in (stored, self._held.next_due(destination)) if at is not None]
            return min(times, default=None)

        return self._run(_next_due, destination).addCallback(earliest)

    def depth(self) -> Deferred:
        """Deliveries by (destination, status), in the file or in memory."""

        def merged(stored: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
            for group, count in self._held.depth().items():
                stored[group] = stored.get(group, 0) + count
            return stored

        return self._run(_depth).addCallback(merged)

    def backlog(self) -> Deferred:
        """A L{Backlog} for every destination the spool owes something, by name.

        One pass over the owed rows: a few milliseconds for a backlog of 100 000, meant
        for a look every few seconds, never per request.
        """

        def merged(stored: dict[str, Backlog]) -> dict[str, Backlog]:
            for destination, (owed, oldest) in self._held.backlog().items():
                before = stored.get(destination)
                stored[destination] = (
                    Backlog(before.owed + owed, min(before.oldest, oldest)) if before else Backlog(owed, oldest)
                )
            return stored

        return self._run(_backlog).addCallback(merged)

    def dead_letters(self, destination: str | None = None, limit: int = 100) -> Deferred:
        """The newest C{limit} dead deliveries as L{DeadLetter}s, with their reasons."""

        def merged(stored: list[DeadLetter]) -> list[DeadLetter]:
            # Every key held is newer than every key in the file.
            held = [DeadLetter(*letter) for letter in self._held.dead_letters(destination, limit)]
            return (held + stored)[:limit]

        return self._run(_dead_letters, destination, limit).addCallback(merged)


# For other processes (the command line), beside a running daemon.


def _uri(path: str, mode: str) -> str:
    """An SQLite URI for C{path}: C{ro} and C{rw} never create a missing file."""
    return f"file:{quote(os.path.abspath(path))}?mode={mode}"


@contextmanager
def _outside(path: str, *, write: bool) -> Iterator[sqlite3.Connection]:
    """A short-lived connection to the spool at C{path}, or L{SpoolError} saying why not.

    Nothing is set up or recovered here, unlike L{Spool.open}: the file must already be a
    spool, and whatever the daemon holds in flight stays so.  A lock the daemon holds is
    waited for, up to L{BUSY_TIMEOUT}.
    """
    if not os.path.exists(path):
        where = os.path.abspath(path)
        raise SpoolError(f"there is no spool at {where} (has tagd run with this configuration there?)")
    try:
        db = sqlite3.connect(
            _uri(path, "rw" if write else "ro"), uri=True, timeout=BUSY_TIMEOUT, isolation_level=None
        )
    except sqlite3.Error as e:
        raise SpoolError(f"cannot open the spool {path}: {_reason(e)}") from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise SpoolError(
                f"{path} is not a spool of this tagd (schema version {version}, expected {SCHEMA_VERSION})"
            )
        yield db
    except sqlite3.Error as e:
        raise SpoolError(f"cannot use the spool {path}: {_reason(e)}") from None
    finally:
        db.close()


def read_depth(path: str) -> dict[tuple[str, str], int]:
    """L{Spool.depth} of the file at C{path}, read-only."""
    with _outside(path, write=False) as db:
        return _depth(db)


def read_journal(path: str) -> tuple[int, list[str]]:
    """How many events the intake journal beside the spool at C{path} holds that the file
    lacks, and the segments that cannot be read.  Beside a running tagd, the events wait
    for its next group commit; beside a stopped one, it accepted them and did not commit
    them, and writes them when it next starts (which sets unreadable segments aside)."""
    with _outside(path, write=False) as db:
        last = db.execute(_LAST_KEY).fetchone()[0]
    lacking, unreadable = 0, []
    for segment in Journal(path).leftovers():
        try:
            entries, _ = read_segment(segment)
        except FileNotFoundError:
            continue  # Committed and removed meanwhile.
        except OSError as e:
            unreadable.append(f"{os.path.basename(segment)} ({e.strerror})")
            continue
        lacking += sum(1 for entry in entries if entry.key > last)
    return lacking, unreadable


def read_dead_letters(path: str, destination: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """L{Spool.dead_letters} of the file at C{path}, read-only."""
    with _outside(path, write=False) as db:
        return _dead_letters(db, destination, limit)


def retry_dead_letters(path: str, destinations: Collection[str] | None = None) -> int:
    """L{Spool.retry_dead} on the file at C{path}; returns the number of deliveries revived.

    They are due at once: a running spool looks at its file at least every L{LOOK_AGAIN}
    seconds, so its dispatcher sends them within a couple of seconds.  The running
    daemon's count of undelivered events includes them from its next L{Spool.recount}
    (once a minute), so its bound may be exceeded by up to this many events meanwhile.
    """
    with _outside(path, write=True) as db:
        return _retry_dead(db, destinations, time.time())[0]
