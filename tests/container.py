"""A real systemd for tests: Debian bookworm booted in a container with systemd-nspawn.

The machines the tests run on are Debian VMs whose PID 1 is not systemd, but a systemd
still runs as PID 1 of a container.  The root file system is built once with mmdebstrap
(L{PACKAGES}, about 20 s) and kept under C{/var/cache} (outside any checkout, keyed by the
package list), then copied for each run.  The container has its own network namespace
with only a loopback, and its own cgroups: the launching process is moved into cgroups of
its own in the C{systemd} and C{unified} hierarchies first, so that nothing of it lands in
the host's root cgroups and cleanup is a few C{rmdir}s.  Commands run inside through
C{nsenter}, with the container's own PID 1 as the target; what needs the network (apt,
pip) runs from the host side, in a C{chroot} of the container's files in a mount namespace
of its own, with the host's CA bundle bound over the container's (the package registries
are reached through a proxy that only the host's bundle trusts).

Root, mmdebstrap and systemd-nspawn (Debian's C{systemd-container}) are needed; without
them L{unavailable} says which is missing, and the tests that need the container skip, or
fail where C{$TAGD_REQUIRE_SYSTEMD} is set (CI).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

# Set (CI sets it) to make a missing systemd a failure instead of a skip, so that a failed
# install cannot pass for a green run.
REQUIRED = "TAGD_REQUIRE_SYSTEMD"

SUITE = "bookworm"
# What the root file system holds beyond apt's minimum: systemd to boot, and what the
# deployment guide's steps run (python3-venv, curl, jq), and netbase for /etc/hosts and
# /etc/services, as every Debian droplet has them.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "curl", "iproute2", "jq",
    "procps", "ca-certificates", "netbase",
)  # fmt: skip

CACHE = Path("/var/cache/tagd-tests")
CGROUPS = Path("/sys/fs/cgroup")
HIERARCHIES = ("systemd", "unified")

# The PATH systemd gives a service on Debian, and the one commands run with inside.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"

BOOT_TIMEOUT = 60.0


def unavailable() -> str | None:
    """Why no container can be booted here, in one line; None when one can."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    for program, package in (("mmdebstrap", "mmdebstrap"), ("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install --no-install-recommends {package})"
    for hierarchy in HIERARCHIES:
        if not (CGROUPS / hierarchy / "cgroup.procs").exists():
            return f"no cgroup hierarchy at {CGROUPS / hierarchy}"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip the test for C{reason}, or fail it where C{$TAGD_REQUIRE_SYSTEMD} is set."""
    if os.environ.get(REQUIRED):
        pytest.fail(f"{reason}, and ${REQUIRED} requires a real systemd", pytrace=False)
    pytest.skip(reason)


def host_mirror() -> str:
    """The Debian mirror of this machine's own apt sources (the one it can reach)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def cached_rootfs() -> Path:
    """The root file system for L{PACKAGES}, built with mmdebstrap unless already cached.

    Built into a folder of its own and renamed when complete, under a lock, so that a run
    that breaks off half-way leaves nothing that a later one would take as built; one built
    for another package list is removed then.
    """
    key = hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:16]
    rootfs = CACHE / f"rootfs-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rootfs.is_dir():
            building = CACHE / f"building-{key}"
            shutil.rmtree(building, ignore_errors=True)
            result = subprocess.run(
                ["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES), SUITE, str(building), host_mirror()],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if result.returncode != 0:
                shutil.rmtree(building, ignore_errors=True)
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise ContainerError(f"mmdebstrap could not build the root file system: {last}")
            building.rename(rootfs)
            for stale in CACHE.glob("rootfs-*"):  # built for another package list
                if stale != rootfs:
                    shutil.rmtree(stale, ignore_errors=True)
    return rootfs


class ContainerError(Exception):
    """The container could not be made, booted or reached, or a command in it did not end
    in time (a boot that hangs, on a developer's machine, is a skip, not an error)."""


class Container:
    """A booted systemd in a copy of the cached root file system.

    C{root} is the container's C{/} as the host sees it: files written there are the
    container's (L{path}).  L{run} runs a command inside, as root, in the container's
    namespaces; L{chroot} runs one from the host side, with the host's network.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.log = root.parent / f"{name}.nspawn.log"
        self.nspawn: subprocess.Popen | None = None
        self.pid: int | None = None  # the container's PID 1, as the host numbers it

    @classmethod
    def create(cls) -> "Container":
        """A fresh copy of the cached root file system, not booted yet."""
        name = f"tagd-test-{uuid.uuid4().hex[:8]}"
        base = Path("/var/tmp") / name
        base.mkdir(mode=0o755)
        root = base / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(cached_rootfs()), str(root)], check=True, timeout=300)
        return cls(root, name)

    def path(self, absolute: str) -> Path:
        """Where the container's C{absolute} path is on the host."""
        return self.root / absolute.lstrip("/")

    # The host's side.

    def chroot(self, command: str, *, input: bytes = b"", env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """C{command} (bash) in the container's files, from the host side: with the host's
        network and CA bundle, in a mount namespace of its own (its C{/proc} and the bound
        bundle vanish with it), with a clean environment."""
        variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        script = (
            'mount -t proc proc "$1/proc" && mount --bind /' + CA_BUNDLE + ' "$1/' + CA_BUNDLE + '" && '
            'exec chroot "$1" env -i "${@:3}" bash -e -o pipefail -c "$2"'
        )
        argv = ["unshare", "--mount", "--propagation", "private", "--fork", "bash", "-c", script, "chroot",
                str(self.root), command, *(f"{k}={v}" for k, v in variables.items())]  # fmt: skip
        return subprocess.run(argv, input=input, capture_output=True, timeout=timeout)

    # Booting and stopping.

    def boot(self) -> None:
        """Boot systemd in the container and wait until it has started every unit."""
        for hierarchy in HIERARCHIES:
            (CGROUPS / hierarchy / self.name).mkdir()
        env = {"PATH": PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.log, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--boot", "--private-network", "--register=no",
                 "--keep-unit", f"--machine={self.name}", "--console=pipe"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=self._own_cgroups,
            )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT
        init = CGROUPS / "unified" / self.name / "payload/init.scope/cgroup.procs"
        while self.pid is None:
            self._alive_or_fail(deadline)
            pids = init.read_text().split() if init.exists() else []
            self.pid = int(pids[0]) if pids else None
            time.sleep(0.05)
        while True:
            self._alive_or_fail(deadline)
            state = self.run("systemctl is-system-running --wait", check=False, timeout=BOOT_TIMEOUT)
            answer = state.stdout.strip()
            if answer == "running":
                return
            if answer in ("degraded", "maintenance", "stopping"):
                failed = self.run("systemctl --failed --no-legend --plain", check=False).stdout.strip()
                raise ContainerError(f"the container's systemd is {answer}: {failed or self.nspawn_output()}")
            time.sleep(0.1)  # not listening yet: /run/systemd/private does not exist

    def _own_cgroups(self) -> None:
        """Run in the child before nspawn: move it into the cgroups made for it."""
        for hierarchy in HIERARCHIES:
            (CGROUPS / hierarchy / self.name / "cgroup.procs").write_text("0")

    def _alive_or_fail(self, deadline: float) -> None:
        if self.nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with status {self.nspawn.returncode}: {self.nspawn_output()}")
        if time.monotonic() > deadline:
            raise ContainerError(f"the container did not boot within {BOOT_TIMEOUT:g} s: {self.nspawn_output()}")

    def nspawn_output(self) -> str:
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return text.splitlines()[-1] if text else "no output"

    def close(self) -> None:
        """Power off (systemd's SIGRTMIN+4), wait for nspawn, and remove what the run made."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.pid is not None:
                os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        for hierarchy in HIERARCHIES:
            remove_empty(CGROUPS / hierarchy / self.name)
        # The host's /run is on disk here, and nspawn leaves its own folders behind.
        nspawn = Path("/run/systemd/nspawn")
        for left in nspawn.glob(f"*/{self.name}"):
            shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink()
        remove_empty(nspawn)
        shutil.rmtree(self.root.parent, ignore_errors=True)

    # Inside.

    def run(self, command: str, *, input: bytes | str = b"", check: bool = True, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """C{command} (bash) inside the container as root, as a login shell would run it:
        its output as text; failing unless it exits 0 when C{check}."""
        process = self.popen(command, env=env, stdin=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(input.encode() if isinstance(input, str) else input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # The whole group: nsenter's child, which runs the command, would hold the pipes.
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise ContainerError(f"{command}: still running after {timeout} s:\n{out.decode(errors='replace')}{err.decode(errors='replace')}") from None
        result = subprocess.CompletedProcess(command, process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"{command}\nexit status {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def popen(self, command: str, *, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """C{command} started inside the container as root; see L{run}."""
        variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", **(env or {})}
        argv = ["nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
                "--root", "--wd", "env", "-i", *(f"{k}={v}" for k, v in variables.items()),
                "bash", "-e", "-o", "pipefail", "-c", "cd /root\n" + command]  # fmt: skip
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(argv, **kwargs)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """C{systemctl show UNIT -p ...}: the unit's properties, as systemd reports them."""
        output = self.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def remove_empty(folder: Path) -> None:
    """Remove C{folder} and every folder below it that is empty, deepest first: a cgroup
    with processes, or a folder another run still uses, stays."""
    if not folder.is_dir():
        return
    for below in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            below.rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass


def booted() -> Container:
    """A booted container, or a skip (a failure under C{$TAGD_REQUIRE_SYSTEMD}) with one
    line naming why there can be none."""
    reason = unavailable()
    if reason is not None:
        skip_or_fail(reason)
    container, up = None, False
    try:
        container = Container.create()
        container.boot()
        up = True
    except (ContainerError, OSError, subprocess.SubprocessError) as e:
        skip_or_fail(f"no container with systemd could be booted: {e}")
    finally:
        if container is not None and not up:  # half-booted, whatever stopped it
            container.close()
    return container
