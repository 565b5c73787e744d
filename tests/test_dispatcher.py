"""The dispatcher drains the spool to the platforms: every row ends acknowledged, retried
later, expired or dead-lettered, and nothing leased is left in flight.

Most tests run the real reactor against the fake platforms on loopback, with short poll
and backoff intervals.  The tests of time itself (backoff ceilings, Retry-After pauses)
use a L{Clock} as the reactor and treq's C{RequestTraversalAgent} in place of the network (the
dispatcher takes any L{IAgent}), because a clock
that only moves when told cannot drive real sockets.  What the dispatcher shares with
the direct fallback (the age windows, the platforms' client) is tested here too.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import deque
from email.utils import formatdate

import attrs
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from conftest import eventually, sleep, within
from fakes import DAY, FakeGA4, FakeMeta, FakeTikTok, Injection, make_event, serve
from helpers import free_port
from tagd.delivery.client import PlatformAgent
from tagd.delivery.direct import DirectDelivery, Route, exchange
from tagd.delivery.destinations import OutgoingRequest, ga4, log, meta, tiktok, webhook
from tagd.delivery.destinations.meta import NEWEST_API_VERSION
from tagd.delivery.dispatcher import LEASE, Dispatcher, retry_after
from tagd.tagging.events import Event
from tagd.admin.metrics import Metrics
from tagd.delivery.outcomes import Outcomes
from tagd.delivery.spool import Backlog

META_TOKEN = "meta-token"


# -- an in-memory spool -----------------------------------------------------------------


@attrs.frozen
class Leased:
    """What L{MemorySpool.lease} hands out: a snapshot, as a database row would be."""

    key: int
    event: Event
    attempts: int


@attrs.define
class Row:
    """One delivery of one event to one destination, and where it stands."""

    destination: str
    key: int
    event: Event
    attempts: int = 0
    state: str = "pending"  # pending, inflight, done, dead, expired
    next_at: float = 0.0
    error: str = ""


class MemorySpool:
    """The spool's interface, in memory, answering at once.

    Only an in-flight row may be settled: a dispatcher that settles a row twice, or one
    it never leased, fails the test with an C{AssertionError}.  C{retries} records every
    retry as (event id, time of the call, next_at, error) for the backoff assertions,
    C{postponed} every row the destination's failure sent back (event id, time, error);
    C{leased} the size of every lease that found rows, C{releases} of every release.
    """

    def __init__(self, clock=_global_reactor.seconds) -> None:
        self._clock = clock
        self._keys = itertools.count(1)
        self.rows: dict[int, Row] = {}
        self.retries: list[tuple[str, float, float, str]] = []
        self.leased: list[int] = []
        self.releases: list[int] = []
        self.postponed: list[tuple[str, float, str]] = []

    def add(self, destination: str, events) -> None:
        for event in events:
            key = next(self._keys)
            self.rows[key] = Row(destination, key, event)

    def states(self, destination: str) -> dict[str, str]:
        """Each event id's state for C{destination}."""
        return {r.event.event_id: r.state for r in self.rows.values() if r.destination == destination}

    def row(self, destination: str, event_id: str) -> Row:
        (row,) = [
            r for r in self.rows.values() if (r.destination, r.event.event_id) == (destination, event_id)
        ]
        return row

    def lease(self, destination: str, limit: int, now: float) -> Deferred:
        due = [
            r for r in self.rows.values()
            if r.destination == destination and r.state == "pending" and r.next_at <= now
        ][:limit]  # fmt: skip
        for row in due:
            row.state = "inflight"
        if due:
            self.leased.append(len(due))
        return succeed([Leased(r.key, r.event, r.attempts) for r in due])

    def _settle(self, destination: str, keys, state: str, error: str = "") -> list[Row]:
        rows = [self.rows[key] for key in keys]
        for row in rows:
            assert (row.destination, row.state) == (destination, "inflight"), f"{row} is not in flight"
            row.state, row.error = state, error or row.error
        return rows

    def ack(self, destination: str, keys) -> Deferred:
        self._settle(destination, keys, "done")
        return succeed(None)

    def retry(self, destination: str, keys, next_at: float, error: str) -> Deferred:
        for row in self._settle(destination, keys, "pending", error):
            row.attempts += 1
            row.next_at = next_at
            self.retries.append((row.event.event_id, self._clock(), next_at, error))
        return succeed(None)

    def postpone(self, destination: str, keys, next_at: float, error: str) -> Deferred:
        for row in self._settle(destination, keys, "pending", error):
            row.next_at = next_at
            self.postponed.append((row.event.event_id, self._clock(), error))
        return succeed(None)

    def backlog(self) -> Deferred:
        backlog: dict[str, Backlog] = {}
        for row in self.rows.values():
            if row.state in ("pending", "inflight"):
                seen = backlog.get(row.destination)
                backlog[row.destination] = Backlog((seen.owed if seen else 0) + 1, seen.oldest if seen else row.key)
        return succeed(backlog)

    def release(self, destination: str, keys) -> Deferred:
        self.releases.append(len(keys))
        self._settle(destination, keys, "pending")
        return succeed(None)

    def dead(self, destination: str, keys, error: str) -> Deferred:
        self._settle(destination, keys, "dead", error)
        return succeed(None)

    def expire(self, destination: str, keys) -> Deferred:
        self._settle(destination, keys, "expired")
        return succeed(None)


# -- fakes, routes, events ------------------------------------------------------------------


