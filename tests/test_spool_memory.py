"""Delivering before writing: the spool's rows in memory between the tick that offers them
and the one that writes what is still owed of them, read back from the real SQLite file;
a kill -9 in between; and hypothesis's random programs of enqueues, ticks, leases,
settlements and crashes against a model of what the spool owes."""

from __future__ import annotations

import glob
import itertools
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tagd.admin.metrics import Metrics
from tagd.delivery.dispatcher import Dispatcher
from tagd.delivery.intake import SEGMENT
from tagd.delivery.spool import Spool

from conftest import eventually, sleep, within
from test_dispatcher import ObservedMeta, dispatcher_log, meta_route, serving  # noqa: F401 (fixtures)
from test_spool import (
    count,
    event,
    events,
    kill,
    on_a_full_disk,
    make_room,
    query,
    read_line,
    trace_statements,
)

FAR = 10.0**12  # a next attempt time (epoch seconds) no test reaches


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "spool.db"


@pytest.fixture
def open_spool(open_spool):
    """The shared opener, with no tick but those a test makes (C{flush_interval} 60 s)."""
    return lambda *args, **options: open_spool(*args, **{"flush_interval": 60, **options})


def segments(path: Path) -> list[str]:
    return sorted(glob.glob(f"{path}{SEGMENT}*"))


async def tick(spool: Spool) -> None:
    """One group-commit tick, and the write it starts, if any, to its end."""
    spool._tick()
    if spool._writer is not None:
        await within(spool._writer)


async def lease_keys(spool: Spool, destination: str, limit: int = 1000) -> list[int]:
    leases = await within(spool.lease(destination, limit, time.time() + 1))
    return [lease.key for lease in leases]


def deliveries(path: Path) -> list[tuple]:
    """(event_id, destination, status, attempts, next_at, last_error) of every row in the file."""
    return query(
        path,
        "SELECT e.event_id, d.destination, d.status, d.attempts, d.next_at, d.last_error"
        " FROM deliveries d JOIN events e ON e.id = d.event ORDER BY d.event, d.destination",
    )


@pytest_twisted.ensureDeferred
async def test_an_event_delivered_before_its_write_never_reaches_the_file(open_spool, path):
    """Offered at a tick, leased and acknowledged by both destinations from memory: the
    next tick writes nothing (no statement changes the file, no group commit), removes
    the journal, and the file never held the events."""
    spool = open_spool()
    statements = await trace_statements(spool)
    spool.enqueue(events(0, 20), ["meta", "ga4"])
    await tick(spool)
    for destination in ("meta", "ga4"):
        keys = await lease_keys(spool, destination)
        assert len(keys) == 20
        assert await within(spool.ack(destination, keys)) == 20
    assert spool.undelivered == 0 and spool.buffered == 0
    assert len(segments(path)) == 1
    await tick(spool)
    assert segments(path) == []
    assert spool.commits == 0
    assert not any(sql.startswith(("INSERT", "UPDATE", "DELETE")) for _, sql in statements)
    assert count(path, "events") == 0 and count(path, "deliveries") == 0
    assert await within(spool.depth()) == {}
    # Leased again, the file is not even asked: it holds nothing due.
    before = len(statements)
    assert await lease_keys(spool, "meta") == []
    assert len(statements) == before


@pytest_twisted.ensureDeferred
async def test_leased_unsettled_rows_are_written_in_flight_and_not_leased_twice(open_spool, path):
    """Rows a destination leased and has not settled by the next tick are written in
    flight: leased from the file, they do not come again; settled later, on the file."""
    spool = open_spool()
    spool.enqueue(events(0, 5), ["meta", "ga4"])
    await tick(spool)
    leased = await lease_keys(spool, "meta", 3)
    await tick(spool)
    rows = deliveries(path)
    assert [(e, d, s) for e, d, s, *_ in rows if d == "meta"] == [
        ("ev-0", "meta", "inflight"),
        ("ev-1", "meta", "inflight"),
        ("ev-2", "meta", "inflight"),
        ("ev-3", "meta", "pending"),
        ("ev-4", "meta", "pending"),
    ]
    assert {s for _, d, s, *_ in rows if d == "ga4"} == {"pending"}
    rest = await lease_keys(spool, "meta")
    assert sorted(rest) != sorted(leased) and not set(rest) & set(leased) and len(rest) == 2
    assert await within(spool.ack("meta", leased + rest)) == 5
    assert query(path, "SELECT COUNT(*) FROM deliveries WHERE destination = 'meta'") == [(0,)]
    assert spool.undelivered == 5  # still owed to ga4
    assert await within(spool.depth()) == {("ga4", "pending"): 5}


