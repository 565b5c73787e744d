"""The durable spool: every accepted (event, destination) delivery, in one SQLite file.

The spool is what makes rule 2 hold ("an accepted event is never silently lost") without
breaking rule 1 ("the visitor never waits for tagging"):

  - L{Spool.enqueue} runs on the reactor thread for every tracked request and never waits
    for the disk: it appends to an in-memory buffer, and to the intake journal (one
    C{write(2)} into the page cache, see L{tagd.delivery.intake}), so that the event outlives the
    process.  A group commit writes everything buffered in one transaction every
    C{flush_interval} seconds, or as soon as L{FLUSH_AT} events wait.
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
per second), never by a visitor.  Events not yet committed are in the intake journal,
which L{Spool.open} replays: they survive a process crash or C{kill -9}, though not an OS
crash or power loss in the moments before the kernel writes them out (the journal is never
synced; that would make the reactor wait for the disk).

Bound: at most C{max_events} events may be undelivered (buffered, pending or in flight).
When the spool is full, the policy is "refuse newest": L{Spool.enqueue} accepts what fits
and refuses the rest, returning how many it accepted, so that the caller counts and logs
each refused event.  Dead and expired rows stay for inspection and do not count.  The
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
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from tagd.tagging.events import Event
from tagd.delivery.jsontext import json_text, json_value
from tagd.delivery.intake import UNREADABLE, Journal, discard, entry_line, read_segment

log = Logger()

FLUSH_AT = 500  # buffered events that start a group commit before the interval is up
# Events of this process kept in memory, decoded, until every destination leased them once:
# enough for the rows a healthy dispatcher leases within a second or two of their commit.
KNOWN_EVENTS = 5000
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
class Lease:
    """A delivery the dispatcher now holds: C{key} names it in L{Spool.ack} and friends."""

    key: int
    event: Event
    attempts: int


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


@attrs.frozen
class _Buffered:
    """An accepted event waiting for the next group commit, already serialised; the event
    itself goes to the spool's map of known events once committed (see L{_insert})."""

    event: Event
    created: float
    body: str
    destinations: tuple[str, ...]
    key: int  # handed out at enqueue, in order (see tagd.delivery.intake)


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
_INSERT_DELIVERY = "INSERT INTO deliveries (event, destination, status, next_at) VALUES (?, ?, 'pending', ?)"
# The last event key ever handed out (AUTOINCREMENT keeps it, even once that event is gone).
_LAST_KEY = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"


def _store(db: sqlite3.Connection, rows: Sequence[tuple[int, str, float, str, Sequence[str]]]) -> None:
    """Insert events and their deliveries: (key, event_id, created, body, destinations) each."""
    db.executemany(_INSERT_EVENT, [(key, event_id, created, body) for key, event_id, created, body, _ in rows])
    db.executemany(
        _INSERT_DELIVERY,
        [(key, destination, created) for key, _, created, _, destinations in rows for destination in destinations],
    )


