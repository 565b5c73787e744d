"""A start that fails: one line and a non-zero exit status, for twistd and the demo alike.

Real processes on loopback: twistd runs tagd as the unit runs it (C{--pidfile=}, with and
without the production logger), and the demo as C{make demo} runs it, with a port they
need already taken by another socket.  What systemd makes of it (one line a try, until the
start limit) is tests/test_deployment.py's.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

import tagd.daemon.startup
from helpers import ADMIN_TOML, TWISTD, browser_get, free_port, read_log, running, tagd_up, wait_until
from tagd.daemon.logs import observer
from tagd.daemon.startup import CONFIG_ERROR_EXIT, START_FAILED_EXIT, ExitOnFailedStart, describe, exit_before_logging
from tagd.daemon.tap import Options, makeService

TAGD = Path(sys.executable).with_name("tagd")


@pytest.fixture
def taken_port():
    """A loopback port that another socket listens on."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    yield taken.getsockname()[1]
    taken.close()


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TAGD_", "NOTIFY_", "LISTEN_", "WATCHDOG_"))}


def twistd(tmp_path, config: str, *logger: str) -> subprocess.CompletedProcess:
    path = tmp_path / "tagd.toml"
    path.write_text(config)
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *logger, "tagd", "--config", str(path)],
        cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )  # fmt: skip


def proxy_on(port: int) -> str:
    return f'[proxy]\nlisten = "tcp:{port}:interface=127.0.0.1"\norigin = "http://127.0.0.1:{free_port()}"\n'


def test_taken_port_is_one_json_line(tmp_path, taken_port):
    """The visitors' port taken: under the production logger every line is JSON, one of
    them (critical) names the port and the cause, no traceback, exit status 1."""
    result = twistd(tmp_path, proxy_on(taken_port) + ADMIN_TOML, "--logger=tagd.daemon.logs.observer")
    assert result.returncode == START_FAILED_EXIT, result.stdout
    logged = [json.loads(line) for line in result.stdout.splitlines()]
    problems = [e for e in logged if e["level"] != "info"]
    assert [(e["level"], e["text"]) for e in problems] == [
        ("critical", f"tagd cannot start: Couldn't listen on 127.0.0.1:{taken_port}: [Errno 98] Address already in use.")
    ]
    assert "Traceback" not in result.stdout


def test_taken_port_is_one_line_of_text(tmp_path, taken_port):
    """Without the production logger: twistd's text lines, one of them the cause, no
    traceback.  (A taken admin port is no failure: tagd serves visitors without it.)"""
    result = twistd(tmp_path, proxy_on(taken_port) + ADMIN_TOML)
    assert result.returncode == START_FAILED_EXIT, result.stdout
    assert "Traceback" not in result.stdout
    [line] = [line for line in result.stdout.splitlines() if "#critical]" in line or "#error]" in line]
    assert line.endswith(f"[tagd.daemon.startup#critical] tagd cannot start: Couldn't listen on 127.0.0.1:{taken_port}: [Errno 98] Address already in use.")


def test_configuration_error_is_json_under_the_production_logger(tmp_path):
    """A configuration error says its one line as tagd's other lines are said (JSON for
    journald), before twistd's logging has begun, and exits with 78."""
    result = twistd(tmp_path, "[proxy]\nlisten = 5\n", "--logger=tagd.daemon.logs.observer")
    assert result.returncode == CONFIG_ERROR_EXIT, result.stdout
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["level"] == "critical"
    assert line["text"] == f"tagd: configuration error in {tmp_path / 'tagd.toml'}: proxy.listen: must be a string, got int"