@pytest_twisted.ensureDeferred
async def test_outcomes_settled_in_memory_are_written_with_their_state(open_spool, path, reactor):
    """retry, postpone, dead, expire and release settled in memory reach the file at the
    next tick as the same calls on the file would have left the rows."""
    spool = open_spool()
    spool.enqueue(events(0, 5), ["meta"])
    await tick(spool)
    k = await lease_keys(spool, "meta")
    created = reactor.seconds()
    assert await within(spool.retry("meta", [k[0]], FAR, "HTTP 503")) == 1
    assert await within(spool.postpone("meta", [k[1]], FAR + 1, "meta is out")) == 1
    assert await within(spool.dead("meta", [k[2]], "invalid parameter")) == 1
    assert await within(spool.expire("meta", [k[3]])) == 1
    assert await within(spool.release("meta", [k[4]])) == 1
    assert await within(spool.ack("meta", [k[2], k[3]])) == 0  # ended: only owed rows change
    assert spool.undelivered == 3
    spool.enqueue(events(5, 1), ["meta"])  # the tick below writes the five, offers this
    await tick(spool)
    rows = deliveries(path)
    assert [row[:4] + row[5:] for row in rows] == [
        ("ev-0", "meta", "pending", 1, "HTTP 503"),
        ("ev-1", "meta", "pending", 0, "meta is out"),
        ("ev-2", "meta", "dead", 1, "invalid parameter"),
        ("ev-3", "meta", "expired", 0, None),
        ("ev-4", "meta", "pending", 0, None),
    ]
    assert [row[4] for row in rows[:2]] == [FAR, FAR + 1]
    assert all(abs(row[4] - created) < 60 for row in rows[2:])  # dead, expired, released: as they were
    assert spool.undelivered == 4


@pytest_twisted.ensureDeferred
async def test_retried_and_postponed_rows_keep_their_times(open_spool, path):
    """A retried row is written pending with one attempt, its next time and the error; a
    postponed one with no attempt; a released one as it was, leasable again from memory
    at once."""
    spool = open_spool()
    spool.enqueue(events(0, 3), ["meta"])
    await tick(spool)
    k = await lease_keys(spool, "meta")
    await within(spool.retry("meta", [k[0]], FAR, "HTTP 503"))
    await within(spool.postpone("meta", [k[1]], FAR + 1, "meta is out"))
    await within(spool.release("meta", [k[2]]))
    assert await lease_keys(spool, "meta") == [k[2]]
    spool.enqueue(events(3, 1), ["meta"])
    await tick(spool)
    assert [row[:6] for row in deliveries(path)] == [
        ("ev-0", "meta", "pending", 1, FAR, "HTTP 503"),
        ("ev-1", "meta", "pending", 0, FAR + 1, "meta is out"),
        ("ev-2", "meta", "inflight", 0, pytest.approx(time.time(), abs=60), None),
    ]
    assert await within(spool.next_due("meta")) == pytest.approx(time.time(), abs=60)  # ev-3, in memory
    assert await lease_keys(spool, "meta") == [k[2] + 1]  # ev-3: ev-0 and ev-1 wait, ev-2 is leased


@pytest_twisted.ensureDeferred
async def test_the_bound_counts_rows_in_memory(open_spool):
    """Events held in memory, offered and leased, count against max_events until every
    destination is done with them."""
    spool = open_spool(max_events=5)
    assert spool.enqueue(events(0, 5), ["meta", "ga4"]) == 5
    await tick(spool)
    keys = await lease_keys(spool, "meta")
    assert spool.enqueue([event(9)], ["meta"]) == 0
    await within(spool.ack("meta", keys[:2]))
    assert spool.undelivered == 5  # still owed to ga4
    ga4 = await lease_keys(spool, "ga4")
    await within(spool.ack("ga4", ga4[:2]))
    assert spool.undelivered == 3
    assert spool.enqueue(events(10, 3), ["meta"]) == 2
    await tick(spool)
    assert spool.undelivered == 5  # three written, two offered
    assert await within(spool.recount()) == 5


