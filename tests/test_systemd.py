"""systemd: the notify protocol on its own, and the shipped units' text.

What systemd does with tagd (READY=1 and the status, the watchdog fed and a hung tagd
killed, a port taken, the stop, the units as systemd-analyze verify reads them, and
MemoryDenyWriteExecute= breaking HTTPS) is tested on a real systemd by
tests/test_deployment.py.  What is left here is what a real systemd cannot show: the
notifier's own choices (an abstract socket, which systemd 252's is not; a watchdog meant
for another process; systemd unreachable), with a datagram socket of the test's own
standing in for systemd's, which tells what arrived from whom.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

import tagd.daemon.systemd
from helpers import ADMIN_TOML, REPO_ROOT, TWISTD, free_port, http_get, read_log, running
from tagd.daemon.config import parse_config
from tagd.daemon.systemd import SystemdNotifier, notify_address, watchdog_interval
from tagd.daemon.tap import CONFIG_ERROR_EXIT, build_service

UNITS = REPO_ROOT / "contrib" / "systemd"
INSTALLED_TWISTD = "/opt/tagd/bin/twistd"  # where the unit expects tagd (docs/deployment.md)

# struct ucred, which the kernel attaches to a datagram for a socket with SO_PASSCRED.
CREDENTIALS = struct.Struct("iII")  # pid, uid, gid


class NotifySocket:
    """The service manager's end: a bound AF_UNIX datagram socket, as systemd makes, which
    learns each sender's pid from the kernel (C{SO_PASSCRED}), as systemd does to tell the
    main process's notifications from others' (C{NotifyAccess=main})."""

    def __init__(self, address) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (arrival, fields)

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next notification, as its fields; None when none comes within C{timeout}."""
        received = self.receive_from(timeout)
        return None if received is None else received[1]

    def receive_from(self, timeout: float) -> tuple[int, dict[str, str]] | None:
        """The next notification: its sender's pid and its fields; None when none comes
        within C{timeout}."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
        except TimeoutError:
            return None
        [pid] = [CREDENTIALS.unpack(d)[0] for level, kind, d in ancillary if kind == socket.SCM_CREDENTIALS]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append((time.monotonic(), fields))
        return pid, fields

    def wait_for(self, key: str, timeout: float, process: subprocess.Popen, log: Path) -> dict[str, str]:
        """Read notifications until one carries C{key}; fail with tagd's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(min(0.2, max(deadline - time.monotonic(), 0.01)))
            if fields is not None and key in fields:
                return fields
            if fields is None and process.poll() is not None:
                break
        raise AssertionError(
            f"no {key} within {timeout} s (got {[m for _, m in self.messages]}):\n{read_log(log)}"
        )

    def close(self) -> None:
        self.sock.close()


def short_socket_path(directory: Path, name: str = "notify") -> Path:
    """A socket path in C{directory}; AF_UNIX paths hold at most 107 bytes."""
    path = directory / name
    if len(str(path).encode()) > 100:
        pytest.skip("the temporary directory's path is too long for an AF_UNIX socket")
    return path


def tagd_config(tmp_path: Path, port: int) -> Path:
    """A tagd on loopback C{port}, in front of an origin nobody needs to run (tagd answers
    502 for it, which is an answer all the same), its admin listener on a free port."""
    config = tmp_path / "tagd.toml"
    config.write_text(
        f'[proxy]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'origin = "http://127.0.0.1:{free_port()}"\n' + ADMIN_TOML
    )
    return config


