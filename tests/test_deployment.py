"""docs/deployment.md's "Deployment with systemd", run step by step on a stand-in droplet.

The section's steps are its numbered headings, and each step's C{sh} blocks are run as
written, one command at a time, in order, each step once, on one droplet for the whole
module: a temporary folder stands for the droplet's root, and every path of the droplet's
own (C{/opt/tagd}, C{/etc/tagd}, C{/var/lib/tagd}, C{/etc/systemd/system},
C{/usr/local/src}) is moved into it on the command line (files keep what the guide
writes), while the ports 8080, 9100 and 8000 become free ones everywhere.  Runs for real:
C{python3 -m venv} and C{pip install} of this checkout into the stand-in C{/opt/tagd} (the
Python the tests run on makes the venv), the installed C{tagd} commands, curl, jq, tar, sed
and the shell.  The shop is L{helpers.TrackedOrigin}; Meta is tests/fakes.py's, which the
guide's destination reaches through an C{endpoint} the test adds to the file: the only
change made to what the guide writes.

What cannot run in a container without systemd as PID 1 runs through the nearest real
thing:

 - C{systemctl}: L{service_manager.ServiceManager} does what systemd does with the unit files
   as the steps installed them, drop-ins included (its docstring says how): tagd runs as
   C{DynamicUser=}'s made-up user, which owns only its state and credentials, so it must
   read the 0644 configuration and cannot write the venv, as on the droplet; a tagd that
   dies or stops feeding the watchdog is restarted.  The steps that install units also pass
   C{systemd-analyze verify --root} on the droplet;
 - what needs systemd's namespaces and filters is not applied: C{ProtectSystem=strict}
   (which would make the venv read-only even to root), C{ProtectHome=}, C{PrivateTmp=},
   C{PrivateDevices=}, the other C{Protect*}/C{Restrict*} settings,
   C{CapabilityBoundingSet=}, C{NoNewPrivileges=} and C{SystemCallArchitectures=}; the
   state directory is a plain folder, not C{/var/lib/private/tagd};
 - C{journalctl -u tagd -o cat}: what the stand-in collected from tagd's stdout and stderr,
   with systemd's own lines about the unit, piped into the guide's jq filters;
 - C{apt-get}: C{update} is left to this machine's package lists, C{install} is run with
   C{--simulate}, and the programs the later steps use must come from those packages;
   C{python3} is this machine's (L{droplet_python});
 - step 2 runs on the reader's computer: C{git archive HEAD} is a tar of the working tree,
   because the code under test must be the code checked out, changes not yet committed
   included, which are what a developer tests; that every file the install and the units
   need is tracked, so that the reader's archive holds it too, is checked instead.  C{ssh}
   runs its command in the droplet's shell, here.

Each step has its test (L{STEPS}); a test first runs the steps before its own that have not
run yet, so any one of them can run alone.  curl, jq and systemd-analyze must be installed:
without them the tests skip, or fail where C{$TAGD_REQUIRE_SYSTEMD} is set (CI).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest

from helpers import REPO_ROOT, TrackedOrigin, browser_get, copy_checkout, free_port, http_get, wait_until
from service_manager import ServiceManager, UnitError, require_tool, seconds, systemd_analyze_verify

SECTION = "## Deployment with systemd\n"
DROPLET_PATHS = ("/opt/tagd", "/etc/tagd", "/var/lib/tagd", "/etc/systemd/system", "/usr/local/src")
GUIDE_PORTS = (8080, 9100, 8000)  # the visitors', the admin listener's, the shop's

# What the reader types at a step: the token, in step 5.
META_TOKEN = "EAAdeploymentTestToken"
TYPED = {"Put the token in a root-only file": META_TOKEN + "\n"}

# Steps that no later step builds on, run only for their own test: a reader may do them at
# any time, or never.
ON_DEMAND = {"After editing the configuration"}

WAIT = 30.0  # seconds for a delivery to arrive

NOBODY = 65534  # Debian's nobody and nogroup

# What step 3's install and step 7's units take from the checkout.
NEEDED_FILES = ("tagd", "twisted", "setup.cfg", "pyproject.toml", "README.md", "contrib")


def readme_steps() -> dict[str, list[str]]:
    """The numbered steps of docs/deployment.md, in order: title -> commands.

    A command is a line of an C{sh} block, or a line with its here-document.  A block
    outside a numbered step, or a step out of sequence, is an error: every command of the
    section must be in a step that has its test.
    """
    text = (REPO_ROOT / "docs" / "deployment.md").read_text()
    section = text[text.index(SECTION) + len(SECTION) :]
    section = section[: section.find("\n## ")]
    steps: dict[str, list[str]] = {}
    for number, part in enumerate(re.split(r"^### ", section, flags=re.M)[1:], 1):
        heading, _, body = part.partition("\n")
        blocks = re.findall(r"^```sh\n(.*?)^```$", body, flags=re.M | re.S)
        step = re.fullmatch(rf"{number}\. (.+)", heading)
        if step is None:
            assert not blocks, f"commands under {heading!r}, which is not step {number}"
            continue
        steps[step.group(1)] = [command for block in blocks for command in commands(block)]
    return steps


def commands(block: str) -> list[str]:
    """The commands of a shell block: its lines, a here-document joined to its line."""
    lines = block.splitlines()
    found = []
    while lines:
        line = lines.pop(0)
        if not line.strip():
            continue
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            end = lines.index(heredoc.group(1))
            line = "\n".join([line, *lines[: end + 1]])
            del lines[: end + 1]
        found.append(line)
    return found


def droplet_python() -> Path:
    """The python3 that step 3 makes /opt/tagd with: the one the tests run on (its
    installation's, not the tests' virtual environment), or, where a user other than root
    cannot run that one (a Python in root's home), Debian's, which a droplet has.  The venv
    keeps running its python3, as the service's made-up user."""
    for python in (Path(sys.base_prefix) / "bin/python3", Path("/usr/bin/python3")):
        try:
            subprocess.run([python, "-I", "-c", "import venv"], check=True, timeout=30, user=NOBODY, group=NOBODY, extra_groups=[])
        except (OSError, subprocess.CalledProcessError):
            continue
        return python
    pytest.fail("no python3 with venv here that a user other than root may run")


class Droplet:
    """A fresh Debian droplet in a folder: the guide's steps run in it, its systemd is a
    L{ServiceManager}, its shop a L{TrackedOrigin}, and Meta a fake (from step 4 on)."""

    def __init__(self, root: Path, origin: TrackedOrigin) -> None:
        self.root = root
        for folder in ("etc/systemd/system", "usr/local/src", "opt", "var/lib", "root"):
            (root / folder).mkdir(parents=True)
        self.origin = origin
        self.ports = dict(zip(GUIDE_PORTS, (free_port(), free_port(), origin.port)))
        self.manager = ServiceManager(root, DROPLET_PATHS, self.ports)
        self.steps = readme_steps()
        self.done: list[str] = []
        self.outputs: dict[str, list[str]] = {}
        self.meta = None  # a helpers.ThreadedPlatform
        # The reader's shell: root's, with a python3 of this machine's (see droplet_python)
        # and nothing that would steer tagd.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TAGD_", "CREDENTIALS_", "NOTIFY_"))}
        self.env["PATH"] = f"{droplet_python().parent}:{os.environ['PATH']}"
        self.env["HOME"] = str(root / "root")

    @property
    def proxy_port(self) -> int:
        return self.ports[8080]

    @property
    def admin_port(self) -> int:
        return self.ports[9100]

    def path(self, absolute: str) -> Path:
        return self.manager.path(absolute)

    # Running the steps.

    def through(self, title: str) -> list[str]:
        """Run every step up to C{title} that has not run (but the L{ON_DEMAND} ones before
        it); the outputs of C{title}'s commands."""
        self.before(title)
        if title not in self.done:
            self.run_step(title)
        return self.outputs[title]

    def before(self, title: str) -> None:
        """Run every step before C{title} that has not run, but the L{ON_DEMAND} ones."""
        for step in list(self.steps)[: list(self.steps).index(title)]:
            if step not in self.done and step not in ON_DEMAND:
                self.run_step(step)

    def run_step(self, title: str) -> None:
        self.outputs[title] = [self.run(command, TYPED.get(title, "")) for command in self.steps[title]]
        self.done.append(title)
        if title == "Write the configuration":
            self.point_at_fake_meta()

    def run(self, command: str, typed: str = "") -> str:
        """One command as the guide writes it, on this droplet; its output."""
        head, newline, document = command.partition("\n")
        command = self.moved_ports(self.manager.inside(head) + newline + document)
        words = shlex.split(command.partition("\n")[0].partition("<<")[0])
        program = next(word for word in words if not re.fullmatch(r"\w+=.*", word))
        stand_in = getattr(self, "stand_in_" + program.replace("-", "_"), None)
        try:
            if stand_in is not None:
                return stand_in(words, command, typed.encode())
            return self.shell(command, typed.encode())
        except UnitError as e:
            raise AssertionError(f"{command}: {e}") from None

    def moved_ports(self, text: str) -> str:
        ports = "|".join(map(str, GUIDE_PORTS))
        return re.sub(rf"(?<=:)({ports})\b", lambda m: str(self.ports[int(m.group(1))]), text)

    def shell(self, command: str, stdin: bytes = b"") -> str:
        """C{command} in the droplet's shell (bash, as root logs in); fails unless it exits 0."""
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=self.root / "root", env=self.env, input=stdin, capture_output=True, timeout=300,
        )  # fmt: skip
        output = result.stdout.decode(errors="replace")
        assert result.returncode == 0, f"{command}\nexit status {result.returncode}:\n{output}{result.stderr.decode(errors='replace')}"
        return output

    # The stand-ins, named after the program they stand in for.

    def stand_in_apt_get(self, words: list[str], command: str, stdin: bytes) -> str:
        """C{update}: this machine's package lists stand in for fresh ones; C{install}: a
        dry run of the same command, which resolves the names against those lists."""
        if words[1] == "update":
            return ""
        require_tool("apt-get")
        result = subprocess.run([*words[:2], "--simulate", *words[2:]], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def stand_in_ssh(self, words: list[str], command: str, stdin: bytes) -> str:
        """C{ssh root@HOST 'COMMAND'}: the command in the droplet's shell."""
        [_, host, remote] = words
        assert host.startswith("root@"), "the steps run as root"
        return self.shell(remote, stdin)

    def stand_in_git(self, words: list[str], command: str, stdin: bytes) -> str:
        """C{git archive --prefix=P/ HEAD | ssh ...}: a tar of the working tree under C{P/},
        the checkout as C{git archive} would give it, into the ssh command's input."""
        pipe = words.index("|")
        [_, verb, prefix, tree] = words[:pipe]
        assert (verb, tree) == ("archive", "HEAD") and prefix.startswith("--prefix=")
        tree = self.root / "checkout"
        copy_checkout(tree)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(tree, arcname=prefix.removeprefix("--prefix=").rstrip("/"))
        shutil.rmtree(tree)
        return self.stand_in_ssh(words[pipe + 1 :], command, archive.getvalue())

    def stand_in_systemctl(self, words: list[str], command: str, stdin: bytes) -> str:
        verb, *args = words[1:]
        units = [arg for arg in args if not arg.startswith("-")]
        if verb == "daemon-reload":
            self.manager.daemon_reload()
        elif verb == "enable":
            for unit in units:
                self.manager.enable(unit)
            for unit in units if "--now" in args else ():
                self.manager.start(unit)
        elif verb == "status":
            return "\n".join(self.manager.status(unit) for unit in units)
        else:
            for unit in units:
                getattr(self.manager, verb)(unit)
        return ""

    def stand_in_journalctl(self, words: list[str], command: str, stdin: bytes) -> str:
        """C{journalctl -u tagd -o cat | FILTER}: the unit's journal into the filter."""
        assert words[1 : words.index("|")] == ["-u", "tagd", "-o", "cat"], words
        return self.shell(command.partition("|")[2], self.manager.journal.read_bytes())

    # The platform.

    def point_at_fake_meta(self) -> None:
        """Meta's fake for the guide's pixel and the token the reader types, and the
        guide's destination pointed at it."""
        from fakes import FakeMeta
        from helpers import ThreadedPlatform

        config = self.path("/etc/tagd/tagd.toml")
        text = config.read_text()
        [destination] = tomllib.loads(text)["destinations"]
        self.meta = ThreadedPlatform("meta", FakeMeta(pixel_id=destination["pixel_id"], access_token=META_TOKEN))
        self.meta.up()
        table = "[[destinations]]\n"
        config.write_text(text.replace(table, f'{table}endpoint = "{self.meta.base}"\n', 1))

    def meta_event(self, event_id: str) -> dict:
        """The event C{event_id} as Meta received it."""
        return next(e for e in self.meta.fake.events if e.get("event_id") == event_id)

    def visit(self, event_id: str) -> None:
        """A browser's request through tagd for a page that tracks the event C{event_id}."""
        status, _, _ = browser_get(self.proxy_port, f"/e/{event_id}")
        assert status == 200

    def wait_delivered(self, event_id: str) -> None:
        wait_until(lambda: event_id in self.meta.delivered_ids(), WAIT, f"{event_id} delivered to Meta")

    def close(self) -> None:
        self.manager.close()
        if self.meta is not None:
            self.meta.close()


@pytest.fixture(scope="module")
def droplet():
    require_tool("curl")
    require_tool("jq")
    origin = TrackedOrigin()
    # Not in pytest's temporary folder, which only root may enter: the service's user must
    # reach the droplet's files, as it can on a machine whose / is 0755.
    root = Path(tempfile.mkdtemp(prefix="droplet-"))
    root.chmod(0o755)
    droplet = Droplet(root, origin)
    try:
        yield droplet
    finally:
        droplet.close()
        origin.close()
        shutil.rmtree(root)


EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost")


def unit_verifies(droplet: Droplet, *units: str) -> None:
    """C{systemd-analyze verify} on units as installed on the droplet (and loaded by
    C{daemon-reload}), drop-ins applied: every key is known, the programs exist there, what
    they require is installed.  A program of Debian's own that a unit runs (C{/bin/kill})
    is copied into the droplet, which holds only what the steps put there."""
    for name in units:
        for key in EXEC_KEYS:
            for command in droplet.manager.unit(name).all("Service", key):
                program = shlex.split(command)[0].lstrip("-@+!:")
                copy = droplet.root / program.lstrip("/")
                if droplet.path(program) == Path(program) and not copy.exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(program, copy)
    result = systemd_analyze_verify(list(units), cwd=droplet.root, root=droplet.root)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


# -- the steps, in the guide's order -----------------------------------------------------


def test_prerequisites(droplet):
    """The packages resolve on this Debian (a simulated install), and curl and jq, which the
    later steps run, are the ones these packages ship."""
    droplet.through("Install the prerequisites")
    [install] = [c for c in droplet.steps["Install the prerequisites"] if " install " in c]
    packages = {word for word in shlex.split(install)[2:] if not word.startswith("-")}
    assert "python3-venv" in packages
    for tool in ("curl", "jq"):
        owner = subprocess.run([require_tool("dpkg"), "-S", require_tool(tool)], capture_output=True, text=True)
        assert owner.stdout.split(":")[0] in packages, owner.stdout + owner.stderr


def test_copy_to_the_droplet(droplet):
    """The code lands in /usr/local/src/tagd: the source tree, without git data or builds;
    and what the install and the units need of it is tracked by git (see the module's
    docstring)."""
    droplet.through("Copy tagd to the droplet")
    source = droplet.path("/usr/local/src/tagd")
    assert (source / "setup.cfg").is_file() and (source / "contrib/systemd/tagd.service").is_file()
    assert not (source / ".git").exists() and not (source / ".venv").exists()
    tracked = subprocess.run(
        [require_tool("git"), "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    copied = [
        str(path.relative_to(source))
        for top in NEEDED_FILES
        for path in ((source / top).rglob("*") if (source / top).is_dir() else [source / top])
        if path.is_file()
    ]
    assert [path for path in copied if path not in tracked] == [], "files git archive HEAD would leave out"


def test_install_into_opt(droplet):
    """The venv holds twistd and tagd, and its tagd is the copy installed there, not the
    checkout the tests import."""
    droplet.through("Install tagd into /opt/tagd")
    bin = droplet.path("/opt/tagd/bin")
    assert (bin / "twistd").is_file() and (bin / "tagd").is_file()
    where = subprocess.run([bin / "python", "-c", "import tagd; print(tagd.__file__)"], capture_output=True, text=True, cwd="/")
    assert where.stdout.startswith(str(droplet.path("/opt/tagd/lib"))), where.stdout + where.stderr
    [plugins] = droplet.path("/opt/tagd/lib").glob("python3*/site-packages/twisted/plugins")
    assert (plugins / "dropin.cache").stat().st_mtime >= (plugins / "tagd_plugin.py").stat().st_mtime


def writable_by_others(folder: Path) -> list[Path]:
    """What in C{folder} a user other than root may change."""
    found = []
    for directory, folders, files in os.walk(folder):
        for path in (Path(directory), *(Path(directory) / name for name in files)):
            stat = path.lstat()
            if not path.is_symlink() and (stat.st_uid != 0 or stat.st_mode & 0o022):
                found.append(path)
    return found


def test_configuration(droplet):
    """The file parses, names its token by reference only, and is readable by any user."""
    droplet.through("Write the configuration")
    config = droplet.path("/etc/tagd/tagd.toml")
    values = tomllib.loads(config.read_text())
    assert values["destinations"][0]["access_token"] == {"credential": "meta-token"}
    assert values["admin"]["listen"].endswith(":interface=127.0.0.1")
    assert config.stat().st_mode & 0o777 == 0o644
    assert META_TOKEN not in config.read_text()


def test_token_file(droplet):
    """The token, as typed (with its newline), in a file only root can read."""
    droplet.through("Put the token in a root-only file")
    token = droplet.path("/etc/tagd/meta-token")
    assert token.read_text() == META_TOKEN + "\n"
    assert token.stat().st_mode & 0o777 == 0o600


def test_check_config(droplet):
    """The installed C{tagd check-config} finds the token and shows its reference, never it."""
    [output] = droplet.through("Check the configuration")
    assert output.startswith("# tagd: ") and ": valid" in output.splitlines()[0]
    assert 'access_token = { credential = "meta-token" }' in output
    assert META_TOKEN not in output


def test_unit_and_drop_in(droplet):
    """The unit with the guide's drop-in passes C{systemd-analyze verify} on the droplet,
    and the drop-in adds the credential to what the unit had."""
    droplet.through("Install the unit and its drop-in")
    droplet.manager.daemon_reload()
    unit_verifies(droplet, "tagd.service")
    unit = droplet.manager.unit("tagd")
    assert unit.all("Service", "LoadCredential") == ["meta-token:/etc/tagd/meta-token"]
    assert unit.get("Service", "Type") == "notify"


def test_start(droplet):
    """tagd says READY=1 (the stand-in's start waits for it) in its state directory, and
    its spool is there, 0600."""
    droplet.through("Start tagd")
    manager = droplet.manager
    assert manager.is_active("tagd") and "tagd.service" in manager.enabled
    pid = manager.processes["tagd.service"].pid
    state = droplet.path("/var/lib/tagd")
    assert os.readlink(f"/proc/{pid}/cwd") == str(state)
    spool = state / "tagd-spool.sqlite3"
    wait_until(spool.exists, 5, "the spool created")
    assert spool.stat().st_mode & 0o777 == 0o600

    # DynamicUser=yes: a user of its own, who owns the state and the credentials, and may
    # not change the venv; the configuration it read is root's, 0644.
    uid = manager.users["tagd.service"]
    assert uid >= 61184
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4
    assert status["Groups"].strip() == ""
    assert (state.stat().st_uid, state.stat().st_mode & 0o777) == (uid, 0o700)
    assert spool.stat().st_uid == uid
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v)
    [credential] = Path(environ["CREDENTIALS_DIRECTORY"]).iterdir()
    assert (credential.stat().st_uid, credential.stat().st_mode & 0o777) == (uid, 0o400)
    assert writable_by_others(droplet.path("/opt/tagd")) == []
    config = droplet.path("/etc/tagd/tagd.toml").stat()
    assert (config.st_uid, config.st_mode & 0o777) == (0, 0o644)
    # LimitNOFILE=: room for max_connections visitors and what each may need besides.
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    [files] = [line.split()[3:5] for line in limits if line.startswith("Max open files")]
    assert files == [manager.unit("tagd").get("Service", "LimitNOFILE")] * 2


def test_check_that_it_runs(droplet):
    """status, /healthz and /metrics through the admin port; the guide's jq filters on a
    journal with systemd's plain lines in it print tagd's messages (the second one checked
    against the same selection made here in Python)."""
    status, healthz, metrics, messages, problems = droplet.through("Check that it runs")
    assert "Active: active (running)" in status and 'Status: "serving"' in status
    assert healthz == "ok\n"
    assert "tagd_requests_in_flight" in metrics
    journal = droplet.manager.journal.read_text().splitlines()
    assert any(line.startswith("Started tagd.service") for line in journal)
    assert not [line for line in journal if "plugin cache" in line]
    assert f"admin listener on 127.0.0.1:{droplet.admin_port}: the dashboard, /metrics, /healthz" in messages.splitlines()
    logged = [json.loads(line) for line in journal if line.startswith("{")]
    assert problems.splitlines() == [e["text"] for e in logged if e["level"] != "info"]


def test_send_test_event(droplet):
    """The installed C{tagd send-test-event} reaches Meta with the token from the file the
    reader typed it into, and Meta takes the event."""
    [output] = droplet.through("Send a test event")
    assert "outcome: success" in output
    assert any(event_id.startswith("tagd-test-") for event_id in droplet.meta.delivered_ids())


def test_in_front_of_the_shop(droplet):
    """The shop answers through tagd; a visitor's tracked page becomes an event that tagd,
    running as the unit runs it, delivers to Meta with the token systemd's credential holds."""
    [code] = droplet.through("Put tagd in front of the shop")
    assert code == "200\n"
    droplet.visit("deploy-visit")
    droplet.wait_delivered("deploy-visit")
    assert droplet.meta_event("deploy-visit")["user_data"]["client_ip_address"] == "127.0.0.1"


def test_watch_deliveries(droplet):
    """C{tagd spool status} in the state directory finds the running tagd's spool; the
    metrics count the events."""
    droplet.before("Watch the deliveries")
    droplet.visit("deploy-watched")
    droplet.wait_delivered("deploy-watched")
    status, metrics = droplet.through("Watch the deliveries")
    assert f"spool {droplet.path('/var/lib/tagd/tagd-spool.sqlite3')}" in status
    assert re.search(r"^meta\s+\d+\s+\d+\s+\d+\s+\d+$", status, re.M), status
    assert re.search(r'^tagd_events_delivered_total\{destination="meta",outcome="success"\} [1-9]', metrics, re.M), metrics


def test_restart_on_failure(droplet):
    """C{Restart=on-failure}: tagd killed (SIGKILL, as by the kernel's OOM killer) is
    started again after C{RestartSec=}, says READY=1 again and serves, and finds its spool:
    an event Meta refused before the kill is delivered after it."""
    droplet.before("Upgrade")
    manager = droplet.manager
    droplet.meta.failing = 503
    droplet.visit("deploy-crash")
    wait_until(lambda: any("deploy-crash" in ids for ids in droplet.meta.received), WAIT, "Meta asked")
    killed = manager.processes["tagd.service"]
    os.kill(killed.pid, signal.SIGKILL)
    died = time.monotonic()
    wait_until(lambda: manager.is_active("tagd") and manager.processes["tagd.service"] is not killed, WAIT, "tagd restarted")
    assert manager.failures[-1] == ("tagd.service", "signal", -signal.SIGKILL)
    assert manager.started_at["tagd.service"] - died >= seconds(manager.unit("tagd").get("Service", "RestartSec"))
    assert http_get(droplet.admin_port, "/healthz")[0] == 200
    droplet.meta.failing = None
    droplet.wait_delivered("deploy-crash")


def test_watchdog(droplet):
    """C{WatchdogSec=}: a tagd whose event loop turns keeps the watchdog fed; one that stops
    (SIGSTOP, a hang) misses it and gets SIGABRT, which a stopped process leaves pending,
    then SIGKILL after C{TimeoutAbortSec=}, and C{Restart=on-failure} starts tagd again.
    A drop-in shortens both times, as a reader could, and is removed afterwards."""
    droplet.before("Upgrade")
    manager = droplet.manager
    drop_in = droplet.path("/etc/systemd/system/tagd.service.d/watchdog.conf")
    drop_in.write_text("[Service]\nWatchdogSec=3\nTimeoutAbortSec=1\n")
    manager.daemon_reload()
    manager.restart("tagd")
    try:
        failures = len(manager.failures)
        time.sleep(4)
        assert len(manager.failures) == failures and manager.is_active("tagd")
        hung = manager.processes["tagd.service"]
        os.kill(hung.pid, signal.SIGSTOP)
        wait_until(lambda: manager.is_active("tagd") and manager.processes["tagd.service"] is not hung, WAIT, "tagd restarted")
        assert manager.failures[failures:] == [("tagd.service", "watchdog", -signal.SIGKILL)]
        assert http_get(droplet.admin_port, "/healthz")[0] == 200
        journal = manager.journal.read_text()
        assert "tagd.service: Watchdog timeout (limit 3s)!" in journal
        assert f"tagd.service: Killing process {hung.pid} with signal SIGABRT." in journal
    finally:
        drop_in.unlink()
        manager.daemon_reload()
        manager.restart("tagd")


def test_upgrade(droplet):
    """Step 2 again, then the upgrade: pip reinstalls tagd, the restart stops tagd cleanly
    (STOPPING=1, within TimeoutStopSec), and the restarted tagd finds its spool: an event
    Meta refused before the restart is delivered after it.  The plugin cache, written again,
    is one the service's user need not write."""
    droplet.before("Upgrade")
    droplet.meta.failing = 503
    droplet.visit("deploy-kept")
    wait_until(lambda: any("deploy-kept" in ids for ids in droplet.meta.received), WAIT, "Meta asked")
    droplet.run_step("Copy tagd to the droplet")
    pid = droplet.manager.processes["tagd.service"].pid
    pip = droplet.through("Upgrade")[0]
    assert "Successfully installed tagd-" in pip
    name, status, took, stopping = droplet.manager.stops[-1]
    assert stopping["STOPPING"] == "1" and status in (0, -signal.SIGTERM)
    assert took < seconds(droplet.manager.unit("tagd").get("Service", "TimeoutStopSec"))
    assert droplet.manager.processes["tagd.service"].pid != pid
    droplet.meta.failing = None
    droplet.wait_delivered("deploy-kept")
    assert "plugin cache" not in droplet.manager.journal.read_text()


def test_reload(droplet):
    """C{systemctl reload} runs the unit's C{ExecReload=}: tagd, sent SIGHUP, keeps serving
    in the same process.  What a reload changes is for the reload's own tests."""
    droplet.before("After editing the configuration")
    if not droplet.manager.unit("tagd").all("Service", "ExecReload"):
        pytest.skip("tagd.service has no ExecReload= yet: systemctl reload tagd would fail")
    pid = droplet.manager.processes["tagd.service"].pid
    check, _ = droplet.through("After editing the configuration")
    assert ": valid" in check.splitlines()[0]
    assert droplet.manager.processes["tagd.service"].pid == pid and droplet.manager.is_active("tagd")
    assert http_get(droplet.admin_port, "/healthz")[0] == 200


def test_socket_activation(droplet):
    """The socket unit and the drop-in verify; tagd serves on the socket systemd made (an
    IPv6 one that takes IPv4 too, handed over as fd 3) with visitors' IPv4 addresses intact; and a
    connection made while tagd is stopped waits and is answered once it runs again.
    C{tagd check-config}, run beside the service, accepts this C{listen}."""
    droplet.through("Optional: socket activation")
    unit_verifies(droplet, "tagd.service", "tagd.socket")
    manager = droplet.manager
    pid = manager.processes["tagd.service"].pid
    listening = os.readlink(f"/proc/self/fd/{manager.sockets['tagd.socket'].fileno()}")
    assert listening in {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    droplet.visit("deploy-socket")
    droplet.wait_delivered("deploy-socket")
    assert droplet.meta_event("deploy-socket")["user_data"]["client_ip_address"] == "127.0.0.1"

    check = droplet.steps["Check the configuration"][0]
    assert ": valid" in droplet.run(check).splitlines()[0]

    manager.stop("tagd")
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(http_get(droplet.proxy_port, "/", timeout=WAIT)[0]))
    waiting.start()
    manager.start("tagd")
    waiting.join(WAIT)
    assert answers == [200]


STEPS = {
    "Install the prerequisites": test_prerequisites,
    "Copy tagd to the droplet": test_copy_to_the_droplet,
    "Install tagd into /opt/tagd": test_install_into_opt,
    "Write the configuration": test_configuration,
    "Put the token in a root-only file": test_token_file,
    "Check the configuration": test_check_config,
    "Install the unit and its drop-in": test_unit_and_drop_in,
    "Start tagd": test_start,
    "Check that it runs": test_check_that_it_runs,
    "Send a test event": test_send_test_event,
    "Put tagd in front of the shop": test_in_front_of_the_shop,
    "Watch the deliveries": test_watch_deliveries,
    "Upgrade": test_upgrade,
    "After editing the configuration": test_reload,
    "Optional: socket activation": test_socket_activation,
}


def test_every_step_has_its_test():
    """A step added to docs/deployment.md, renamed or moved, has no test until this list says so."""
    assert list(readme_steps()) == list(STEPS)
