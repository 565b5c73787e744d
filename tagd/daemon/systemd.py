"""systemd's notify protocol: tell the service manager when tagd is ready, alive and stopping.

With C{Type=notify} systemd counts a unit as started only when the service says
C{READY=1}, so units ordered after tagd (and C{systemctl start} itself) wait until visitors
can really connect, and a tagd that fails to bind is a failed start rather than a unit that
looks "active" for a moment.  With C{WatchdogSec=} systemd restarts a tagd whose reactor
stops turning (a blocking call, a deadlock) even though the process is still there, which
C{Restart=on-failure} alone never notices.  C{STOPPING=1} shows C{deactivating} while the
visitors in flight drain and the spool flushes, instead of a running unit that does not
answer; C{STATUS=stopped} once they have, since systemd shows a unit's last status even
after it stopped.

The protocol is one datagram per message, C{KEY=VALUE} lines, sent to the AF_UNIX socket
named in C{$NOTIFY_SOCKET}: a path, or an abstract name written with a leading C{@}.  It is
spoken here with the standard library rather than through libsystemd bindings: it is a few
lines, and tagd then needs nothing installed beyond Python wheels.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address of C{$NOTIFY_SOCKET} as C{socket.sendto} takes it; None when unset.

    An abstract socket (C{@name}) becomes bytes starting with a NUL byte, as the kernel
    names it; a path is passed as it is.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two C{WATCHDOG=1}: half of C{$WATCHDOG_USEC}, as systemd advises, so
    that one late tick never trips the watchdog.  None when the watchdog is off, or is meant
    for another process (C{$WATCHDOG_PID} names a different pid)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class SystemdNotifier(Service):
    """Sends C{READY=1}, C{WATCHDOG=1} and C{STOPPING=1} to C{$NOTIFY_SOCKET}.

    It must be the last child of the service tree: L{OrderedServices} starts children in
    order, so its C{startService} runs after the visitor listener has bound its port (a
    bind failure raises out of the listener's start, and C{READY=1} is never sent), and
    stops them in reverse, so its C{stopService} runs first and systemd hears C{STOPPING=1}
    before the listener closes.

    Without C{$NOTIFY_SOCKET} (tagd not run by systemd, or with another C{Type=}) it does
    nothing.  The socket is non-blocking and a failed send is logged once and otherwise
    ignored: systemd being unreachable must never stop tagd from serving.
    """

    def __init__(self, reactor, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._reactor = reactor
        self._address = notify_address(environ)
        self._named = environ.get("NOTIFY_SOCKET", "")
        pid = os.getpid() if pid is None else pid
        self._interval = watchdog_interval(environ, pid) if self._address is not None else None
        self._socket: socket.socket | None = None
        self._watchdog: LoopingCall | None = None
        self._complained = False

    def startService(self) -> None:
        super().startService()
        if self._address is None:
            return
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        except OSError as e:
            self._failed(e)
            return
        # twistd starts the services before the reactor runs; the port is bound by then,
        # but "ready" is said once the reactor can actually answer on it.
        self._reactor.callWhenRunning(self._ready)
        # The watchdog keeps ticking through shutdown (the drain may take shutdown_timeout
        # seconds, and a hung drain is worth a restart too); it ends with the reactor.
        self._reactor.addSystemEventTrigger("after", "shutdown", self._close)

    def _ready(self) -> None:
        if self._socket is None:
            return
        self.send("READY=1\nSTATUS=serving")
        if self._interval is not None and self._watchdog is None:
            self._watchdog = LoopingCall(self.send, "WATCHDOG=1")
            self._watchdog.clock = self._reactor
            self._watchdog.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._socket is not None:
            self.send("STOPPING=1\nSTATUS=shutting down: draining visitors, flushing the spool")

    def _close(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        if self._socket is not None:
            # systemd keeps a unit's last status after it stops: it must not say draining.
            self.send("STATUS=stopped")
            self._socket.close()
            self._socket = None

    def send(self, message: str) -> None:
        """Send one notification; never raises."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as e:
            self._failed(e)

    def _failed(self, error: OSError) -> None:
        # Logged once: a watchdog tick every few seconds must not flood the journal.
        if not self._complained:
            self._complained = True
            log.warn(
                "cannot notify systemd at {address}: {error}; going on without it",
                address=self._named,
                error=error.strerror or str(error),
            )