@pytest_twisted.ensureDeferred
async def test_close_writes_everything_owed(open_spool, path, reactor):
    """Closing writes what was offered and what was not, each in its state; reopened, the
    rows in flight are pending again, and the journal is gone."""
    spool = open_spool()
    spool.enqueue(events(0, 3), ["meta", "ga4"])
    await tick(spool)
    keys = await lease_keys(spool, "meta")
    await within(spool.ack("meta", keys[:1]))
    await within(spool.retry("meta", keys[1:2], FAR, "HTTP 503"))
    spool.enqueue(events(3, 2), ["meta"])  # not offered yet
    await within(spool.close())
    assert segments(path) == []
    assert [row[:4] for row in deliveries(path)] == [
        ("ev-0", "ga4", "pending", 0),
        ("ev-1", "ga4", "pending", 0),
        ("ev-1", "meta", "pending", 1),
        ("ev-2", "ga4", "pending", 0),
        ("ev-2", "meta", "inflight", 0),
        ("ev-3", "meta", "pending", 0),
        ("ev-4", "meta", "pending", 0),
    ]
    reopened = open_spool()
    assert reopened.undelivered == 5
    assert await within(reopened.depth()) == {("ga4", "pending"): 3, ("meta", "pending"): 4}


@pytest_twisted.ensureDeferred
async def test_settlements_of_rows_being_written_wait_for_the_write(open_spool, path):
    """Rows being written are neither leased nor settled in memory: an ack that comes
    meanwhile is applied once they are in the file."""
    spool = open_spool()
    spool.enqueue(events(0, 4), ["meta"])
    await tick(spool)
    keys = await lease_keys(spool, "meta", 2)
    spool.enqueue(events(4, 1), ["meta"])
    spool._tick()  # writes the four, without waiting here
    assert spool._writer is not None
    assert await within(spool.lease("meta", 10, time.time() + 1)) != []  # ev-4, offered; ev-2, ev-3 from the file
    acked = spool.ack("meta", keys)
    assert not acked.called
    assert await within(acked) == 2
    assert [row[:3] for row in deliveries(path)] == [("ev-2", "meta", "inflight"), ("ev-3", "meta", "inflight")]


@pytest_twisted.ensureDeferred
async def test_rows_that_cannot_be_written_are_still_delivered(open_spool, path):
    """While the file cannot be written, offered rows are leased and settled in memory all
    the same, and what is owed is written once it can be."""
    spool = await on_a_full_disk(open_spool)
    spool.enqueue(events(1, 100), ["meta", "ga4"])
    await tick(spool)  # offers
    await tick(spool)  # fails
    assert not spool.healthy and spool.buffered == 100
    meta = await lease_keys(spool, "meta")
    assert len(meta) == 101  # ev-0 from the file, the others from memory
    await within(spool.ack("meta", meta))
    assert spool.undelivered == 100  # owed to ga4
    await make_room(spool)
    await eventually(lambda: spool.healthy)
    assert count(path, "events") == 100
    assert query(path, "SELECT DISTINCT destination, status FROM deliveries") == [("ga4", "pending")]


@pytest_twisted.ensureDeferred
async def test_rows_held_while_the_file_cannot_be_written_stay_within_max_events(open_spool, path):
    """While the file cannot be written, dead letters held in memory make every retried
    write fail, and the rows delivered from memory after them stay there with them until
    one succeeds: they count against max_events meanwhile, or memory grows with every
    event the platform takes.  Once the file can be written, they are gone and room is back."""
    spool = open_spool(max_events=100)
    spool.enqueue([event(0)], ["meta"])
    await within(spool.flush())
    pages = await within(spool._run(lambda db: db.execute("PRAGMA page_count").fetchone()[0]))
    await within(spool._run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}")))  # a full disk
    spool.enqueue(events(1, 20), ["meta"])
    await tick(spool)
    await within(spool.dead("meta", await lease_keys(spool, "meta"), "HTTP 400"))  # ev-0 too: the file keeps them
    accepted = 0
    for round in range(10):
        accepted += spool.enqueue(events(100 + 50 * round, 50), ["meta"])
        await tick(spool)  # offers them; writing those before fails
        await within(spool.ack("meta", await lease_keys(spool, "meta")))
        assert not spool.healthy
    assert spool.undelivered == 0
    assert len(spool._held._rows) <= 100
    assert accepted <= 100
    await make_room(spool)
    await within(spool.flush())
    assert spool.healthy
    assert count(path, "deliveries") == 21
    assert query(path, "SELECT DISTINCT status FROM deliveries") == [("dead",)]
    assert spool.enqueue(events(1000, 100), ["meta"]) == 100


