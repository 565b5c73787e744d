"""Start-up and shutdown order of tagd's services, within a deadline.

Twisted's L{MultiService} stops its children all at once.  tagd's must stop in turn: the
listener first (no new visitors), then the visitors already in flight get to finish, then
the origin connections close, and last the delivery side, whose dispatcher must release
its leased rows before the spool flushes its buffer and closes.  The whole sequence is
bounded by C{shutdown_timeout}, kept shorter than systemd's stop timeout, so that tagd
exits on its own instead of being killed.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

log = Logger()


class OrderedServices(MultiService):
    """Children start in the order they were added and stop in reverse, one after another."""

    def __init__(self, reactor, deadline: float) -> None:
        super().__init__()
        self._reactor = reactor
        self._deadline = deadline

    def stopService(self) -> Deferred:
        Service.stopService(self)
        stopping = self._stop_in_turn()
        stopping.addTimeout(self._deadline, self._reactor)
        stopping.addErrback(self._late)
        return stopping

    @inlineCallbacks
    def _stop_in_turn(self):
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service} failed; going on with shutdown", service=service)

    def _late(self, failure) -> None:
        failure.trap(TimeoutError)
        log.warn("shutdown took longer than {deadline} s; exiting anyway", deadline=self._deadline)


class Draining(Service):
    """Waits, on shutdown, until no visitor request is in flight (or the deadline passes).

    C{in_flight} is a callable giving the number of requests still being answered; it is
    polled, since a request ends at many places and shutdown is rare.
    """

    def __init__(self, reactor, in_flight, poll: float = 0.05) -> None:
        self._reactor = reactor
        self._in_flight = in_flight
        self._poll = poll

    def stopService(self) -> Deferred:
        super().stopService()
        drained: Deferred = Deferred()
        self._check(drained)
        return drained

    def _check(self, drained: Deferred) -> None:
        if drained.called:
            return
        if self._in_flight() == 0:
            drained.callback(None)
        else:
            self._reactor.callLater(self._poll, self._check, drained)
