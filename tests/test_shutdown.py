"""SIGTERM: tagd stops in order, within its deadline, and keeps every event it accepted.

tagd runs as users run it (C{twistd -n tagd --config FILE}), in front of an origin served
from a thread whose pages carry the tracking header and can be made to answer late; the
fake Meta, GA4 and TikTok (tests/fakes.py) are served from threads too, and can be made
slow or left down.

twistd re-raises SIGTERM after a clean shutdown, so the process ends with -SIGTERM even
then: a clean exit is told by the log's C{Server Shut Down.} and the absence of any
traceback, not by the exit code.
"""

from __future__ import annotations

import http.client
import re
import socket
import sqlite3
import threading
import time

import attrs
import pytest

from conftest import process_config, threaded_platforms
from helpers import (
    TRACKED_PAGE,
    TagdProcess,
    ThreadedPlatform,
    TrackedOrigin,
    browser_get,
    free_port,
    spool_rows,
    wait_until,
)

MARGIN = 2.0  # seconds twistd may take beyond the shutdown deadline to exit
# What a warning that the deadline passed, or that visitors were cut, says.
DEADLINE_WORDS = re.compile(r"deadline|took longer|still running|cut")


@attrs.define
class Setup:
    """An origin, the three platforms, and the configuration of a tagd in front of them."""

    origin: TrackedOrigin
    meta: ThreadedPlatform
    ga4: ThreadedPlatform
    tiktok: ThreadedPlatform
    port: int
    spool: object  # Path
    tagd: TagdProcess
    configure: object = None  # configure(shutdown_timeout=..., flush_interval=...) writes tagd.toml

    @property
    def platforms(self) -> tuple[ThreadedPlatform, ...]:
        return (self.meta, self.ga4, self.tiktok)


@pytest.fixture
def setup(tmp_path):
    """Build the servers; C{setup.configure(...)} writes tagd's configuration. Everything
    started is stopped when the test ends."""
    origin = TrackedOrigin()
    meta, ga4, tiktok = threaded_platforms()
    config = tmp_path / "tagd.toml"
    made = Setup(
        origin, meta, ga4, tiktok, free_port(), tmp_path / "spool.sqlite3", TagdProcess(config, tmp_path)
    )

    def configure(*, shutdown_timeout: float, flush_interval: float, platform_timeout: float = 5) -> None:
        config.write_text(
            process_config(
                made.port,
                origin.url,
                made.spool,
                made.platforms,
                proxy={"shutdown_timeout": shutdown_timeout},
                spool={"flush_interval": flush_interval},
                delivery={"backoff_base": 0.05, "backoff_cap": 0.5},
                timeout=platform_timeout,
            )
        )

    made.configure = configure
    try:
        yield made
    finally:
        made.tagd.close()
        for platform in made.platforms:
            platform.close()
        origin.close()


class SlowVisit(threading.Thread):
    """A visitor asking for a page the origin answers after C{delay} seconds."""

    def __init__(self, port: int, event_id: str, delay: float, timeout: float) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.timeout = port, f"/e/{event_id}?delay={delay}", timeout
        self.status: int | None = None
        self.body: bytes | None = None
        self.error: Exception | None = None
        self.answered: float | None = None

    def run(self) -> None:
        try:
            self.status, _, self.body = browser_get(self.port, self.path, timeout=self.timeout)
        except (OSError, http.client.HTTPException) as e:
            self.error = e
        self.answered = time.monotonic()


def waiting_visitor(setup: Setup, event_id: str, delay: float, timeout: float) -> SlowVisit:
    """Start a L{SlowVisit} to tagd and wait until the origin holds its request back."""
    visitor = SlowVisit(setup.port, event_id, delay, timeout)
    visitor.start()
    wait_until(lambda: setup.origin.waiting == 1, 5, "the visitor waiting on the origin")
    return visitor


def visit_all(port: int, event_ids: list[str]) -> None:
    """Visit each tracked page; each answer is the origin's page."""
    for event_id in event_ids:
        status, _, body = browser_get(port, f"/e/{event_id}")
        assert (status, body) == (200, TRACKED_PAGE)