class Observed:
    """For a fake platform: when each request came, the most it held open at once, and
    a C{Retry-After} on its 429 answers when C{retry_after} is set."""

    def __init__(self, retry_after: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.retry_after = retry_after
        self.times: list[float] = []
        self.open = 0
        self.peak = 0

    def render(self, request):
        self.times.append(self.now())
        self.open += 1
        self.peak = max(self.peak, self.open)
        request.notifyFinish().addBoth(self._closed)
        return super().render(request)

    def _closed(self, _) -> None:
        self.open -= 1

    def _write(self, request, answer):
        if answer.status == 429 and self.retry_after is not None:
            request.setHeader(b"retry-after", self.retry_after.encode("ascii"))
        return super()._write(request, answer)


class ObservedMeta(Observed, FakeMeta):
    """Fake Meta for pixel 1234 and token meta-token, observed."""


class ObservedGA4(Observed, FakeGA4):
    """Fake GA4 for stream G-TEST and secret ga-secret, observed."""


class Aborting(Protocol):
    """A server that resets every connection as soon as a request arrives."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.abortConnection()


def meta_route(served, timeout: float = 2.0, **settings) -> Route:
    settings = {"pixel_id": "1234", "access_token": META_TOKEN, "endpoint": served.base, **settings}
    return Route(meta.build("meta", settings), timeout)


def ga4_route(served) -> Route:
    settings = {"measurement_id": "G-TEST", "api_secret": "ga-secret", "endpoint": served.base}
    return Route(ga4.build("ga4", settings), 2.0)


def tiktok_route(served, **settings) -> Route:
    settings = {"pixel_code": "CTEST123", "access_token": "tt-token", "endpoint": served.base, **settings}
    return Route(tiktok.build("tiktok", settings), 2.0)


def hook_route(url: str, timeout: float = 2.0, **settings) -> Route:
    return Route(webhook.build("hook", {"url": url, **settings}), timeout)


def events(prefix: str, count: int, **fields) -> list[Event]:
    return [make_event(event_id=f"{prefix}-{i}", **fields) for i in range(count)]


def settled(spool: MemorySpool, *destinations: str) -> bool:
    """Whether every row of C{destinations} has reached its end (none pending or in flight)."""
    states = {state for name in destinations for state in spool.states(name).values()}
    return not states & {"pending", "inflight"}


def delivered(metrics: Metrics, destination: str, outcome: str) -> float:
    return metrics.value("events_delivered", destination=destination, outcome=outcome)


def refused(metrics: Metrics, destination: str) -> float | None:
    """C{tagd_destination_credentials_refused} of C{destination}; None when not set."""
    name = "tagd_destination_credentials_refused"
    return metrics.registry.get_sample_value(name, {"destination": destination})


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def spool() -> MemorySpool:
    return MemorySpool()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest_twisted.async_yield_fixture
async def serving():
    """Serve fakes on loopback: C{served = serving(FakeMeta())}; stopped after the test."""
    started = []

    def start(fake):
        served = serve(fake)
        started.append(served)
        return served

    yield start
    for served in started:
        await within(Deferred.fromCoroutine(served.stop()))


@pytest_twisted.async_yield_fixture
async def dispatch(reactor, platforms, spool, metrics):
    """Start a dispatcher on the real reactor: C{dispatch(route, ..., concurrency=1)}."""
    started = []

    def start(*routes, **options) -> Dispatcher:
        options = {"poll_interval": 0.05, "backoff_base": 0.05, **options}
        dispatcher = Dispatcher(
            reactor=reactor, spool=spool, routes=routes, http=platforms, metrics=metrics, **options
        )
        dispatcher.startService()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        if dispatcher.running:
            await within(dispatcher.stopService())


@pytest.fixture
def dispatcher_log():
    """The dispatcher's log lines while the test runs, formatted."""
    lines = []

    def observe(event):
        if event.get("log_namespace") == "tagd.delivery.dispatcher":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


# -- over loopback ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_success_acknowledges_rows(serving, dispatch, spool, metrics, dispatcher_log):
    """Due rows go out as one batch, are acknowledged on success, and the attempt is
    logged with the URL that carries no token."""
    served = serving(ObservedMeta())
    spool.add("meta", events("ok", 3))
    dispatch(meta_route(served))

    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    assert len(served.fake.requests) == 1
    assert sorted(e["event_id"] for e in served.fake.events) == ["ok-0", "ok-1", "ok-2"]
    assert delivered(metrics, "meta", "success") == 3
    assert any(f"/{NEWEST_API_VERSION}/1234/events: success (HTTP 200)" in line for line in dispatcher_log)
    assert not [line for line in dispatcher_log if META_TOKEN in line]


@pytest_twisted.ensureDeferred
async def test_an_outage_backs_the_destination_off_not_its_rows(serving, dispatch, spool, metrics):
    """Two 503s while nothing else is delivered are the destination's: its rows go back
    with no attempt counted, the next request is a probe of one event, within the
    destination's backoff (up to base, then twice that), and the first success sends
    the rest at once."""
    served = serving(ObservedMeta())
    served.fake.inject(2, status=503)
    spool.add("meta", events("down", 3))
    dispatch(meta_route(served), backoff_base=0.2, outage_backoff_cap=5.0)

    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    sizes = [len(request.body["data"]) for request in served.fake.requests]
    assert sizes == [3, 1, 1, 2]
    first, second, third, fourth = served.fake.times
    assert second - first <= 0.2 + 0.1 and third - second <= 0.4 + 0.1
    assert fourth - third < 0.1  # the outage ended: no pause, no poll
    assert [r.attempts for r in spool.rows.values()] == [0, 0, 0]
    assert spool.retries == []
    assert len(spool.postponed) == 4
    assert all(error.startswith("HTTP 503, Meta error 1: Injected failure") for _, _, error in spool.postponed)
    assert delivered(metrics, "meta", "transient") == 4
    assert metrics.value("delivery_retries", destination="meta") == 0
    assert delivered(metrics, "meta", "success") == 3
    assert metrics.registry.get_sample_value("tagd_destination_up", {"destination": "meta"}) == 1


class SmallOnlyMeta(ObservedMeta):
    """Meta recovering from an outage: it takes requests of one event, and fails (503)
    every larger one, as a platform whose large requests time out would."""

    def answer(self, recorded):
        if len(recorded.body["data"]) > 1:
            return self.injected_answer(Injection(status=503))
        return super().answer(recorded)


@pytest_twisted.ensureDeferred
async def test_batches_failing_after_a_probe_succeeds_are_halved_not_counted(serving, dispatch, spool, metrics):
    """The probe of one event succeeds, and every larger request fails: those failures are
    the batches', not their events'.  Halved down to single events, every event is
    delivered, none gains an attempt, and none becomes a dead letter."""
    served = serving(SmallOnlyMeta())
    spool.add("meta", events("big", 8))
    dispatch(meta_route(served), backoff_base=0.05, outage_backoff_cap=0.2, max_attempts=2)

    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    assert [r.attempts for r in spool.rows.values()] == [0] * 8
    assert spool.retries == []
    assert delivered(metrics, "meta", "dead") == 0
    assert delivered(metrics, "meta", "success") == 8


class ChangingAdviceMeta(ObservedMeta):
    """Meta (or something answering as it) with a different version warning each time."""

    def render(self, request):
        request.setHeader(b"x-ad-api-version-warning", b"version warning %d" % len(self.requests))
        return super().render(request)


@pytest_twisted.ensureDeferred
async def test_the_platforms_advice_is_said_once_however_it_varies(serving, dispatch, spool, dispatcher_log):
    """A version warning whose text changes with every answer is still one line: the
    advice is said once a destination, never a line (and a kept text) an answer."""
    served = serving(ChangingAdviceMeta())
    dispatch(meta_route(served, max_batch=1))
    spool.add("meta", events("warned", 5))
    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    assert len(served.fake.requests) == 5
    assert len([line for line in dispatcher_log if "is retired or retiring" in line]) == 1


class FailingVisitor(FakeGA4):
    """GA4 answering 503 to every request of one visitor, and as usual to the others."""

    def __init__(self, client_id: str) -> None:
        super().__init__()
        self.client_id = client_id

    def answer(self, recorded):
        if isinstance(recorded.body, dict) and recorded.body.get("client_id") == self.client_id:
            return self.injected_answer(Injection(status=503))
        return super().answer(recorded)


@pytest_twisted.ensureDeferred
async def test_a_row_failing_while_others_are_delivered_backs_off_and_ends_dead(reactor, dispatch, spool, metrics):
    """GA4 fails visitor A's request every time (503) while other visitors' go through:
    that row's own failures count, each retry within base * 2**attempts, and after
    max_attempts it is a dead letter with the platform's last message."""
    served = serve(FailingVisitor(VISITOR_A))
    spool.add("ga4", [make_event(event_id="a", ga_client_id=VISITOR_A)])
    dispatcher = dispatch(ga4_route(served), concurrency=4, backoff_base=0.05, max_attempts=3)
    others = itertools.count()

    def visit() -> None:
        spool.add("ga4", [make_event(event_id=f"b-{next(others)}", ga_client_id=VISITOR_B)])
        dispatcher.wake("ga4")

    traffic = LoopingCall(visit)
    traffic.start(0.01)
    try:
        await eventually(lambda: spool.row("ga4", "a").state == "dead")
    finally:
        traffic.stop()
        await served.stop()
    row = spool.row("ga4", "a")
    assert row.error.startswith("3 attempts failed; the last: HTTP 503")
    retried = [(at, next_at) for event_id, at, next_at, _ in spool.retries if event_id == "a"]
    assert len(retried) == 2
    for (at, next_at), attempts in zip(retried, [0, 1]):
        assert 0 <= next_at - at <= 0.05 * 2**attempts
    assert metrics.value("delivery_retries", destination="ga4") == 2
    assert delivered(metrics, "ga4", "dead") == 1
    assert served.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_throttle_pauses_only_its_destination(serving, dispatch, spool, metrics):
    """A 429 with Retry-After: 1 stops all requests to Meta for a second, rows back to
    pending untouched, while TikTok's events are delivered meanwhile."""
    throttled = serving(ObservedMeta(retry_after="1"))
    throttled.fake.inject(1, status=429, code=17)
    healthy = serving(FakeTikTok())
    spool.add("meta", events("m", 2))
    dispatcher = dispatch(meta_route(throttled), tiktok_route(healthy))

    await eventually(lambda: delivered(metrics, "meta", "throttle") == 2)
    assert set(spool.states("meta").values()) == {"pending"}
    assert [r.attempts for r in spool.rows.values()] == [0, 0]
    spool.add("tiktok", events("t", 2))
    dispatcher.wake("tiktok")
    dispatcher.wake("meta")
    await eventually(lambda: set(spool.states("tiktok").values()) == {"done"})
    assert len(throttled.fake.requests) == 1

    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    first, second = throttled.fake.times
    assert second - first >= 0.99
    assert spool.retries == []
    assert metrics.value("delivery_retries", destination="meta") == 0


@pytest_twisted.ensureDeferred
async def test_timeout_is_transient(serving, dispatch, spool, metrics):
    """An answer slower than the route's timeout is given up and retried later."""
    served = serving(ObservedMeta())
    served.fake.inject(1, delay=3.0)
    spool.add("meta", events("slow", 1))
    dispatch(meta_route(served, timeout=0.2))

    await eventually(lambda: spool.states("meta") == {"slow-0": "done"})
    ((_, _, error),) = spool.postponed
    assert error == "no answer: TimeoutError"
    assert len(served.fake.requests) == 2
    assert delivered(metrics, "meta", "transient") == 1


@pytest.mark.parametrize(
    ("failure", "error"),
    [("reset", "no answer: ResponseNeverReceived"), ("refused", "no answer: ConnectionRefusedError")],
)
@pytest_twisted.ensureDeferred
async def test_connection_failure_is_transient(reactor, dispatch, spool, metrics, failure, error):
    """A connection reset mid-request, or refused outright, is an outage: the row waits
    with no attempt counted, and the destination is down, never the row dead."""
    if failure == "reset":
        port = reactor.listenTCP(0, Factory.forProtocol(Aborting), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}/events"
    else:
        port, url = None, f"http://127.0.0.1:{free_port()}/events"
    spool.add("hook", events("lost", 1))
    try:
        dispatch(hook_route(url), backoff_base=60.0)
        await eventually(lambda: spool.postponed)
    finally:
        if port is not None:
            await within(port.stopListening())
    ((_, _, reason),) = spool.postponed
    assert reason == error
    row = spool.row("hook", "lost-0")
    assert (row.state, row.attempts) == ("pending", 0)
    assert delivered(metrics, "hook", "transient") == 1
    assert metrics.value("delivery_retries", destination="hook") == 0
    assert delivered(metrics, "hook", "dead") == 0
    assert metrics.registry.get_sample_value("tagd_destination_up", {"destination": "hook"}) == 0


@pytest_twisted.ensureDeferred
async def test_poison_event_is_split_out_of_its_batch(serving, dispatch, spool, metrics):
    """Meta refuses a batch of 8 for one bad event: halving finds it in 7 requests, the
    7 others are delivered and the bad one is dead-lettered with Meta's message."""
    served = serving(ObservedMeta())
    batch = events("good", 8)
    batch[5] = make_event(event_id="poison", source_url="shop.example/no-scheme")
    spool.add("meta", batch)
    dispatch(meta_route(served))

    await eventually(lambda: settled(spool, "meta"))
    states = spool.states("meta")
    assert states.pop("poison") == "dead"
    assert set(states.values()) == {"done"} and len(states) == 7
    error = spool.row("meta", "poison").error
    assert error.startswith("HTTP 400, Meta error 100: Invalid parameter")
    assert "event_source_url" in error and META_TOKEN not in error
    assert len(served.fake.requests) == 7
    assert delivered(metrics, "meta", "permanent") == 8 + 4 + 2 + 1
    assert delivered(metrics, "meta", "success") == 7
    assert delivered(metrics, "meta", "dead") == 1


REFUSALS = {
    "meta": (ObservedMeta, meta_route, "HTTP 400, Meta error 190: Invalid OAuth access token."),
    "tiktok": (FakeTikTok, tiktok_route, "TikTok code 40105: Access token is incorrect or has been revoked."),
}


@pytest.mark.parametrize("platform", sorted(REFUSALS))
@pytest_twisted.ensureDeferred
async def test_refused_token_pauses_the_destination_and_loses_nothing(
    serving, dispatch, spool, metrics, dispatcher_log, platform
):
    """A wrong token, refused as the platform documents it: of a lease of 50 events in
    requests of 10, two at a time, the first two requests go out and nothing more (no
    halving), no event is dead-lettered or charged an attempt, every row is pending
    again, one error line names the destination and gives the platform's message but not
    the token, and the refusal is counted and shown.  With the right token, after a
    restart, all 50 are delivered."""
    fake, route, message = REFUSALS[platform]
    served = serving(fake())
    spool.add(platform, events("tok", 50))
    first = dispatch(route(served, access_token="wrong-token-123", max_batch=10), concurrency=2)

    await eventually(lambda: delivered(metrics, platform, "auth") == 20)
    await eventually(lambda: set(spool.states(platform).values()) == {"pending"})
    assert len(served.fake.requests) == 2
    assert [row.attempts for row in spool.rows.values()] == [0] * 50
    assert spool.retries == []
    assert delivered(metrics, platform, "permanent") == delivered(metrics, platform, "dead") == 0
    assert refused(metrics, platform) == 1
    errors = [line for line in dispatcher_log if "refuses this destination's credentials" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{platform}: ") and message in errors[0]
    assert not [line for line in dispatcher_log if "wrong-token-123" in line]
    await within(first.stopService())
    assert len(served.fake.requests) == 2

    dispatch(route(served, max_batch=10))
    await eventually(lambda: set(spool.states(platform).values()) == {"done"})
    assert len(served.fake.requests) == 2 + 5
    assert sorted(e["event_id"] for r in served.fake.requests[2:] for e in r.body["data"]) == sorted(
        f"tok-{i}" for i in range(50)
    )
    assert [{v.code for v in r.violations} for r in served.fake.requests] == [{"BAD_TOKEN"}] * 2 + [set()] * 5
    assert delivered(metrics, platform, "success") == 50
    assert refused(metrics, platform) == 0


@pytest_twisted.ensureDeferred
async def test_events_past_the_age_window_expire_unsent(serving, dispatch, spool, metrics):
    """Meta's 7 days and GA4's 72 hours (less a minute's margin) expire events before
    batching, so they are never sent; the log destination has no window."""
    meta_served, ga4_served = serving(ObservedMeta()), serving(FakeGA4())
    now = int(time.time())
    spool.add("meta", [
        make_event(event_id="m-fresh", event_time=now - 6 * DAY),
        make_event(event_id="m-old", event_time=now - 8 * DAY),
        make_event(event_id="m-edge", event_time=now - 7 * DAY + 30),
    ])  # fmt: skip
    spool.add("ga4", [
        make_event(event_id="g-fresh", event_time=now - 71 * 3600),
        make_event(event_id="g-old", event_time=now - 73 * 3600),
    ])  # fmt: skip
    spool.add("dry", [make_event(event_id="d-ancient", event_time=now - 30 * DAY)])
    dispatch(meta_route(meta_served), ga4_route(ga4_served), Route(log.build("dry", {}), 1.0))

    await eventually(lambda: settled(spool, "meta", "ga4", "dry"))
    assert spool.states("meta") == {"m-fresh": "done", "m-old": "expired", "m-edge": "expired"}
    assert spool.states("ga4") == {"g-fresh": "done", "g-old": "expired"}
    assert spool.states("dry") == {"d-ancient": "done"}
    assert [e["event_id"] for e in meta_served.fake.events] == ["m-fresh"]
    assert len(ga4_served.fake.events) == 1 and ga4_served.fake.violations == []
    assert delivered(metrics, "meta", "expired") == 2
    assert delivered(metrics, "ga4", "expired") == 1


@pytest_twisted.ensureDeferred
async def test_events_a_destination_cannot_encode_are_dead(serving, dispatch, spool, metrics):
    """GA4 needs a client id: an event without one is dead-lettered with the reason,
    and the rest of its batch is sent."""
    served = serving(FakeGA4())
    spool.add("ga4", [make_event(event_id="with-id"), make_event(event_id="no-id", ga_client_id=None)])
    dispatch(ga4_route(served))

    await eventually(lambda: spool.states("ga4") == {"with-id": "done", "no-id": "dead"})
    assert "ga4 cannot send this event" in spool.row("ga4", "no-id").error
    assert len(served.fake.events) == 1
    assert delivered(metrics, "ga4", "dead") == 1


VISITOR_A, VISITOR_B = "111.1706540400", "222.1706540400"


@pytest_twisted.ensureDeferred
async def test_visitors_sharing_an_event_id_are_each_delivered(serving, dispatch, spool, metrics):
    """Two visitors' events with one id (a shop's product id as the event id) make two
    GA4 requests from one lease: both are sent, each settling its own row."""
    served = serving(FakeGA4())
    spool.add("ga4", [make_event(event_id="sku-9", ga_client_id=c) for c in (VISITOR_A, VISITOR_B)])
    dispatch(ga4_route(served))

    await eventually(lambda: settled(spool, "ga4"))
    assert [row.state for row in spool.rows.values()] == ["done", "done"]
    assert sorted(r.body["client_id"] for r in served.fake.requests) == [VISITOR_A, VISITOR_B]
    assert len(served.fake.events) == 2 and served.fake.violations == []
    assert delivered(metrics, "ga4", "success") == 2


@pytest_twisted.ensureDeferred
async def test_a_request_settles_exactly_the_rows_it_carries(serving, dispatch, spool, metrics):
    """Rows 1 and 3 are visitor A's, row 2 visitor B's, rows 2 and 3 share an id: when
    A's request succeeds and B's then fails, row 2 is retried and rows 1 and 3 are done,
    though B's row comes first with the shared id."""
    served = serving(FakeGA4())
    served.fake.inject(1)
    served.fake.inject(1, status=503)
    spool.add("ga4", [
        make_event(event_id="view", ga_client_id=VISITOR_A),
        make_event(event_id="sku-9", ga_client_id=VISITOR_B),
        make_event(event_id="sku-9", ga_client_id=VISITOR_A),
    ])  # fmt: skip
    # One request at a time, A's first; retries far beyond the test.
    dispatch(ga4_route(served), concurrency=1, backoff_base=60.0, rand=Ceilings())

    await eventually(lambda: [row.state for row in spool.rows.values()] == ["done", "pending", "done"])
    assert [row.attempts for row in spool.rows.values()] == [0, 1, 0]
    assert [(r.body["client_id"], len(r.body["events"])) for r in served.fake.requests] == [
        (VISITOR_A, 2),
        (VISITOR_B, 1),
    ]
    assert delivered(metrics, "ga4", "transient") == 1
    assert delivered(metrics, "ga4", "success") == 2


def ga4_clients(count: int) -> list[Event]:
    """Events of C{count} different visitors: one GA4 request each, from one lease."""
    return [make_event(event_id=f"v-{i}", ga_client_id=f"{i}.1706540400") for i in range(count)]


@pytest_twisted.ensureDeferred
async def test_ga4_leases_many_visitors_at_once(serving, dispatch, spool, metrics):
    """60 visitors' events are one lease, not one per 25 rows: 60 requests, one visitor
    each, two at a time at most, each settled by itself."""
    served = serving(ObservedGA4())
    spool.add("ga4", ga4_clients(60))
    dispatch(ga4_route(served), concurrency=2)

    await eventually(lambda: settled(spool, "ga4"))
    assert set(spool.states("ga4").values()) == {"done"}
    assert spool.leased == [60]
    assert len(served.fake.requests) == 60 and served.fake.violations == []
    assert served.fake.peak <= 2
    assert delivered(metrics, "ga4", "success") == 60


class Counting(MemorySpool):
    """Records the most rows that were in flight at once."""

    peak = 0

    def lease(self, destination: str, limit: int, now: float) -> Deferred:
        leased = super().lease(destination, limit, now)
        self.peak = max(self.peak, sum(r.state == "inflight" for r in self.rows.values()))
        return leased


@pytest_twisted.ensureDeferred
async def test_a_backlog_stays_in_the_spool_not_in_memory(serving, reactor, platforms, metrics):
    """2,200 visitors owed to a slow GA4 with two request slots: the lane holds one lease
    of rows at a time (all it can send soon), never a lease per slot, and delivers all."""
    spool = Counting()
    served = serving(ObservedGA4())
    spool.add("ga4", ga4_clients(2200))
    served.fake.inject(20, delay=0.05)
    dispatcher = Dispatcher(reactor=reactor, spool=spool, routes=[ga4_route(served)], http=platforms, metrics=metrics,
                            concurrency=2, poll_interval=0.05)
    dispatcher.startService()
    try:
        await eventually(lambda: settled(spool, "ga4"), timeout=60)
    finally:
        await within(dispatcher.stopService())
    assert set(spool.states("ga4").values()) == {"done"}
    assert spool.peak <= LEASE
    assert spool.leased[:2] == [LEASE, LEASE]


@pytest.mark.parametrize("shape", ["batches", "requests"])
@pytest_twisted.ensureDeferred
async def test_concurrency_limit_per_destination(serving, dispatch, spool, shape):
    """Six requests to a slow platform, from six one-event batches to Meta or from one
    GA4 batch of six visitors: two in flight at most, and two used."""
    if shape == "batches":
        served = serving(ObservedMeta())
        spool.add("meta", events("c", 6))
        dispatch(meta_route(served, max_batch=1), concurrency=2)
    else:
        served = serving(ObservedGA4())
        spool.add("ga4", ga4_clients(6))
        dispatch(ga4_route(served), concurrency=2)
    served.fake.inject(6, delay=0.2)

    await eventually(lambda: settled(spool, "meta", "ga4"))
    assert {state for name in ("meta", "ga4") for state in spool.states(name).values()} == {"done"}
    assert len(served.fake.requests) == 6
    assert served.fake.peak == 2


@pytest_twisted.ensureDeferred
async def test_stop_cancels_requests_and_releases_rows(serving, dispatch, spool, metrics, reactor):
    """Stopping cancels the request in flight at once; its row, and the rows of the same
    lease still waiting for a request slot, are pending again with no attempt counted,
    released together (a lease may hold hundreds of requests)."""
    served = serving(ObservedGA4())
    served.fake.inject(3, delay=5.0)
    spool.add("ga4", ga4_clients(3))
    dispatcher = dispatch(ga4_route(served), concurrency=1)
    await eventually(lambda: len(served.fake.requests) == 1)
    assert set(spool.states("ga4").values()) == {"inflight"}

    started = reactor.seconds()
    await within(dispatcher.stopService(), 2.0)
    assert reactor.seconds() - started < 1.0
    assert set(spool.states("ga4").values()) == {"pending"}
    assert [r.attempts for r in spool.rows.values()] == [0, 0, 0]
    assert spool.releases == [3]  # in one spool call
    assert spool.retries == []
    assert len(served.fake.requests) == 1
    assert delivered(metrics, "ga4", "transient") == 0


# -- shared with the direct fallback -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_direct_delivery_expires_events_as_the_dispatcher_does(serving, reactor, platforms, metrics):
    """Without the spool, events past a platform's window (less the margin) are counted
    as expired and never sent, by the dispatcher's rule: Meta takes the event 30 s short
    of GA4's 72 hours, GA4 does not, neither takes the one 8 days old, the log takes all."""
    meta_served, ga4_served = serving(ObservedMeta()), serving(FakeGA4())
    now = int(time.time())
    times = {"fresh": now - 3600, "ga4-edge": now - 72 * 3600 + 30, "old": now - 8 * DAY}
    batch = [make_event(event_id=event_id, event_time=t) for event_id, t in times.items()]
    routes = [meta_route(meta_served), ga4_route(ga4_served), Route(log.build("dry", {}), 1.0)]
    delivery = DirectDelivery(reactor=reactor, routes=routes, http=platforms, outcomes=Outcomes(metrics))

    await within(delivery.submit(batch))
    assert [e["event_id"] for e in meta_served.fake.events] == ["fresh", "ga4-edge"]
    assert [e["timestamp_micros"] for e in ga4_served.fake.events] == [times["fresh"] * 1_000_000]
    assert meta_served.fake.violations == ga4_served.fake.violations == []
    counts = {
        (name, outcome): delivered(metrics, name, outcome)
        for name in ("meta", "ga4", "dry")
        for outcome in ("success", "expired")
    }
    assert counts == {
        ("meta", "success"): 2, ("meta", "expired"): 1,
        ("ga4", "success"): 1, ("ga4", "expired"): 2,
        ("dry", "success"): 3, ("dry", "expired"): 0,
    }  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_platform_connections_log_no_factory_lines(serving, reactor, log_events):
    """A connection of tagd's platform client opens and closes without Twisted's
    "Starting factory" and "Stopping factory" lines; a stock pool beside it logs both,
    which shows that the lines would be seen."""
    quiet_served, stock_served = serving(FakeGA4()), serving(FakeGA4())
    quiet = PlatformAgent(reactor)
    stock_pool = HTTPConnectionPool(reactor)
    stock = HTTPClient(Agent(reactor, pool=stock_pool))
    await within(exchange(quiet, OutgoingRequest(quiet_served.base + "/mp/collect", b"{}")))
    response = await within(stock.post(stock_served.base + "/mp/collect", data=b"{}"))
    await within(treq.content(response))
    await within(quiet.close())
    await within(stock_pool.closeCachedConnections())

    def factory_lines(served) -> list[str]:
        """The factory lines of connections to C{served}, by their endpoint's port."""
        lines = [formatEvent(event) for event in log_events]
        port = f":{served.port.getHost().port}>"
        return [line.split(" ")[0] for line in lines if "factory" in line and port in line]

    await eventually(lambda: factory_lines(stock_served) == ["Starting", "Stopping"])
    assert factory_lines(quiet_served) == []


# -- on a clock ------------------------------------------------------------------------------


class Scripted(Resource):
    """A webhook receiver answering with the queued (status, headers), then 200; notes
    when each request came and which events it carried."""

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.answers: deque[tuple[int, dict[str, str]]] = deque()
        self.received: list[tuple[float, list[str]]] = []

    def render_POST(self, request) -> bytes:
        ids = [event["event_id"] for event in json.loads(request.content.read())["events"]]
        self.received.append((self.clock.seconds(), ids))
        status, headers = self.answers.popleft() if self.answers else (200, {})
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return b"{}"


class Ceilings(random.Random):
    """Jitter at its upper bound, so each delay shows its ceiling; notes every range."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


def clocked(clock: Clock, receiver: Scripted, spool: MemorySpool, **options) -> Dispatcher:
    """A started dispatcher on C{clock} with one webhook route to C{receiver}."""
    route = hook_route("http://hook.test/events", 5.0, max_batch=options.pop("max_batch", 100))
    options = {"poll_interval": 1.0, "rand": Ceilings(), "metrics": Metrics(), **options}
    dispatcher = Dispatcher(reactor=clock, spool=spool, routes=[route], http=RequestTraversalAgent(receiver), **options)
    dispatcher.startService()
    return dispatcher


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)  # a plausible now, for HTTP dates
    return clock


def test_outage_probes_back_off_doubling_up_to_the_cap(clock):
    """While the destination is out, each probe waits uniform(0, min(cap, base * 2**n)):
    2, 4, 8, then 10; the row gains no attempt."""
    receiver, spool = Scripted(clock), MemorySpool(clock.seconds)
    receiver.answers.extend([(500, {})] * 5)
    spool.add("hook", events("b", 1))
    rand = Ceilings()
    dispatcher = clocked(clock, receiver, spool, backoff_base=2.0, outage_backoff_cap=10.0, rand=rand)

    for count, ceiling in enumerate((2, 4, 8, 10, 10), start=1):
        clock.advance(ceiling - 0.5)
        dispatcher.wake("hook")
        assert len(receiver.received) == count  # still pausing
        clock.advance(0.5)
    assert spool.states("hook") == {"b-0": "done"}
    assert spool.row("hook", "b-0").attempts == 0 and spool.retries == []
    times = [at for at, _ in receiver.received]
    assert [later - earlier for earlier, later in zip(times, times[1:])] == [2, 4, 8, 10, 10]
    assert rand.ranges == [(0, 2), (0, 4), (0, 8), (0, 10), (0, 10)]
    assert dispatcher.stopService().called  # nothing in flight: at once


class HeldAcks(MemorySpool):
    """A spool whose acknowledgements wait until the test lets them through; C{acks}
    holds the number of rows of each call, and a Deferred that writes them when fired."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.acks: list[tuple[int, Deferred]] = []

    def ack(self, destination: str, keys) -> Deferred:
        written = Deferred().addCallback(lambda _: MemorySpool.ack(self, destination, keys))
        self.acks.append((len(keys), written))
        return written


def test_acknowledgements_answered_meanwhile_are_written_together(clock):
    """Five one-event requests answered while the first acknowledgement is written: the
    other four are acknowledged in one spool call after it, each row done."""
    receiver, spool = Scripted(clock), HeldAcks(clock.seconds)
    spool.add("hook", events("a", 5))
    dispatcher = clocked(clock, receiver, spool, max_batch=1, concurrency=1)

    assert len(receiver.received) == 5
    assert [count for count, _ in spool.acks] == [1]
    spool.acks[0][1].callback(None)
    assert [count for count, _ in spool.acks] == [1, 4]
    spool.acks[1][1].callback(None)
    assert set(spool.states("hook").values()) == {"done"}
    assert dispatcher.stopService().called  # nothing in flight: at once


def test_throttle_holds_every_batch_until_retry_after(clock):
    """After a 429 with Retry-After: 30, no batch of the destination goes out for 30 s,
    whatever the polls and wake-ups; then all are delivered."""
    receiver, spool = Scripted(clock), MemorySpool(clock.seconds)
    receiver.answers.append((429, {"Retry-After": "30"}))
    spool.add("hook", events("t", 3))
    dispatcher = clocked(clock, receiver, spool, max_batch=1, concurrency=1)
    throttled_at = clock.seconds()

    for _ in range(29):
        clock.advance(1)
        dispatcher.wake("hook")
    assert len(receiver.received) == 1
    assert set(spool.states("hook").values()) == {"pending"}
    clock.advance(1)
    assert spool.states("hook") == {"t-0": "done", "t-1": "done", "t-2": "done"}
    assert [at - throttled_at for at, _ in receiver.received[1:]] == [30, 30, 30]
    assert spool.retries == []
    assert dispatcher.stopService().called  # nothing in flight: at once


def test_refusals_pause_longer_each_time_up_to_the_cap(clock):
    """A receiver refusing the credentials (401) four times: the destination pauses
    AUTH_PAUSE (10 s), then 20, 40, and 50 (the cap), with its row pending, no attempt
    counted and the refusal shown meanwhile; the first success ends it."""
    receiver, spool, metrics = Scripted(clock), MemorySpool(clock.seconds), Metrics()
    receiver.answers.extend([(401, {})] * 4)
    spool.add("hook", events("r", 1))
    dispatcher = clocked(clock, receiver, spool, backoff_cap=50.0, metrics=metrics)
    started = clock.seconds()

    for _ in range(119):
        clock.advance(1)
    assert [at - started for at, _ in receiver.received] == [0, 10, 30, 70]
    assert spool.row("hook", "r-0").state == "pending" and spool.row("hook", "r-0").attempts == 0
    assert refused(metrics, "hook") == 1
    clock.advance(1)
    assert [at - started for at, _ in receiver.received][-1] == 120
    assert spool.states("hook") == {"r-0": "done"}
    assert spool.retries == []
    assert refused(metrics, "hook") == 0
    assert delivered(metrics, "hook", "auth") == 4 and delivered(metrics, "hook", "dead") == 0
    assert dispatcher.stopService().called  # nothing in flight: at once


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        ({"Retry-After": "0"}, 1.0),  # clamped up to a second
        ({"Retry-After": "7200"}, 600.0),  # clamped down to max_retry_after
        ({"Retry-After": formatdate(1_700_000_045, usegmt=True)}, 45.0),
        ({"Retry-After": "soon"}, 2.0),  # unreadable: the backoff, at its ceiling 2 * 2**0
        ({}, 2.0),
    ],
    ids=["zero", "too-long", "http-date", "unreadable", "absent"],
)
def test_throttle_pause_honours_and_clamps_retry_after(clock, headers, pause):
    """Retry-After in seconds or as an HTTP date, clamped to [1, max_retry_after]; none
    or an unreadable one gives the backoff instead."""
    receiver, spool = Scripted(clock), MemorySpool(clock.seconds)
    receiver.answers.append((429, headers))
    spool.add("hook", events("p", 1))
    dispatcher = clocked(clock, receiver, spool, backoff_base=2.0, max_retry_after=600.0)

    clock.advance(pause - 0.5)
    dispatcher.wake("hook")
    assert len(receiver.received) == 1
    clock.advance(0.5)
    assert spool.states("hook") == {"p-0": "done"}
    assert receiver.received[1][0] == 1_700_000_000 + pause
    assert dispatcher.stopService().called  # nothing in flight: at once


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"120", 120.0),
        (formatdate(1_700_000_090, usegmt=True).encode(), 90.0),
        (formatdate(1_699_999_990, usegmt=True).encode(), -10.0),
        (b"1.5", None),
        (b"", None),
        (b"\xb2", None),
        (None, None),
    ],
)
def test_retry_after_header(value, seconds):
    """Delay-seconds or an HTTP date, relative to now; anything else is no answer."""
    headers = Headers({b"retry-after": [value]} if value is not None else {})
    assert retry_after(headers, 1_700_000_000) == seconds


