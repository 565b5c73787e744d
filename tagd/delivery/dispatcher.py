"""The dispatcher: drains the spool through each destination, at least once.

One loop per destination leases due rows from the spool (up to L{LEASE} at once, more when
a destination's batches are larger, and never more than its request slots can carry at
once: L{_Lane.room}), drops the events the platform would refuse for their
age, encodes the rest into as many requests as the platform's limits ask (GA4 sends one
visitor per request), POSTs them through an L{IAgent} (L{tagd.delivery.client}), at most C{concurrency} at once, and settles
the rows of every request by the platform's verdict on it:

  - success: acknowledged, done;
  - transient (5xx, timeout, reset, the platform's transient codes): when every request
    is meeting it (L{tagd.delivery.outage} says when), the destination is out: it backs off as a
    whole, one probe request at a time, and the rows go back to pending with no attempt
    counted, until the first success ends the outage and the backlog drains at full
    speed.  While other requests succeed, the failure is the rows' own: retried later,
    with exponential backoff and full jitter so that many rows failing together do not
    come back together, and dead-lettered with the platform's last message after
    C{max_attempts};
  - throttle (429, throttle codes): the whole destination pauses, for C{Retry-After} when
    the platform says, and the rows go back to pending untouched; requests waiting for
    a slot wait out a short pause (L{THROTTLE_WAIT}) and go then;
  - permanent: a batch is split in halves and each half sent again, so that one poison
    event cannot sink the others; a single event is dead-lettered with the platform's
    message;
  - auth (a bad, expired or revoked token, no permission): the destination's fault, not
    the events', so nothing is split or dead-lettered.  The destination pauses, for
    L{AUTH_PAUSE} seconds at first, twice as long after each further refusal, up to
    C{backoff_cap}, and its rows go back to pending untouched.  One error line says so
    (with the platform's message), and C{tagd_destination_credentials_refused} is 1 until
    the platform accepts a request again; once the token is fixed (a reload gives the
    destination a new lane, unpaused) delivery resumes with nothing lost.

Throttled, refused and outage-struck rows go back with their attempt count unchanged: the
platform refused the destination's rate, credentials or service, not those events, and
counting it would lengthen their own backoff for a fault that is not theirs.

Every few seconds (L{BACKLOG_EVERY}) the dispatcher reads each destination's backlog
from the spool, for C{tagd_spool_oldest_pending_seconds}, the dashboard and the outage's
lines; C{tagd_destination_up} is 0 while a destination is out or its credentials are
refused.  Pauses live in memory; after
a restart the first request asks again, and a platform still refusing restores them.

Counted outcomes: C{transient}, C{throttle}, C{auth} and C{permanent} count the events of
every answered attempt (a poison event found by three halvings counts four times), while
C{success}, C{expired} and C{dead} count each event once, at its end.  Each row scheduled
for another attempt (L{_retry}) is also counted in C{tagd_delivery_retries_total}, so that
an alert can watch retries alone.

A row is never lost here: whatever is not acknowledged, retried, expired or dead-lettered
is released back to pending (on shutdown, on a throttle), and a row whose settlement
never happens (a crash) stays in the spool, to be leased again after a restart.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable
from email.utils import mktime_tz, parsedate_tz
from typing import Any, Protocol, Sequence

import attrs
from prometheus_client.core import GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from tagd.delivery.direct import Route, by_unsendable_reason, exchange, expired, judged
from tagd.delivery.destinations import Advising, Describing, Outcome, OutgoingRequest, Verdict
from tagd.tagging.events import Event
from tagd.admin.metrics import Metrics
from tagd.delivery.outage import Outage, doubled
from tagd.delivery.outcomes import DEAD, EXPIRED, Outcomes
from tagd.ratelimit import RateLimitedLog
from tagd.delivery.spool import Backlog, SpoolError

log = Logger()

# The shortest pause a throttle causes, even when Retry-After says 0 or a past date.
MIN_PAUSE = 1.0
# Seconds a destination whose credentials were refused first pauses (then twice as long
# after each refusal, up to backoff_cap): a fixed token comes with a reload or a restart,
# which starts the destination afresh, and a refusal the platform takes back soon (a token
# rotated a moment late) is retried soon.
AUTH_PAUSE = 10.0
# Rows a destination leases at once, at least.  GA4 takes 25 events of one visitor per
# request, so a lease of its batch size would be a few visitors' events: after an outage
# with many visitors, one lease per request or two.  A large lease keeps every request
# slot busy; each of its requests is still settled by itself.
LEASE = 1000
# Seconds a request waits for a throttle's end in its slot, at most; after a longer pause
# its rows go back to the spool, to be leased again.
THROTTLE_WAIT = 10.0
# Requests in flight per destination when neither its route nor the dispatcher says.
CONCURRENCY = 2
# Seconds between looks at the spool's backlog (for the gauges, the dashboard and the
# outage lines), at most; a shorter outage reminder shortens it.
BACKLOG_EVERY = 5.0

_DELAY_SECONDS = re.compile(r"[0-9]+")


class Lease(Protocol):
    """One spool row handed to the dispatcher; the row is in flight until settled."""

    @property
    def key(self) -> Hashable: ...
    @property
    def event(self) -> Event: ...
    @property
    def attempts(self) -> int:
        """Failed attempts so far (0 for a row never tried)."""


class Spool(Protocol):
    """What the dispatcher needs from the spool; every call answers with a Deferred."""

    def lease(self, destination: str, limit: int, now: float) -> Deferred: ...
    def ack(self, destination: str, keys: Sequence[Hashable]) -> Deferred: ...
    def retry(self, destination: str, keys: Sequence[Hashable], next_at: float, error: str) -> Deferred: ...
    def postpone(self, destination: str, keys: Sequence[Hashable], next_at: float, error: str) -> Deferred: ...
    def release(self, destination: str, keys: Sequence[Hashable]) -> Deferred: ...
    def backlog(self) -> Deferred: ...
    def dead(self, destination: str, keys: Sequence[Hashable], error: str) -> Deferred: ...
    def expire(self, destination: str, keys: Sequence[Hashable]) -> Deferred: ...


def retry_after(headers: Headers, now: float) -> float | None:
    """The seconds a C{Retry-After} header asks to wait, from C{now}; C{None} when the
    header is absent or unreadable.

    The header is either a number of seconds or an HTTP date; a past date gives a
    negative number, which the caller clamps like any other value.
    """
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    value = values[0].decode("latin-1").strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        parsed = parsedate_tz(value)
        return None if parsed is None else mktime_tz(parsed) - now
    except (ValueError, OverflowError):
        return None


def _timed_out(result: Any, timeout: float) -> None:
    """The request outlived its route's timeout: say so, whatever the cancelled agent raised."""
    raise TimeoutError(f"no answer within {timeout} s")


