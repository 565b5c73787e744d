"""systemd's side of tagd, for tests: the notify socket it listens on, C{systemd-analyze
verify}, and a service manager that runs the units of a stand-in machine as systemd would.

The tests run in containers without systemd as PID 1, so nothing can ask systemd to start
tagd.  The nearest real thing is to do for tagd what systemd does for its unit, read from
the unit files as installed (drop-ins included): start C{ExecStart=} in
C{WorkingDirectory=} with the environment systemd gives a service (C{$NOTIFY_SOCKET} naming a
real datagram socket, C{$WATCHDOG_USEC}, C{$STATE_DIRECTORY}, C{$CREDENTIALS_DIRECTORY} with
the C{LoadCredential=} files copied into it, C{$LISTEN_FDS} with a socket unit's listening
socket as file descriptor 3) and the open-file limit of C{LimitNOFILE=}, count it started
at C{READY=1}, stop it with SIGTERM within C{TimeoutStopSec=}, reload it with
C{ExecReload=}, and keep its output, with systemd's own lines about the unit, as the
journal.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Mapping

import pytest

from helpers import read_log

# Set (CI sets it) to make a test fail instead of skip when a program it needs is missing,
# so that a failed install cannot pass for a green run.
REQUIRE_TOOLS = "TAGD_REQUIRE_SYSTEMD"

# The PATH systemd gives a service on Debian.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# struct ucred, which the kernel attaches to a datagram for a socket with SO_PASSCRED.
CREDENTIALS = struct.Struct("iII")  # pid, uid, gid


def require_tool(name: str) -> str:
    """The path of program C{name}; without it the test skips, or fails where
    C{$TAGD_REQUIRE_SYSTEMD} is set."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian 12 has it; .ci/run installs it)"
        if os.environ.get(REQUIRE_TOOLS):
            pytest.fail(f"{message}, and ${REQUIRE_TOOLS} requires it")
        pytest.skip(message)
    return path


def systemd_analyze_verify(units: list[str], *, cwd: Path, root: Path | None = None) -> subprocess.CompletedProcess:
    """C{systemd-analyze verify} on C{units} (files in C{cwd}, or, with C{root}, units
    installed in C{root}/etc/systemd/system with their drop-ins).

    With C{root}, every path a unit names is looked up inside it (C{ExecStart=} must exist
    there), and the units it pulls in (C{multi-user.target}, a C{Requires=}) must be in it
    too: C{root} gets a copy of this machine's own units, as a Debian machine has them.
    """
    command = [require_tool("systemd-analyze"), "verify", "--man=no"]
    if root is not None:
        shipped = root / "usr/lib/systemd/system"
        if not shipped.exists():
            shutil.copytree("/usr/lib/systemd/system", shipped, symlinks=True)
        command.append(f"--root={root}")
    return subprocess.run(
        [*command, *units], cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )  # fmt: skip


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


