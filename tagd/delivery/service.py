"""The tagging pipeline behind the proxy: tracker, spool, dispatcher.

Accepted events are written to the SQLite spool and drained by the dispatcher, so a slow
or dead platform, a restart or a crash loses nothing.  If the spool cannot be opened
(read-only disk, corrupt file), tagd still proxies every visitor and still tags, sending
events straight to the platforms, best effort, and says so loudly: a broken disk must not
take the shop down, nor turn into a restart loop under systemd.
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tagd.daemon.config import Config
from tagd.delivery.client import PlatformAgent
from tagd.delivery.direct import DirectDelivery, Route
from tagd.delivery.dispatcher import BacklogCollector, Dispatcher
from tagd.tagging.events import Event
from tagd.admin.feed import Feed
from tagd.admin.metrics import Metrics
from tagd.delivery.outcomes import DEAD, Outcomes
from tagd.ratelimit import RateLimitedLog
from tagd.delivery.spool import Spool, SpoolError
from tagd.tagging.tracker import Tracker
from tagd.tagging.hook import TrackingHook

log = Logger()

# Why the rows of a destination that was removed from the configuration are dead letters.
ABANDONED = "destination no longer configured"
# Seconds between recounts of the spool's undelivered events from its file (see
# Spool.recount): how long dead letters that `tagd spool retry-dead` revived may go
# uncounted against [spool] max_events.  A recount of a full spool (100 000 events, three
# destinations) holds the next group commit back for some tens of milliseconds, which no
# visitor waits for.
RECOUNT_INTERVAL = 60.0
# Connections kept open to each platform, at least.
POOL_SIZE = 10


def _pool_size(config: Config) -> int:
    """Connections kept open to each platform: as many as its requests in flight, so that
    none is opened afresh (a TLS handshake) for every request of a GA4 backlog."""
    return max([POOL_SIZE, *(d.concurrency for d in config.destinations)])


class _Enqueue:
    """The tracker's submit: events into the spool, those it takes counted as accepted,
    refusals counted as dropped and logged.

    One for the life of the spool: a reload sets C{destinations}, so that an event a
    replaced tracker still hands over goes to the destinations configured now.
    """

    def __init__(
        self, spool: Spool, destinations: Sequence[str], metrics: Metrics, outcomes: Outcomes, clock=time.time
    ) -> None:
        self._spool = spool
        self.destinations = destinations
        self._metrics = metrics
        self._outcomes = outcomes
        self._warnings = RateLimitedLog(log, clock)

    @property
    def destinations(self) -> tuple[str, ...]:
        """The destinations configured now."""
        return self._destinations

    @destinations.setter
    def destinations(self, names: Sequence[str]) -> None:
        self._destinations = tuple(names)
        # By the destinations a visitor's consent allows (a handful of tuples): those of
        # them still configured, worked out once rather than for every tracked response.
        self._targets: dict[tuple[str, ...], tuple[str, ...]] = {}

    def __call__(self, events: Sequence[Event], allowed: Sequence[str]) -> None:
        """Enqueue C{events} for those of the C{allowed} destinations still configured."""
        allowed = tuple(allowed)
        targets = self._targets.get(allowed)
        if targets is None:
            targets = self._targets[allowed] = tuple(name for name in allowed if name in self._destinations)
        if not targets:
            # A reload removed every destination after these responses were tracked.
            self._metrics.tracking_dropped.labels("no_destination").inc(len(events))
            return
        try:
            accepted = self._spool.enqueue(events, targets)
        except SpoolError:
            accepted = 0  # Closed: tagd is shutting down.
        if accepted:
            self._outcomes.accepted(events[:accepted])
        refused = len(events) - accepted
        if refused:
            self._metrics.tracking_dropped.labels("queue_full").inc(refused)
            self._warnings.warn(
                "queue full",
                "spool full or closed: {count} event(s) refused (said once a minute; see "
                'tagd_tracking_dropped_total{{reason="queue_full"}})',
                count=refused,
            )


class Delivery(Service):
    """Owns the dispatcher, the spool and the platforms' connection pool, and stops them
    in that order: leased rows are released before the spool flushes and closes.

    It also holds the destinations, which L{retarget} changes while tagd runs (a
    configuration reload), and makes the trackers that hand events to them.  Without a
    spool (it could not be opened, for the reason C{unopened}) events go straight to the
    platforms instead, which its start says: only then, so that a start failing later (a
    port taken) ends with the one line that says why, not with a fallback that never was.

    While it runs, the spool recounts its undelivered events every L{RECOUNT_INTERVAL}
    seconds, so that the C{tagd spool} commands, which change the file from another
    process, cannot loosen the bound for good.
    """

    def __init__(
        self,
        *,
        reactor,
        config: Config,
        metrics: Metrics,
        spool: Spool | None,
        feed: Feed | None = None,
        unopened: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._unopened = unopened
        self._metrics = metrics
        self._outcomes = Outcomes(metrics, feed)
        self._spool = spool
        self._http = PlatformAgent(reactor, _pool_size(config))
        self._routes = {d.name: Route(d.destination, d.timeout, d.concurrency) for d in config.destinations}
        self._outcomes.configured([route.destination for route in self._routes.values()])
        self._dispatcher: Dispatcher | None = None
        self._recounting: LoopingCall | None = None
        if spool is None:
            self._submit: Callable[[Sequence[Event], Sequence[str]], object] = self._direct()
            return
        self._dispatcher = Dispatcher(
            reactor=reactor,
            spool=spool,
            routes=list(self._routes.values()),
            http=self._http,
            metrics=metrics,
            outcomes=self._outcomes,
            **attrs.asdict(config.delivery),
        )
        metrics.registry.register(BacklogCollector(self._dispatcher, reactor))
        spool.on_offer = self._wake
        self._recounting = LoopingCall(self._recount)
        self._recounting.clock = reactor
        self._enqueue = _Enqueue(spool, self._routes, metrics, self._outcomes)
        self._submit = self._enqueue

    def startService(self) -> None:
        super().startService()
        if self._unopened is not None:
            log.error(
                "{reason}; events are sent straight to the platforms, best effort, until the "
                "spool is fixed and tagd restarted",
                reason=self._unopened,
            )
        if self._dispatcher is not None:
            self._dispatcher.startService()
            ensureDeferred(self._abandon_unconfigured()).addErrback(
                lambda failure: log.failure(
                    "cannot dead-letter the rows of destinations no longer configured", failure
                )
            )
            self._recounting.start(RECOUNT_INTERVAL, now=False)

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._recounting is not None and self._recounting.running:
            self._recounting.stop()
        if self._dispatcher is not None:
            yield self._dispatcher.stopService()
        if self._spool is not None:
            yield self._spool.close()
        yield self._http.close()

    @property
    def spool(self) -> Spool | None:
        """The spool events are written to; None when it could not be opened."""
        return self._spool

    def tracker(self, config: Config) -> Tracker:
        """The tracker for C{config}'s tracking settings and destinations, handing events
        to the current destinations."""
        return Tracker(
            config=config.tracking,
            submit=self._submit,
            metrics=self._metrics,
            destinations=config.destinations,
        )

    def retarget(self, config: Config, changed: Collection[str]) -> Deferred:
        """Deliver to C{config}'s destinations from now on, with its C{[delivery]} settings.

        Destinations not in C{changed} keep their route (and their lane, with its pause).
        Events already accepted keep the destinations they were accepted for; those owed
        to a destination that is gone become dead letters once its lane has settled what
        it leased.  Fires when that is done.
        """
        self._routes = {
            d.name: attrs.evolve(self._routes[d.name], concurrency=d.concurrency)
            if d.name in self._routes and d.name not in changed
            else Route(d.destination, d.timeout, d.concurrency)
            for d in config.destinations
        }
        self._outcomes.configured([route.destination for route in self._routes.values()])
        self._http.pool_size = _pool_size(config)
        if self._dispatcher is None:
            self._submit = self._direct()
            return succeed(None)
        self._enqueue.destinations = tuple(self._routes)
        retired = self._dispatcher.reroute(list(self._routes.values()), **attrs.asdict(config.delivery))
        return ensureDeferred(self._abandon_after(retired))

    def _direct(self) -> Callable[[Sequence[Event], Sequence[str]], object]:
        """The submit of a tagd without a spool: every event is accepted, and sent at once
        to the destinations allowed."""
        direct = DirectDelivery(
            reactor=self._reactor,
            routes=list(self._routes.values()),
            http=self._http,
            outcomes=self._outcomes,
        )

        def submit(events: Sequence[Event], allowed: Sequence[str]) -> object:
            self._outcomes.accepted(events)
            return direct.submit(events, allowed)

        return submit

    def _recount(self) -> Deferred:
        """L{Spool.recount}; a failure is logged, and the next recount tries again."""
        return self._spool.recount().addErrback(
            lambda failure: log.failure("cannot recount the spool's undelivered events", failure)
        )

    def _wake(self) -> None:
        for name in self._routes:
            self._dispatcher.wake(name)

    async def _abandon_after(self, retired: Deferred) -> None:
        await retired
        await self._abandon_unconfigured()

    async def _abandon_unconfigured(self) -> None:
        """Rows owed to destinations no longer configured would wait for good, and count
        against C{[spool] max_events}: they become dead letters, counted, logged once and
        shown on the dashboard, like the dead letters of a delivery."""
        abandoned = await self._spool.abandon(list(self._routes), ABANDONED)
        for name, count in abandoned.items():
            self._outcomes.counted(name, DEAD, count, ABANDONED)
        if abandoned:
            log.warn(
                "dead-lettered the pending deliveries to destinations no longer configured "
                "({counts}); `tagd spool retry-dead --destination NAME` sends them once NAME "
                "is configured again",
                counts=", ".join(f"{name}: {count}" for name, count in sorted(abandoned.items())),
            )


def build_tagging(
    config: Config, reactor, metrics: Metrics, feed: Feed | None = None
) -> tuple[TrackingHook | None, Delivery | None]:
    """The tracking hook for the proxy (None without destinations: the tracking header is
    then only removed), and the service that delivers what it accepts (None without
    destinations, since nothing needs delivering, nor a spool); both tell C{feed} what
    happens, for the dashboard."""
    if not config.destinations:
        log.info("no [[destinations]] configured: tracking headers are removed, no events sent")
        return None, None
    spool, unopened = None, None
    try:
        spool = Spool.open(
            config.spool.path,
            reactor=reactor,
            max_events=config.spool.max_events,
            flush_interval=config.spool.flush_interval,
        )
    except SpoolError as e:
        unopened = str(e)
    delivery = Delivery(reactor=reactor, config=config, metrics=metrics, spool=spool, feed=feed, unopened=unopened)
    return delivery.tracker(config), delivery