def refused(port: int) -> bool:
    """Whether a new connection to C{port} is refused right now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_exit(tagd: TagdProcess, timeout: float) -> float:
    """Wait for the running tagd to exit; return when it did (monotonic seconds)."""
    wait_until(lambda: tagd.process.poll() is not None, timeout, "exited", interval=0.01)
    return time.monotonic()


def assert_clean_shutdown(log: str) -> None:
    assert "Received SIGTERM" in log
    assert "Server Shut Down." in log, log[-3000:]
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]


def by_event(rows) -> dict[str, dict[str, tuple[str, int]]]:
    """Spool rows as {event_id: {destination: (status, attempts)}}."""
    table: dict[str, dict[str, tuple[str, int]]] = {}
    for event_id, destination, status, attempts, _ in rows:
        table.setdefault(event_id, {})[destination] = (status, attempts)
    return table


def test_sigterm_lets_the_visitor_finish_refuses_new_ones_and_keeps_every_event(setup):
    """With Meta and TikTok hanging on POSTs already in flight, events buffered and a
    visitor waiting 1.5 s on the origin, SIGTERM makes tagd refuse new connections at
    once while the visitor still gets the whole page; tagd exits cleanly well within
    C{shutdown_timeout}; the spool then holds every accepted event: the in-flight POSTs'
    rows back to pending with no attempt counted, the events accepted just before and
    during the shutdown pending for every destination.  Started again with the platforms
    answering, tagd delivers all of them."""
    setup.configure(shutdown_timeout=6, flush_interval=0.5, platform_timeout=30)
    meta, ga4, tiktok, tagd, port = setup.meta, setup.ga4, setup.tiktok, setup.tagd, setup.port
    meta.delay = tiktok.delay = 30.0  # hang until the test ends
    for platform in setup.platforms:
        platform.up()
    tagd.start()

    posted = ["posted-0", "posted-1", "posted-2"]
    visit_all(port, posted)
    wait_until(
        lambda: all(set(posted) <= {i for ids in p.received for i in ids} for p in (meta, tiktok))
        and set(posted) <= ga4.delivered_ids(),
        5,
        "the first events posted",
    )
    buffered = ["buffered-0", "buffered-1", "buffered-2"]
    visit_all(port, buffered)
    visitor = waiting_visitor(setup, "last-visitor", delay=1.5, timeout=10)

    signalled = time.monotonic()
    tagd.process.terminate()
    wait_until(lambda: refused(port), 1.0, "refusing new connections", interval=0.01)
    assert tagd.process.poll() is None and visitor.answered is None, "refused only because it was gone"
    exited = wait_exit(tagd, 6 + MARGIN)
    visitor.join(5)

    assert visitor.error is None and (visitor.status, visitor.body) == (200, TRACKED_PAGE)
    assert visitor.answered < exited
    assert exited - signalled < 6, "waited for the hanging platforms instead of cancelling"
    log = tagd.logs()
    assert_clean_shutdown(log)
    assert not [line for line in log.splitlines() if "#warn]" in line and DEADLINE_WORDS.search(line)]

    spooled = by_event(spool_rows(setup.spool))
    pending = ("pending", 0)
    for event_id in [*posted, *buffered]:
        # The POSTs hanging at Meta and TikTok were cancelled, not failed; GA4 took the
        # events (the buffered ones, committed while the visitor was served, unless its
        # POST was still on its way when the dispatcher stopped).
        rows = spooled.get(event_id, {})
        at_ga4 = rows.pop("ga4", None)
        assert at_ga4 == pending or (at_ga4 is None and event_id in ga4.delivered_ids()), event_id
        assert rows == {"meta": pending, "tiktok": pending}, event_id
    assert set(posted) <= ga4.delivered_ids()
    # The last visitor's event came with the end of its answer, during the shutdown: only
    # the shutdown's flush can have written it.
    assert spooled.get("last-visitor") == {"ga4": pending, "meta": pending, "tiktok": pending}
    assert set(spooled) == {*posted, *buffered, "last-visitor"}

    # Back with every platform answering at once: nothing was lost.
    meta.delay = tiktok.delay = 0.0
    tagd.start()
    everything = {*posted, *buffered, "last-visitor"}
    wait_until(
        lambda: all(everything <= p.delivered_ids() for p in setup.platforms),
        10,
        "every event delivered after the restart",
    )
    wait_until(lambda: spool_rows(setup.spool) == [], 5, "the spool empty")
    tagd.process.terminate()
    wait_exit(tagd, 6 + MARGIN)
    assert_clean_shutdown(tagd.logs())
    for platform in setup.platforms:
        assert platform.violations == []


def test_sigterm_exits_within_the_deadline_when_a_visitor_takes_longer(setup):
    """A visitor whose origin answer would take 30 s does not hold tagd: after SIGTERM it
    exits within C{shutdown_timeout} (2 s) and a small margin, with C{Server Shut Down.};
    that visitor gets a 502 as its origin connection closes, or is cut off.  The events it accepted before, still waiting for their
    group commit (the flush interval is 30 s), are flushed to the spool all the same, and
    delivered once tagd is started again with the platforms up."""
    setup.configure(shutdown_timeout=2, flush_interval=30)
    tagd, port = setup.tagd, setup.port
    tagd.start()
    accepted = ["before-0", "before-1", "before-2"]
    visit_all(port, accepted)
    visitor = waiting_visitor(setup, "never-answered", delay=30, timeout=10)

    signalled = time.monotonic()
    tagd.process.terminate()
    exited = wait_exit(tagd, 2 + MARGIN + 1)
    visitor.join(5)

    assert exited - signalled < 2 + MARGIN
    assert exited - signalled >= 0.5, "did not wait for the visitor at all"
    assert not visitor.is_alive()
    assert visitor.status == 502 or (visitor.status is None and visitor.error is not None)
    log = tagd.logs()
    assert "Received SIGTERM" in log and "Server Shut Down." in log, log[-3000:]
    spooled = by_event(spool_rows(setup.spool))
    assert spooled == {e: {d: ("pending", 0) for d in ("ga4", "meta", "tiktok")} for e in accepted}

    for platform in setup.platforms:
        platform.up()
    tagd.start()
    wait_until(
        lambda: all(set(accepted) <= p.delivered_ids() for p in setup.platforms),
        10,
        "the events accepted before the shutdown delivered after the restart",
    )


def test_a_passed_deadline_is_a_warning_not_a_traceback(setup):
    """When a visitor outlasts C{shutdown_timeout}, tagd says so in a warning (that the
    deadline passed, or that visitors were cut) and logs no traceback or critical line:
    a deadline reached is an expected event, not a crash."""
    setup.configure(shutdown_timeout=2, flush_interval=0.05)
    tagd = setup.tagd
    tagd.start()
    visitor = waiting_visitor(setup, "never-answered", delay=30, timeout=10)
    tagd.process.terminate()
    wait_exit(tagd, 2 + MARGIN + 1)
    visitor.join(5)

    log = tagd.logs()
    assert "Server Shut Down." in log
    warnings = [line for line in log.splitlines() if "#warn]" in line]
    assert any(DEADLINE_WORDS.search(line) for line in warnings), log[-3000:]
    assert "Traceback" not in log and "#critical]" not in log, log[-3000:]


def test_the_deadline_bounds_the_whole_shutdown_even_after_a_visitor_used_it_up(setup):
    """When a visitor uses up C{shutdown_timeout} and then flushing the spool is slow
    (here another process holds the spool's write lock, as a long C{sqlite3} session or a
    stalled disk would), tagd still exits within the deadline and a small margin, instead
    of waiting for the lock after the deadline has passed."""
    setup.configure(shutdown_timeout=1.5, flush_interval=30)
    tagd, port = setup.tagd, setup.port
    tagd.start()
    visit_all(port, ["buffered-0"])
    visitor = waiting_visitor(setup, "never-answered", delay=30, timeout=15)
    locker = sqlite3.connect(setup.spool, timeout=1, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        signalled = time.monotonic()
        tagd.process.terminate()
        exited = wait_exit(tagd, 1.5 + MARGIN)
    finally:
        locker.close()
    visitor.join(5)

    assert "Server Shut Down." in tagd.logs()
    assert exited - signalled < 1.5 + MARGIN, f"exited {exited - signalled:.1f} s after SIGTERM"