def _keys(rows: Sequence[Lease]) -> list[Hashable]:
    return [row.key for row in rows]


def _by_attempts(rows: Sequence[Lease]) -> dict[int, list[Lease]]:
    """Rows grouped by how often they failed: each group backs off by its own count."""
    groups: dict[int, list[Lease]] = {}
    for row in rows:
        groups.setdefault(row.attempts, []).append(row)
    return groups


class _Acks:
    """One destination's acknowledgements, written together: the requests answered while
    a write runs are acknowledged by the next one, in a single spool call.

    A lease makes hundreds of GA4 requests, one visitor each.  An acknowledgement apiece
    (a transaction and a disk sync on the spool's one thread) would queue up ahead of
    every other destination's leases and slow them all down.
    """

    def __init__(self, spool: Spool, destination: str) -> None:
        self._spool = spool
        self._destination = destination
        self._keys: list[Hashable] = []
        self._waiting: list[Deferred] = []
        self._writing = False

    def ack(self, keys: Sequence[Hashable]) -> Deferred:
        """Acknowledge C{keys}; fires once they are written (fails as the spool did)."""
        done = Deferred()
        self._keys.extend(keys)
        self._waiting.append(done)
        if not self._writing:
            ensureDeferred(self._write())
        return done

    async def _write(self) -> None:
        self._writing = True
        try:
            while self._keys:
                keys, self._keys = self._keys, []
                waiting, self._waiting = self._waiting, []
                try:
                    await self._spool.ack(self._destination, keys)
                except Exception:
                    failure = Failure()
                    for done in waiting:
                        done.errback(failure)
                else:
                    for done in waiting:
                        done.callback(None)
        finally:
            self._writing = False


@attrs.define(eq=False)
class _Lane:
    """One destination's loop: its request slots, its pause, its nap and its work."""

    route: Route
    slots: DeferredSemaphore
    acks: _Acks
    outage: Outage
    paused_until: float = 0.0
    throttles: int = 0  # throttled answers since the last success
    refusals: int = 0  # pauses for refused credentials since the last success
    woken: bool = False  # a wake-up came while the loop was not napping
    nap: Deferred | None = None
    batches: set[Deferred] = attrs.field(factory=set)
    inflight: set[Deferred] = attrs.field(factory=set)
    loop: Deferred | None = None  # the running _run, once started
    retired: bool = False  # replaced or removed by a reroute: leases nothing more
    advised: bool = False  # the platform's advice was said (once a lane: its text may vary)
    waiting: set[Deferred] = attrs.field(factory=set)  # requests waiting for a slot
    sleeping: set[Deferred] = attrs.field(factory=set)  # requests waiting for a throttle's end
    held: int = 0  # rows leased by batches that have not ended
    # Whether the platform's answers carry advice for the operator: asked once, as a check
    # against a runtime Protocol costs more than the rest of a request's verdict.
    advising: bool = attrs.field(
        init=False, default=attrs.Factory(lambda lane: isinstance(lane.route.destination, Advising), takes_self=True)
    )

    @property
    def name(self) -> str:
        return self.route.destination.name

    def room(self) -> int:
        """How many more rows the lane may lease now.  What every slot can carry at once
        (at least L{LEASE}) keeps the slots busy; more would be a backlog held in memory:
        64 GA4 batches of 1,000 rows each, with their encoded requests, took 400 MB."""
        return max(LEASE, self.slots.limit * self.route.destination.max_batch) - self.held