def seconds(span: str) -> float:
    """A systemd time span such as C{30}, C{30s}, C{500ms} or C{2min}, in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", span.strip())
    if match is None:
        raise ValueError(f"not a time span this stand-in reads: {span!r}")
    return float(match.group(1)) * {"ms": 0.001, None: 1, "s": 1, "min": 60}[match.group(2)]


class Unit:
    """A unit file and its drop-ins (C{NAME.d/*.conf}, in name order) as systemd merges them:
    a setting given again adds to a list setting or replaces a single one (L{get} takes
    the last), and an empty assignment clears what came before."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.files = [directory / name, *sorted((directory / f"{name}.d").glob("*.conf"))]
        self._settings: dict[tuple[str, str], list[str]] = {}
        section = ""
        for path in self.files:
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line[0] in "#;":
                    continue
                if line.startswith("["):
                    section = line.strip("[]")
                    continue
                key, _, value = line.partition("=")
                values = self._settings.setdefault((section, key.strip()), [])
                if value.strip():
                    values.append(value.strip())
                else:
                    values.clear()

    def all(self, section: str, key: str) -> list[str]:
        return list(self._settings.get((section, key), []))

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        values = self._settings.get((section, key))
        return values[-1] if values else default

    @property
    def description(self) -> str:
        return self.get("Unit", "Description", self.name)


class UnitError(Exception):
    """What systemctl would say, failing."""


# Run between fork and exec, as systemd does it: a listening socket becomes descriptor 3,
# the variables that name the process's own pid get it, the open-file limit is the unit's
# LimitNOFILE= (soft and hard), and the process becomes the service's user (no
# supplementary group) with systemd's default umask.
LAUNCHER = """\
import os, resource, sys
fd, uid, files = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if files >= 0:
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
if fd >= 0:
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
if "WATCHDOG_USEC" in os.environ:
    os.environ["WATCHDOG_PID"] = str(os.getpid())
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.umask(0o022)
os.execv(sys.argv[4], sys.argv[4:])
"""

# systemd's range for DynamicUser= (its uid and gid are the same number).
DYNAMIC_IDS = range(61184, 65520)

# What a service's main process may die of and still count as stopped cleanly.
CLEAN_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)


def exit_description(returncode: int) -> str:
    """How systemd words a main process's end: C{code=exited, status=1/FAILURE}."""
    if returncode >= 0:
        return f"code=exited, status={returncode}/{'SUCCESS' if returncode == 0 else 'FAILURE'}"
    number = -returncode
    return f"code=killed, status={number}/{signal.Signals(number).name.removeprefix('SIG')}"


class ServiceManager:
    """systemd on a stand-in machine: a folder C{root} holding the machine's own paths
    (C{paths}: C{/opt/tagd} is C{root/opt/tagd}, and so on), and C{ports} for the ports its
    units name (C{ListenStream=8080} binds C{ports[8080]}).  A path a unit names outside
    C{paths} is this machine's (C{/bin/kill}); what systemd itself makes (the notify socket,
    state and credential directories, the journal) is always in C{root}.

    Units are read at L{daemon_reload}, from C{root/etc/systemd/system}.  A service must be
    C{Type=notify}, as tagd's is.  C{journal} holds what the units wrote and systemd's
    lines about them, as C{journalctl -u NAME -o cat} would show.  A state directory is a
    plain folder where systemd, for a C{DynamicUser=}, links C{/var/lib/NAME} to
    C{/var/lib/private/NAME}.

    C{DynamicUser=yes} runs the service as a uid of systemd's dynamic range that no account,
    group or process has (and the gid of that number, without supplementary groups): the
    state directory and the credentials are made its own, and everything else is as the
    steps left it, so that the service can read and write only what systemd would let it
    (the namespaces of C{ProtectSystem=} and the like aside).  C{root} and its parents must
    therefore be open to other users, as a machine's C{/} is.

    As systemd does, a thread reads the notifications, and another watches the running
    services: a main process that ends by itself is a failure unless it exits 0 or dies of
    one of L{CLEAN_SIGNALS}; C{WatchdogSec=} passed without C{WATCHDOG=1} (counted from
    the start) is one too, and the process gets SIGABRT, then SIGKILL after
    C{TimeoutAbortSec=} (by default C{TimeoutStopSec=}); with C{Restart=on-failure} a failed
    service is started again after C{RestartSec=}.  One job runs at a time: a C{systemctl}
    command waits for a restart under way, as it would wait in systemd's job queue.
    """

    def __init__(self, root: Path, paths: tuple[str, ...], ports: Mapping[int, int]) -> None:
        self.root = root
        self.paths = paths
        self.ports = ports
        self._inside = re.compile(r"(?<![\w./-])(%s)(?![\w.-])" % "|".join(map(re.escape, paths)))
        # What systemd itself makes is in root, whatever C{paths} say.
        run = root / "run/systemd"
        run.mkdir(parents=True, exist_ok=True)
        self.notify_path = short_socket_path(run)
        self.notify = NotifySocket(str(self.notify_path))
        self.notify_path.chmod(0o777)  # as systemd's: any service's user may notify
        self.journal = root / "var/log/journal.log"
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.units: dict[str, Unit] = {}
        self.enabled: set[str] = set()
        self.processes: dict[str, subprocess.Popen] = {}
        self.running: set[str] = set()  # the services started and neither stopped nor failed
        self.users: dict[str, int] = {}  # DynamicUser= services' uids
        self.started_at: dict[str, float] = {}  # when each service's main process last started
        self.sockets: dict[str, socket.socket] = {}
        self.status_text: dict[str, str] = {}
        self.stops: list[tuple[str, int, float, dict[str, str]]] = []  # name, exit, seconds, notification
        self.failures: list[tuple[str, str, int]] = []  # name, result ('signal', 'watchdog'...), exit
        self.notifications: list[tuple[float, int, dict[str, str]]] = []  # arrival, pid, fields
        self._arrived = threading.Condition()
        self._job = threading.RLock()
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._receive, daemon=True), threading.Thread(target=self._supervise, daemon=True)]
        for thread in self._threads:
            thread.start()

    # The machine's paths.

    def path(self, absolute: str) -> Path:
        """Where C{absolute} is: inside C{root} if it is one of the machine's own paths."""
        return Path(self.inside(absolute))

    def inside(self, text: str) -> str:
        """C{text} with every one of the machine's own paths moved into C{root}."""
        return self._inside.sub(lambda m: str(self.root) + m.group(1), text)

    def port(self, port: str) -> int:
        return self.ports[int(port)]

    def log(self, line: str) -> None:
        """A line of systemd's own about a unit, into the journal."""
        with open(self.journal, "a") as journal:
            journal.write(line + "\n")

    # systemctl.

    @staticmethod
    def unit_name(name: str) -> str:
        return name if "." in name else name + ".service"

    def daemon_reload(self) -> None:
        directory = self.root / "etc/systemd/system"
        self.units = {p.name: Unit(directory, p.name) for p in directory.iterdir() if p.suffix in (".service", ".socket")}

    def unit(self, name: str) -> Unit:
        try:
            return self.units[self.unit_name(name)]
        except KeyError:
            raise UnitError(f"Unit {self.unit_name(name)} not found.") from None

    def enable(self, name: str) -> None:
        unit = self.unit(name)
        if not unit.all("Install", "WantedBy"):
            raise UnitError(f"{unit.name} has no [Install] section: enable would not start it at boot")
        self.enabled.add(unit.name)

    def is_active(self, name: str) -> bool:
        name = self.unit_name(name)
        if name in self.sockets:
            return True
        return name in self.running and self.processes[name].poll() is None

    def start(self, name: str) -> None:
        unit = self.unit(name)
        with self._job:
            if self.is_active(unit.name):
                return
            if unit.name.endswith(".socket"):
                self._listen(unit)
            else:
                self._start_service(unit)

    def stop(self, name: str) -> None:
        unit = self.unit(name)
        with self._job:
            if unit.name in self.sockets:
                self.sockets.pop(unit.name).close()
                self.log(f"{unit.name}: Deactivated successfully.")
            elif self.is_active(unit.name):
                self._stop_service(unit)

    def restart(self, name: str) -> None:
        with self._job:
            self.stop(name)
            self.start(name)

    def reload(self, name: str) -> None:
        """C{ExecReload=}, with C{$MAINPID} the service's pid, as systemd runs it: as the
        service's user."""
        unit = self.unit(name)
        with self._job:
            commands = unit.all("Service", "ExecReload")
            if not commands or not self.is_active(unit.name):
                raise UnitError(f"Job type reload is not applicable for unit {unit.name}.")
            pid = str(self.processes[unit.name].pid)
            uid = self.users.get(unit.name)
            self.log(f"Reloading {unit.name} - {unit.description}...")
            for command in commands:
                argv = [self.inside(word) for word in shlex.split(command.replace("${MAINPID}", pid).replace("$MAINPID", pid))]
                subprocess.run(
                    argv, check=True, env={"PATH": SERVICE_PATH, "MAINPID": pid}, timeout=30,
                    user=uid, group=uid, extra_groups=None if uid is None else [],
                )  # fmt: skip
            self.log(f"Reloaded {unit.name} - {unit.description}.")

    def status(self, name: str) -> str:
        """The lines of C{systemctl status} that say how the unit is."""
        unit = self.unit(name)
        lines = [
            f"* {unit.name} - {unit.description}",
            f"     Loaded: loaded ({unit.files[0]}; {'enabled' if unit.name in self.enabled else 'disabled'})",
            f"     Active: {'active (running)' if self.is_active(unit.name) else 'inactive (dead)'}",
        ]
        if unit.name in self.processes and self.is_active(unit.name):
            lines.append(f"   Main PID: {self.processes[unit.name].pid}")
        if unit.name in self.status_text:
            lines.append(f'     Status: "{self.status_text[unit.name]}"')
        return "\n".join(lines)

    def close(self) -> None:
        """Stop watching, stop every unit, and end the notify socket."""
        self._closing.set()
        for thread in self._threads:
            thread.join(10)
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for listening in self.sockets.values():
            listening.close()
        self.notify.close()

    # What systemd does.

    def _receive(self) -> None:
        """Keep every notification, with its sender's pid, for whoever waits for one."""
        while not self._closing.is_set():
            received = self.notify.receive_from(0.2)
            if received is not None:
                with self._arrived:
                    self.notifications.append((time.monotonic(), *received))
                    self._arrived.notify_all()

    def _last_sign(self, unit: Unit, process: subprocess.Popen) -> float:
        """When C{process} last said WATCHDOG=1, or was started if it has not yet."""
        with self._arrived:
            signs = [arrival for arrival, pid, fields in self.notifications if pid == process.pid and fields.get("WATCHDOG") == "1"]
        return max([self.started_at[unit.name], *signs])

    def _wait_for(self, unit: Unit, process: subprocess.Popen, key: str, timeout: float, since: float) -> dict[str, str]:
        """The first notification carrying C{key} from C{unit}'s main process after
        C{since}; what other processes send is ignored (C{NotifyAccess=main})."""
        deadline = since + timeout
        with self._arrived:
            while True:
                for arrival, pid, fields in self.notifications:
                    if pid == process.pid and arrival > since and key in fields:
                        return fields
                if process.poll() is not None or time.monotonic() > deadline or self._closing.is_set():
                    break
                self._arrived.wait(0.2)
        raise UnitError(f"{unit.name}: no {key} from the main process within {timeout} s:\n{read_log(self.journal)}")

    def _supervise(self) -> None:
        """Every tenth of a second, what systemd would notice about the running services."""
        while not self._closing.wait(0.1):
            with self._job:
                for name in list(self.running):
                    if not self._closing.is_set():
                        self._watch(self.units[name], self.processes[name])

    def _watch(self, unit: Unit, process: subprocess.Popen) -> None:
        """A main process that ended, or missed its watchdog, is a failure (see the class)."""
        watchdog = unit.get("Service", "WatchdogSec")
        if process.poll() is not None:
            clean = process.returncode == 0 or -process.returncode in CLEAN_SIGNALS
            self._ended(unit, process, None if clean else "exit-code" if process.returncode > 0 else "signal")
        elif watchdog and time.monotonic() - self._last_sign(unit, process) > seconds(watchdog):
            self.log(f"{unit.name}: Watchdog timeout (limit {seconds(watchdog):g}s)!")
            self.log(f"{unit.name}: Killing process {process.pid} with signal SIGABRT.")
            process.send_signal(signal.SIGABRT)
            abort = unit.get("Service", "TimeoutAbortSec") or unit.get("Service", "TimeoutStopSec", "90")
            try:
                process.wait(seconds(abort))
            except subprocess.TimeoutExpired:
                self.log(f"{unit.name}: State 'stop-watchdog' timed out. Killing.")
                process.kill()
                process.wait(10)
            self._ended(unit, process, "watchdog")

    def _ended(self, unit: Unit, process: subprocess.Popen, failure: str | None) -> None:
        """The main process is gone by itself: inactive if it ended cleanly (C{failure}
        None), else failed, and restarted after C{RestartSec=} if C{Restart=on-failure}."""
        self.running.discard(unit.name)
        self.log(f"{unit.name}: Main process exited, {exit_description(process.returncode)}")
        if failure is None:
            self.log(f"{unit.name}: Deactivated successfully.")
            return
        self.failures.append((unit.name, failure, process.returncode))
        self.log(f"{unit.name}: Failed with result '{failure}'.")
        if unit.get("Service", "Restart", "no") != "on-failure" or self._closing.wait(seconds(unit.get("Service", "RestartSec", "100ms"))):
            return
        self.log(f"{unit.name}: Scheduled restart job, restart counter is at {sum(f[0] == unit.name for f in self.failures)}.")
        self.log(f"Stopped {unit.name} - {unit.description}.")
        try:
            self._start_service(unit)
        except UnitError as e:
            self.log(str(e).partition("\n")[0])

    def _listen(self, unit: Unit) -> None:
        """Bind C{ListenStream=PORT} as systemd does: one IPv6 socket that takes IPv4 too
        (C{BindIPv6Only=default}), or an IPv4 one where the kernel has no IPv6."""
        [port] = unit.all("Socket", "ListenStream")
        if not port.isdigit():
            raise UnitError(f"this stand-in binds a bare port only, not {port!r}")
        try:
            listening = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address = ("::", self.port(port))
        except OSError:
            listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("0.0.0.0", self.port(port))
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if unit.get("Socket", "NoDelay") == "yes":
            listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listening.bind(address)
        listening.listen(socket.SOMAXCONN)
        self.sockets[unit.name] = listening
        self.log(f"Listening on {unit.name} - {unit.description}.")

    def _dynamic_user(self, unit: Unit) -> int:
        """The uid (and gid) of C{unit}'s C{DynamicUser=}: one of systemd's range that no
        account, group or process has, the same for the unit at every start, as systemd
        picks it from the unit's name."""
        if unit.name not in self.users:
            for folder in (self.root, *self.root.parents):
                if not folder.stat().st_mode & 0o001:
                    raise UnitError(f"{folder} is closed to other users: {unit.name}'s user could not reach its files")
            taken = set(self.users.values())
            for process in Path("/proc").glob("[0-9]*"):
                try:
                    taken.add(process.stat().st_uid)
                except FileNotFoundError:
                    continue
            self.users[unit.name] = next(i for i in DYNAMIC_IDS if i not in taken and not account_exists(i))
        return self.users[unit.name]

    def _environment(self, unit: Unit, uid: int | None) -> dict[str, str]:
        """What systemd puts in a service's environment (no variable of the caller's), and
        the directories it makes for the service, owned by C{uid} where there is one."""
        env = {"PATH": SERVICE_PATH, "INVOCATION_ID": uuid.uuid4().hex, "NOTIFY_SOCKET": str(self.notify_path)}
        if uid is not None:
            name = unit.name.removesuffix(".service")
            env.update(USER=name, LOGNAME=name, HOME="/", SHELL="/usr/sbin/nologin")
        watchdog = unit.get("Service", "WatchdogSec")
        if watchdog:
            env["WATCHDOG_USEC"] = str(int(seconds(watchdog) * 1_000_000))
        states = (unit.get("Service", "StateDirectory") or "").split()
        for state in states:
            directory = self.root / "var/lib" / state
            directory.mkdir(parents=True, exist_ok=True)
            if uid is not None and directory.stat().st_uid != uid:
                for path in (directory, *directory.rglob("*")):
                    os.chown(path, uid, uid, follow_symlinks=False)
            directory.chmod(int(unit.get("Service", "StateDirectoryMode", "0755"), 8))
        if states:
            env["STATE_DIRECTORY"] = ":".join(str(self.root / "var/lib" / s) for s in states)
        credentials = unit.all("Service", "LoadCredential")
        if credentials:
            directory = self.root / "run/credentials" / unit.name
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            for credential in credentials:
                name, _, source = credential.partition(":")
                if not self.path(source).is_file():
                    raise UnitError(f"{unit.name}: Failed to set up credentials: {source} does not exist")
                shutil.copyfile(self.path(source), directory / name)
                (directory / name).chmod(0o400)
            for path in (directory, *directory.iterdir()) if uid is not None else ():
                os.chown(path, uid, uid)
            directory.chmod(0o500)
            env["CREDENTIALS_DIRECTORY"] = str(directory)
        for assignments in unit.all("Service", "Environment"):
            env.update(word.split("=", 1) for word in shlex.split(assignments))
        return env

    def _start_service(self, unit: Unit) -> None:
        if unit.get("Service", "Type") != "notify":
            raise UnitError(f"this stand-in starts Type=notify services only, not {unit.name}")
        if unit.get("Service", "Restart", "no") not in ("no", "on-failure"):
            raise UnitError(f"this stand-in knows Restart=no and on-failure only, not {unit.name}'s")
        for required in unit.all("Unit", "Requires"):
            self.start(required)
        uid = self._dynamic_user(unit) if unit.get("Service", "DynamicUser") == "yes" else None
        env = self._environment(unit, uid)
        listening = self.sockets.get(unit.name.removesuffix(".service") + ".socket")
        fd = -1
        if listening is not None:
            fd = listening.fileno()
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES=unit.name.removesuffix(".service") + ".socket")
        files = unit.get("Service", "LimitNOFILE", "-1")
        if not files.lstrip("-").isdigit():
            raise UnitError(f"this stand-in reads LimitNOFILE= as one number only, not {unit.name}'s {files!r}")
        argv = [self.inside(word) for word in shlex.split(unit.get("Service", "ExecStart"))]
        cwd = self.path(unit.get("Service", "WorkingDirectory", "/"))
        self.log(f"Starting {unit.name} - {unit.description}...")
        self.started_at[unit.name] = time.monotonic()
        with open(self.journal, "ab") as journal:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", LAUNCHER, str(fd), str(-1 if uid is None else uid), files, *argv],
                cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=journal, stderr=subprocess.STDOUT,
                pass_fds=() if fd < 0 else (fd,),
            )  # fmt: skip
        self.processes[unit.name] = process
        timeout = seconds(unit.get("Service", "TimeoutStartSec", "90"))
        ready = self._wait_for(unit, process, "READY", timeout, self.started_at[unit.name])
        self.status_text[unit.name] = ready.get("STATUS", "")
        self.running.add(unit.name)
        self.log(f"Started {unit.name} - {unit.description}.")

    def _stop_service(self, unit: Unit) -> None:
        """SIGTERM, then up to C{TimeoutStopSec=} for the process to exit; a SIGTERM exit
        counts as clean, as it does for systemd."""
        self.running.discard(unit.name)
        process = self.processes[unit.name]
        timeout = seconds(unit.get("Service", "TimeoutStopSec", "90"))
        self.log(f"Stopping {unit.name} - {unit.description}...")
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stopping = self._wait_for(unit, process, "STOPPING", timeout, began)
        try:
            process.wait(max(timeout - (time.monotonic() - began), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise UnitError(f"{unit.name}: State 'stop-sigterm' timed out. Killing.") from None
        took = time.monotonic() - began
        self.stops.append((unit.name, process.returncode, took, stopping))
        if process.returncode not in (0, -signal.SIGTERM):
            raise UnitError(f"{unit.name}: Main process exited, status={process.returncode}:\n{read_log(self.journal)}")
        self.log(f"{unit.name}: Deactivated successfully.")
        self.log(f"Stopped {unit.name} - {unit.description}.")


def account_exists(number: int) -> bool:
    """Whether a user or a group of this machine has C{number}."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
            return True
        except KeyError:
            pass
    return False