def test_wake_sends_before_the_next_poll(clock):
    """New rows wait for the poll interval unless wake() says they are there."""
    receiver, spool = Scripted(clock), MemorySpool(clock.seconds)
    dispatcher = clocked(clock, receiver, spool, poll_interval=60.0)

    spool.add("hook", events("woken", 1))
    dispatcher.wake("hook")
    assert receiver.received == [(1_700_000_000, ["woken-0"])]
    spool.add("hook", events("polled", 1))
    clock.advance(59)
    assert len(receiver.received) == 1
    clock.advance(1)
    assert receiver.received[1] == (1_700_000_060, ["polled-0"])
    assert dispatcher.stopService().called  # nothing in flight: at once


# -- with the real spool ----------------------------------------------------------------------


async def drained(spool) -> dict[tuple[str, str], int]:
    """The spool's depth once nothing is pending or in flight (bounded wait)."""
    for _ in range(250):
        depth = await within(spool.depth())
        if not {status for _, status in depth} & {"pending", "inflight"}:
            return depth
        await sleep(0.02)
    raise AssertionError(f"the spool still owes deliveries: {depth}")


@pytest_twisted.ensureDeferred
async def test_drains_the_sqlite_spool(serving, reactor, platforms, metrics, tmp_path):
    """Against the real SQLite spool: a 503 is retried, the too-old event expires, the
    poison event is dead-lettered with Meta's message and the others are delivered."""
    from tagd.delivery.spool import Spool

    served = serving(ObservedMeta())
    served.fake.inject(1, status=503)
    spool = Spool.open(tmp_path / "spool.sqlite", reactor=reactor)
    batch = [
        *events("good", 3),
        make_event(event_id="poison", source_url="shop.example/no-scheme"),
        make_event(event_id="old", event_time=int(time.time()) - 8 * DAY),
    ]
    assert spool.enqueue(batch, ["meta"]) == 5
    await within(spool.flush())
    dispatcher = Dispatcher(
        reactor=reactor, spool=spool, routes=[meta_route(served)], http=platforms, metrics=metrics,
        poll_interval=0.05, backoff_base=0.05,
    )  # fmt: skip
    dispatcher.startService()
    try:
        depth = await drained(spool)
        letters = await within(spool.dead_letters())
    finally:
        await within(dispatcher.stopService())
        await within(spool.close())

    assert depth == {("meta", "dead"): 1, ("meta", "expired"): 1}
    # 503 (the destination's); a probe of one; 400; halves; the poison half's halves
    assert len(served.fake.requests) == 1 + 1 + 1 + 2 + 2
    assert "old" not in {e["event_id"] for e in served.fake.events}
    assert delivered(metrics, "meta", "success") == 3
    assert delivered(metrics, "meta", "transient") == 4
    (letter,) = letters
    assert (letter.event_id, letter.attempts) == ("poison", 1)
    assert letter.last_error.startswith("HTTP 400, Meta error 100: Invalid parameter")


@pytest_twisted.ensureDeferred
async def test_a_pause_lets_go_of_a_thousand_waiting_requests(serving, dispatch, spool):
    """GA4's lease of 1000 visitors is 1000 requests waiting for two slots; the first
    answers start an outage, and every waiting request goes back unsent, its row pending
    again, none left in flight (a slot handed from waiter to waiter would nest them all
    in one call, past Python's recursion limit)."""
    served = serving(FakeGA4())
    served.fake.inject(10, status=503)
    spool.add("ga4", ga4_clients(1000))
    dispatch(ga4_route(served), concurrency=2, backoff_base=60.0)

    await eventually(lambda: len(served.fake.requests) >= 2 and spool.releases)
    await eventually(lambda: {row.state for row in spool.rows.values()} == {"pending"})
    assert len(served.fake.requests) == 2
    assert sum(spool.releases) == 998 and all(row.attempts == 0 for row in spool.rows.values())
