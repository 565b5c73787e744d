"""systemd: the notify protocol against a real datagram socket, and the shipped units.

tagd runs as the unit runs it (C{twistd -n --pidfile= tagd --config FILE}) with
C{$NOTIFY_SOCKET} naming a socket this test binds, as systemd does for C{Type=notify}; what
arrives there is what systemd would hear.  The units in contrib/systemd are checked by
C{systemd-analyze verify} (Debian's C{systemd} package; see L{service_manager.require_tool}).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

import tagd.systemd
from helpers import ADMIN_TOML, REPO_ROOT, TWISTD, free_port, http_get, read_log, running
from service_manager import NotifySocket, short_socket_path, systemd_analyze_verify
from tagd.config import parse_config
from tagd.systemd import SystemdNotifier, notify_address, watchdog_interval
from tagd.tap import CONFIG_ERROR_EXIT, build_service

UNITS = REPO_ROOT / "contrib" / "systemd"
INSTALLED_TWISTD = "/opt/tagd/bin/twistd"  # where the unit expects tagd (docs/deployment.md)


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


def test_ready_watchdog_stopping(tmp_path):
    """READY=1 comes only when the port answers HTTP; WATCHDOG=1 every WATCHDOG_USEC/2;
    STOPPING=1 as soon as SIGTERM starts the shutdown, and tagd then exits cleanly."""
    manager = NotifySocket(str(short_socket_path(tmp_path)))
    port = free_port()
    config = tagd_config(tmp_path, port)
    log = tmp_path / "tagd.log"
    env = tagd_env(str(tmp_path / "notify"), WATCHDOG_USEC="200000")
    args = [TWISTD, "-n", "--pidfile=", "tagd", "--config", str(config)]
    try:
        with running(args, cwd=tmp_path, log=log, env=env) as process:
            ready = manager.wait_for("READY", 20, process, log)
            assert ready["READY"] == "1"
            # Ready means serving: the first request, made without any retry, is answered.
            status, _, _ = http_get(port)
            assert status == 502  # the origin is down; tagd itself answers

            # 0.1 s apart: about ten in a second.  Count them over a window.
            start = time.monotonic()
            while time.monotonic() - start < 1.0:
                manager.receive(0.3)
            ticks = [t for t, m in manager.messages if m.get("WATCHDOG") == "1" and t >= start]
            assert len(ticks) >= 5, manager.messages
            gaps = [b - a for a, b in zip(ticks, ticks[1:])]
            # Typically half of WATCHDOG_USEC apart (a busy test machine may delay one).
            assert sorted(gaps)[len(gaps) // 2] < 0.15, gaps

            process.send_signal(signal.SIGTERM)
            stopping = manager.wait_for("STOPPING", 10, process, log)
            assert stopping["STOPPING"] == "1"
            process.wait(15)
        text = read_log(log)
        assert "Server Shut Down." in text
        assert "Traceback" not in text and "cannot notify systemd" not in text
        ready_at = next(i for i, (_, m) in enumerate(manager.messages) if "READY" in m)
        assert not any("WATCHDOG" in m for _, m in manager.messages[:ready_at])
    finally:
        manager.close()


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


def test_no_ready_when_the_port_is_taken(tmp_path):
    """A tagd that cannot bind its port never says READY=1: systemd sees a failed start."""
    manager = NotifySocket(str(short_socket_path(tmp_path)))
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    log = tmp_path / "tagd.log"
    config = tagd_config(tmp_path, taken.getsockname()[1])
    args = [TWISTD, "-n", "--pidfile=", "tagd", "--config", str(config)]
    try:
        with running(args, cwd=tmp_path, log=log, env=tagd_env(str(tmp_path / "notify"))) as process:
            process.wait(20)
            assert process.returncode != 0, read_log(log)
        while manager.receive(0.2) is not None:
            pass
        assert not any("READY" in m for _, m in manager.messages), manager.messages
    finally:
        taken.close()
        manager.close()


# -- the notifier on its own --------------------------------------------------------------


def test_without_notify_socket_nothing_happens(monkeypatch):
    """Not under systemd: no socket is opened, nothing is scheduled, nothing is logged."""

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened without $NOTIFY_SOCKET")

    monkeypatch.setattr(tagd.systemd.socket, "socket", no_socket)
    events = []
    monkeypatch.setattr(tagd.systemd, "log", Logger(observer=events.append))
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
    monkeypatch.setattr(tagd.systemd, "log", Logger(observer=events.append))
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
    assert "--logger=tagd.logs.observer" in settings["ExecStart"]
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


def verify(tmp_path: Path, service_text: str) -> subprocess.CompletedProcess:
    """C{systemd-analyze verify} on the units copied to C{tmp_path}, with ExecStart
    pointing at the twistd under test (verify insists that the program exists)."""
    assert INSTALLED_TWISTD in service_text
    (tmp_path / "tagd.service").write_text(service_text.replace(INSTALLED_TWISTD, TWISTD))
    shutil.copy(UNITS / "tagd.socket", tmp_path / "tagd.socket")
    return systemd_analyze_verify(["tagd.service", "tagd.socket"], cwd=tmp_path)


def test_units_verify(tmp_path):
    """Every line of both units is one systemd knows (verify only warns of unknown keys,
    so any output at all fails)."""
    result = verify(tmp_path, unit_text("tagd.service"))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_units_verify_with_socket_activation(tmp_path):
    """The socket-activated variant the comments describe: Requires=/After= uncommented."""
    text = unit_text("tagd.service")
    enabled = re.sub(r"^#((Requires|After)=tagd\.socket)$", r"\1", text, flags=re.M)
    assert "\nRequires=tagd.socket\nAfter=tagd.socket\n" in enabled
    result = verify(tmp_path, enabled)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3)
    sys.exit(77)
from twisted.internet import ssl
try:
    ssl.optionsForClientTLS("graph.facebook.com").clientConnectionForTLS(None)
except MemoryError:
    sys.exit(1)
"""


def test_memory_deny_write_execute_only_if_https_survives_it():
    """MemoryDenyWriteExecute= refuses writable+executable memory; the kernel's PR_SET_MDWE
    refuses the same.  Under it, Twisted's HTTPS client (pyOpenSSL callbacks through cffi)
    cannot be built with the installed libraries, so the unit must not set it."""
    result = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, timeout=60)
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+) to try it with")
    settings = unit_text("tagd.service").splitlines()
    if result.returncode != 0:
        assert "MemoryDenyWriteExecute=yes" not in settings
