"""Reloading the configuration on SIGHUP (C{systemctl reload tagd}), without a restart.

A restart drops every visitor's keep-alive connection and, for a moment, the port itself;
a shop owner who adds a destination or fixes a filter should not have to pay that.  So on
SIGHUP tagd reads again the file it started with (the path found at start-up, the same
command-line overrides; see L{tagd.daemon.tap.config_loader}), and applies what it can while it
serves:

  - C{[[destinations]]}: new ones start, removed ones stop (their pending rows become dead
    letters), changed ones take the new settings from their next batch on;
  - C{[tracking]}: a new tracker replaces the proxy's hook in one assignment, so a
    request is tracked wholly by the old tracker or wholly by the new one;
  - C{[delivery]}: the dispatcher takes the new settings.

The spool stays open and no connection is touched.  C{[proxy]}, C{[spool]} and C{[admin]}
are read only at start-up: when they differ, the rest is applied and the reload's one line,
a warning then, names the keys that wait for a restart.  A tagd started without
destinations has no spool and no dispatcher, so adding destinations to it also waits for
a restart.

A file tagd cannot run with changes nothing: one error line says why (the same text that
would stop start-up, naming file and key, never a secret), and
C{tagd_config_reloads_total{result="failed"}} counts it.
"""

from __future__ import annotations

import signal
from typing import Callable

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.logger import Logger

from tagd.daemon.config import Config, ConfigError
from tagd.daemon.configdiff import RESTART_TABLES, diff
from tagd.admin.metrics import Metrics
from tagd.delivery.service import Delivery
from tagd.proxy.resource import ProxyResource

log = Logger()

# What the restart warning names when destinations come to a tagd started without any.
NO_SPOOL_YET = "destinations (tagd started without any, so it has no spool yet)"


class Reloader:
    """Reads the configuration again and applies what can change while tagd serves.

    @param config: the configuration tagd started with.
    @param load: reads the configuration as start-up did; raises L{ConfigError}.
    @param proxy: the proxy resource, whose tracking hook is replaced.
    @param delivery: the delivery service; None when tagd started without destinations.
    """

    def __init__(
        self,
        *,
        config: Config,
        load: Callable[[], Config],
        proxy: ProxyResource,
        delivery: Delivery | None,
        metrics: Metrics,
    ) -> None:
        # What runs: the start-up values of RESTART_TABLES, the rest as last applied.
        self.current = config
        self._load = load
        self._proxy = proxy
        self._delivery = delivery
        self._metrics = metrics
        self._lock = DeferredLock()  # one reload at a time, in the order asked

    def reload(self) -> Deferred:
        """Reload once the reload before (if any) is done.  Never fails: every problem is
        logged and counted.  Fires once the rows of removed destinations are dead letters."""
        return self._lock.run(lambda: ensureDeferred(self._reload()))

    async def _reload(self) -> None:
        try:
            new = self._load()
        except ConfigError as e:
            self._metrics.config_reloads.labels("failed").inc()
            log.error("configuration not reloaded, the running one stays: {error}", error=str(e))
            return
        no_spool = ()
        if self._delivery is None and new.destinations:
            no_spool = (NO_SPOOL_YET,)
            new = attrs.evolve(new, destinations=())
        changes = diff(self.current, new)
        restart = changes.restart + no_spool
        applied = attrs.evolve(new, **{table: getattr(self.current, table) for table in RESTART_TABLES})
        settled = None
        if changes.reloadable and self._delivery is not None:
            if changes.delivering:
                settled = self._delivery.retarget(applied, changes.changed)
            self._proxy.on_tracking = self._delivery.tracker(applied) if applied.destinations else None
        self.current = applied
        self._metrics.config_reloads.labels("ok").inc()
        # One line per reload, a warning when keys wait for a restart, so that every reload
        # that worked is one entry beginning "configuration reloaded from" in the journal.
        parts = [changes.summary()] if changes.reloadable or not restart else []
        if restart:
            parts.append(
                f"{', '.join(restart)} changed, which tagd reads only at start-up: the running "
                "values stay until a restart (systemctl restart tagd)"
            )
        (log.warn if restart else log.info)(
            "configuration reloaded from {path}: {summary}", path=new.path, summary="; ".join(parts)
        )
        if settled is not None:
            try:
                await settled
            except Exception:
                log.failure(
                    "cannot dead-letter the rows of removed destinations now; "
                    "they are dead-lettered at the next start"
                )


class ReloadOnHangup(Service):
    """Calls L{Reloader.reload} for every SIGHUP while tagd runs.

    Neither the reactor nor twistd claims SIGHUP, in daemon mode either: the reactor
    installs handlers for SIGINT, SIGTERM (SIGBREAK on Windows) and SIGCHLD only, and
    twistd adds SIGUSR1 (to rotate a log file of its own, so never with C{--logger}) and,
    with C{--debug}, SIGUSR2.  Like the reactor's own handlers, this one only hands the work
    to the reactor with C{callFromThread}: a Python signal handler runs between any two
    bytecodes of whatever the reactor is doing, and the reload must not run in the middle
    of it.

    The handler stays installed after L{stopService}, ignoring the signal: the default
    action of SIGHUP is to end the process, which would cut the shutdown's drain short.
    """

    def __init__(self, reactor, reloader: Reloader) -> None:
        self._reactor = reactor
        self.reloader = reloader

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._received)

    def _received(self, number, frame) -> None:
        self._reactor.callFromThread(self._hangup)

    def _hangup(self) -> None:
        if not self.running:
            log.info("SIGHUP ignored: tagd is shutting down")
            return
        self.reloader.reload().addErrback(lambda failure: log.failure("configuration reload failed", failure))
