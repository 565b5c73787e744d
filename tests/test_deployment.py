"""docs/deployment.md's "Deployment with systemd", run step by step on a real systemd.

The droplet is a Debian bookworm booted with systemd as its PID 1 in a container
(tests/container.py), one for the module.  The section's steps are its numbered headings,
and each step's C{sh} blocks are run as written, one command at a time, in order, each
step once, in root's shell inside the container: C{systemctl}, C{journalctl}, the
installed C{tagd} commands, curl, jq, tar and sed are the droplet's own.  The shop and Meta
run inside it too, as transient units (tests/droplet_servers.py); Meta is tests/fakes.py's,
over HTTPS with a certificate whose authority the droplet trusts, which the guide's
destination reaches through an C{endpoint} the test adds to the file: the only change made
to what the guide writes.

The container has no network but its loopback, so what needs one runs from the host's side,
in the container's files (L{container.Container.chroot}): C{apt-get} (step 1) and C{pip
install} (steps 3 and 13).  Step 2 runs on the reader's computer: C{git archive HEAD} is a
tar of the working tree, because the code under test must be the code checked out, changes
not yet committed included; that every file the install and the units need is tracked, so
that the reader's archive holds it too, is checked instead.  C{ssh} runs its command in the
droplet's shell.

Each step has its test (L{STEPS}); a test first runs the steps before its own that have not
run yet, so any one of them can run alone.  The tests after the steps check for real what
the unit promises (docs/deployment.md, "How the unit works"): the watchdog, restarts,
stops, a start that fails, the hardening and the journal.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from certificates import authority_and_localhost
from helpers import BROWSER_UA, REPO_ROOT, copy_checkout, spool_rows, wait_until

SECTION = "## Deployment with systemd\n"

# What the reader types at a step: the token, in step 5.
META_TOKEN = "EAAdeploymentTestToken"
TYPED = {"Put the token in a root-only file": META_TOKEN + "\n"}

# Steps that no later step builds on, run only for their own test: a reader may do them at
# any time, or never.
ON_DEMAND = {"After editing the configuration"}

WAIT = 30.0  # seconds for a delivery to arrive

# Where the guide's tagd reaches its shop and Meta inside the droplet.
SHOP_PORT = 8000
META_PORT = 8443
META = "/srv/fake-meta"  # the fake's certificate, token, and state (droplet_servers.py)
TESTS = "/srv/tagd-tests"  # the test servers' code

# What step 3's install and step 7's units take from the checkout.
NEEDED_FILES = ("tagd", "twisted", "setup.cfg", "pyproject.toml", "README.md", "contrib")

# systemd's range for DynamicUser=.
DYNAMIC_IDS = range(61184, 65520)

# What docs/deployment.md says `systemd-analyze security tagd` rates the unit.
SECURITY = re.compile(r"`systemd-analyze security tagd` rates the unit (\d+\.\d) \((\w+)\)")


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


class Droplet:
    """The guide's droplet: a booted container (L{container.Container}) that the steps run
    in, with the shop and Meta's fake inside it once tagd's venv exists (from step 3)."""

    def __init__(self, container) -> None:
        self.container = container
        self.steps = readme_steps()
        self.done: list[str] = []
        self.outputs: dict[str, list[str]] = {}
        self.serving = False  # the shop and Meta
        self.units: list[str] = ["tagd"]  # the guide's, then those the failure tests add

    def path(self, absolute: str) -> Path:
        return self.container.path(absolute)

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
        if title == "Install tagd into /opt/tagd" and not self.serving:
            self.serve_shop_and_meta()
            self.serving = True
        if title == "Write the configuration":
            self.point_at_fake_meta()

    def run(self, command: str, typed: str = "") -> str:
        """One command as the guide writes it, on this droplet (see the module's docstring
        for those that need the network or the reader's computer); its output."""
        words = shlex.split(command.partition("\n")[0].partition("<<")[0])
        program = next(word for word in words if not re.fullmatch(r"\w+=.*", word))
        if program == "ssh":
            return self.ssh(words, typed.encode())
        if program == "git":
            return self.git_archive(words)
        if program == "apt-get" or program.endswith("/bin/pip"):
            return self.on_the_network(command)
        return self.container.run(command, input=typed).stdout

    def on_the_network(self, command: str) -> str:
        result = self.container.chroot(command)
        output = result.stdout.decode(errors="replace")
        assert result.returncode == 0, f"{command}\nexit status {result.returncode}:\n{output}{result.stderr.decode(errors='replace')}"
        return output

    def ssh(self, words: list[str], stdin: bytes) -> str:
        """C{ssh root@HOST 'COMMAND'}: the command in the droplet's shell."""
        [_, host, remote] = words
        assert host.startswith("root@"), "the steps run as root"
        return self.container.run(remote, input=stdin).stdout

    def git_archive(self, words: list[str]) -> str:
        """C{git archive --prefix=P/ HEAD | ssh ...}: a tar of the working tree under C{P/},
        the checkout as C{git archive} would give it, into the ssh command's input."""
        pipe = words.index("|")
        [_, verb, prefix, tree] = words[:pipe]
        assert (verb, tree) == ("archive", "HEAD") and prefix.startswith("--prefix=")
        with tempfile.TemporaryDirectory() as folder:
            checkout = Path(folder) / "checkout"
            copy_checkout(checkout)
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                tar.add(checkout, arcname=prefix.removeprefix("--prefix=").rstrip("/"))
        return self.ssh(words[pipe + 1 :], archive.getvalue())

    # The shop and Meta.

    def serve_shop_and_meta(self) -> None:
        """The shop on port 8000 and Meta's fake on 8443 (HTTPS), as transient units run
        with tagd's venv, and the fake's certificate authority in the droplet's trust store
        (Debian's way: update-ca-certificates)."""
        tests = self.path(TESTS)
        shutil.rmtree(tests, ignore_errors=True)
        tests.mkdir(parents=True)
        for module in ("droplet_servers.py", "helpers.py", "fakes.py"):
            shutil.copy(REPO_ROOT / "tests" / module, tests)
        meta = self.path(META)
        meta.mkdir(parents=True, exist_ok=True)
        authority = authority_and_localhost(meta)
        (meta / "token").write_text(META_TOKEN)
        self.path("/usr/local/share/ca-certificates/tagd-test-authority.crt").write_bytes(authority)
        self.container.run("update-ca-certificates")
        python = f"/opt/tagd/bin/python {TESTS}/droplet_servers.py"
        self.container.run(f"systemd-run --unit=droplet-shop {python} shop {SHOP_PORT}")
        self.container.run(f"systemd-run --unit=droplet-meta {python} meta {META_PORT} {META} 1234567890")
        wait_until(lambda: (meta / "state.json").exists(), 20, "Meta's fake serving")
        self.container.run(f"curl -sf -o /dev/null http://127.0.0.1:{SHOP_PORT}/e/ready")

    def point_at_fake_meta(self) -> None:
        """The guide's destination pointed at Meta's fake, for the guide's pixel."""
        config = self.path("/etc/tagd/tagd.toml")
        text = config.read_text()
        [destination] = tomllib.loads(text)["destinations"]
        assert destination["pixel_id"] == "1234567890"
        table = "[[destinations]]\n"
        config.write_text(text.replace(table, f'{table}endpoint = "https://localhost:{META_PORT}"\n', 1))

    def meta(self) -> dict:
        """What Meta's fake received: C{received} (the event ids of each request),
        C{delivered} (those it accepted), C{violations}."""
        return json.loads(self.path(f"{META}/state.json").read_text())

    def meta_failing(self, status: int | None) -> None:
        """Meta answers every request with C{status} from now on, or as Meta would (None)."""
        failing = self.path(f"{META}/failing")
        if status is None:
            failing.unlink(missing_ok=True)
        else:
            failing.write_text(str(status))
        time.sleep(0.2)  # the fake reads it every 0.05 s

    def visit(self, event_id: str, port: int = 8080) -> None:
        """A browser's request through tagd for a page that tracks the event C{event_id}."""
        status = self.container.run(
            f"curl -s -o /dev/null -w '%{{http_code}}' -A '{BROWSER_UA}' -H 'Host: shop.example' "
            f"http://127.0.0.1:{port}/e/{event_id}"
        ).stdout
        assert status == "200"

    def wait_asked(self, event_id: str) -> None:
        wait_until(lambda: any(event_id in ids for ids in self.meta()["received"]), WAIT, f"Meta asked for {event_id}")

    def wait_delivered(self, event_id: str) -> None:
        wait_until(lambda: event_id in self.meta()["delivered"], WAIT, f"{event_id} delivered to Meta")

    # systemd.

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        return self.container.show(unit, *properties)

    def main_pid(self, unit: str = "tagd") -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def restarted(self, unit: str, restarts: int) -> int:
        """Wait until C{unit} has been restarted after C{restarts} restarts and runs again;
        its new main pid."""

        def running_again():
            state = self.show(unit, "NRestarts", "ActiveState", "SubState", "MainPID")
            again = int(state["NRestarts"]) > restarts and (state["ActiveState"], state["SubState"]) == ("active", "running")
            return again and int(state["MainPID"])

        return wait_until(running_again, WAIT, f"{unit} restarted", interval=0.1)

    def journal(self, unit: str = "tagd") -> list[dict]:
        """The journal's entries for C{unit}, systemd's own and the service's."""
        output = self.container.run(f"journalctl -u {unit} -o json --no-pager").stdout
        return [json.loads(line) for line in output.splitlines()]

    def tagd_lines(self, unit: str = "tagd") -> list[str]:
        """What C{unit}'s processes wrote (their stdout and stderr), line by line."""
        return [e["MESSAGE"] for e in self.journal(unit) if e.get("_TRANSPORT") == "stdout"]

    def systemd_lines(self, unit: str = "tagd") -> list[str]:
        """What systemd itself said about C{unit}."""
        return [e["MESSAGE"] for e in self.journal(unit) if e.get("_TRANSPORT") != "stdout"]

    def as_tagd(self, command: str, check: bool = False):
        """C{command} as tagd's user, in tagd's own mount namespace: what the unit lets it do."""
        pid = self.main_pid()
        uid = self.container.run(f"stat -c %u /proc/{pid}").stdout.strip()
        return self.container.run(
            f"nsenter --target={pid} --mount --setuid={uid} --setgid={uid} -- sh -c {shlex.quote(command)}", check=check
        )

    def host_pid(self, unit: str = "tagd") -> int:
        """The host's number for C{unit}'s main process (from its cgroup, which holds the
        host's numbers), whose own files in /proc the test reads."""
        pid = self.main_pid(unit)
        cgroup = Path("/sys/fs/cgroup/unified") / self.container.name / f"payload/system.slice/{unit}.service/cgroup.procs"
        for host in cgroup.read_text().split():
            numbers = Path(f"/proc/{host}/status").read_text().split("NSpid:")[1].splitlines()[0].split()
            if int(numbers[-1]) == pid:
                return int(host)
        raise AssertionError(f"{unit}'s main process {pid} is not in {cgroup}")

    def held_files(self) -> list[str]:
        """The files tagd's main process holds open, as it names them."""
        pid = self.main_pid()
        targets = self.container.run(f"find /proc/{pid}/fd -type l -exec readlink {{}} +").stdout.split()
        return [target for target in targets if target.startswith("/") and not target.startswith("/dev/")]


@pytest.fixture(scope="module")
def droplet(systemd_container):
    yield Droplet(systemd_container)


def tagd_journal_entries(droplet: Droplet, unit: str) -> list[dict]:
    """Every line C{unit}'s tagd wrote, parsed: each must be JSON with a level."""
    parsed = []
    for line in droplet.tagd_lines(unit):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"{unit} wrote a line that is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and entry.get("level") in ("debug", "info", "warn", "error", "critical"), line
        parsed.append(entry)
    return parsed


def timespan(text: str) -> float:
    """Seconds in a time span as C{systemctl show} writes one (C{30s}, C{1min 30s}, C{500ms})."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|min|h)\b", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * units[u] for n, u in parts)


# -- the steps, in the guide's order -----------------------------------------------------


def test_prerequisites(droplet):
    """The packages install on Debian 12 (run with the network, in the droplet's files),
    and curl and jq, which the later steps run, are the ones these packages ship."""
    droplet.through("Install the prerequisites")
    [install] = [c for c in droplet.steps["Install the prerequisites"] if " install " in c]
    packages = {word for word in shlex.split(install)[2:] if not word.startswith("-")}
    assert "python3-venv" in packages
    for tool in ("curl", "jq"):
        owner = droplet.container.run(f"dpkg -S $(command -v {tool})").stdout
        assert owner.split(":")[0] in packages, owner


def test_copy_to_the_droplet(droplet):
    """The code lands in /usr/local/src/tagd: the source tree, without git data or builds;
    and what the install and the units need of it is tracked by git (see the module's
    docstring)."""
    droplet.through("Copy tagd to the droplet")
    source = droplet.path("/usr/local/src/tagd")
    assert (source / "setup.cfg").is_file() and (source / "contrib/systemd/tagd.service").is_file()
    assert not (source / ".git").exists() and not (source / ".venv").exists()
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: which files it tracks cannot be asked")
    tracked = subprocess.run([git, "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    copied = [
        str(path.relative_to(source))
        for top in NEEDED_FILES
        for path in ((source / top).rglob("*") if (source / top).is_dir() else [source / top])
        if path.is_file()
    ]
    assert [path for path in copied if path not in tracked] == [], "files git archive HEAD would leave out"


def test_install_into_opt(droplet):
    """The venv holds twistd and tagd, its tagd is the copy installed there, and the plugin
    cache is written."""
    droplet.through("Install tagd into /opt/tagd")
    assert droplet.path("/opt/tagd/bin/twistd").is_file() and droplet.path("/opt/tagd/bin/tagd").is_file()
    where = droplet.container.run("/opt/tagd/bin/python -c 'import tagd; print(tagd.__file__)'").stdout
    assert where.startswith("/opt/tagd/lib/python3.11/site-packages/tagd/"), where
    plugins = droplet.path("/opt/tagd/lib/python3.11/site-packages/twisted/plugins")
    assert (plugins / "dropin.cache").stat().st_mtime >= (plugins / "tagd_plugin.py").stat().st_mtime


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
    assert (token.stat().st_uid, token.stat().st_mode & 0o777) == (0, 0o600)


def test_check_config(droplet):
    """The installed C{tagd check-config} finds the token and shows its reference, never it."""
    [output] = droplet.through("Check the configuration")
    assert output.startswith("# tagd: ") and ": valid" in output.splitlines()[0]
    assert 'access_token = { credential = "meta-token" }' in output
    assert META_TOKEN not in output


def test_unit_and_drop_in(droplet):
    """The unit with the guide's drop-in passes C{systemd-analyze verify} on the droplet
    (no output at all: verify only warns of a key it does not know), and systemd reads the
    credential from the drop-in."""
    droplet.through("Install the unit and its drop-in")
    droplet.container.run("systemctl daemon-reload")
    verify = droplet.container.run("systemd-analyze verify /etc/systemd/system/tagd.service 2>&1")
    assert verify.stdout == ""
    assert droplet.show("tagd", "DropInPaths")["DropInPaths"] == "/etc/systemd/system/tagd.service.d/override.conf"
    assert "LoadCredential=meta-token:/etc/tagd/meta-token" in droplet.container.run("systemctl cat tagd").stdout


def test_start(droplet):
    """C{Type=notify}: C{systemctl enable --now} returns once tagd said READY=1 and its
    status, so the admin port answers at once; C{DynamicUser=}, C{StateDirectory=},
    C{LoadCredential=} and C{LimitNOFILE=} as the unit says."""
    droplet.through("Start tagd")
    healthz = droplet.container.run("curl -s 127.0.0.1:9100/healthz").stdout  # no retry
    assert healthz == "ok\n"
    assert droplet.container.run("curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8080/").stdout == "200"
    state = droplet.show("tagd", "ActiveState", "SubState", "StatusText", "Type", "NotifyAccess", "UnitFileState", "MainPID")
    assert state["ActiveState"] == "active" and state["SubState"] == "running", state
    assert (state["Type"], state["NotifyAccess"], state["StatusText"]) == ("notify", "main", "serving")
    assert state["UnitFileState"] == "enabled"
    pid = droplet.host_pid()
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    [uid] = set(status["Uid"].split())
    assert int(uid) in DYNAMIC_IDS and set(status["Gid"].split()) == {uid} and status["Groups"].split() == [uid]
    assert f":{uid}:" not in droplet.path("/etc/passwd").read_text()  # a user no account holds

    # StateDirectory=: /var/lib/tagd, a link to the user's own folder, which holds the spool.
    assert droplet.container.run("readlink /var/lib/tagd").stdout == "private/tagd\n"
    state_dir = droplet.path("/var/lib/private/tagd")
    assert (state_dir.stat().st_uid, state_dir.stat().st_mode & 0o777) == (int(uid), 0o700)
    assert os.readlink(f"/proc/{pid}/cwd") == "/var/lib/private/tagd"
    spool = wait_until(lambda: next(state_dir.glob("*.sqlite3"), None), 5, "the spool created")
    assert (spool.stat().st_uid, spool.stat().st_mode & 0o777) == (int(uid), 0o600)

    # LoadCredential=: a copy of the token that only tagd's user can read; not in the file.
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v)
    assert environ["CREDENTIALS_DIRECTORY"] == "/run/credentials/tagd.service"
    listing = droplet.container.run("stat -c '%u %a %s' /run/credentials/tagd.service/meta-token").stdout.split()
    assert listing == [uid, "400", str(len(META_TOKEN) + 1)]
    assert META_TOKEN not in droplet.path("/etc/tagd/tagd.toml").read_text()
    assert META_TOKEN not in droplet.container.run("systemctl show tagd").stdout

    # LimitNOFILE=: room for max_connections visitors and what each may need besides.
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    [files] = [line.split()[3:5] for line in limits if line.startswith("Max open files")]
    assert files == ["8192", "8192"]


def test_check_that_it_runs(droplet):
    """status, /healthz and /metrics through the admin port; the guide's jq filters, on a
    journal that has systemd's plain lines too, print tagd's messages (the second one
    checked against the same selection made here in Python)."""
    status, healthz, metrics, messages, problems = droplet.through("Check that it runs")
    assert "Active: active (running)" in status and 'Status: "serving"' in status
    assert healthz == "ok\n"
    assert "tagd_requests_in_flight" in metrics
    assert any(line.startswith("Started tagd.service") for line in droplet.systemd_lines())
    assert "admin listener on 127.0.0.1:9100: the dashboard, /metrics, /healthz" in messages.splitlines()
    assert not [line for line in messages.splitlines() if "plugin cache" in line]
    logged = tagd_journal_entries(droplet, "tagd")
    assert problems.splitlines() == [e["text"] for e in logged if e["level"] != "info"]


def test_send_test_event(droplet):
    """The installed C{tagd send-test-event} reaches Meta over HTTPS with the token from the
    file the reader typed it into, and Meta takes the event."""
    [output] = droplet.through("Send a test event")
    assert "outcome: success" in output
    assert any(event_id.startswith("tagd-test-") for event_id in droplet.meta()["delivered"])


def test_in_front_of_the_shop(droplet):
    """The shop answers through tagd; a visitor's tracked page becomes an event that tagd,
    running as the unit runs it, delivers to Meta over HTTPS with the token systemd's
    credential holds, and that Meta finds as it documents it."""
    [code] = droplet.through("Put tagd in front of the shop")
    assert code == "200\n"
    droplet.visit("deploy-visit")
    droplet.wait_delivered("deploy-visit")
    assert droplet.meta()["violations"] == []


def test_watch_deliveries(droplet):
    """C{tagd spool status} in the state directory finds the running tagd's spool; the
    metrics count the events."""
    droplet.before("Watch the deliveries")
    droplet.visit("deploy-watched")
    droplet.wait_delivered("deploy-watched")
    status, metrics = droplet.through("Watch the deliveries")
    assert "spool /var/lib/private/tagd/tagd-spool.sqlite3" in status  # where /var/lib/tagd leads
    assert re.search(r"^meta\s+\d+\s+\d+\s+\d+\s+\d+$", status, re.M), status
    assert re.search(r'^tagd_events_delivered_total\{destination="meta",outcome="success"\} [1-9]', metrics, re.M), metrics


# -- what the unit promises, on the running droplet --------------------------------------


def test_writes_only_its_state_directory(droplet):
    """C{ProtectSystem=strict} and its family: as tagd's user, in tagd's own namespaces, the
    file system is read-only but for the state directory and a private /tmp and /var/tmp
    (C{PrivateTmp=}), home folders are gone, other processes are out of sight, and the
    files tagd holds open are all in its state directory."""
    droplet.before("Upgrade")
    for folder in ("/opt/tagd", "/etc/tagd", "/var/lib", "/usr/local", "/"):
        refused = droplet.as_tagd(f"touch {folder}/probe")
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (folder, refused.stderr)
    for folder in ("/var/lib/tagd", "/tmp", "/var/tmp"):
        droplet.as_tagd(f"touch {folder}/probe", check=True)
    assert not droplet.path("/tmp/probe").exists() and not droplet.path("/var/tmp/probe").exists()  # not the droplet's
    droplet.as_tagd("rm /var/lib/tagd/probe", check=True)
    assert droplet.as_tagd("ls /root /home").returncode != 0
    assert droplet.as_tagd("ls -d /proc/1").returncode != 0  # ProtectProc=invisible
    files = droplet.held_files()
    assert files and all(path.startswith("/var/lib/private/tagd/") for path in files), files


def test_memory_and_tasks_are_bounded_far_above_what_tagd_uses(droplet):
    """C{MemoryMax=} and C{TasksMax=} hold, and tagd, having delivered (the guide's test
    event and a visit), uses less than a quarter of either: a bound a leak meets, not a
    busy hour."""
    droplet.before("Upgrade")
    droplet.visit("deploy-bounded")
    droplet.wait_delivered("deploy-bounded")
    state = droplet.show("tagd", "MemoryMax", "TasksMax")
    assert state == {"MemoryMax": str(512 * 2**20), "TasksMax": "64"}, state
    # From the process itself: the droplet's cgroups need not account for memory or tasks.
    status = droplet.container.run(f"cat /proc/{droplet.main_pid()}/status").stdout
    threads = int(re.search(r"^Threads:\s+(\d+)$", status, re.M)[1])
    resident = int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M)[1]) * 1024
    assert threads * 4 <= 64 and resident * 4 <= 512 * 2**20, status


def test_security_exposure_is_the_documented_one(droplet):
    """C{systemd-analyze security tagd} rates the unit as docs/deployment.md says it does."""
    droplet.before("Upgrade")
    output = droplet.container.run("systemd-analyze security --no-pager tagd").stdout
    [(score, word)] = re.findall(r"Overall exposure level for tagd.service: (\d+\.\d) (\w+)", output)
    documented = SECURITY.search((REPO_ROOT / "docs" / "deployment.md").read_text())
    assert documented is not None, "docs/deployment.md does not give the unit's security rating"
    assert (score, word) == documented.groups(), output


def test_https_needs_writable_executable_memory(droplet):
    """The one hardening the unit leaves out: under C{MemoryDenyWriteExecute=yes}, Twisted's
    TLS client (pyOpenSSL's callbacks through cffi) cannot connect, so every delivery to the
    platforms would fail.  The installed C{tagd send-test-event}, run by systemd with and
    without it, reaches Meta over HTTPS only without it."""
    droplet.before("Upgrade")
    command = (
        "systemd-run --wait --pipe --quiet -p MemoryDenyWriteExecute={} -E CREDENTIALS_DIRECTORY=/etc/tagd "
        "/opt/tagd/bin/tagd send-test-event --config /etc/tagd/tagd.toml --destination meta 2>&1"
    )
    assert "outcome: success" in droplet.container.run(command.format("no")).stdout
    denied = droplet.container.run(command.format("yes"), check=False)
    assert denied.returncode != 0 and f"no answer from https://localhost:{META_PORT}/" in denied.stdout, denied.stdout
    assert "MemoryDenyWriteExecute=yes" not in droplet.path("/etc/systemd/system/tagd.service").read_text().splitlines()


def test_watchdog(droplet):
    """C{WatchdogSec=}: a tagd whose event loop turns keeps the watchdog fed; one that stops
    (SIGSTOP, a hang) misses it and is killed, and C{Restart=on-failure} starts it again.  A
    drop-in shortens the times, as a reader could, and is removed afterwards."""
    droplet.before("Upgrade")
    drop_in = droplet.path("/etc/systemd/system/tagd.service.d/watchdog.conf")
    drop_in.write_text("[Service]\nWatchdogSec=2\nTimeoutAbortSec=1\n")
    run = droplet.container.run
    run("systemctl daemon-reload && systemctl restart tagd")
    try:
        restarts = int(droplet.show("tagd", "NRestarts")["NRestarts"])
        fed = [droplet.show("tagd", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]]
        for _ in range(3):  # fed every second, half of WatchdogSec
            time.sleep(1.2)
            fed.append(droplet.show("tagd", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        assert len(set(fed)) == len(fed), fed
        assert int(droplet.show("tagd", "NRestarts")["NRestarts"]) == restarts
        hung = droplet.main_pid()
        run(f"kill -STOP {hung}")
        assert droplet.restarted("tagd", restarts) != hung
        said = droplet.systemd_lines()
        assert "tagd.service: Watchdog timeout (limit 2s)!" in said
        assert f"tagd.service: Killing process {hung} (twistd) with signal SIGABRT." in said
        assert run("curl -s 127.0.0.1:9100/healthz").stdout == "ok\n"
    finally:
        drop_in.unlink()
        run("systemctl daemon-reload && systemctl restart tagd")


def test_restart_on_failure(droplet):
    """C{Restart=on-failure}: tagd killed (SIGKILL, as by the kernel's OOM killer) is
    started again after C{RestartSec=} and finds its spool: an event Meta refused before
    the kill is delivered after it."""
    droplet.before("Upgrade")
    droplet.meta_failing(503)
    droplet.visit("deploy-crash")
    droplet.wait_asked("deploy-crash")
    restarts = int(droplet.show("tagd", "NRestarts")["NRestarts"])
    killed = droplet.main_pid()
    droplet.container.run(f"kill -9 {killed}")
    died = time.monotonic()
    assert droplet.restarted("tagd", restarts) != killed
    assert time.monotonic() - died >= 2  # RestartSec=2
    assert "tagd.service: Main process exited, code=killed, status=9/KILL" in droplet.systemd_lines()
    droplet.meta_failing(None)
    droplet.wait_delivered("deploy-crash")


def test_stop_within_its_timeout_keeps_the_spool(droplet):
    """C{systemctl stop}: tagd says STOPPING=1, drains and flushes, and exits cleanly well
    within C{TimeoutStopSec=}, its status saying it stopped; what it had not delivered is
    in the spool, and is delivered once it runs again."""
    droplet.before("Upgrade")
    droplet.meta_failing(503)
    droplet.visit("deploy-stopped")
    droplet.wait_asked("deploy-stopped")
    began = time.monotonic()
    droplet.container.run("systemctl stop tagd")
    took = time.monotonic() - began
    state = droplet.show("tagd", "ActiveState", "Result", "ExecMainStatus", "StatusText", "TimeoutStopUSec")
    assert took < timespan(state["TimeoutStopUSec"]) / 2, (took, state)
    assert (state["ActiveState"], state["Result"], state["StatusText"]) == ("inactive", "success", "stopped"), state
    rows = spool_rows(droplet.path("/var/lib/private/tagd/tagd-spool.sqlite3"))
    assert [row[:3] for row in rows if row[0] == "deploy-stopped"] == [("deploy-stopped", "meta", "pending")], rows
    droplet.meta_failing(None)
    droplet.container.run("systemctl start tagd")
    droplet.wait_delivered("deploy-stopped")


def second_unit(droplet: Droplet, name: str, service: str) -> None:
    """Unit C{name}: the guide's, with its credential and the C{[Service]} lines
    C{service} in a drop-in, and a state directory of its own."""
    unit = droplet.path(f"/etc/systemd/system/{name}.service")
    unit.write_text(droplet.path("/etc/systemd/system/tagd.service").read_text().replace("/var/lib/tagd", f"/var/lib/{name}"))
    drop_in = droplet.path(f"/etc/systemd/system/{name}.service.d/override.conf")
    drop_in.parent.mkdir(exist_ok=True)
    drop_in.write_text(f"[Service]\nLoadCredential=meta-token:/etc/tagd/meta-token\nStateDirectory=\nStateDirectory={name}\n{service}")
    droplet.container.run("systemctl daemon-reload")
    droplet.units.append(name)


def test_a_taken_port_is_one_line_a_try(droplet):
    """A second tagd on the ports the first holds fails to start: each try writes one line
    (JSON, critical, naming the port), not a traceback, and exits non-zero; systemd tries
    C{StartLimitBurst=} times and gives up."""
    droplet.before("Upgrade")
    second_unit(droplet, "tagd-second", "RestartSec=100ms\n")
    failed = droplet.container.run("systemctl start tagd-second", check=False)
    assert failed.returncode != 0
    gave_up = "tagd-second.service: Start request repeated too quickly."
    wait_until(lambda: gave_up in droplet.systemd_lines("tagd-second"), WAIT, "the start limit hit", interval=0.1)
    said = droplet.systemd_lines("tagd-second")
    tries = [line for line in said if line == "tagd-second.service: Main process exited, code=exited, status=1/FAILURE"]
    assert len(tries) == 5, said
    problems = [e for e in tagd_journal_entries(droplet, "tagd-second") if e["level"] != "info"]
    assert [e["level"] for e in problems] == ["critical"] * 5, problems
    taken = r"tagd cannot start: Couldn't listen on (any|127\.0\.0\.1):(8080|9100): \[Errno 98\] Address already in use\."
    assert all(re.fullmatch(taken, e["text"]) for e in problems), problems
    assert droplet.show("tagd", "ActiveState")["ActiveState"] == "active"


def test_a_configuration_error_is_not_restarted(droplet):
    """A configuration error exits with 78, which C{RestartPreventExitStatus=} keeps from a
    restart; the journal's last line from tagd names the file and the key, in JSON like the
    others, so that the guide's jq filters show it."""
    droplet.before("Upgrade")
    droplet.path("/etc/tagd/broken.toml").write_text('[proxy]\nlisten = 8080\n')
    exec_start = droplet.show("tagd", "ExecStart")["ExecStart"]
    assert "--config /etc/tagd/tagd.toml" in exec_start
    second_unit(droplet, "tagd-broken", "RestartSec=100ms\n")
    unit = droplet.path("/etc/systemd/system/tagd-broken.service")
    unit.write_text(unit.read_text().replace("--config /etc/tagd/tagd.toml", "--config /etc/tagd/broken.toml"))
    droplet.container.run("systemctl daemon-reload")
    assert droplet.container.run("systemctl start tagd-broken", check=False).returncode != 0
    time.sleep(1)  # ten times RestartSec
    state = droplet.show("tagd-broken", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78", "NRestarts": "0"}, state
    last = tagd_journal_entries(droplet, "tagd-broken")[-1]
    assert last["level"] == "critical"
    assert last["text"] == "tagd: configuration error in /etc/tagd/broken.toml: proxy.listen: must be a string, got int"
    filtered = droplet.container.run("journalctl -u tagd-broken -o cat | jq -rR 'fromjson? | select(.level != \"info\") | .text'").stdout
    assert filtered.splitlines()[-1] == last["text"]


def test_upgrade(droplet):
    """Step 2 again, then the upgrade: pip reinstalls tagd, the restart stops tagd cleanly
    and the restarted tagd finds its spool: an event Meta refused before the restart is
    delivered after it.  The plugin cache, written again, is one the service's user need
    not write."""
    droplet.before("Upgrade")
    droplet.meta_failing(503)
    droplet.visit("deploy-kept")
    droplet.wait_asked("deploy-kept")
    droplet.run_step("Copy tagd to the droplet")
    pid = droplet.main_pid()
    pip = droplet.through("Upgrade")[0]
    assert "Successfully installed tagd-" in pip
    assert droplet.main_pid() != pid
    assert droplet.show("tagd", "Result")["Result"] == "success"
    droplet.meta_failing(None)
    droplet.wait_delivered("deploy-kept")
    assert not [line for line in droplet.tagd_lines() if "plugin cache" in line]


def test_reload(droplet):
    """C{systemctl reload} runs the unit's C{ExecReload=}: tagd, sent SIGHUP, reads its file
    again in the same process, and says so in the journal.  What a reload changes is for
    the reload's own tests."""
    droplet.before("After editing the configuration")
    pid = droplet.main_pid()
    check, _ = droplet.through("After editing the configuration")
    assert ": valid" in check.splitlines()[0]
    assert droplet.main_pid() == pid and droplet.show("tagd", "ActiveState")["ActiveState"] == "active"
    texts = [e["text"] for e in tagd_journal_entries(droplet, "tagd")]
    assert any(text.startswith("configuration reloaded from /etc/tagd/tagd.toml") for text in texts), texts[-5:]
    assert "Reloaded tagd.service - tagd server-side tagging proxy." in droplet.systemd_lines()


def test_socket_activation(droplet):
    """The socket unit and the drop-in verify; tagd serves on the socket systemd made (an
    IPv6 one that takes IPv4 too) with visitors' IPv4 addresses intact; C{tagd
    check-config} accepts this C{listen}; and no request is lost across C{systemctl
    restart}: those made while tagd is down wait in the socket's queue."""
    droplet.through("Optional: socket activation")
    run = droplet.container.run
    assert run("systemd-analyze verify /etc/systemd/system/tagd.service /etc/systemd/system/tagd.socket 2>&1").stdout == ""
    listening = run("ss -Hltnp 'sport = :8080'").stdout
    assert "*:8080" in listening and '"systemd"' in listening and '"twistd"' in listening, listening
    droplet.visit("deploy-socket")
    droplet.wait_delivered("deploy-socket")
    check = droplet.steps["Check the configuration"][0]
    assert ": valid" in droplet.run(check).splitlines()[0]

    visitors = droplet.container.popen(
        "for i in $(seq 60); do curl -s -o /dev/null -w '%{http_code}\\n' --max-time 30 http://127.0.0.1:8080/e/restart-$i; sleep 0.05; done"
    )
    time.sleep(0.5)
    pid = droplet.main_pid()
    run("systemctl restart tagd")
    out, err = visitors.communicate(timeout=120)
    assert droplet.main_pid() != pid
    assert out.decode().split() == ["200"] * 60, err


def test_every_journal_line_of_tagd_is_json(droplet):
    """Every line the unit's tagd wrote, through every start, stop, restart, reload and
    failure above, is a JSON object with a level, which the guide's jq filters read.  Run
    alone, it makes the failures first: each unit is read, none skipped for being absent."""
    droplet.before("Upgrade")
    for unit, failure in (("tagd-second", test_a_taken_port_is_one_line_a_try),
                          ("tagd-broken", test_a_configuration_error_is_not_restarted)):  # fmt: skip
        if unit not in droplet.units:
            failure(droplet)
    read = [unit for unit in droplet.units if tagd_journal_entries(droplet, unit)]
    assert read == ["tagd", "tagd-second", "tagd-broken"]


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
