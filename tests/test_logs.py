"""tagd's log observer: one JSON object per line for journald, readable text on a terminal,
the level from TAGD_LOG_LEVEL, and twistd running tagd with it (--logger)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from twisted.logger import Logger

from tagd import __version__
from tagd.daemon.logs import observer
from tagd.daemon.startup import CONFIG_ERROR_EXIT

from helpers import TWISTD, http_get, wait_until

FIELDS = {"time", "level", "namespace", "text"}
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def logger_to(stream, **environ) -> Logger:
    """A logger whose only observer is tagd's, built for C{stream} and C{environ}."""
    return Logger(namespace="tagd.test", observer=observer(stream, environ))


def lines(stream) -> list[dict]:
    """The JSON objects written to C{stream}, one per line (each line must be one)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_time_level_namespace_and_text_only():
    """Not on a terminal: each event is one JSON object with the formatted message, and none
    of the event's other fields, which could hold a secret."""
    out = io.StringIO()
    log = logger_to(out)
    log.info("sent {count} event(s) to {destination}", count=3, destination="meta", token="EAAB-secret")
    log.warn("two\nlines")
    first, second = lines(out)
    assert set(first) == FIELDS
    assert first["text"] == "sent 3 event(s) to meta"
    assert (first["level"], first["namespace"]) == ("info", "tagd.test")
    assert ISO_UTC.fullmatch(first["time"])
    assert (second["level"], second["text"]) == ("warn", "two\nlines")
    assert "EAAB-secret" not in out.getvalue()
    assert out.getvalue().count("\n") == 2


def test_failure_text_is_included():
    """A logged failure adds its traceback as C{failure}, in the same single line."""
    out = io.StringIO()
    log = logger_to(out)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("delivery failed")
    (line,) = lines(out)
    assert set(line) == FIELDS | {"failure"}
    assert (line["level"], line["text"]) == ("critical", "delivery failed")
    assert "Traceback" in line["failure"] and "ZeroDivisionError" in line["failure"]


@pytest.mark.parametrize(
    "setting, written",
    [
        (None, ["info", "warn", "error", "critical"]),
        ("debug", ["debug", "info", "warn", "error", "critical"]),
        ("WARN", ["warn", "error", "critical"]),
        ("warning", ["warn", "error", "critical"]),
        ("critical", ["critical"]),
    ],
)
def test_level_from_the_environment(setting, written):
    """TAGD_LOG_LEVEL sets the lowest level written (any letter case); info when unset."""
    out = io.StringIO()
    log = logger_to(out, **({} if setting is None else {"TAGD_LOG_LEVEL": setting}))
    for level in ("debug", "info", "warn", "error", "critical"):
        getattr(log, level)("a {name} line", name=level)
    assert [line["level"] for line in lines(out)] == written
    assert [line["text"] for line in lines(out)] == [f"a {level} line" for level in written]


def test_unknown_level_stops_start_up_with_one_line():
    """A level tagd does not know is an error, as a bad configuration file is: one line in
    the form the log would have had (JSON for the journal), and the exit status of a
    configuration error, which systemd does not restart."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as caught:
        observer(out, {"TAGD_LOG_LEVEL": "loud"})
    assert caught.value.code == CONFIG_ERROR_EXIT
    [line] = lines(out)
    assert line["level"] == "critical"
    assert line["text"] == "tagd: TAGD_LOG_LEVEL='loud': must be one of debug, info, warn, error, critical"


def test_unknown_level_on_a_terminal_is_text():
    out = Terminal()
    with pytest.raises(SystemExit):
        observer(out, {"TAGD_LOG_LEVEL": "loud"})
    assert out.getvalue().endswith(" [tagd.daemon.logs#critical] tagd: TAGD_LOG_LEVEL='loud': must be one of debug, info, warn, error, critical\n")
    assert out.getvalue().count("\n") == 1


def test_terminal_gets_readable_text():
    """On a terminal the lines are twistd's classic text, not JSON, and still filtered."""
    out = Terminal()
    log = logger_to(out)
    log.debug("not shown")
    log.info("hello {who}", who="operator")
    text = out.getvalue()
    assert text.endswith(" [tagd.test#info] hello operator\n")
    assert text.count("\n") == 1 and "not shown" not in text


