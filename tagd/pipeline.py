"""The tagging pipeline behind the proxy: tracker, spool, dispatcher.

Accepted events are written to the SQLite spool and drained by the dispatcher, so a slow
or dead platform, a restart or a crash loses nothing.  If the spool cannot be opened
(read-only disk, corrupt file), tagd still proxies every visitor and still tags, sending
events straight to the platforms, best effort, and says so loudly: a broken disk must not
take the shop down, nor turn into a restart loop under systemd.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from tagd.config import Config
from tagd.delivery import DirectDelivery, Route, http_client
from tagd.dispatcher import Dispatcher
from tagd.events import Event
from tagd.feed import Feed
from tagd.metrics import Metrics
from tagd.spool import Spool, SpoolError
from tagd.tracker import Tracker
from tagd.tracking import TrackingHook

log = Logger()

# A full queue on a busy site would otherwise log on every page view.
QUEUE_FULL_LOG_INTERVAL = 60.0


class _Delivery(Service):
    """Owns the dispatcher, the spool and the platforms' connection pool, and stops them
    in that order: leased rows are released before the spool flushes and closes."""

    def __init__(self, dispatcher: Dispatcher | None, spool: Spool | None, pool: HTTPConnectionPool) -> None:
        self._dispatcher = dispatcher
        self._spool = spool
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        if self._dispatcher is not None:
            self._dispatcher.startService()

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._dispatcher is not None:
            yield self._dispatcher.stopService()
        if self._spool is not None:
            yield self._spool.close()
        yield self._pool.closeCachedConnections()


class _Enqueue:
    """The tracker's submit: events into the spool, refusals counted and logged."""

    def __init__(self, spool: Spool, destinations: Sequence[str], metrics: Metrics, clock=time.time) -> None:
        self._spool = spool
        self._destinations = tuple(destinations)
        self._metrics = metrics
        self._clock = clock
        self._last_logged = float("-inf")

    def __call__(self, events: Sequence[Event]) -> None:
        try:
            accepted = self._spool.enqueue(events, self._destinations)
        except SpoolError:
            accepted = 0  # Closed: tagd is shutting down.
        refused = len(events) - accepted
        if refused:
            self._metrics.tracking_dropped.labels("queue_full").inc(refused)
            now = self._clock()
            if now - self._last_logged >= QUEUE_FULL_LOG_INTERVAL:
                self._last_logged = now
                log.warn(
                    "spool full or closed: {count} event(s) refused (said once a minute; see "
                    'tagd_tracking_dropped_total{{reason="queue_full"}})',
                    count=refused,
                )


def build_tagging(
    config: Config, reactor, metrics: Metrics, feed: Feed | None = None
) -> tuple[TrackingHook | None, list[Service]]:
    """The tracking hook for the proxy (None without destinations: the tracking header is
    then only removed), and the services that deliver what it accepts; both tell C{feed}
    what happens, for the dashboard."""
    if not config.destinations:
        log.info("no [[destinations]] configured: tracking headers are removed, no events sent")
        return None, []
    http, pool = http_client(reactor)
    routes = [Route(d.destination, d.timeout) for d in config.destinations]
    try:
        spool = Spool.open(
            config.spool.path,
            reactor=reactor,
            max_events=config.spool.max_events,
            flush_interval=config.spool.flush_interval,
        )
    except SpoolError as e:
        log.error(
            "{reason}; events are sent straight to the platforms, best effort, until the "
            "spool is fixed and tagd restarted",
            reason=str(e),
        )
        submit = DirectDelivery(reactor=reactor, routes=routes, http=http, metrics=metrics, feed=feed).submit
        return _tracker(config, submit, metrics, feed), [_Delivery(None, None, pool)]
    delivery = config.delivery
    dispatcher = Dispatcher(
        reactor=reactor,
        spool=spool,
        routes=routes,
        http=http,
        metrics=metrics,
        poll_interval=delivery.poll_interval,
        concurrency=delivery.concurrency,
        backoff_base=delivery.backoff_base,
        backoff_cap=delivery.backoff_cap,
        max_retry_after=delivery.max_retry_after,
        feed=feed,
    )
    names = [d.name for d in config.destinations]
    spool.on_commit = lambda: [dispatcher.wake(name) for name in names]
    submit = _Enqueue(spool, names, metrics)
    return _tracker(config, submit, metrics, feed), [_Delivery(dispatcher, spool, pool)]


def _tracker(
    config: Config, submit: Callable[[Sequence[Event]], object], metrics: Metrics, feed: Feed | None
) -> Tracker:
    """The tracker for C{config}'s tracking settings and destinations, handing events to C{submit}."""
    return Tracker(
        config=config.tracking,
        submit=submit,
        metrics=metrics,
        destination_types={d.type for d in config.destinations},
        feed=feed,
    )
