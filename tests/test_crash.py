"""kill -9 loses nothing tagd accepted: real processes, platforms down, then back up.

tagd runs as users run it (C{twistd -n tagd --config FILE}) with a spool in the test's
folder, in front of an origin whose pages carry the tracking header, each with an event
id of its own.  The fake Meta, GA4 and TikTok (tests/fakes.py) are served from threads of
the test process, so that they outlive every tagd the test kills.

While they are down (Meta not listening, GA4 answering 503 slowly so that POSTs are in
flight at the kills, TikTok answering 503), browser visits go through tagd and tagd is
killed with SIGKILL several times, each time while a visitor's request is in flight, and
started again.  Then the platforms come back, one of them refusing one event for good:
every event tagd accepted reaches every platform at least once, and the spool ends with
that one event as its only dead letter.

"Accepted" is honest about the one window docs/delivery.md documents: tagd accepts an event
(into the spool's buffer and its intake journal) two reactor turns after the visitor's
response head is written, so a kill right after a visitor got the answer may come first.
An event counts as accepted here only when its visitor had the whole answer at least
L{GRACE} before the next kill.  Group commits run every 10 ms, so that kills also fall on
commits in progress; the last test kills tagd before any group commit has run.
"""

from __future__ import annotations

import glob
import http.client
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

from conftest import FAKE_GA4_SECRET, FAKE_META_TOKEN, FAKE_TIKTOK_TOKEN, process_config, threaded_platforms
from fakes import Injection
from helpers import (
    TRACKED_PAGE,
    TagdProcess,
    TrackedOrigin,
    browser_get,
    events_accepted,
    free_port,
    spool_rows,
    tagd_up,
    wait_until,
)

KILLS = 4
FLUSH_INTERVAL = 0.01
GRACE = 0.3  # well beyond two reactor turns of a loaded tagd
PHASE = 0.6  # seconds of traffic before each kill
SLOW = 0.4  # the origin's delay for the slow visitor, who is in flight at every kill
SENDERS = 4  # visitors sending at once; the first one asks for slow pages
ACCEPTED = 60  # events accepted, none committed, before the kill of the journal's test


@attrs.define
class Visit:
    event_id: str
    sent: float
    answered: float | None = None
    status: int | None = None
    complete: bool = False