def journal(config: Path, cwd: Path, **env: str) -> tuple[list[str], tuple[int, bytes]]:
    """The lines C{twistd --logger=tagd.daemon.logs.observer -n --pidfile= tagd --config FILE}
    writes to its stdout, a pipe (as under systemd), from start-up until it has stopped on
    SIGTERM, sent once its admin listener has answered C{/healthz} (status and body, the
    second value); its stderr must stay empty."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TAGD_CONFIG", "TAGD_LOG_LEVEL")}
    process = subprocess.Popen(
        [TWISTD, "--logger=tagd.daemon.logs.observer", "-n", "--pidfile=", "tagd", "--config", str(config)],
        cwd=cwd,
        env=environ | env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output: list[str] = []

    def read() -> None:
        for line in process.stdout:
            output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:

        def admin_port():
            if process.poll() is not None:
                raise AssertionError(f"twistd exited with {process.returncode}: {process.stderr.read()}")
            found = re.search(r"admin listener on 127\.0\.0\.1:(\d+)", "".join(output))
            return found and int(found.group(1))

        port = wait_until(admin_port, timeout=20, what="listening")
        health = http_get(port, "/healthz")[::2]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    reader.join(10)
    assert process.stderr.read() == ""
    return output, health


def test_twistd_with_the_logger_writes_json_lines_to_a_pipe(tmp_path):
    """C{twistd --logger=tagd.daemon.logs.observer -n tagd --config FILE}, its stdout a pipe (as
    under systemd): every line it writes, from start-up to shutdown, is one JSON object with
    the fields, including the admin listener's line and twistd's own."""
    config = tmp_path / "tagd.toml"
    config.write_text(
        '[proxy]\nlisten = "tcp:0:interface=127.0.0.1"\norigin = "http://127.0.0.1:9"\n'
        '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\n',
        encoding="utf-8",
    )
    output, health = journal(config, tmp_path)
    assert health == (200, b"ok\n")
    records = [json.loads(line) for line in output]
    assert all(line.endswith("\n") for line in output)
    assert all(set(record) == FIELDS for record in records), records
    assert all(record["level"] != "debug" for record in records)
    texts = [record["text"] for record in records]
    assert any(text.startswith("admin listener on 127.0.0.1:") for text in texts)
    assert any(re.fullmatch(r"TagdSite starting on \d+", text) for text in texts)
    assert texts[-1] == "Server Shut Down."


START_UP = """
[proxy]
listen = "tcp:0:interface=127.0.0.1"
origin = "http://127.0.0.1:9"

[admin]
listen = "tcp:0:interface=127.0.0.1"
token = { env = "TAGD_TEST_ADMIN_TOKEN" }

[spool]
path = "spool.db"

[[destinations]]
type = "meta"
name = "fb-main"
pixel_id = "1234"
access_token = { env = "TAGD_TEST_META_TOKEN" }
endpoint = "http://127.0.0.1:9"

[[destinations]]
type = "ga4"
measurement_id = "G-TEST"
api_secret = "ga4-literal-secret-7"
endpoint = "http://127.0.0.1:9"

[[destinations]]
type = "log"
"""


@pytest.mark.parametrize("with_destinations", [True, False], ids=["destinations", "none"])
def test_start_up_says_what_tagd_runs_with_in_one_line(tmp_path, with_destinations):
    """The first line of tagd's own, in the production logger's journal: the file, each
    destination's name and type, the spool (absolute), the visitor and admin listeners as
    configured; no secret anywhere in the journal.  Without destinations, none, and no spool."""
    text = START_UP if with_destinations else START_UP.split("[[destinations]]")[0]
    config = tmp_path / "tagd.toml"
    config.write_text(text, encoding="utf-8")
    secrets = {"TAGD_TEST_ADMIN_TOKEN": "admin-token-from-env-5", "TAGD_TEST_META_TOKEN": "meta-token-from-env-6"}
    output, (status, _) = journal(config, tmp_path, **secrets)
    assert status == 401  # the admin token was read: its variable was set
    records = [json.loads(line) for line in output]
    ours = [r for r in records if r["namespace"].startswith("tagd.")]
    destinations = "fb-main (meta), ga4 (ga4), log (log)" if with_destinations else "none"
    spool = tmp_path / "spool.db" if with_destinations else "none (no destinations)"
    assert (ours[0]["level"], ours[0]["text"]) == (
        "info",
        f"tagd {__version__} starting: configuration {config}; destinations {destinations};"
        f" spool {spool}; visitors on tcp:0:interface=127.0.0.1, admin on tcp:0:interface=127.0.0.1",
    )
    assert [r["text"] for r in records].count(ours[0]["text"]) == 1
    for secret in [*secrets.values(), "ga4-literal-secret-7"]:
        assert secret not in "".join(output)