@pytest_twisted.ensureDeferred
async def test_a_file_that_refuses_leases_stops_no_delivery_from_memory_and_floods_no_log(
    open_spool, serving, dispatcher_log, reactor, platforms
):
    """The file turns read-only under a running dispatcher while visitors keep coming:
    every tick offers their events and wakes the dispatcher, whose leases ask the file
    (at least once a second) and fail.  The events offered are delivered from memory all
    the same, and the failing leases are said in a line, not in one traceback per tick."""
    served = serving(ObservedMeta())
    spool = open_spool(flush_interval=0.05)
    dispatcher = Dispatcher(reactor=reactor, spool=spool, routes=[meta_route(served)], http=platforms, metrics=Metrics())
    spool.on_offer = lambda: dispatcher.wake("meta")
    dispatcher.startService()
    try:
        await within(spool._run(lambda db: db.execute("PRAGMA query_only = 1")))  # as a file made read-only
        for number in range(50):
            spool.enqueue([event(number)], ["meta"])
            await sleep(0.05)
        assert len([line for line in dispatcher_log if "cannot lease" in line]) <= 1
        await eventually(lambda: len(served.fake.events) == 50)
    finally:
        await within(dispatcher.stopService())


@pytest_twisted.ensureDeferred
async def test_a_lease_skips_the_file_only_while_it_holds_nothing_due(open_spool, path):
    """Once a lease found the file holding nothing due for a destination, the next ones
    run no statement until a row of it may be due there: a retry written to the file is
    leased when its time comes."""
    spool = open_spool()
    statements = await trace_statements(spool)
    spool.enqueue(events(0, 2), ["meta"])
    await within(spool.flush())
    first = await lease_keys(spool, "meta")
    assert len(first) == 2
    before = len(statements)
    assert await lease_keys(spool, "meta") == []
    assert len(statements) == before
    due = time.time() + 0.5
    await within(spool.retry("meta", first[:1], due, "HTTP 503"))
    assert await within(spool.lease("meta", 10, due - 0.1)) == []
    assert [lease.key for lease in await within(spool.lease("meta", 10, due))] == first[:1]


# -- kill -9 between the delivery and the write ------------------------------------------


DELIVERING = r"""
import sys
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from tagd.delivery.spool import Spool
from tagd.tagging.events import Event

async def main(reactor, path, count):
    spool = Spool.open(path, reactor=reactor, flush_interval=60)
    spool.enqueue([Event("Purchase", f"ev-{n}", 1_700_000_000, "https://shop.example/", "192.0.2.1", "UA")
                   for n in range(int(count))], ["meta", "ga4"])
    spool._tick()
    for destination in ("meta", "ga4"):
        leases = await spool.lease(destination, 1000, reactor.seconds() + 1)
        await spool.ack(destination, [lease.key for lease in leases])
    print("delivered", len(leases), spool.undelivered, flush=True)
    await Deferred()

react(lambda reactor: ensureDeferred(main(reactor, *sys.argv[1:])))
"""