def test_unknown_log_level_is_json_and_a_configuration_error(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(proxy_on(free_port()) + ADMIN_TOML)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logger=tagd.daemon.logs.observer", "tagd", "--config", str(path)],
        cwd=tmp_path, env={**environment(), "TAGD_LOG_LEVEL": "loud"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == CONFIG_ERROR_EXIT, result.stdout + result.stderr
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["level"] == "critical" and "TAGD_LOG_LEVEL='loud'" in line["text"]
    assert result.stderr == ""


def shared_folder_config(port: int) -> str:
    """A quick start's configuration: the visitors' port C{port}, the spool in the folder
    tagd runs from, a dry-run destination."""
    return proxy_on(port) + ADMIN_TOML + '[spool]\npath = "spool.sqlite3"\n[[destinations]]\ntype = "log"\n'


def test_a_second_tagd_from_the_same_folder_says_only_that_the_port_is_taken(tmp_path):
    """A second tagd started beside a running one, same spool and same port: its one
    problem line is the port's, with exit status 1; the spool it could not have is not
    mentioned, since it never ran without it.  The first one keeps serving."""
    port = free_port()
    (tmp_path / "tagd.toml").write_text(shared_folder_config(port))
    first_log = tmp_path / "first.log"
    first_args = [TWISTD, "-n", "--pidfile=", "--logger=tagd.daemon.logs.observer", "tagd", "--config", "tagd.toml"]
    with running(first_args, cwd=tmp_path, env=environment(), log=first_log) as first:
        wait_until(lambda: tagd_up(first, first_log), 20, "the first tagd up")
        result = twistd(tmp_path, shared_folder_config(port), "--logger=tagd.daemon.logs.observer")
        assert result.returncode == START_FAILED_EXIT, result.stdout
        problems = [e for e in map(json.loads, result.stdout.splitlines()) if e["level"] != "info"]
        assert [(e["level"], e["text"]) for e in problems] == [
            ("critical", f"tagd cannot start: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.")
        ]
        assert browser_get(port, "/")[0] == 502  # no origin runs, but the first tagd answers
        assert first.poll() is None


def test_a_second_tagd_on_a_port_of_its_own_says_once_that_it_runs_without_the_spool(tmp_path):
    """The same second tagd with a free port starts, and says once, as an error, that the
    spool is another process's and its events go straight to the platforms."""
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    (tmp_path / "first.toml").write_text(shared_folder_config(free_port()))
    (tmp_path / "second.toml").write_text(shared_folder_config(free_port()))
    logger = "--logger=tagd.daemon.logs.observer"
    with running([TWISTD, "-n", "--pidfile=", logger, "tagd", "--config", "first.toml"],
                 cwd=tmp_path, env=environment(), log=first_log) as first:  # fmt: skip
        wait_until(lambda: tagd_up(first, first_log), 20, "the first tagd up")
        with running([TWISTD, "-n", "--pidfile=", logger, "tagd", "--config", "second.toml"],
                     cwd=tmp_path, env=environment(), log=second_log) as second:  # fmt: skip
            wait_until(lambda: tagd_up(second, second_log), 20, "the second tagd up")
            logged = [json.loads(line) for line in read_log(second_log).splitlines()]
    [error] = [e for e in logged if e["level"] == "error"]
    assert "another process has it open" in error["text"]
    assert error["text"].endswith(
        "events are sent straight to the platforms, best effort, until the spool is fixed and tagd restarted"
    )
    assert not [e for e in logged if e["level"] == "critical"]


@pytest.mark.parametrize("taken_option", ["--port", "--shop-port"])
@pytest.mark.parametrize("command", [[sys.executable, "-m", "tagd.demo"], [str(TAGD)]], ids=["module", "tagd-demo"])
def test_demo_with_a_taken_port_is_one_line(taken_port, taken_option, command):
    """The demo with the shop's or tagd's port taken, as C{python -m tagd.demo} and as
    C{tagd demo}: one line saying so, no traceback, exit status 1."""
    ports = {"--port": free_port(), "--shop-port": free_port(), "--admin-port": free_port(), taken_option: taken_port}
    arguments = [*command, *(["demo"] if command == [str(TAGD)] else []), *(f"{k}={v}" for k, v in ports.items())]
    result = subprocess.run(
        arguments, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout
    [line] = [line for line in result.stdout.splitlines() if "cannot start" in line]
    assert line.endswith(
        f"tagd demo cannot start: Couldn't listen on 127.0.0.1:{taken_port}: [Errno 98] Address already in use."
    )


# -- the pieces on their own ------------------------------------------------------------


class Failing(Service):
    def __init__(self, error: Exception, privileged: bool) -> None:
        self.error, self.privileged = error, privileged

    def privilegedStartService(self) -> None:
        if self.privileged:
            raise self.error

    def startService(self) -> None:
        raise self.error


@pytest.mark.parametrize("privileged", [True, False])
def test_a_failed_start_is_one_critical_line_and_an_exit(monkeypatch, privileged):
    events = []
    monkeypatch.setattr(tagd.daemon.startup, "log", Logger(observer=events.append))
    guarded = ExitOnFailedStart(Failing(KeyError("spool"), privileged))
    with pytest.raises(SystemExit) as caught:
        guarded.privilegedStartService()
        guarded.startService()
    assert caught.value.code == START_FAILED_EXIT
    [event] = events
    assert event["log_level"].name == "critical" and event["cause"] == "KeyError: 'spool'"
    assert "log_failure" not in event


def test_describe():
    assert describe(OSError(13, "Permission denied")) == "[Errno 13] Permission denied"
    assert describe(ValueError("no")) == "ValueError: no"


def test_exit_before_logging_uses_twistd_s_logger(monkeypatch):
    """With twistd's C{--logger}, the line goes through the observer it names."""
    out = io.StringIO()
    options = Options()
    options.parent = {"logger": lambda: observer(out, {})}
    with pytest.raises(SystemExit) as caught:
        exit_before_logging(options, "tagd: configuration error in x: y: z", CONFIG_ERROR_EXIT)
    assert caught.value.code == CONFIG_ERROR_EXIT
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["text"] == "tagd: configuration error in x: y: z"


def test_exit_before_logging_without_a_logger_is_plain(capsys):
    with pytest.raises(SystemExit):
        exit_before_logging(Options(), "tagd: configuration error in x: y: z", CONFIG_ERROR_EXIT)
    assert capsys.readouterr().err == "tagd: configuration error in x: y: z\n"


def test_make_service_guards_the_tree(tmp_path):
    config = tmp_path / "tagd.toml"
    config.write_text(proxy_on(free_port()) + ADMIN_TOML)
    options = Options()
    options.parseOptions(["--config", str(config)])
    service = makeService(options, reactor=MemoryReactorClock())
    assert isinstance(service, ExitOnFailedStart)
