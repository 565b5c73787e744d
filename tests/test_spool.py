"""The durable spool: storage of events, group commits, delivery states, the bound, crashes
with real processes, and files that cannot be opened or written."""

from __future__ import annotations

import json

import errno
import glob
import math
import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from tagd.daemon.config import parse_config
from tagd.tagging.events import Event
from tagd.delivery import intake as intake_module
from tagd.delivery.intake import SEGMENT, UNREADABLE, read_segment
from tagd.admin.metrics import Metrics
from tagd.delivery.service import RECOUNT_INTERVAL, Delivery
from tagd.delivery.spool import (
    FLUSH_AT,
    LOOK_AGAIN,
    Lease,
    Spool,
    SpoolError,
    event_from_json,
    event_to_json,
    retry_dead_letters,
)

from conftest import eventually, sleep, within
from fakes import make_event

EMAIL = " Joe@Example.COM"  # make_event's raw e-mail: personal data that must never be logged


def event(number: int, **fields) -> Event:
    """A fully enriched purchase with the id C{ev-<number>}."""
    return make_event(event_id=f"ev-{number}", **fields)


def events(first: int, count: int) -> list[Event]:
    """C{count} events numbered from C{first}."""
    return [event(n) for n in range(first, first + count)]


def query(path: Path, sql: str, *params) -> list[tuple]:
    """Rows read with a connection of the test's own, as another process would see the file."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


def count(path: Path, table: str) -> int:
    """The number of rows in C{table}, read from the file."""
    return query(path, f"SELECT COUNT(*) FROM {table}")[0][0]


@pytest.fixture
def path(tmp_path) -> Path:
    """Where the test's spool lives."""
    return tmp_path / "spool.db"