class BacklogCollector:
    """Each destination's backlog as the dispatcher last read it (every L{BACKLOG_EVERY}
    seconds), as Prometheus metrics when scraped: a scrape never waits on SQLite."""

    def __init__(self, dispatcher: Dispatcher, reactor) -> None:
        self._dispatcher = dispatcher
        self._reactor = reactor

    def collect(self):
        owed = GaugeMetricFamily(
            "tagd_spool_backlog_events",
            "Events owed to the destination (pending or in flight), as read from the spool every few seconds.",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "tagd_spool_oldest_pending_seconds",
            "Seconds since the oldest event owed to the destination was accepted; 0 when none is owed.",
            labels=["destination"],
        )
        now = self._reactor.seconds()
        for name in self._dispatcher.destinations:
            backlog = self._dispatcher.backlog.get(name)
            owed.add_metric([name], backlog.owed if backlog else 0)
            oldest.add_metric([name], max(0.0, now - backlog.oldest) if backlog else 0.0)
        yield owed
        yield oldest


class Dispatcher(Service):
    """Deliver the spool's rows to every destination, at least once.

    @param spool: leases rows and records their fate (see L{Spool}).
    @param routes: the destinations, each with its request timeout.
    @param http: the agent for the platforms (L{tagd.delivery.client.PlatformAgent}, or
        any other L{IAgent}).
    @param poll_interval: seconds between looks at the spool when nobody calls L{wake}.
    @param concurrency: requests in flight per destination whose route does not say
        (L{Route.concurrency}), at most; times the destination's C{max_batch} (at least
        L{LEASE}), also the rows it holds leased at once (L{_Lane.room}), so that a
        backlog stays in the spool.
    @param backoff_base: seconds; the n-th retry waits up to C{backoff_base * 2**n}.
    @param backoff_cap: seconds; no retry waits longer.
    @param max_retry_after: seconds; the longest pause a platform's C{Retry-After} gets.
    @param outage_backoff_cap: seconds; the longest a destination that is out waits
        between probes.
    @param outage_reminder: seconds between the reminders that a destination is still out.
    @param max_attempts: a row's own failed attempts before it is a dead letter.
    @param rand: the jitter's source; pass a seeded one for reproducible tests.
    @param outcomes: told of every outcome (by default counted in C{metrics} only).
    """

    def __init__(
        self,
        *,
        reactor,
        spool: Spool,
        routes: Sequence[Route],
        http: IAgent,
        metrics: Metrics,
        poll_interval: float = 1.0,
        concurrency: int | None = None,
        backoff_base: float = 0.25,
        backoff_cap: float = 600.0,
        max_retry_after: float = 3600.0,
        outage_backoff_cap: float = 5.0,
        outage_reminder: float = 300.0,
        max_attempts: int = 10,
        rand: random.Random | None = None,
        outcomes: Outcomes | None = None,
    ) -> None:
        self._reactor = reactor
        self._spool = spool
        self._http = http
        self._metrics = metrics
        self._outcomes = outcomes if outcomes is not None else Outcomes(metrics)
        self._rand = rand if rand is not None else random.Random()
        self._said = RateLimitedLog(log, reactor.seconds)
        self.backlog: dict[str, Backlog] = {}  # by destination, as last read (BACKLOG_EVERY)
        self._looking = LoopingCall(self._look)
        self._looking.clock = reactor
        self._lanes: dict[str, _Lane] = {}
        self._retiring: set[_Lane] = set()  # retired lanes still settling what they leased
        self.reroute(
            routes,
            poll_interval=poll_interval,
            concurrency=concurrency,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_retry_after=max_retry_after,
            outage_backoff_cap=outage_backoff_cap,
            outage_reminder=outage_reminder,
            max_attempts=max_attempts,
        )

    # -- the service ------------------------------------------------------------------

    def startService(self) -> None:
        """Start one loop per destination."""
        super().startService()
        for lane in self._lanes.values():
            self._start(lane)
        self._looking.start(min(BACKLOG_EVERY, self._outage_reminder)).addErrback(
            lambda failure: log.failure("the look at the spool's backlog stopped", failure)
        )

    def stopService(self) -> Deferred:
        """Stop leasing and cancel the requests in flight; their rows go back to pending.

        The Deferred fires once every leased row is settled or released, so the spool
        may be closed after it, and nothing that was leased is left in flight.
        """
        super().stopService()
        if self._looking.running:
            self._looking.stop()
        lanes = [*self._lanes.values(), *self._retiring]
        for lane in lanes:
            self._rouse(lane)
            self._hold(lane)
            for sending in list(lane.inflight):
                sending.cancel()
        return gatherResults([self._settled(lane) for lane in lanes]).addCallback(lambda _: None)

    def reroute(
        self,
        routes: Sequence[Route],
        *,
        poll_interval: float,
        concurrency: int | None,
        backoff_base: float,
        backoff_cap: float,
        max_retry_after: float,
        outage_backoff_cap: float,
        outage_reminder: float,
        max_attempts: int,
    ) -> Deferred:
        """Deliver to C{routes}, with these settings, from now on (see the constructor;
        a configuration reload calls this while the dispatcher runs).

        A destination whose route is unchanged keeps its lane, with its pause and its
        batches.  Every other lane is retired: it leases nothing more, its requests in
        flight finish and are settled as usual, and its batches not yet sent release their
        rows, which the new lane of that name (if any) then leases with the new route.  A
        lane is never changed under a batch: a batch is sent, classified and split by the
        route it was leased for.  A new concurrency retires the lanes it applies to, since
        it sizes their request slots; a lane retired for that alone hands its pause (a
        throttle's, refused credentials', an outage's) to its successor, as the platform
        would still answer the same route the same way.

        Fires once every retired lane has settled or released all it leased: from then on
        no row of a removed destination is in flight.
        """
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self._poll_interval = poll_interval
        self._concurrency = concurrency
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_retry_after = max_retry_after
        self._outage_backoff_cap = outage_backoff_cap
        self._outage_reminder = outage_reminder
        self._max_attempts = max_attempts
        wanted = {route.destination.name: route for route in routes}
        retired = [
            lane
            for name, lane in self._lanes.items()
            if wanted.get(name) != lane.route or lane.slots.limit != self._slots(lane.route)
        ]
        replaced = {lane.name: lane for lane in retired}
        for lane in retired:
            del self._lanes[lane.name]
            lane.retired = True
            self._retiring.add(lane)
            self._rouse(lane)
            self._hold(lane)
            if lane.name not in wanted:
                self._metrics.credentials_refused.remove(lane.name)
                self._metrics.destination_up.remove(lane.name)
                self.backlog.pop(lane.name, None)
        for name, route in wanted.items():
            if name not in self._lanes:
                lane = self._lanes[name] = _Lane(
                    route, DeferredSemaphore(self._slots(route)), _Acks(self._spool, name), self._outage(name)
                )
                previous = replaced.get(name)
                if previous is not None and attrs.evolve(previous.route, concurrency=route.concurrency) == route:
                    lane.paused_until = previous.paused_until
                    lane.throttles = previous.throttles
                    lane.refusals = previous.refusals
                    lane.outage = attrs.evolve(previous.outage, cap=self._outage_backoff_cap, reminder=self._outage_reminder)
                else:
                    # A new route (a new token, say) has not been refused yet.
                    self._metrics.credentials_refused.labels(name).set(0)
                self._show_up(lane)
                if self.running:
                    self._start(lane)
        return gatherResults([self._settled(lane) for lane in retired]).addCallback(lambda _: None)

    @property
    def destinations(self) -> list[str]:
        """The names of the destinations delivered to now."""
        return list(self._lanes)

    def wake(self, destination: str) -> None:
        """Look at C{destination}'s rows now: the spool has new ones."""
        self._rouse(self._lanes[destination])

    def _slots(self, route: Route) -> int:
        """The requests a route may have in flight: its own number, else the dispatcher's."""
        return route.concurrency or self._concurrency or CONCURRENCY

    def _outage(self, name: str) -> Outage:
        return Outage(
            name,
            base=self._backoff_base,
            cap=self._outage_backoff_cap,
            reminder=self._outage_reminder,
            rand=self._rand,
        )

    def _show_up(self, lane: _Lane) -> None:
        """C{tagd_destination_up}: 0 while the destination is out or refuses the credentials."""
        up = not (lane.outage.out or lane.refusals)
        self._metrics.destination_up.labels(lane.name).set(int(up))

    async def _look(self) -> None:
        """Read every destination's backlog, and let each outage say what changed."""
        try:
            self.backlog = await self._spool.backlog()
        except Exception:
            self._said.warn("backlog", "cannot read the spool's backlog; trying again in a few seconds")
            return
        now = self._reactor.seconds()
        for lane in self._lanes.values():
            lane.outage.report(now, self.backlog.get(lane.name))

    # -- the loop ---------------------------------------------------------------------

    def _start(self, lane: _Lane) -> None:
        lane.loop = ensureDeferred(self._run(lane))

    def _live(self, lane: _Lane) -> bool:
        """Whether C{lane} may still lease and send: the service runs and the lane is not retired."""
        return bool(self.running) and not lane.retired

    def _settled(self, lane: _Lane) -> Deferred:
        """Fires once C{lane}'s loop and batches have ended (at once for a lane never
        started); a retired lane is then forgotten."""
        ending = [lane.loop, *lane.batches] if lane.loop is not None else []
        return gatherResults(ending).addCallback(lambda _: self._retiring.discard(lane))

    async def _run(self, lane: _Lane) -> None:
        """Lease and deliver until the service stops or the lane is retired; a failing
        spool is retried, never fatal."""
        while self._live(lane):
            try:
                await self._step(lane)
            except CancelledError:
                return  # Stopping: whatever was leased is released by stopService.
            except SpoolError as e:
                if not self._live(lane):
                    return
                # Every tick that offers rows wakes the lane: a line a minute, not one a tick.
                self._said.warn(
                    f"lease {lane.name}",
                    "{destination}: cannot lease from the spool: {reason}",
                    destination=lane.name,
                    reason=str(e),
                )
                await self._nap(lane, self._poll_interval)
            except Exception:
                if not self._live(lane):
                    return
                log.failure("{destination}: cannot lease from the spool", destination=lane.name)
                await self._nap(lane, self._poll_interval)

    async def _step(self, lane: _Lane) -> None:
        """Wait out a pause or a full lane, else lease one batch and start it."""
        now = self._reactor.seconds()
        if lane.paused_until > now:
            await self._nap(lane, lane.paused_until - now)
        elif lane.room() <= 0 or (lane.outage.out and lane.batches):
            await self._nap(lane, None)  # until a batch ends
        else:
            await self._lease(lane, now)

    async def _lease(self, lane: _Lane, now: float) -> None:
        """Lease a batch, or while the destination is out one row: the next probe."""
        limit = 1 if lane.outage.out else min(lane.room(), max(LEASE, lane.route.destination.max_batch))
        rows = await self._spool.lease(lane.name, limit, now)
        if not rows:
            await self._nap(lane, self._poll_interval)
        elif not self._live(lane):
            await self._release(lane, rows)
        else:
            self._start_batch(lane, rows)

    def _nap(self, lane: _Lane, seconds: float | None) -> Deferred:
        """Fires after C{seconds} (never, for C{None}) or at the next L{_rouse}."""
        if lane.woken or not self._live(lane):
            lane.woken = False
            return succeed(None)
        lane.nap = Deferred()
        if seconds is not None:
            lane.nap.addTimeout(seconds, self._reactor, onTimeoutCancel=lambda _, __: None)
        return lane.nap

    def _rouse(self, lane: _Lane) -> None:
        """End the lane's nap, or, when it is busy, make its next nap return at once."""
        nap, lane.nap = lane.nap, None
        if nap is not None and not nap.called:
            nap.callback(None)
        else:
            lane.woken = True

    def _start_batch(self, lane: _Lane, rows: Sequence[Lease]) -> None:
        lane.held += len(rows)
        batch = ensureDeferred(self._deliver_batch(lane, rows))
        lane.batches.add(batch)
        batch.addErrback(
            lambda failure: log.failure(
                "{destination}: the spool could not record a batch's fate; its rows stay in flight",
                failure,
                destination=lane.name,
            )
        )
        batch.addBoth(lambda _: self._batch_done(lane, batch, len(rows)))

    def _batch_done(self, lane: _Lane, batch: Deferred, rows: int) -> None:
        lane.batches.discard(batch)
        lane.held -= rows
        self._rouse(lane)

    # -- one batch ----------------------------------------------------------------------

    async def _deliver_batch(self, lane: _Lane, rows: Sequence[Lease]) -> None:
        fresh = await self._expire(lane, rows)
        if fresh:
            await self._deliver(lane, fresh)

    async def _expire(self, lane: _Lane, rows: Sequence[Lease]) -> list[Lease]:
        """The rows the platform still takes; the others are expired (L{expired}), never sent."""
        now = self._reactor.seconds()
        fresh: list[Lease] = []
        stale: list[Lease] = []
        for row in rows:
            (stale if expired(lane.route.destination, row.event, now) else fresh).append(row)
        if stale:
            await self._spool.expire(lane.name, _keys(stale))
            self._count(lane, EXPIRED, stale)
            log.info(
                "{destination}: {count} event(s) expired, older than the platform takes",
                destination=lane.name,
                count=len(stale),
            )
        return fresh

    async def _deliver(self, lane: _Lane, rows: Sequence[Lease]) -> None:
        """Encode C{rows} and send every request; rows no request carries are dead.

        The rows of requests that could not be sent (stopping, or the destination paused
        meanwhile) go back to pending in one spool call: a lease may make hundreds of
        requests, and a call for each would hold shutdown up, one disk sync apiece.
        """
        destination = lane.route.destination
        if isinstance(destination, Describing):
            await self._dry_run(lane, rows, destination)
            return
        try:
            requests = destination.encode([row.event for row in rows])
        except Exception:
            log.failure(
                "{destination}: cannot encode {count} event(s)", destination=lane.name, count=len(rows)
            )
            await self._bisect(lane, rows, f"{destination.type} cannot encode this event")
            return
        # As many senders as the lane has slots take the requests in turn, each the next
        # once its slot is free again: a sender per request (a lease of 1,000 GA4
        # visitors) started them all in one reactor turn, a stall visitors waited out.
        # Settling runs beside the senders, so a slow acknowledgement holds no slot.
        queue, unsent, settling, failures = iter(requests), [], [], []

        async def sender() -> None:
            for request in queue:
                # A request settles the rows at its positions: by event id, two visitors'
                # events that share one (GA4 sends each visitor apart) would be settled by one.
                carried = [rows[position] for position in request.positions]
                try:
                    answer = await self._send(lane, request, carried)
                except Exception:
                    failures.append(Failure())
                    continue
                if answer is None:
                    unsent.extend(carried)
                else:
                    settling.append(ensureDeferred(self._settle(lane, request, carried, *answer)))

        senders = [ensureDeferred(sender()) for _ in range(min(len(requests), lane.slots.limit))]
        sent = {position for request in requests for position in request.positions}
        skipped = [row for position, row in enumerate(rows) if position not in sent]
        for reason, group in by_unsendable_reason(destination, skipped, lambda row: row.event).items():
            await self._dead(lane, group, reason)
        await gatherResults(senders)
        results = await DeferredList(settling, consumeErrors=True)
        if unsent:
            await self._release(lane, unsent)
        failures += [failure for ok, failure in results if not ok]
        for failure in failures[1:]:
            log.failure("{destination}: the spool could not record a request's fate", failure, destination=lane.name)
        if failures:
            failures[0].raiseException()  # Logged by the batch's own handler.

    async def _dry_run(self, lane: _Lane, rows: Sequence[Lease], destination: Describing) -> None:
        """The log destination: each event described in the log, and done."""
        for line in destination.describe([row.event for row in rows]):
            log.info("{destination} (dry run): {line}", destination=lane.name, line=line)
        await self._spool.ack(lane.name, _keys(rows))
        self._count(lane, Outcome.SUCCESS.value, rows)

    async def _bisect(self, lane: _Lane, rows: Sequence[Lease], reason: str) -> None:
        """Deliver each half of a refused or failed batch again; a single refused event is dead
        (a failed one never comes here: it is retried on its own)."""
        if len(rows) == 1:
            await self._dead(lane, rows, reason)
            return
        half = len(rows) // 2
        halves = (rows[:half], rows[half:])
        await gatherResults(
            [ensureDeferred(self._deliver(lane, part)) for part in halves], consumeErrors=True
        )

    # -- one request --------------------------------------------------------------------

    async def _send(
        self, lane: _Lane, request: OutgoingRequest, rows: Sequence[Lease]
    ) -> tuple[int | None, Verdict, bool] | None:
        """Send C{request} in one of the lane's slots; returns the status, the verdict and
        whether a failure is the rows' own (L{_heed}), for the caller to settle outside the
        slot, or C{None} when the request was not sent or was cancelled.

        A request waiting for a slot when the lane stops sending (a pause, shutdown) is
        let go by L{_hold}, never through the slot: a slot released to a waiter runs it
        at once, inside the release, and a thousand waiters that each give the slot back
        unsent would nest a thousand deep."""
        if not self._may_send(lane):
            return None
        acquiring = lane.slots.acquire()
        lane.waiting.add(acquiring)
        try:
            await acquiring
        except CancelledError:
            return None
        finally:
            lane.waiting.discard(acquiring)
        try:
            await self._throttled(lane)
            sent_at = self._reactor.seconds()
            answer = await self._attempt(lane, request) if self._may_send(lane) else None
            if answer is None:
                return None
            return (*answer, self._heed(lane, answer[1], sent_at, len(rows)))
        finally:
            lane.slots.release()

    def _may_send(self, lane: _Lane) -> bool:
        """Not once stopping or retired, nor while the platform asked us to pause."""
        return self._live(lane) and lane.paused_until <= self._reactor.seconds()

    def _hold(self, lane: _Lane) -> None:
        """Let go of the requests waiting for a slot, or for a throttle's end in one: the
        lane sends nothing for now."""
        for waiting in [*lane.waiting, *lane.sleeping]:
            waiting.cancel()

    async def _throttled(self, lane: _Lane) -> None:
        """Wait out a throttle's pause in the slot, and send then: a pause of a second or
        two, as a platform's C{Retry-After} asks, costs no new lease and encoding of what
        waits.  A longer pause (over L{THROTTLE_WAIT}), an outage, refused credentials,
        shutdown or a reroute lets go (L{_hold}), and the rows go back to the spool."""
        while self._live(lane) and not (lane.outage.out or lane.refusals):
            wait = lane.paused_until - self._reactor.seconds()
            if not 0 < wait <= THROTTLE_WAIT:
                return
            pause = deferLater(self._reactor, wait)
            lane.sleeping.add(pause)
            try:
                await pause
            except CancelledError:
                return
            finally:
                lane.sleeping.discard(pause)

    async def _attempt(self, lane: _Lane, request: OutgoingRequest) -> tuple[int | None, Verdict] | None:
        """The HTTP status and the verdict; C{None} when shutdown cancelled the request."""
        sending = exchange(self._http, request).addTimeout(lane.route.timeout, self._reactor, onTimeoutCancel=_timed_out)
        lane.inflight.add(sending)
        try:
            response, body = await sending
        except Exception as e:
            if not self.running:
                return None
            # The exception text may quote the URL, and with it a token: name the type only.
            return None, Verdict(Outcome.TRANSIENT, f"no answer: {type(e).__name__}")
        finally:
            lane.inflight.discard(sending)
        destination = lane.route.destination
        verdict = judged(destination, request, response.code, body)
        if verdict.outcome is Outcome.THROTTLE and verdict.retry_after is None:
            # Only a throttle's pause heeds Retry-After (L{_heed}).
            asked = retry_after(response.headers, self._reactor.seconds())
            verdict = attrs.evolve(verdict, retry_after=asked)
        if lane.advising:
            self._advise(lane, destination.advice(response.code, response.headers, body))
        return response.code, verdict

    def _advise(self, lane: _Lane, advice: str | None) -> None:
        """What the platform's answer asks of the operator, logged once per destination."""
        if advice and not lane.advised:
            lane.advised = True
            log.warn("{destination}: {advice}", destination=lane.name, advice=advice)

    def _heed(self, lane: _Lane, verdict: Verdict, sent_at: float, count: int) -> bool:
        """What an answer means for the whole destination (a pause, or the end of one),
        decided before its slot passes to the next request: releasing the slot starts
        that request at once, which must not go out after a pause began.

        Returns whether a transient failure is the rows' own (see L{tagd.delivery.outage}); a
        retired lane's always are.  A retired lane's answers say nothing of the
        destination any more: its requests left with the old route (an old token, say),
        and the lane that replaced it, or the destination's removal, decides its pause
        and its gauges."""
        if lane.retired:
            return True
        now = self._reactor.seconds()
        if verdict.outcome is Outcome.SUCCESS:
            lane.throttles = 0
            if lane.outage.succeeded(now, count):
                self._rouse(lane)  # the backlog drains now, not at the next poll
            self._accepted(lane)
        elif verdict.outcome is Outcome.THROTTLE:
            self._pause(lane, verdict.retry_after)
        elif verdict.outcome is Outcome.AUTH:
            self._refused(lane, verdict.message)
        elif verdict.outcome is Outcome.TRANSIENT:
            theirs, delay = lane.outage.failed(now, sent_at, verdict.message)
            if delay is not None:
                lane.paused_until = max(lane.paused_until, now + delay)
                self._hold(lane)
            self._show_up(lane)
            return not theirs
        return True

    async def _settle(
        self,
        lane: _Lane,
        request: OutgoingRequest,
        rows: Sequence[Lease],
        status: int | None,
        verdict: Verdict,
        mine: bool,
    ) -> None:
        """Record what the platform's answer means for C{rows} (for the destination:
        L{_heed}, which told whether a transient failure is C{mine}, the rows' own)."""
        outcome = verdict.outcome
        if not verdict.refused:  # else counted event by event, by _partly_delivered
            self._count(lane, outcome.value, rows, status, verdict.message)
        log.debug(
            "{destination}: {count} event(s) to {url}: {outcome} (HTTP {status}) {message}",
            destination=lane.name,
            count=len(rows),
            url=request.log_url,
            outcome=outcome.value,
            status=status if status is not None else "-",
            message=verdict.message,
        )
        if outcome is Outcome.SUCCESS and verdict.refused:
            await self._partly_delivered(lane, rows, status, verdict)
        elif outcome is Outcome.SUCCESS:
            await lane.acks.ack(_keys(rows))
        elif outcome is Outcome.TRANSIENT and mine and len(rows) > 1:
            # A batch's failure is no failure of each of its events: a platform recovering
            # from an outage may fail large requests while it takes the probes, and one
            # event it fails for fails its whole batch.  The halves go again at once, with
            # no attempt counted; only a single event's failure is its own.
            await self._bisect(lane, rows, verdict.message)
        elif outcome is Outcome.TRANSIENT and mine:
            await self._retry(lane, rows, verdict.message)
        elif outcome is Outcome.TRANSIENT:
            # Due when the pause ends, behind the rows not tried yet: the next probe carries
            # another event, so one that the platform fails for itself cannot hold the
            # destination out for good.
            next_at = max(lane.paused_until, self._reactor.seconds())
            await self._spool.postpone(lane.name, _keys(rows), next_at, verdict.message)
        elif outcome in (Outcome.THROTTLE, Outcome.AUTH):
            await self._release(lane, rows)
        else:
            await self._bisect(lane, rows, verdict.message)

    # -- the rows' fates ----------------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        """Seconds to wait after C{attempts} earlier failures: full jitter, uniformly
        between 0 and C{min(cap, base * 2**attempts)}."""
        return self._rand.uniform(0, doubled(self._backoff_base, attempts, self._backoff_cap))

    async def _retry(self, lane: _Lane, rows: Sequence[Lease], error: str) -> None:
        """The rows' own failure: another attempt later, or, after C{max_attempts}, a dead
        letter with the platform's last message."""
        now = self._reactor.seconds()
        for attempts, group in _by_attempts(rows).items():
            if attempts + 1 >= self._max_attempts:
                await self._dead(lane, group, f"{attempts + 1} attempts failed; the last: {error}")
                continue
            await self._spool.retry(lane.name, _keys(group), now + self._backoff(attempts), error)
            self._metrics.delivery_retries.labels(lane.name).inc(len(group))

    def _pause(self, lane: _Lane, asked: float | None) -> None:
        """No new request to the destination for the delay the platform asked (clamped),
        else for a backoff that grows with each throttle since the last success."""
        delay = asked if asked is not None else self._backoff(lane.throttles)
        delay = min(max(delay, MIN_PAUSE), self._max_retry_after)
        lane.throttles += 1
        lane.paused_until = max(lane.paused_until, self._reactor.seconds() + delay)
        self._said.info(
            f"throttle {lane.name}", "{destination}: throttled, pausing for {delay:.1f} s",
            destination=lane.name, delay=delay,
        )

    def _refused(self, lane: _Lane, message: str) -> None:
        """The platform refused the destination's credentials: pause it (L{AUTH_PAUSE},
        doubling, up to the backoff cap) and say so, at error level the first time.

        A refusal that comes while such a pause runs answers a request sent before it
        began: the same refusal, neither a longer pause nor another line.
        """
        now = self._reactor.seconds()
        if lane.refusals and lane.paused_until > now:
            return
        delay = doubled(AUTH_PAUSE, lane.refusals, self._backoff_cap)
        lane.refusals += 1
        lane.paused_until = max(lane.paused_until, now + delay)
        self._hold(lane)
        self._metrics.credentials_refused.labels(lane.name).set(1)
        self._show_up(lane)
        if lane.refusals == 1:
            log.error(
                "{destination}: the platform refuses this destination's credentials, so nothing"
                " is sent to it; its events stay in the spool until the token is fixed (then reload"
                " the configuration, or restart tagd). Trying again in {delay:.0f} s. The platform said: {message}",
                destination=lane.name,
                delay=delay,
                message=message,
            )
        else:
            log.info(
                "{destination}: credentials still refused, trying again in {delay:.0f} s",
                destination=lane.name,
                delay=delay,
            )

    def _accepted(self, lane: _Lane) -> None:
        """A request went through: whatever refusal or outage there was is over."""
        if lane.refusals:
            lane.refusals = 0
            self._metrics.credentials_refused.labels(lane.name).set(0)
            log.info("{destination}: credentials accepted again, delivering", destination=lane.name)
        self._show_up(lane)

    async def _release(self, lane: _Lane, rows: Sequence[Lease]) -> None:
        await self._spool.release(lane.name, _keys(rows))

    async def _partly_delivered(self, lane: _Lane, rows: Sequence[Lease], status: int | None, verdict: Verdict) -> None:
        """The platform took some of a request's events and refused the others, each with
        its own message: the refused are dead letters at once (sending them again would
        be refused again), the rest delivered; one line says how many."""
        reasons = {index: reason for index, reason in verdict.refused if 0 <= index < len(rows)}
        delivered = [row for index, row in enumerate(rows) if index not in reasons]
        if delivered:
            self._count(lane, Outcome.SUCCESS.value, delivered, status, verdict.message)
            await lane.acks.ack(_keys(delivered))
        by_reason: dict[str, list[Lease]] = {}
        for index, reason in reasons.items():
            by_reason.setdefault(reason, []).append(rows[index])
        for reason, group in by_reason.items():
            await self._spool.dead(lane.name, _keys(group), reason)
            self._count(lane, DEAD, group, message=reason)
        if reasons:
            log.warn(
                "{destination}: the platform took {delivered} event(s) of a request and refused"
                " {count}, now dead letters; the first refusal: {reason}",
                destination=lane.name,
                delivered=len(delivered),
                count=len(reasons),
                reason=next(iter(by_reason)),
            )

    async def _dead(self, lane: _Lane, rows: Sequence[Lease], reason: str) -> None:
        await self._spool.dead(lane.name, _keys(rows), reason)
        self._count(lane, DEAD, rows, message=reason)
        log.warn(
            "{destination}: {count} event(s) dead-lettered: {reason}",
            destination=lane.name,
            count=len(rows),
            reason=reason,
        )

    def _count(
        self, lane: _Lane, outcome: str, rows: Sequence[Lease], status: int | None = None, message: str = ""
    ) -> None:
        self._outcomes.delivered(lane.name, outcome, [row.event for row in rows], status, message)