@pytest_twisted.ensureDeferred
async def test_kill_9_between_delivery_and_write_delivers_again(open_spool, path, reactor):
    """A real process delivers N events from memory to both destinations and is SIGKILLed
    before the tick that would have skipped them: nothing is lost, the file never had
    them, and reopening replays them from the journal to both, to be delivered again."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", DELIVERING, str(path), "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    assert read_line(child) == "delivered 50 0"
    kill(child)
    assert count(path, "events") == 0
    spool = open_spool()
    assert spool.undelivered == 50
    for destination in ("meta", "ga4"):
        leases = await within(spool.lease(destination, 100, reactor.seconds() + 1))
        assert [lease.event.event_id for lease in leases] == [f"ev-{n}" for n in range(50)]


# -- random programs against a model -----------------------------------------------------

DESTINATIONS = ("a", "b")
OWED = ("due", "leased", "later")  # pending and due, in flight, pending from FAR

# Ticks and leases from memory the most often: most of what the spool does happens there.
operations = st.one_of(
    st.tuples(st.just("enqueue"), st.integers(1, 4), st.sampled_from([("a",), ("b",), ("a", "b")])),
    st.tuples(st.just("tick")),
    st.tuples(st.just("tick")),
    st.tuples(st.just("tick_nowait")),  # the next steps run while its write does
    st.tuples(st.just("flush")),
    st.tuples(st.just("lease"), st.sampled_from(DESTINATIONS), st.integers(1, 6)),
    st.tuples(st.just("lease"), st.sampled_from(DESTINATIONS), st.integers(1, 6)),
    st.tuples(
        st.just("settle"),
        st.sampled_from(DESTINATIONS),
        st.sampled_from(["ack", "retry", "retry_later", "postpone", "release", "dead", "expire"]),
        st.integers(0, 2**12),
    ),
    st.tuples(
        st.just("settle"),
        st.sampled_from(DESTINATIONS),
        st.sampled_from(["ack", "ack", "retry", "release"]),
        st.integers(0, 2**12),
    ),
    st.tuples(st.just("crash")),
    st.tuples(st.just("lease_all"), st.sampled_from(DESTINATIONS)),
)

_programs = itertools.count()


def settled(kind: str, state: tuple[str, int]) -> tuple[str, int]:
    """A delivery's (state, attempts) once settled as C{kind}, as the spool documents it."""
    status, attempts = state
    return {
        "ack": ("delivered", attempts),
        "retry": ("due", attempts + 1),
        "retry_later": ("later", attempts + 1),
        "postpone": ("later", attempts),
        "release": ("due" if status == "leased" else status, attempts),
        "dead": ("dead", attempts + 1),
        "expire": ("expired", attempts),
    }[kind]


class Model:
    """What the spool owes: by event id and destination, (state, attempts)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, tuple[str, int]]] = {}
        self.keys: dict[int, str] = {}  # lease keys seen, to their event ids
        self.leased: dict[str, set[int]] = {name: set() for name in DESTINATIONS}

    def depth(self) -> dict[tuple[str, str], int]:
        names = {"due": "pending", "later": "pending", "leased": "inflight", "dead": "dead", "expired": "expired"}
        depth: dict[tuple[str, str], int] = {}
        for states in self.rows.values():
            for destination, (status, _) in states.items():
                if status != "delivered":
                    group = (destination, names[status])
                    depth[group] = depth.get(group, 0) + 1
        return depth

    def owed(self) -> int:
        return sum(any(s in OWED for s, _ in states.values()) for states in self.rows.values())


async def crash_and_reopen(spool: Spool, where: Path, reactor, model: Model) -> Spool:
    """Drop the spool as a kill -9 would (its thread finishes what it was given, nothing
    more is written), reopen the file, and check it against the model: every delivery
    owed is pending, every one ended is as it ended, or, its event replayed from the
    journal, pending again from the start (at least once).  The model then takes the
    file's word."""
    spool._cancel_timer()
    spool._closed = True
    spool._pool.stop()
    spool._journal.seal()
    spool._journal.unlock()
    reopened = Spool.open(str(where), reactor=reactor, flush_interval=60)
    with closing(sqlite3.connect(where)) as db:
        stored = {
            (event_id, destination): (status, attempts, next_at)
            for event_id, destination, status, attempts, next_at in db.execute(
                "SELECT e.event_id, d.destination, d.status, d.attempts, d.next_at"
                " FROM deliveries d JOIN events e ON e.id = d.event"
            )
        }
    for event_id, states in model.rows.items():
        replayed = all(stored.get((event_id, d), ("",))[:2] == ("pending", 0) for d in states)
        for destination, (status, attempts) in states.items():
            found = stored.get((event_id, destination))
            if status in OWED:
                assert found is not None and found[0] == "pending", (event_id, destination, status, found)
            elif found is None:
                assert status == "delivered", (event_id, destination, status)
            elif found[0] != status:
                assert replayed and found[:2] == ("pending", 0), (event_id, destination, status, found)
            if found is None:
                states[destination] = ("delivered", attempts)
            elif found[0] == "pending":
                states[destination] = ("later" if found[2] >= FAR else "due", found[1])
            else:
                states[destination] = (found[0], found[1])
    model.leased = {name: set() for name in DESTINATIONS}
    assert reopened.undelivered == model.owed()
    return reopened