@pytest.fixture
def spool_log():
    """The text of every line the spool logs while the test runs."""
    lines = []

    def observe(log_event):
        if log_event.get("log_namespace") == "tagd.delivery.spool":
            lines.append(formatEvent(log_event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


async def trace_statements(spool: Spool) -> list[tuple[int, str]]:
    """Record (thread id, SQL) for every statement the spool's connection runs from now on."""
    statements: list[tuple[int, str]] = []

    def record(sql: str) -> None:
        statements.append((threading.get_ident(), sql))

    await spool._run(lambda db: db.set_trace_callback(record))
    return statements


# -- events as JSON -------------------------------------------------------------------


def _default(field: attrs.Attribute):
    """The value a field takes when it is not given (NOTHING for required fields)."""
    default = field.default
    return default.factory() if isinstance(default, attrs.Factory) else default


def test_sample_event_sets_every_field():
    """The round-trip sample leaves no field at its default, so every field is really stored."""
    sample = event(1)
    unset = [f.name for f in attrs.fields(Event) if getattr(sample, f.name) == _default(f)]
    assert unset == []


def test_rows_from_before_consent_read_as_no_record():
    """A row written before events carried their consent has none: as no record read."""
    text = event_to_json(event(1))
    old = json.loads(text)
    del old["consent"]
    assert event_from_json(json.dumps(old)).consent is None
    assert event_from_json(text).consent == frozenset({"marketing", "analytics"})
    assert event_from_json(event_to_json(event(2, consent=frozenset()))).consent == frozenset()


def test_event_json_round_trip_every_field():
    """Every field comes back equal and of the same type: tuples stay tuples."""
    sample = event(
        1,
        custom_data={"value": 42.5, "n": 3, "ok": True, "none": None, "tags": ["a", "é"], "deep": {"x": [1.0]}},
    )
    restored = event_from_json(event_to_json(sample))
    assert restored == sample
    assert type(restored.contents) is tuple
    assert all(type(values) is tuple for values in restored.user_data.values())
    assert type(restored.custom_data["deep"]["x"][0]) is float


def test_event_json_round_trip_minimal_event():
    """An event with only the required fields comes back with its defaults (None, empty)."""
    sample = Event("PageView", "ev-min", 1_700_000_000, "https://shop.example/", "192.0.2.1", "UA")
    assert event_from_json(event_to_json(sample)) == sample


def test_event_json_refuses_non_finite_numbers():
    """NaN is not JSON: such an event is refused rather than stored as unreadable text."""
    with pytest.raises(ValueError):
        event_to_json(event(1, custom_data={"value": math.nan}))


# -- opening ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_creates_private_wal_file(open_spool, path):
    """The file, its WAL and shared-memory files are 0600, in WAL mode with synchronous FULL."""
    spool = open_spool()
    spool.enqueue([event(1)], ["meta"])
    await within(spool.flush())
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert oct(name.stat().st_mode & 0o777) == oct(0o600), name
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert await within(spool._run(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])) == 2


@pytest_twisted.ensureDeferred
async def test_open_tightens_an_existing_file(open_spool, path):
    """A spool file readable by others (created by hand, say) is made private on open."""
    path.touch(mode=0o644)
    path.chmod(0o644)
    open_spool()
    assert path.stat().st_mode & 0o777 == 0o600


@pytest_twisted.ensureDeferred
async def test_open_is_on_the_spool_thread(open_spool):
    """The connection belongs to the spool's thread: SQLite refuses it anywhere else."""
    spool = open_spool()
    with pytest.raises(sqlite3.ProgrammingError):
        spool._db.execute("SELECT 1")


def test_corrupt_file(reactor, path):
    """Garbage in the file: a clear SpoolError naming the file, and the file left as it was."""
    garbage = b"this is not a database\n" * 400
    path.write_bytes(garbage)
    with pytest.raises(SpoolError) as raised:
        Spool.open(str(path), reactor=reactor)
    message = str(raised.value)
    assert str(path) in message
    assert "not a SQLite database or is damaged" in message
    assert path.read_bytes() == garbage


def test_unknown_schema_version(reactor, path):
    """A spool written by a newer tagd is refused rather than misread."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(SpoolError, match="schema version 99"):
        Spool.open(str(path), reactor=reactor)


def test_missing_directory(reactor, tmp_path):
    """A path in a directory that does not exist: SpoolError with the system's reason."""
    with pytest.raises(SpoolError, match="cannot open the spool .*No such file or directory"):
        Spool.open(str(tmp_path / "absent" / "spool.db"), reactor=reactor)


def test_read_only_directory_new_file(reactor, tmp_path, make_read_only):
    """No spool file yet and a read-only directory: SpoolError, nothing created."""
    directory = tmp_path / "state"
    directory.mkdir()
    make_read_only(directory)
    with pytest.raises(SpoolError, match="cannot open the spool"):
        Spool.open(str(directory / "spool.db"), reactor=reactor)
    assert list(directory.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_read_only_directory_existing_file(reactor, tmp_path, make_read_only):
    """A spool whose directory became read-only (WAL needs files beside it): SpoolError."""
    directory = tmp_path / "state"
    directory.mkdir()
    spool = Spool.open(str(directory / "spool.db"), reactor=reactor)
    spool.enqueue([event(1)], ["meta"])
    await within(spool.close())
    make_read_only(directory)
    with pytest.raises(SpoolError) as raised:
        Spool.open(str(directory / "spool.db"), reactor=reactor)
    assert "cannot open the spool" in str(raised.value)
    assert EMAIL not in str(raised.value)


# -- enqueue and group commit -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enqueue_does_not_touch_the_disk(open_spool, path):
    """enqueue runs no SQL at all; the flush writes on the spool's thread, not the caller's."""
    spool = open_spool(flush_interval=60)
    statements = await trace_statements(spool)
    assert spool.enqueue(events(0, 10), ["meta", "ga4"]) == 10
    assert statements == []
    assert count(path, "events") == 0
    assert spool.buffered == 10
    await within(spool.flush())
    assert count(path, "events") == 10
    assert count(path, "deliveries") == 20
    assert spool.buffered == 0
    assert statements
    assert threading.get_ident() not in {thread for thread, _ in statements}


@pytest_twisted.ensureDeferred
async def test_group_commit_is_one_transaction(open_spool, path):
    """Many enqueue calls end up in one transaction: one BEGIN, one COMMIT, one counted commit."""
    spool = open_spool(flush_interval=60)
    statements = await trace_statements(spool)
    for n in range(FLUSH_AT - 1):
        spool.enqueue([event(n)], ["meta", "ga4", "tiktok"])
    await within(spool.flush())
    sql = [text for _, text in statements]
    assert sql.count("BEGIN IMMEDIATE") == 1
    assert sql.count("COMMIT") == 1
    assert spool.commits == 1
    assert count(path, "events") == FLUSH_AT - 1
    assert count(path, "deliveries") == 3 * (FLUSH_AT - 1)


@pytest_twisted.ensureDeferred
async def test_flush_interval_commits_without_a_flush_call(open_spool, path):
    """Buffered events reach the file by themselves after the flush interval."""
    spool = open_spool(flush_interval=0.05)
    spool.enqueue(events(0, 3), ["meta"])
    assert count(path, "events") == 0
    await eventually(lambda: count(path, "events") == 3)
    assert spool.commits == 1


@pytest_twisted.ensureDeferred
async def test_full_buffer_ticks_before_the_interval(open_spool, path, reactor):
    """FLUSH_AT accepted events make a tick at once, long before a 60 s interval: it offers
    them, and the next such tick writes those nobody leased meanwhile."""
    spool = open_spool(flush_interval=60)
    for n in range(3 * FLUSH_AT):
        spool.enqueue([event(n)], ["meta"])
    await eventually(lambda: count(path, "events") == 2 * FLUSH_AT)
    assert spool.commits == 2
    assert spool.buffered == FLUSH_AT  # offered, in memory, written at the next tick
    leases = await within(spool.lease("meta", 10 * FLUSH_AT, reactor.seconds() + 1))
    assert [lease.event.event_id for lease in leases] == [f"ev-{n}" for n in range(3 * FLUSH_AT)]


@pytest_twisted.ensureDeferred
async def test_enqueue_dedupes_destinations_and_needs_one(open_spool, path):
    """A destination named twice gets one delivery; no destination at all is a caller's bug."""
    spool = open_spool()
    spool.enqueue([event(1)], ["meta", "ga4", "meta"])
    await within(spool.flush())
    assert sorted(query(path, "SELECT destination FROM deliveries")) == [("ga4",), ("meta",)]
    with pytest.raises(ValueError):
        spool.enqueue([event(2)], [])


@pytest_twisted.ensureDeferred
async def test_unencodable_event_buffers_nothing(open_spool):
    """A batch with an event that cannot be stored is refused whole, before anything is buffered."""
    spool = open_spool()
    with pytest.raises(ValueError):
        spool.enqueue([event(1), event(2, custom_data={"v": math.inf})], ["meta"])
    assert spool.buffered == 0
    assert spool.undelivered == 0


@pytest_twisted.ensureDeferred
async def test_event_with_a_lone_surrogate_buffers_nothing(open_spool):
    """A lone surrogate (which the tracking header refuses) is no UTF-8: refused whole as well."""
    spool = open_spool()
    with pytest.raises(ValueError):
        spool.enqueue([event(1), event(2, custom_data={"v": "\ud800"})], ["meta"])
    assert spool.buffered == 0
    assert spool.undelivered == 0


# -- the bound ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bound_refuses_newest(open_spool, path):
    """At max_events undelivered events the newest are refused, counted by the return value;
    a delivered event makes room again."""
    spool = open_spool(max_events=5)
    assert spool.enqueue(events(0, 3), ["meta", "ga4"]) == 3
    assert spool.enqueue(events(3, 4), ["meta", "ga4"]) == 2  # ev-5 and ev-6 refused
    assert spool.enqueue([event(7)], ["meta"]) == 0
    assert spool.undelivered == 5
    await within(spool.flush())
    stored = sorted(event_id for (event_id,) in query(path, "SELECT event_id FROM events"))
    assert stored == [f"ev-{n}" for n in range(5)]

    for destination in ("meta", "ga4"):
        leases = await within(spool.lease(destination, 1, time.time() + 1))
        await within(spool.ack(destination, [lease.key for lease in leases]))
    assert spool.undelivered == 4
    assert spool.enqueue(events(8, 2), ["meta"]) == 1


@pytest_twisted.ensureDeferred
async def test_bound_survives_a_restart(open_spool, path):
    """The count of undelivered events is read from the file on open."""
    spool = open_spool(max_events=4)
    spool.enqueue(events(0, 3), ["meta"])
    await within(spool.close())
    reopened = open_spool(max_events=4)
    assert reopened.undelivered == 3
    assert reopened.enqueue(events(3, 3), ["meta"]) == 1


async def dead_letter_all(spool: Spool, destination: str, now: float) -> None:
    """Every due row of C{destination} leased and given up on."""
    leases = await within(spool.lease(destination, 1000, now))
    await within(spool.dead(destination, [lease.key for lease in leases], "invalid parameter"))


async def deliver_all(spool: Spool, destination: str, now: float) -> None:
    """Every due row of C{destination} leased and acknowledged."""
    leases = await within(spool.lease(destination, 1000, now))
    await within(spool.ack(destination, [lease.key for lease in leases]))


async def revive_from_the_command_line(path: Path) -> int:
    """C{tagd spool retry-dead}: the CLI's helper on the file, beside the open spool, from
    another thread as another process would.  The spool sees what another process made
    due from LOOK_AGAIN seconds after it last looked at the file."""
    return await within(deferToThread(retry_dead_letters, str(path)))


@pytest_twisted.ensureDeferred
async def test_recount_counts_dead_letters_revived_by_the_command_line(open_spool, path, reactor):
    """Dead letters that the command line makes pending again behind the spool's back are
    counted from the next recount on, buffered events included, and delivering them brings
    the count to exactly what is still owed, never below zero."""
    spool = await filled(open_spool, range(7), ["meta"])
    now = reactor.seconds() + 1
    await dead_letter_all(spool, "meta", now)
    assert spool.undelivered == 0
    assert await revive_from_the_command_line(path) == 7
    spool.enqueue(events(7, 2), ["meta"])  # buffered while the recount runs
    assert spool.undelivered == 2

    assert await within(spool.recount()) == 9
    assert spool.undelivered == 9
    await deliver_all(spool, "meta", now + LOOK_AGAIN)
    assert spool.undelivered == 2
    await within(spool.flush())
    await deliver_all(spool, "meta", now)
    assert spool.undelivered == 0
    assert await within(spool.recount()) == 0


@pytest_twisted.ensureDeferred
async def test_recount_repairs_a_count_gone_below_zero(open_spool, path, reactor, spool_log):
    """Revived dead letters delivered before the recount noticed them were taken off the
    count twice; the recount puts it right, and says so."""
    spool = await filled(open_spool, range(7), ["meta"])
    now = reactor.seconds() + 1
    await dead_letter_all(spool, "meta", now)
    await revive_from_the_command_line(path)
    await deliver_all(spool, "meta", now + LOOK_AGAIN)
    assert spool.undelivered == -7  # what the bound would go on believing

    assert await within(spool.recount()) == 0
    assert spool.undelivered == 0
    assert spool_log == [
        "spool: 0 undelivered event(s) recounted from the file where -7 were counted (another "
        "process, such as tagd spool retry-dead, changed what is owed)"
    ]


@pytest_twisted.ensureDeferred
async def test_recount_among_commits_and_changes_is_exact(open_spool, reactor, spool_log):
    """A change the spool's thread runs before the recount's count is in the count, one it
    runs after adjusts the new count; a commit running when the recount is asked for is
    waited for, one asked for later waits for the recount, and events buffered meanwhile
    are counted: nothing twice, nothing missed."""
    spool = open_spool(flush_interval=60.0)  # no commit but those asked for here
    spool.enqueue(events(0, 4), ["meta"])
    await within(spool.flush())
    leases = await within(spool.lease("meta", 2, reactor.seconds() + 1))

    spool.enqueue(events(4, 3), ["meta"])
    committing = spool.flush()
    acked = spool.ack("meta", [leases[0].key])  # runs before the count, which waits for the commit
    recounted = spool.recount()
    spool.enqueue(events(7, 2), ["meta"])
    assert await within(recounted) == 8  # 7 committed, 1 acknowledged, 2 buffered
    await within(committing)
    await within(acked)

    recounted = spool.recount()
    dead = spool.dead("meta", [leases[1].key], "invalid parameter")  # runs after the count
    assert await within(recounted) == 8
    await within(dead)
    assert spool.undelivered == 7

    recounted = spool.recount()
    committing = spool.flush()  # its batch leaves the buffer only once the count is in
    assert await within(recounted) == 7
    await within(committing)
    assert spool.buffered == 0
    assert await within(spool.recount()) == 7
    assert spool_log == []


@pytest_twisted.ensureDeferred
async def test_a_recount_holds_up_no_offer(open_spool, path, reactor):
    """Events accepted while a recount holds the write lock are offered at once all the
    same (leased from memory), and those still owed are written once it is done."""
    spool = open_spool(flush_interval=60.0)
    recounted = spool.recount()
    spool.enqueue(events(0, FLUSH_AT), ["meta", "ga4"])
    leases = await within(spool.lease("meta", 2 * FLUSH_AT, reactor.seconds() + 1))
    assert len(leases) == FLUSH_AT
    await within(spool.ack("meta", [lease.key for lease in leases]))
    assert await within(recounted) == FLUSH_AT
    spool.enqueue(events(FLUSH_AT, FLUSH_AT), ["meta"])  # the next tick writes the first
    await eventually(lambda: spool.commits == 1)
    assert count(path, "events") == FLUSH_AT
    assert query(path, "SELECT DISTINCT destination, status FROM deliveries") == [("ga4", "pending")]


@pytest_twisted.ensureDeferred
async def test_the_delivery_service_recounts_periodically(open_spool, path, reactor):
    """While the delivery service runs, the spool is recounted every RECOUNT_INTERVAL
    seconds of its reactor's clock, and no longer once it has stopped."""
    spool = await filled(open_spool, range(3), ["log"])
    now = reactor.seconds() + 1
    await dead_letter_all(spool, "log", now)
    await revive_from_the_command_line(path)
    await deliver_all(spool, "log", now + LOOK_AGAIN)
    assert spool.undelivered == -3
    clock = Clock()
    config = parse_config(f'[spool]\npath = "{path}"\n[[destinations]]\ntype = "log"\n', "(test)")
    delivery = Delivery(reactor=clock, config=config, metrics=Metrics(), spool=spool)
    delivery.startService()
    try:
        clock.advance(RECOUNT_INTERVAL - 1)
        await sleep(0.1)
        assert spool.undelivered == -3
        clock.advance(1)
        await eventually(lambda: spool.undelivered == 0)
        spool.enqueue(events(3, 1), ["log"])
        await within(spool.flush())
        await dead_letter_all(spool, "log", now + 10)
        await revive_from_the_command_line(path)
        await deliver_all(spool, "log", now + 10 + LOOK_AGAIN)
        assert spool.undelivered == -1
        clock.advance(RECOUNT_INTERVAL)
        await eventually(lambda: spool.undelivered == 0)
    finally:
        await within(delivery.stopService())
    assert clock.getDelayedCalls() == []


# -- delivery states ----------------------------------------------------------------------


async def filled(open_spool, numbers: range, destinations=("meta", "ga4")) -> Spool:
    """A spool holding the events C{numbers}, committed."""
    spool = open_spool()
    spool.enqueue([event(n) for n in numbers], list(destinations))
    await within(spool.flush())
    return spool


@pytest_twisted.ensureDeferred
async def test_lease_takes_due_rows_oldest_first(open_spool, reactor):
    """lease returns the oldest due rows of one destination, up to the limit, now inflight."""
    spool = await filled(open_spool, range(5))
    now = reactor.seconds() + 1
    leases = await within(spool.lease("meta", 3, now))
    assert all(isinstance(lease, Lease) for lease in leases)
    assert [lease.event.event_id for lease in leases] == ["ev-0", "ev-1", "ev-2"]
    assert [lease.attempts for lease in leases] == [0, 0, 0]
    assert leases[0].event == event(0)
    more = await within(spool.lease("meta", 10, now))
    assert [lease.event.event_id for lease in more] == ["ev-3", "ev-4"]
    assert await within(spool.lease("meta", 10, now)) == []
    assert await within(spool.depth()) == {("meta", "inflight"): 5, ("ga4", "pending"): 5}


@pytest_twisted.ensureDeferred
async def test_lease_waits_for_next_at(open_spool, reactor):
    """A row is not due before its next attempt time (new rows: their enqueue time)."""
    spool = await filled(open_spool, range(1))
    assert await within(spool.lease("meta", 10, reactor.seconds() - 60)) == []
    assert len(await within(spool.lease("meta", 10, reactor.seconds() + 1))) == 1


@pytest_twisted.ensureDeferred
async def test_ack_forgets_the_event_after_its_last_destination(open_spool, path, reactor):
    """ack deletes the delivery; the event row goes, and stops counting, once no destination is owed."""
    spool = await filled(open_spool, range(2))
    now = reactor.seconds() + 1
    meta = await within(spool.lease("meta", 10, now))
    assert await within(spool.ack("meta", [meta[0].key])) == 1
    assert count(path, "events") == 2
    assert spool.undelivered == 2
    ga4 = await within(spool.lease("ga4", 1, now))
    await within(spool.ack("ga4", [ga4[0].key]))
    assert query(path, "SELECT event_id FROM events") == [("ev-1",)]
    assert spool.undelivered == 1
    assert await within(spool.depth()) == {("meta", "inflight"): 1, ("ga4", "pending"): 1}


@pytest_twisted.ensureDeferred
async def test_retry_counts_the_attempt_and_waits(open_spool, path, reactor):
    """retry: pending again from next_at, one more attempt, the error kept; next_due says when."""
    spool = await filled(open_spool, range(2), ["meta"])
    now = reactor.seconds() + 1
    keys = [lease.key for lease in await within(spool.lease("meta", 10, now))]
    assert await within(spool.retry("meta", keys, now + 100, "HTTP 503")) == 2
    assert await within(spool.next_due("meta")) == now + 100
    assert await within(spool.lease("meta", 10, now + 50)) == []
    again = await within(spool.lease("meta", 10, now + 100))
    assert [lease.attempts for lease in again] == [1, 1]
    assert query(path, "SELECT DISTINCT last_error FROM deliveries") == [("HTTP 503",)]
    assert spool.undelivered == 2


@pytest_twisted.ensureDeferred
async def test_release_changes_nothing_but_the_status(open_spool, reactor):
    """release (a cancelled or throttled send): pending, due as before, no attempt counted."""
    spool = await filled(open_spool, range(1), ["meta"])
    now = reactor.seconds() + 1
    (lease,) = await within(spool.lease("meta", 10, now))
    assert await within(spool.release("meta", [lease.key])) == 1
    (again,) = await within(spool.lease("meta", 10, now))
    assert (again.key, again.attempts) == (lease.key, 0)


@pytest_twisted.ensureDeferred
async def test_dead_letters_and_retry_dead(open_spool, reactor):
    """dead keeps the reason for dead_letters; retry_dead makes them pending with no attempts."""
    spool = await filled(open_spool, range(3))
    now = reactor.seconds() + 1
    for destination in ("meta", "ga4"):
        leases = await within(spool.lease(destination, 1, now))
        await within(spool.dead(destination, [leases[0].key], f"{destination}: invalid parameter"))
    assert spool.undelivered == 2  # ev-0 is owed to nobody now

    letters = await within(spool.dead_letters())
    assert {(d.event_id, d.event_name, d.destination, d.attempts, d.last_error) for d in letters} == {
        ("ev-0", "Purchase", "meta", 1, "meta: invalid parameter"),
        ("ev-0", "Purchase", "ga4", 1, "ga4: invalid parameter"),
    }
    assert all(abs(d.created - reactor.seconds()) < 60 for d in letters)
    assert [d.destination for d in await within(spool.dead_letters("ga4"))] == ["ga4"]

    assert await within(spool.retry_dead(["meta"])) == 1
    assert spool.undelivered == 3
    leases = await within(spool.lease("meta", 10, reactor.seconds() + 1))
    assert [(lease.event.event_id, lease.attempts) for lease in leases] == [
        ("ev-1", 0),
        ("ev-2", 0),
        ("ev-0", 0),  # due again since retry_dead, after the rows due since they were enqueued
    ]
    assert await within(spool.retry_dead()) == 1
    assert await within(spool.dead_letters()) == []


@pytest_twisted.ensureDeferred
async def test_expire(open_spool, reactor):
    """expire: kept as expired, never leased again, no longer counted against the bound."""
    spool = await filled(open_spool, range(2), ["meta"])
    now = reactor.seconds() + 1
    leases = await within(spool.lease("meta", 1, now))
    assert await within(spool.expire("meta", [leases[0].key])) == 1
    assert spool.undelivered == 1
    assert await within(spool.depth()) == {("meta", "expired"): 1, ("meta", "pending"): 1}
    assert [lease.event.event_id for lease in await within(spool.lease("meta", 10, now))] == ["ev-1"]
    assert await within(spool.dead_letters()) == []


@pytest_twisted.ensureDeferred
async def test_only_owed_rows_change(open_spool, reactor):
    """A dead or expired row is not acked, retried or released by a late call: it stays as it is."""
    spool = await filled(open_spool, range(2), ["meta"])
    (first, second) = await within(spool.lease("meta", 2, reactor.seconds() + 1))
    await within(spool.dead("meta", [first.key], "permanent"))
    await within(spool.expire("meta", [second.key]))
    keys = [first.key, second.key]
    assert await within(spool.ack("meta", keys)) == 0
    assert await within(spool.retry("meta", keys, 0, "late")) == 0
    assert await within(spool.release("meta", keys)) == 0
    assert await within(spool.depth()) == {("meta", "dead"): 1, ("meta", "expired"): 1}
    assert spool.undelivered == 0


@pytest_twisted.ensureDeferred
async def test_unreadable_stored_event_is_dead_lettered(open_spool, path, reactor):
    """A stored event that no longer decodes is dead-lettered by lease; the others are leased.

    Reopened, as after a restart: the events a spool enqueued itself are leased from memory.
    """
    await within((await filled(open_spool, range(3), ["meta"])).close())
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE events SET body = '{broken' WHERE event_id = 'ev-1'")
    spool = open_spool()
    leases = await within(spool.lease("meta", 10, reactor.seconds() + 1))
    assert [lease.event.event_id for lease in leases] == ["ev-0", "ev-2"]
    (letter,) = await within(spool.dead_letters())
    assert (letter.event_id, letter.event_name) == ("ev-1", None)
    assert "cannot be read" in letter.last_error
    assert spool.undelivered == 2


@pytest_twisted.ensureDeferred
async def test_lease_hands_over_the_enqueued_events(open_spool, reactor):
    """Each destination leases the very events this spool enqueued from memory: none is
    decoded again; one leased from the file is decoded from it, equal."""
    enqueued = events(0, 3)
    spool = open_spool(flush_interval=60)
    spool.enqueue(enqueued, ["meta", "ga4"])
    spool._tick()
    for destination in ("meta", "ga4"):
        leases = await within(spool.lease(destination, 10, reactor.seconds() + 1))
        assert [lease.event for lease in leases] == enqueued
        assert all(lease.event is original for lease, original in zip(leases, enqueued))
    await within(spool.release("meta", [leases[0].key]))
    await within(spool.flush())
    (stored,) = await within(spool.lease("meta", 10, reactor.seconds() + 1))
    assert stored.event == enqueued[0] and stored.event is not enqueued[0]


# -- restart, crash, close ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reopen_puts_inflight_back_to_pending(open_spool, reactor):
    """Rows in flight when the spool closed are pending again after a reopen, attempts unchanged."""
    spool = await filled(open_spool, range(4), ["meta"])
    await within(spool.lease("meta", 3, reactor.seconds() + 1))
    await within(spool.close())
    reopened = open_spool()
    assert await within(reopened.depth()) == {("meta", "pending"): 4}
    leases = await within(reopened.lease("meta", 10, reactor.seconds() + 1))
    assert [lease.event for lease in leases] == events(0, 4)


@pytest_twisted.ensureDeferred
async def test_close_flushes_and_ends_the_spool(open_spool, path):
    """close writes what is buffered and stops the thread; the spool then refuses any use."""
    spool = open_spool(flush_interval=60)
    spool.enqueue(events(0, 5), ["meta"])
    await within(spool.close())
    assert count(path, "events") == 5
    assert not any(thread.is_alive() for thread in spool._pool.threads)
    with pytest.raises(SpoolError, match="closed"):
        spool.enqueue([event(9)], ["meta"])
    with pytest.raises(SpoolError, match="closed"):
        await spool.depth()


CHILD = r"""
import sys
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from tagd.tagging.events import Event
from tagd.delivery.spool import Spool

def events(first, count):
    return [
        Event("Purchase", f"ev-{n}", 1_700_000_000, "https://shop.example/", "192.0.2.1", "UA",
              user_data={"em": ("jane@example.com",)})
        for n in range(first, first + count)
    ]

async def leased(reactor, spool, count):
    spool.enqueue(events(0, count), ["meta", "ga4"])
    await spool.flush()
    leases = await spool.lease("meta", count // 2, reactor.seconds() + 1)
    print("leased", len(leases), flush=True)
    await Deferred()

async def accepted(reactor, spool, count):
    for n in range(count):
        spool.enqueue(events(n, 1), ["meta", "ga4"])
    print("accepted", count, flush=True)
    await Deferred()

async def writing(reactor, spool, count):
    written = 0
    while True:
        spool.enqueue(events(written, count), ["meta", "ga4"])
        print("accepted", written + count, flush=True)
        await spool.flush()
        written += count
        print("committed", written, flush=True)

async def main(reactor, mode, path, count):
    spool = Spool.open(path, reactor=reactor, flush_interval=60)
    await {"leased": leased, "accepted": accepted, "writing": writing}[mode](reactor, spool, int(count))

react(lambda reactor: ensureDeferred(main(reactor, *sys.argv[1:])))
"""


def start_child(*args: str) -> subprocess.Popen:
    """A python process running L{CHILD} with C{args}, its output unbuffered."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )


def read_line(child: subprocess.Popen, timeout: float = 20.0) -> str:
    """The child's next output line; fails with its errors if none comes in time."""
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline().decode() if ready else ""
    if not line:
        child.kill()
        raise AssertionError(f"no output from the child: {child.stderr.read().decode()}")
    return line.strip()


def kill(child: subprocess.Popen) -> None:
    """SIGKILL: no cleanup, no flush, no close."""
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    child.stdout.close()
    child.stderr.close()


@pytest_twisted.ensureDeferred
async def test_kill_9_with_rows_in_flight_loses_nothing(open_spool, path, reactor):
    """A real process commits N events, leases half, and is SIGKILLed: after reopening, all N
    are pending for both destinations and deliverable."""
    total = 200
    child = start_child("leased", str(path), str(total))
    assert read_line(child) == f"leased {total // 2}"
    kill(child)
    assert query(path, "SELECT status, COUNT(*) FROM deliveries GROUP BY status ORDER BY status") == [
        ("inflight", total // 2),
        ("pending", 3 * total // 2),
    ]

    spool = open_spool()
    assert await within(spool.depth()) == {("meta", "pending"): total, ("ga4", "pending"): total}
    assert spool.undelivered == total
    for destination in ("meta", "ga4"):
        leases = await within(spool.lease(destination, 10 * total, reactor.seconds() + 1))
        assert sorted(lease.event.event_id for lease in leases) == sorted(f"ev-{n}" for n in range(total))


@pytest_twisted.ensureDeferred
async def test_kill_9_while_committing_keeps_every_commit_whole(open_spool, path):
    """A real process accepts and commits groups of 100 in a loop and is SIGKILLed at a
    moment it does not choose: every group it committed is in the file, none in part, and
    reopening adds the group it had accepted but not committed, from the intake journal."""
    child = start_child("writing", str(path), "100")
    while read_line(child) != "committed 500":
        pass
    time.sleep(0.003)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    # Everything it printed before it died: its last "accepted" line is what it had accepted
    # (or one group less, when the kill fell between an enqueue and its line).
    printed = child.stdout.read().decode().splitlines()
    child.stdout.close()
    child.stderr.close()
    accepted = max([500, *(int(line.split()[1]) for line in printed if line.startswith("accepted"))])

    stored = count(path, "events")
    assert stored >= 500
    assert stored % 100 == 0
    assert count(path, "deliveries") == 2 * stored
    ids = {event_id for (event_id,) in query(path, "SELECT event_id FROM events")}
    assert ids == {f"ev-{n}" for n in range(stored)}
    spool = open_spool()
    reopened = count(path, "events")
    assert reopened in (accepted, accepted + 100)
    assert spool.undelivered == reopened
    assert count(path, "deliveries") == 2 * reopened
    ids = {event_id for (event_id,) in query(path, "SELECT event_id FROM events")}
    assert ids == {f"ev-{n}" for n in range(reopened)}


# -- a file that cannot be written ------------------------------------------------------


async def on_a_full_disk(open_spool) -> Spool:
    """A spool that committed C{event(0)} and whose file may grow no more from now on: its
    next commit that needs a page fails as on a full disk."""
    spool = open_spool(flush_interval=60)
    spool.enqueue([event(0)], ["meta"])
    await within(spool.flush())
    pages = await within(spool._run(lambda db: db.execute("PRAGMA page_count").fetchone()[0]))
    await within(spool._run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}")))
    return spool


async def make_room(spool: Spool) -> None:
    """Let the spool's file grow again."""
    await within(spool._run(lambda db: db.execute("PRAGMA max_page_count = 1000000")))


@pytest_twisted.ensureDeferred
async def test_disk_full_keeps_events_in_memory(open_spool, path, spool_log):
    """A full disk during group commits: nothing raised, events kept in memory, healthy false,
    one log line naming the reason and no personal data; once space is back, all are written."""
    spool = await on_a_full_disk(open_spool)

    assert spool.enqueue(events(1, 200), ["meta", "ga4"]) == 200
    await within(spool.flush())
    await within(spool.flush())
    assert not spool.healthy
    assert "the disk is full" in spool.last_error
    assert spool.buffered == 200
    assert spool.undelivered == 201
    assert count(path, "events") == 1
    assert len(spool_log) == 1
    assert "cannot write 200 event(s)" in spool_log[0]
    assert "disk is full" in spool_log[0]
    assert not any(EMAIL.strip() in text or "203.0.113.7" in text for text in [*spool_log, spool.last_error])

    await make_room(spool)
    await within(spool.flush())
    assert spool.healthy
    assert spool.last_error is None
    assert spool.buffered == 0
    assert count(path, "events") == 201
    assert "writing again" in spool_log[-1]


@pytest_twisted.ensureDeferred
async def test_close_on_a_full_disk_leaves_the_events_to_the_journal(open_spool, path, spool_log, reactor):
    """Closing while the buffer cannot be written: close still finishes, the log counts the
    events not written and says where they are, and the next open writes them."""
    spool = await on_a_full_disk(open_spool)
    spool.enqueue(events(1, 50), ["meta"])
    await within(spool.close())
    assert count(path, "events") == 1
    assert "50 event(s) could not be written before closing" in spool_log[-1]
    assert "disk is full" in spool_log[-1]
    assert "intake journal" in spool_log[-1]

    reopened = open_spool()  # SQLite's page limit was the closed connection's own
    assert reopened.undelivered == 51
    assert "50 event(s) accepted before tagd last stopped" in spool_log[-1]
    leases = await within(reopened.lease("meta", 100, reactor.seconds() + 1))
    assert [lease.event for lease in leases] == events(0, 51)


@pytest_twisted.ensureDeferred
async def test_failed_writes_are_retried_by_themselves(open_spool, path):
    """After a failed group commit the spool tries again on its own, without a flush call."""
    spool = await on_a_full_disk(open_spool)
    spool.enqueue(events(1, 100), ["meta"])
    await within(spool.flush())
    assert not spool.healthy
    await make_room(spool)
    await eventually(lambda: spool.healthy)
    assert count(path, "events") == 101


@pytest_twisted.ensureDeferred
async def test_enqueue_storm_during_a_commit_queues_no_flushes(open_spool, path):
    """Thousands of tracked responses in one reactor turn, while a commit runs, queue no
    write per response (a chain of waiters once overflowed the stack and left the lock
    taken for good): every event reaches the file (the last tick's at the next one), and
    the lock is free afterwards."""
    spool = open_spool(flush_interval=60)
    for n in range(4 * FLUSH_AT):
        spool.enqueue([event(n)], ["meta"])
    assert len(spool._lock.waiting) <= 1
    await eventually(lambda: count(path, "events") == 3 * FLUSH_AT)
    await eventually(lambda: not spool._lock.locked)
    assert spool.buffered == FLUSH_AT
    assert spool.commits <= 3
    await within(spool.flush())
    assert count(path, "events") == 4 * FLUSH_AT


# The intake journal: what is accepted and not yet committed outlives the process.


def segments(path: Path) -> list[str]:
    """The intake journal's segments beside the spool at C{path}."""
    return sorted(glob.glob(f"{path}{SEGMENT}*"))


@pytest_twisted.ensureDeferred
async def test_kill_9_before_the_group_commit_loses_no_accepted_event(open_spool, path, reactor, spool_log):
    """A real process accepts N events one at a time, as N tracked responses would hand
    them over, and is SIGKILLed before any group commit: reopening the spool writes all N
    from the intake journal, once each, owed to both destinations, and removes the journal."""
    total = 300
    child = start_child("accepted", str(path), str(total))
    assert read_line(child) == f"accepted {total}"
    kill(child)
    assert count(path, "events") == 0
    assert len(segments(path)) == 1

    spool = open_spool()
    assert spool.undelivered == total
    assert await within(spool.depth()) == {("meta", "pending"): total, ("ga4", "pending"): total}
    for destination in ("meta", "ga4"):
        leases = await within(spool.lease(destination, 10 * total, reactor.seconds() + 1))
        assert [lease.event for lease in leases] == child_events(total)
    assert segments(path) == []
    assert f"{total} event(s) accepted before tagd last stopped" in spool_log[-1]


def child_events(count: int) -> list[Event]:
    """The events L{CHILD} enqueues."""
    return [
        Event("Purchase", f"ev-{n}", 1_700_000_000, "https://shop.example/", "192.0.2.1", "UA",
              user_data={"em": ("jane@example.com",)})
        for n in range(count)
    ]


@pytest_twisted.ensureDeferred
async def test_a_group_commit_removes_the_journal_it_covers(open_spool, path):
    """Accepted events are in a journal segment (owner-only) until their group commit, which
    removes it; events accepted later go to a new segment."""
    spool = open_spool(flush_interval=60)
    spool.enqueue(events(0, 3), ["meta"])
    spool.enqueue(events(3, 2), ["meta", "ga4"])
    [first] = segments(path)
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o600
    with open(first, "rb") as f:
        assert len(f.read().splitlines()) == 5
    await within(spool.flush())
    assert segments(path) == []
    spool.enqueue(events(5, 1), ["meta"])
    [second] = segments(path)
    assert second > first


@pytest_twisted.ensureDeferred
async def test_committed_events_are_not_written_again_from_the_journal(open_spool, path, reactor):
    """A segment left behind although its events were committed (the process died between
    the commit and the removal) adds nothing when the spool is opened again, even once
    those events were delivered and forgotten."""
    spool = open_spool(flush_interval=60)
    spool.enqueue(events(0, 4), ["meta"])
    [segment] = segments(path)
    with open(segment, "rb") as f:
        kept = f.read()
    await within(spool.flush())
    leases = await within(spool.lease("meta", 2, reactor.seconds() + 1))
    await within(spool.ack("meta", [lease.key for lease in leases]))
    await within(spool.close())
    with open(segment, "wb") as f:
        f.write(kept)

    reopened = open_spool()
    assert reopened.undelivered == 2
    assert count(path, "events") == 2
    assert segments(path) == []
    reopened.enqueue(events(4, 1), ["meta"])
    await within(reopened.flush())
    assert query(path, "SELECT id, event_id FROM events ORDER BY id") == [(3, "ev-2"), (4, "ev-3"), (5, "ev-4")]


async def left_journal(open_spool, path: Path, count: int) -> bytes:
    """The journal a spool at C{path} writes for C{count} events (to meta), as a crash
    before their group commit would leave it; the spool itself is closed."""
    spool = open_spool(path, flush_interval=60)
    spool.enqueue(events(0, count), ["meta"])
    [segment] = segments(path)
    with open(segment, "rb") as f:
        kept = f.read()
    await within(spool.close())
    return kept


@pytest_twisted.ensureDeferred
async def test_an_unreadable_journal_line_is_counted_and_the_rest_written(open_spool, tmp_path, spool_log, reactor):
    """A line the disk had no room to finish is skipped and counted in the log line; every
    other line of the journal is written, here into a spool file started anew (the old one
    moved aside)."""
    kept = await left_journal(open_spool, tmp_path / "old.db", 3)
    new = tmp_path / "new.db"
    with open(f"{new}{SEGMENT}00000001", "wb") as f:
        f.write(kept + b'4\t1700000000.0\t["meta"]\t{"event_name":"Purch')

    reopened = open_spool(new)
    assert reopened.undelivered == 3
    leases = await within(reopened.lease("meta", 10, reactor.seconds() + 1))
    assert [lease.event for lease in leases] == events(0, 3)
    assert "3 event(s) accepted before tagd last stopped" in spool_log[-1]
    assert "1 line(s) could not be read and are lost" in spool_log[-1]
    assert EMAIL.strip() not in spool_log[-1]


@pytest_twisted.ensureDeferred
async def test_a_journal_the_kernel_refuses_is_logged_once(open_spool, path, spool_log):
    """When the journal cannot be appended to, events still wait for their group commit
    in memory and are committed; one log line says that a crash would lose them, and
    another when appending works again."""
    spool = open_spool(flush_interval=60)

    def refuse(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool._journal.append = refuse
    assert spool.enqueue(events(0, 2), ["meta"]) == 2
    assert spool.enqueue(events(2, 2), ["meta"]) == 2
    journal_lines = [line for line in spool_log if "intake journal" in line]
    assert len(journal_lines) == 1
    assert "No space left on device" in journal_lines[0] and "in memory only" in journal_lines[0]
    del spool._journal.append  # the kernel takes writes again
    assert spool.enqueue(events(4, 1), ["meta"]) == 1
    assert spool_log[-1] == "spool: appending to the intake journal again"
    assert len(segments(path)) == 1
    await within(spool.flush())
    assert count(path, "events") == 5


@pytest_twisted.ensureDeferred
async def test_a_second_process_cannot_open_a_spool_in_use(open_spool, path):
    """Only one process hands out a spool's event keys: a second tagd on the same file is
    refused with a reason (and proxies without a spool), and the first goes on committing."""
    child = start_child("accepted", str(path), "5")
    assert read_line(child) == "accepted 5"
    try:
        with pytest.raises(SpoolError, match="another process has it open"):
            open_spool()
    finally:
        kill(child)
    spool = open_spool()  # the kernel released the lock with the process
    assert spool.undelivered == 5


@pytest_twisted.ensureDeferred
async def test_a_short_journal_write_starts_a_new_segment(open_spool, path, monkeypatch):
    """The disk takes only part of a journal line: the next event goes to a new segment,
    so that it is not glued to the cut line, and a crash would lose only the cut one; the
    group commit of both events removes both segments."""
    spool = open_spool(flush_interval=60)
    real_write = os.write

    def half(fd, data):
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(intake_module.os, "write", half)
    spool.enqueue(events(0, 1), ["meta"])
    monkeypatch.setattr(intake_module.os, "write", real_write)
    spool.enqueue(events(1, 1), ["meta"])
    cut, whole = segments(path)
    assert read_segment(cut) == ([], 1)
    assert [entry.event_id for entry in read_segment(whole)[0]] == ["ev-1"]
    await within(spool.flush())
    assert count(path, "events") == 2
    assert segments(path) == []


@pytest_twisted.ensureDeferred
async def test_a_segment_that_cannot_be_read_is_set_aside_and_named(open_spool, tmp_path, spool_log, reactor):
    """A segment that cannot be read (here a directory in its place) does not stop the
    spool from opening: the other segments are written, and the unreadable one is renamed
    out of the journal, named in an error line, so that no later start reads it with keys
    this one hands out anew."""
    kept = await left_journal(open_spool, tmp_path / "old.db", 2)
    new = tmp_path / "new.db"
    with open(f"{new}{SEGMENT}00000007", "wb") as f:
        f.write(kept)
    os.mkdir(f"{new}{SEGMENT}00000003")

    reopened = open_spool(new)
    assert reopened.undelivered == 2
    assert "2 event(s) accepted before tagd last stopped" in spool_log[-2]
    assert "00000003 cannot be read" in spool_log[-1]
    assert "moved aside as new.db.intake-00000003.unreadable" in spool_log[-1]
    assert "00000007" not in spool_log[-1]
    assert segments(new) == [f"{new}{SEGMENT}00000003{UNREADABLE}"]
    reopened.enqueue(events(2, 1), ["meta"])
    await within(reopened.close())
    assert open_spool(new).undelivered == 3