def _insert(
    db: sqlite3.Connection, batch: Sequence[_Buffered], known: dict[int, list], segments: Sequence[str]
) -> list[str]:
    """The group commit: every buffered event and its deliveries, in one transaction; then
    the journal C{segments} it covers are removed (returns why any could not be).

    Once committed, each event also goes into C{known} (row key to C{[event, destinations
    left to lease it]}), so that L{_lease} need not decode what this process just wrote.
    """
    with _transaction(db):
        _store(db, [(item.key, item.event.event_id, item.created, item.body, item.destinations) for item in batch])
    known.update((item.key, [item.event, len(item.destinations)]) for item in batch)
    # Oldest first: those a destination did not lease in time are decoded when it does.
    while len(known) > KNOWN_EVENTS:
        del known[next(iter(known))]
    return discard(segments)


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
    those accepted by a process that died before committing them."""
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
    if lacking:
        with _transaction(db):
            _store(db, [(e.key, e.event_id, e.created, e.body, e.destinations) for e in lacking])
    return _Recovered(
        owed=_owed(db),
        next_key=max([last, *(entry.key for entry in lacking)]) + 1,
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


def _event(known: dict[int, list], key: int, body: str) -> Event:
    """The event of row C{key}: from C{known} while a destination has yet to lease it,
    else decoded from its stored C{body} (rows from before a restart, retried rows)."""
    entry = known.get(key)
    if entry is None:
        return event_from_json(body)
    entry[1] -= 1
    if not entry[1]:
        del known[key]
    return entry[0]


def _lease(
    db: sqlite3.Connection, destination: str, limit: int, now: float, known: dict[int, list]
) -> tuple[list[Lease], int]:
    """Take up to C{limit} due rows, oldest first, and mark them C{inflight}.

    A stored event that no longer decodes is dead-lettered here, so that one bad row can
    never block its destination.
    """
    leases, resolved = [], 0
    with _transaction(db):
        for key, attempts, body in db.execute(_DUE, (destination, now, limit)).fetchall():
            try:
                leases.append(Lease(key, _event(known, key, body), attempts))
            except Exception as e:
                error = f"the stored event cannot be read ({type(e).__name__})"
                resolved += _end(db, destination, [key], _DEAD, error)[1]
        _keep(db, destination, [lease.key for lease in leases], _INFLIGHT)
    return leases, resolved


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
        # Called after each group commit, so the dispatcher leases new rows at once
        # instead of at its next poll.
        self.on_commit: Callable[[], None] = lambda: None
        self._reactor = reactor
        self._max_events = max_events
        self._flush_interval = flush_interval
        self._undelivered = 0
        self._buffer: list[_Buffered] = []
        self._journal = Journal(path)
        self._sealed: list[str] = []  # journal segments no group commit has covered yet
        self._next_key = 1  # set by open() from the file
        self._destination_lists: dict[tuple[str, ...], str] = {}  # their JSON, for journal lines
        self._journal_logged_at: float | None = None  # the last error line about it
        self._journal_failing = False  # an error line said so, and no line since that it works
        self._known: dict[int, list] = {}  # see _insert; touched on the spool's thread only
        self._timer = None
        self._lock = DeferredLock()  # one group commit at a time, in order
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
        spool._undelivered, spool._next_key = recovered.owed, recovered.next_key
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
        """Events accepted and still owed to some destination: buffered, pending or in flight."""
        return self._undelivered

    @property
    def buffered(self) -> int:
        """Events accepted but not yet written to the file."""
        return len(self._buffer)

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
        """Run C{fn(connection, *args)} on the spool's thread."""
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

        Never waits for the disk: the events wait in memory for the next group commit, and
        are appended to the intake journal (L{tagd.delivery.intake}), which outlives the process.  When
        the spool is full, the newest are refused (the last of C{events}): the caller counts
        C{len(events) - accepted} as dropped, queue full.
        """
        if self._closing is not None:
            raise SpoolError("the spool is closed")
        targets = tuple(dict.fromkeys(destinations))
        if not targets:
            raise ValueError("an event needs at least one destination")
        room = max(0, self._max_events - self._undelivered)
        now = self._reactor.seconds()
        rows = [_Buffered(event, now, event_to_json(event), targets, key) for key, event in self._keyed(events[:room])]
        if rows:
            self._journal_append(rows)
            self._buffer.extend(rows)
            self._undelivered += len(rows)
            if len(self._buffer) < FLUSH_AT or not self.healthy:
                self._schedule(self._flush_interval)
            elif not self._lock.locked:
                self.flush()
            # Else a commit (or a recount) is running and starts the next when it ends: one
            # waiter at most, never one per tracked response.
        return len(rows)

    def _keyed(self, events: Sequence[Event]) -> Iterator[tuple[int, Event]]:
        """C{events} with the keys they will have in the file, handed out in order."""
        first, self._next_key = self._next_key, self._next_key + len(events)
        return zip(range(first, self._next_key), events)

    def _journal_append(self, rows: Sequence[_Buffered]) -> None:
        """Put C{rows} in the intake journal; when the kernel refuses, they wait in memory
        only, as the log says (once a minute at most)."""
        targets = rows[0].destinations
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

    def flush(self) -> Deferred:
        """Commit everything buffered now, in one transaction.

        Never fails: when the file cannot be written the events stay buffered, L{healthy}
        turns false, and the write is tried again every L{RETRY_WRITE_AFTER} seconds.
        """
        self._cancel_timer()
        return self._lock.run(lambda: ensureDeferred(self._commit()))

    def close(self) -> Deferred:
        """Flush, close the file and stop the spool's thread; later calls fail with L{SpoolError}."""
        if self._closing is None:
            self._closing = ensureDeferred(self._close())
        return self._closing

    async def _close(self) -> None:
        await self.flush()
        self._cancel_timer()
        self._journal.seal()
        if self._buffer:
            log.error(
                "spool: {count} event(s) could not be written before closing: {reason}; those "
                "in its intake journal are written when tagd next opens the spool",
                count=len(self._buffer),
                reason=self.last_error,
            )
        try:
            await self._run(lambda db: db.close())
        finally:
            self._closed = True
            self._pool.stop()
            self._journal.unlock()

    def _schedule(self, delay: float) -> None:
        if self._timer is None or not self._timer.active():
            self._timer = self._reactor.callLater(delay, self.flush)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    async def _commit(self) -> None:
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        self._sealed += self._journal.seal()
        covered = list(self._sealed)
        try:
            problems = await self._run(_insert, batch, self._known, covered)
        except Exception as e:
            self._buffer[:0] = batch
            self._write_failed(str(e) if isinstance(e, SpoolError) else type(e).__name__)
            return
        del self._sealed[: len(covered)]
        _left_behind(problems)
        self.commits += 1
        self._write_succeeded(len(batch))
        self.on_commit()
        self._resume()

    def _resume(self) -> None:
        """Schedule the commit of what piled up while the lock was held: L{enqueue} starts
        none then, trusting the holder to start the next once it is done."""
        if len(self._buffer) >= FLUSH_AT and self.healthy:
            self._reactor.callLater(0, self.flush)
        elif self._buffer:
            self._schedule(self._flush_interval)

    def _write_failed(self, reason: str) -> None:
        """Keep the buffer, try again later, and say so at most once a minute."""
        self.healthy, self.last_error = False, reason
        if self._closing is None:
            self._schedule(RETRY_WRITE_AFTER)
        now = self._reactor.seconds()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.error(
                "spool: cannot write {count} event(s), keeping them in memory and retrying: {reason}",
                count=len(self._buffer),
                reason=reason,
            )

    def _write_succeeded(self, count: int) -> None:
        if not self.healthy:
            log.info("spool: writing again, {count} delayed event(s) written", count=count)
        self.healthy, self.last_error, self._logged_at = True, None, None

    def recount(self) -> Deferred:
        """Count the undelivered events anew, from the file; fires with the count.

        The count is kept in memory, changed by what this process does, and another
        process changes the file behind its back: C{tagd spool retry-dead} makes dead
        letters owed again, uncounted, and delivering them then takes them off the count a
        second time.  Left alone, the count would drift below the truth for good, and the
        bound loosen with it.

        The count is exact: it runs under the commit lock, so every accepted event is either
        in the file or in the buffer, none in a commit on its way between them; and on the
        spool's thread, whose results reach the reactor in the order it ran them, so the
        changes it sees have already adjusted the count it replaces, and those it does not
        see adjust the new one.
        """
        return self._lock.run(lambda: ensureDeferred(self._recount()))

    async def _recount(self) -> int:
        try:
            owed = await self._run(_owed)
        finally:
            self._resume()
        counted, self._undelivered = self._undelivered, owed + len(self._buffer)
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

        Oldest first, in the order they became due: new rows in enqueue order, a retried
        row from its C{next_at}.  That order is the leasing index's own, so a lease costs
        the same with a large backlog as with a small one.
        """
        return self._counted(_lease, destination, limit, now, self._known)

    def ack(self, destination: str, keys: Sequence[int]) -> Deferred:
        """Delivered: forget these deliveries (and each event once nothing else is owed for it)."""
        return self._counted(_change, _end, destination, keys, _ACK)

    def retry(self, destination: str, keys: Sequence[int], next_at: float, error: str) -> Deferred:
        """A failed attempt: pending again from C{next_at}, one more attempt counted.

        C{error} is kept for people: it must not contain personal data.
        """
        return self._counted(_change, _keep, destination, keys, _RETRY, next_at, _clip(error))

    def postpone(self, destination: str, keys: Sequence[int], next_at: float, error: str) -> Deferred:
        """The destination failed, not these rows: pending again from C{next_at}, with
        C{error} kept (as for L{retry}) and no attempt counted."""
        return self._counted(_change, _keep, destination, keys, _POSTPONE, next_at, _clip(error))

    def release(self, destination: str, keys: Sequence[int]) -> Deferred:
        """Not attempted after all (cancelled, throttled): pending again, as it was."""
        return self._counted(_change, _keep, destination, keys, _RELEASE)

    def dead(self, destination: str, keys: Sequence[int], error: str) -> Deferred:
        """Given up on (a permanent failure, the attempt counted); C{error} as for L{retry}."""
        return self._counted(_change, _end, destination, keys, _DEAD, _clip(error))

    def expire(self, destination: str, keys: Sequence[int]) -> Deferred:
        """Too old for the platform to take: kept as C{expired}, never sent."""
        return self._counted(_change, _end, destination, keys, _EXPIRE)

    def abandon(self, keep: Sequence[str], error: str) -> Deferred:
        """Pending deliveries to destinations not in C{keep} become dead letters with
        C{error}, so that they stop counting against L{undelivered}'s bound; fires with
        their number by destination.

        Rows in flight are left to whoever leased them.  L{retry_dead} (C{tagd spool
        retry-dead}) makes them pending again once their destination is back.
        """
        return self._counted(_abandon, keep, _clip(error))

    def retry_dead(self, destinations: Collection[str] | None = None) -> Deferred:
        """Dead deliveries (of C{destinations}, or of all when None) pending again with no
        attempts; fires with their number."""
        return self._counted(_retry_dead, destinations, self._reactor.seconds())

    def next_due(self, destination: str) -> Deferred:
        """When the next pending delivery to C{destination} is due (a time), or None."""
        return self._run(_next_due, destination)

    def depth(self) -> Deferred:
        """Deliveries in the file by (destination, status); buffered events are in L{buffered}."""
        return self._run(_depth)

    def backlog(self) -> Deferred:
        """A L{Backlog} for every destination the file owes something, by name.

        One pass over the owed rows: a few milliseconds for a backlog of 100 000, meant
        for a look every few seconds, never per request.
        """
        return self._run(_backlog)

    def dead_letters(self, destination: str | None = None, limit: int = 100) -> Deferred:
        """The newest C{limit} dead deliveries as L{DeadLetter}s, with their reasons."""
        return self._run(_dead_letters, destination, limit)


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

    They are due at once, so a running dispatcher sends them at its next poll.  The running
    daemon's count of undelivered events includes them from its next L{Spool.recount}
    (once a minute), so its bound may be exceeded by up to this many events meanwhile.
    """
    with _outside(path, write=True) as db:
        return _retry_dead(db, destinations, time.time())[0]