@settings(
    max_examples=150,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(operations, min_size=10, max_size=50))
@pytest_twisted.ensureDeferred
async def test_random_programs_keep_every_delivery_owed(tmp_path, reactor, program):
    """hypothesis writes programs of enqueues, ticks (some with the next steps running
    while their write does), flushes, leases, settlements (of leased keys, and late ones
    of keys already settled) and crashes; after each step the
    spool's depth and bound count agree with a model, a lease never hands out a delivery
    that is in flight, ended or not yet due, nor with the wrong attempt count, and after a
    flush every due delivery is leasable; a crash loses no owed delivery."""
    where = tmp_path / f"program-{next(_programs)}" / "spool.db"
    where.parent.mkdir()
    spool = Spool.open(str(where), reactor=reactor, flush_interval=60)
    model = Model()
    numbers = itertools.count()
    try:
        for step in program:
            kind = step[0]
            if kind == "enqueue":
                made = [event(next(numbers)) for _ in range(step[1])]
                assert spool.enqueue(made, list(step[2])) == len(made)
                for one in made:
                    model.rows[one.event_id] = {name: ("due", 0) for name in step[2]}
            elif kind == "tick":
                await tick(spool)
            elif kind == "tick_nowait":
                spool._tick()
            elif kind == "flush":
                await within(spool.flush())
            elif kind in ("lease", "lease_all"):
                destination = step[1]
                if kind == "lease_all":
                    await within(spool.flush())
                limit = step[2] if kind == "lease" else 10_000
                leases = await within(spool.lease(destination, limit, reactor.seconds() + 1))
                assert len(leases) <= limit
                for lease in leases:
                    model.keys[lease.key] = lease.event.event_id
                    status, attempts = model.rows[lease.event.event_id][destination]
                    assert status == "due" and lease.attempts == attempts, (lease, status, attempts)
                    model.rows[lease.event.event_id][destination] = ("leased", attempts)
                    model.leased[destination].add(lease.key)
                if kind == "lease_all":
                    due = {
                        event_id
                        for event_id, states in model.rows.items()
                        if states.get(destination, ("",))[0] == "due"
                    }
                    assert due == set(), f"due deliveries not leased after a flush: {sorted(due)}"
            elif kind == "settle":
                _, destination, how, mask = step
                candidates = sorted(model.leased[destination])
                keys = [key for i, key in enumerate(candidates) if mask >> (i % 12) & 1]
                expected = 0
                for key in keys:
                    states = model.rows[model.keys[key]]
                    if states[destination][0] in OWED:
                        expected += 1
                        states[destination] = settled(how, states[destination])
                if how == "ack":
                    changed = await within(spool.ack(destination, keys))
                elif how == "retry":
                    changed = await within(spool.retry(destination, keys, 0, "HTTP 503"))
                elif how == "retry_later":
                    changed = await within(spool.retry(destination, keys, FAR, "HTTP 503"))
                elif how == "postpone":
                    changed = await within(spool.postpone(destination, keys, FAR, "out"))
                elif how == "release":
                    changed = await within(spool.release(destination, keys))
                elif how == "dead":
                    changed = await within(spool.dead(destination, keys, "invalid"))
                else:
                    changed = await within(spool.expire(destination, keys))
                assert changed == expected, (step, changed, expected)
            elif kind == "crash":
                spool = await crash_and_reopen(spool, where, reactor, model)
            assert spool.undelivered == model.owed(), step
            assert await within(spool.depth()) == model.depth(), step
    finally:
        if not spool._closed:
            await within(spool.close())
