"""A start that fails ends tagd with one line and a non-zero exit status, never a traceback.

Under systemd a failed start is tried again (C{Restart=on-failure}, up to the unit's
C{StartLimitBurst=}), and the traceback twistd would print for a port already taken lands
in the journal as some forty lines, each a JSON line of level C{error} once twistd sends
stderr to the log: two hundred lines for one cause.  The operator needs the cause, once a
try, in the form the other lines have.  A mistake of tagd's own is told apart by the
exception's name in that line; the traceback is for a test to reproduce, not the journal.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, LegacyLogObserverWrapper, Logger, LogLevel

log = Logger()

# sysexits.h's EX_CONFIG.  A status of its own, so that systemd can tell a configuration
# error, which a restart would only repeat, from a crash (RestartPreventExitStatus=).
CONFIG_ERROR_EXIT = 78
# Any other failure to start: a restart may well succeed (the port freed).
START_FAILED_EXIT = 1


def describe(error: BaseException) -> str:
    """The cause in words: an error of the system (a port taken, a file refused) says it
    itself; anything else is a mistake, named by its type."""
    if isinstance(error, (OSError, CannotListenError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


class ExitOnFailedStart(MultiService):
    """Holds the service tree that twistd starts: an exception out of its privileged start
    (where the listeners bind) or its start is logged as one critical line, and the process
    exits with C{status} before the reactor runs.

    twistd starts both before it runs the reactor, with its logging begun, so the line has
    the form of every other one (JSON under C{--logger=tagd.daemon.logs.observer}); C{SystemExit}
    is the one exception twistd lets through without a traceback.  A pid file written by
    twistd is left, as after any exit, and taken for stale at the next start.
    """

    def __init__(self, tree: IService, status: int = START_FAILED_EXIT) -> None:
        super().__init__()
        self._status = status
        tree.setServiceParent(self)

    def privilegedStartService(self) -> None:
        self._or_exit(super().privilegedStartService)

    def startService(self) -> None:
        self._or_exit(super().startService)

    def _or_exit(self, start: Callable[[], None]) -> None:
        try:
            start()
        except Exception as e:
            log.critical("tagd cannot start: {cause}", cause=describe(e))
            raise SystemExit(self._status) from None


def exit_before_logging(options, message: str, status: int) -> None:
    """Say C{message} and exit with C{status} while twistd is still reading its options,
    before its logging begins: through the observer its C{--logger} names, so that the line
    is in the form the journal gets from tagd (one JSON object), or as one plain line on
    stderr without one (a terminal, C{twistd -ny tagd.tac})."""
    twistd = getattr(options, "parent", None)
    factory = twistd.get("logger") if twistd is not None else None
    if factory is None:
        sys.stderr.write(message + "\n")
    else:
        observer = factory()
        if not ILogObserver.providedBy(observer):
            observer = LegacyLogObserverWrapper(observer)
        observer(critical_event(message, __name__))
    raise SystemExit(status)


def critical_event(message: str, namespace: str) -> dict:
    """A log event of level critical saying C{message}, for an observer called directly
    before twistd's logging begins."""
    return {
        "log_level": LogLevel.critical, "log_namespace": namespace, "log_time": time.time(),
        "log_format": "{message}", "message": message,
    }  # fmt: skip