def tagd_env(notify: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
    env.update(NOTIFY_SOCKET=notify, **extra)
    return env


# -- against a real tagd ------------------------------------------------------------------


def test_abstract_notify_socket(tmp_path):
    """C{$NOTIFY_SOCKET} may name an abstract socket (C{@name}), as systemd's own does."""
    name = f"tagd-test-{uuid.uuid4().hex}"
    manager = NotifySocket("\0" + name)
    port = free_port()
    log = tmp_path / "tagd.log"
    args = [TWISTD, "-n", "--pidfile=", "tagd", "--config", str(tagd_config(tmp_path, port))]
    try:
        with running(args, cwd=tmp_path, log=log, env=tagd_env("@" + name)) as process:
            assert manager.wait_for("READY", 20, process, log)["READY"] == "1"
            assert http_get(port)[0] == 502
            # No WATCHDOG_USEC: no watchdog.
            assert manager.receive(0.5) is None
    finally:
        manager.close()


# -- the notifier on its own --------------------------------------------------------------


def test_without_notify_socket_nothing_happens(monkeypatch):
    """Not under systemd: no socket is opened, nothing is scheduled, nothing is logged."""

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened without $NOTIFY_SOCKET")

    monkeypatch.setattr(tagd.daemon.systemd.socket, "socket", no_socket)
    events = []
    monkeypatch.setattr(tagd.daemon.systemd, "log", Logger(observer=events.append))
    reactor = MemoryReactorClock()
    notifier = SystemdNotifier(reactor, environ={"WATCHDOG_USEC": "200000"})
    notifier.startService()
    reactor.advance(10)
    notifier.stopService()
    assert reactor.whenRunningHooks == []
    assert not any(reactor.triggers.values())
    assert reactor.getDelayedCalls() == []
    assert events == []


def test_unreachable_socket_is_logged_once_and_never_fatal(tmp_path, monkeypatch):
    """systemd gone (no one bound at the path): tagd goes on, and says so once."""
    events = []
    monkeypatch.setattr(tagd.daemon.systemd, "log", Logger(observer=events.append))
    reactor = MemoryReactorClock()
    environ = {"NOTIFY_SOCKET": str(tmp_path / "nobody"), "WATCHDOG_USEC": "1000000"}
    notifier = SystemdNotifier(reactor, environ=environ)
    notifier.startService()
    for hook in reactor.whenRunningHooks:
        hook[0](*hook[1], **hook[2])
    for _ in range(20):
        reactor.advance(0.5)
    notifier.stopService()
    assert len(events) == 1
    assert "cannot notify systemd" in events[0]["log_format"]
    # The reactor's shutdown ends the watchdog and closes the socket.
    [(close, _, _)] = reactor.triggers["after"]["shutdown"]
    close()
    assert reactor.getDelayedCalls() == []


def test_watchdog_for_another_process_is_not_ours(tmp_path):
    """C{$WATCHDOG_PID} naming another pid (inherited from a parent): no WATCHDOG=1."""
    manager = NotifySocket(str(short_socket_path(tmp_path)))
    try:
        reactor = MemoryReactorClock()
        environ = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000",
                   "WATCHDOG_PID": str(os.getpid() + 1)}
        notifier = SystemdNotifier(reactor, environ=environ)
        notifier.startService()
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        reactor.advance(1)
        assert manager.receive(1)["READY"] == "1"
        assert manager.receive(0.2) is None
        notifier.stopService()
        assert manager.receive(1)["STOPPING"] == "1"
    finally:
        manager.close()


def test_the_last_status_says_stopped(tmp_path):
    """systemd keeps a unit's last status after it stops: once the reactor has shut down
    (the visitors drained, the spool flushed) it is C{stopped}, not the draining one."""
    manager = NotifySocket(str(short_socket_path(tmp_path)))
    try:
        reactor = MemoryReactorClock()
        notifier = SystemdNotifier(reactor, environ={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        notifier.startService()
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        assert manager.receive(1) == {"READY": "1", "STATUS": "serving"}
        notifier.stopService()
        assert manager.receive(1)["STATUS"].startswith("shutting down")
        [(close, _, _)] = reactor.triggers["after"]["shutdown"]
        close()
        assert manager.receive(1) == {"STATUS": "stopped"}
    finally:
        manager.close()


@pytest.mark.parametrize(
    "environ, pid, seconds",
    [
        ({}, 7, None),
        ({"WATCHDOG_USEC": "30000000"}, 7, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7, None),
        ({"WATCHDOG_USEC": "0"}, 7, None),
        ({"WATCHDOG_USEC": "soon"}, 7, None),
    ],
)
def test_watchdog_interval(environ, pid, seconds):
    assert watchdog_interval(environ, pid) == seconds


def test_notify_address():
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify/1"}) == (
        b"\0/org/freedesktop/systemd1/notify/1"
    )


def test_notifier_is_last_in_the_service_tree():
    """Last to start (after the listener has bound) and, in reverse, first to stop."""
    config = parse_config(ADMIN_TOML, "(test)")
    children = list(build_service(config, MemoryReactorClock()))
    assert isinstance(children[-1], SystemdNotifier)
    assert type(children[-2]).__name__ == "StreamServerEndpointService"


# -- the units ----------------------------------------------------------------------------


def unit_text(name: str) -> str:
    return (UNITS / name).read_text()


def test_service_unit_runs_tagd_as_documented():
    text = unit_text("tagd.service")
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith(("#", "["))
    )
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["ExecStart"].startswith(INSTALLED_TWISTD + " ")
    assert "--pidfile= " in settings["ExecStart"]
    assert "--logger=tagd.daemon.logs.observer" in settings["ExecStart"]
    assert settings["WorkingDirectory"] == "/var/lib/tagd"
    assert settings["StateDirectory"] == "tagd"
    defaults = parse_config("", "(defaults)").proxy
    # tagd's own deadline (10 s by default) must end well before systemd kills it.
    assert float(settings["TimeoutStopSec"]) > defaults.shutdown_timeout
    # Room for max_connections visitors, an origin connection for each, and the rest (the
    # spool, the platforms, the admin listener), so that tagd's own cap refuses visitors
    # before the kernel refuses it a file descriptor.
    assert int(settings["LimitNOFILE"]) >= 2 * defaults.max_connections + 1024
    assert settings["CapabilityBoundingSet"] == ""
    # A configuration error is not restarted: tagd exits with the status the unit names.
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == str(CONFIG_ERROR_EXIT)