class Visitors:
    """Threads that visit tracked pages while C{open} is set, each visit with a new event id."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open = threading.Event()
        self.done = threading.Event()
        self.visits: list[Visit] = []
        self.slow_since: float | None = None  # when the slow visitor's request in flight started
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._visit, args=(i == 0,), daemon=True) for i in range(SENDERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.done.set()
        self.open.set()  # wake the waiting ones, so that they see done
        for thread in self._threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in self._threads), "a visitor thread hangs"

    def _visit(self, slow: bool) -> None:
        while not self.done.is_set():
            if not self.open.wait(1.0) or self.done.is_set():
                continue
            with self._lock:
                visit = Visit(f"crash-{next(self._ids):04d}", time.monotonic())
                self.visits.append(visit)
            if slow:
                self.slow_since = visit.sent
            path = f"/e/{visit.event_id}" + (f"?delay={SLOW}" if slow else "")
            try:
                status, _, body = browser_get(self.port, path, timeout=5)
                visit.status, visit.complete = status, body == TRACKED_PAGE
            except (OSError, http.client.HTTPException):
                pass  # tagd was killed or is not up yet: not accepted
            visit.answered = time.monotonic()
            if slow:
                self.slow_since = None
            time.sleep(0.03)


def accepted(visits: list[Visit], kills: list[tuple[float, float]]) -> set[str]:
    """The events tagd surely accepted: answered in full, and no kill (from the signal to
    the process's end) from the request's start until L{GRACE} after the answer."""
    return {
        v.event_id
        for v in visits
        if v.status == 200
        and v.complete
        and not any(v.sent <= dead and signalled <= v.answered + GRACE for signalled, dead in kills)
    }


def spool_dead_command(config: Path, cwd: Path) -> list[str] | None:
    """The rows C{tagd spool dead} prints, or None where the command is not installed."""
    command = Path(sys.executable).with_name("tagd")
    if not command.exists():
        return None
    done = subprocess.run(
        [str(command), "spool", "dead", "--config", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["event_id", "event", "destination"], done.stdout
    return rows


def slow_in_flight(visitors: Visitors, since: float) -> bool:
    """Whether the slow visitor's request, sent after C{since}, has been in tagd for 0.1 s."""
    sent = visitors.slow_since
    return sent is not None and sent > since and time.monotonic() - sent > 0.1


def test_kill_9_mid_flight_loses_no_accepted_event(tmp_path):
    """tagd is killed with SIGKILL four times while visitors' requests are in flight and
    the platforms are down (refused connections, slow 503s, fast 503s), and started again
    each time; once the platforms are back, every event whose visitor got the answer
    (more than the flush window before a kill) is delivered at least once to Meta, GA4
    and TikTok, nothing tagd sent breaks the platforms' rules, and the only dead letter
    in the spool is the one event Meta refused as permanently invalid."""
    began = time.monotonic()
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    meta, ga4, tiktok = platforms
    port = free_port()
    spool = tmp_path / "spool.sqlite3"
    config = tmp_path / "tagd.toml"
    config.write_text(
        process_config(
            port,
            origin.url,
            spool,
            platforms,
            proxy={"shutdown_timeout": 5},
            spool={"flush_interval": FLUSH_INTERVAL},
            delivery={"backoff_base": 0.05, "backoff_cap": 0.5},
            timeout=2,
        )
    )
    tagd = TagdProcess(config, tmp_path)
    visitors = Visitors(port)
    kills: list[tuple[float, float]] = []
    in_flight_at_kill: list[int] = []
    try:
        # Down: Meta does not listen, GA4 answers 503 after 0.1 s, TikTok 503 at once.
        ga4.failing, ga4.delay = 503, 0.1
        tiktok.failing = 503
        ga4.up()
        tiktok.up()

        tagd.start()
        visitors.start()
        for _ in range(KILLS):
            started = time.monotonic()
            visitors.open.set()
            time.sleep(PHASE)
            # Kill while the slow visitor's request has been inside tagd for a while.
            wait_until(lambda: slow_in_flight(visitors, started), 5, "a slow visit in flight")
            signalled = time.monotonic()
            tagd.kill()
            dead = time.monotonic()
            visitors.open.clear()
            kills.append((signalled, dead))
            in_flight_at_kill.append(
                sum(
                    1
                    for v in list(visitors.visits)
                    if v.sent < signalled and (v.answered is None or v.answered > signalled)
                )
            )
            tagd.start()
        visitors.open.set()
        time.sleep(PHASE)
        visitors.stop()

        sure = accepted(visitors.visits, kills)
        assert all(count >= 1 for count in in_flight_at_kill), in_flight_at_kill
        assert len(sure) >= 40, f"only {len(sure)} of {len(visitors.visits)} visits surely accepted"
        assert meta.received == [], "Meta was down, yet got requests"
        assert ga4.delivered_ids() == set() and tiktok.delivered_ids() == set()

        # Back up, Meta refusing one accepted event for good (an invalid parameter).
        poison = sorted(sure)[len(sure) // 2]
        meta.refuse, meta.refusal = {poison}, Injection(status=400, code=100)
        meta.up()
        ga4.failing, ga4.delay = None, 0.0
        tiktok.failing = None

        def all_delivered():
            return (
                sure - {poison} <= meta.delivered_ids()
                and sure <= ga4.delivered_ids()
                and sure <= tiktok.delivered_ids()
            )

        wait_until(all_delivered, 20, "every accepted event delivered to every platform")
        # The spool drains completely: whatever else it held (events accepted just before
        # a kill) is delivered too, and the poison event is dead-lettered for Meta.
        wait_until(
            lambda: [row[:3] for row in spool_rows(spool)] == [(poison, "meta", "dead")],
            10,
            "the spool drained to its one dead letter",
        )
        dead_letters = spool_dead_command(config, tmp_path)
        tagd.process.terminate()
        tagd.process.wait(10)
        rows = spool_rows(spool)
    finally:
        visitors.done.set()
        visitors.open.set()
        tagd.close()
        for platform in platforms:
            platform.close()
        origin.close()

    assert poison not in meta.delivered_ids()
    assert len(rows) == 1
    event_id, destination, status, attempts, last_error = rows[0]
    assert (event_id, destination, status) == (poison, "meta", "dead") and attempts >= 1
    assert "Meta error 100" in last_error and "Injected failure" in last_error
    if dead_letters is not None:
        # What people see with the command beside the running daemon: that one letter.
        assert len(dead_letters) == 1, dead_letters
        assert poison in dead_letters[0] and " meta " in dead_letters[0], dead_letters
    for platform in platforms:
        assert platform.violations == [], (platform.platform, platform.violations[:5])
        # No phantom events: every event a platform got came from a visit.
        sent = {v.event_id for v in visitors.visits}
        assert {i for ids in platform.received for i in ids} <= sent
    logs = tagd.logs()
    assert "Traceback" not in logs and "Unhandled" not in logs, logs[-3000:]
    for secret in (FAKE_META_TOKEN, FAKE_GA4_SECRET, FAKE_TIKTOK_TOKEN):
        assert secret not in logs
    assert len(tagd.runs) == KILLS + 1
    assert time.monotonic() - began < 60


def test_kill_9_before_the_group_commit_loses_no_accepted_event(tmp_path):
    """Every event tagd counts as accepted survives a SIGKILL that comes before its group
    commit (C{flush_interval} is a minute, so none has run): started again, tagd writes
    them from the spool's intake journal and delivers each to Meta, GA4 and TikTok."""
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    port = free_port()
    spool = tmp_path / "spool.sqlite3"
    config = tmp_path / "tagd.toml"
    config.write_text(process_config(port, origin.url, spool, platforms, spool={"flush_interval": 60}))
    tagd = TagdProcess(config, tmp_path)
    try:
        tagd.start()
        _, admin = tagd_up(tagd.process, tagd.runs[-1][1])
        ids = [f"journal-{n}" for n in range(ACCEPTED)]
        for event_id in ids:
            status, _, body = browser_get(port, f"/e/{event_id}")
            assert (status, body) == (200, TRACKED_PAGE)
        wait_until(lambda: events_accepted(admin) == ACCEPTED, 5, "every event accepted")
        assert spool_rows(spool) == []  # nothing committed: all of it is in memory and the journal
        tagd.kill()

        for platform in platforms:
            platform.up()
        tagd.start()
        meta, ga4, tiktok = platforms
        wait_until(
            lambda: all(set(ids) <= platform.delivered_ids() for platform in platforms),
            20,
            "every accepted event delivered to every platform",
        )
        wait_until(lambda: spool_rows(spool) == [], 10, "the spool drained")
    finally:
        stop_all(tagd, platforms, origin)
    assert_clean_restart(tagd, platforms, ACCEPTED)


def test_kill_9_after_delivery_before_the_write_delivers_again(tmp_path):
    """Events delivered from memory, before the tick that would have skipped writing them
    (the flush interval is 3 s, so that tick comes 3 s after their delivery), are in no
    row of the file but still in the intake journal: a SIGKILL then loses nothing, and
    started again, tagd delivers each of them to Meta, GA4 and TikTok once more, with the
    same event_id (at least once, as docs/delivery.md says)."""
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    port = free_port()
    spool = tmp_path / "spool.sqlite3"
    config = tmp_path / "tagd.toml"
    config.write_text(process_config(port, origin.url, spool, platforms, spool={"flush_interval": 3}))
    tagd = TagdProcess(config, tmp_path)
    ids = [f"twice-{n}" for n in range(20)]
    try:
        for platform in platforms:
            platform.up()
        tagd.start()
        _, admin = tagd_up(tagd.process, tagd.runs[-1][1])
        for event_id in ids:
            status, _, body = browser_get(port, f"/e/{event_id}")
            assert (status, body) == (200, TRACKED_PAGE)
        wait_until(
            lambda: all(set(ids) <= platform.delivered_ids() for platform in platforms),
            10,
            "every event delivered once",
        )
        assert spool_rows(spool) == []  # delivered from memory: never written
        tagd.kill()
        assert glob.glob(f"{spool}.intake-*"), "the tick after the delivery came before the kill"

        tagd.start()
        wait_until(
            lambda: all(
                all(sum(event_id in sent for sent in platform.received) >= 2 for event_id in ids)
                for platform in platforms
            ),
            20,
            "every event delivered again after the restart",
        )
        wait_until(lambda: spool_rows(spool) == [], 10, "the spool drained")
    finally:
        stop_all(tagd, platforms, origin)
    assert_clean_restart(tagd, platforms, len(ids))


def stop_all(tagd, platforms, origin) -> None:
    """Stop tagd, the fake platforms and the origin, whatever the test did."""
    tagd.close()
    for platform in platforms:
        platform.close()
    origin.close()


def assert_clean_restart(tagd, platforms, accepted: int) -> None:
    """tagd said, after its restart, how many events it found accepted; it logged no
    traceback; every platform found every request it got well-formed."""
    logs = tagd.logs()
    assert f"{accepted} event(s) accepted before tagd last stopped" in logs
    assert "Traceback" not in logs
    for platform in platforms:
        assert platform.violations == [], (platform.platform, platform.violations[:5])
