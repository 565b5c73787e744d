"""Start-up and shutdown order of tagd's services, within a deadline.

Twisted's L{MultiService} stops its children all at once.  tagd's must stop in turn: the
listener first (no new visitors), then the visitors already in flight get to finish, then
the origin connections close, and last the delivery side, whose dispatcher must release
its leased rows before the spool flushes its buffer and closes.  The whole sequence is
bounded by C{shutdown_timeout}, kept shorter than systemd's stop timeout, so that tagd
exits on its own instead of being killed: visitors get the deadline less a reserve, and
the services after them share what is left.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# A service is never given less than this, even once the deadline has passed: a spool
# that gets no time at all to flush would lose what it holds.
MIN_GRACE = 0.5


def visitor_budget(deadline: float) -> float:
    """How much of the shutdown deadline visitors in flight may take."""
    return deadline - min(2.0, deadline / 2)


class OrderedServices(MultiService):
    """Children start in the order they were added and stop in reverse, one after another."""

    def __init__(self, reactor, deadline: float) -> None:
        super().__init__()
        self._reactor = reactor
        self._deadline = deadline

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop_in_turn())

    async def _stop_in_turn(self) -> None:
        end = self._reactor.seconds() + self._deadline
        for service in reversed(list(self)):
            allowed = max(end - self._reactor.seconds(), MIN_GRACE)
            if not await self._stopped_within(service, allowed):
                log.warn(
                    "{service} did not stop within the shutdown deadline; going on",
                    service=type(service).__name__,
                )

    def _stopped_within(self, service: Service, allowed: float) -> Deferred:
        """Fires True once C{service} has stopped, or False when C{allowed} seconds pass.

        A late stop is neither cancelled nor waited for: cancelling would make it fail
        half-way (a spool cut mid-flush), and waiting would break the deadline.  Its work
        ends with the process; what the spool committed is safe on disk.
        """
        outcome: Deferred = Deferred()
        timer = self._reactor.callLater(allowed, outcome.callback, False)

        def stopped(result):
            if isinstance(result, Failure):
                log.failure("stopping {service} failed; going on", result, service=type(service).__name__)
            if timer.active():
                timer.cancel()
                outcome.callback(True)

        maybeDeferred(service.stopService).addBoth(stopped)
        return outcome


class Draining(Service):
    """Waits, on shutdown, until no visitor request is in flight, for C{budget} seconds.

    C{in_flight} is a callable giving the number of requests still being answered; it is
    polled, since a request ends at many places and shutdown is rare.  Requests still
    running when the budget is spent are cut when the reactor stops.
    """

    def __init__(self, reactor, in_flight, budget: float, poll: float = 0.05) -> None:
        self._reactor = reactor
        self._in_flight = in_flight
        self._budget = budget
        self._poll = poll

    def stopService(self) -> Deferred:
        super().stopService()
        drained: Deferred = Deferred()
        self._check(drained, self._reactor.seconds() + self._budget)
        return drained

    def _check(self, drained: Deferred, until: float) -> None:
        left = self._in_flight()
        if left == 0:
            drained.callback(None)
        elif self._reactor.seconds() >= until:
            log.warn("shutdown: {count} visitor request(s) still running are cut", count=left)
            drained.callback(None)
        else:
            self._reactor.callLater(self._poll, self._check, drained, until)
