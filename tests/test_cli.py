"""The C{tagd} command as a user runs it: the installed console script, in a folder of its own,
against a spool file written by the real L{Spool}, with and without that spool still open."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import tomllib
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from tagd import __version__
from tagd.delivery.intake import SEGMENT, entry_line
from tagd.delivery.spool import Spool, event_to_json

from conftest import serve_quietly, within
from fakes import make_event

# The console script installed next to the interpreter running the tests.
TAGD = str(Path(sys.executable).with_name("tagd"))

META_TOKEN = "EAAB-meta-token-1"
GA4_SECRET = "ga4-api-secret-2"
TIKTOK_TOKEN = "tiktok-token-3"
WEBHOOK_AUTH = "Bearer webhook-token-4"
WEBHOOK_KEY = "webhook-key-5"
SECRETS = (META_TOKEN, GA4_SECRET, TIKTOK_TOKEN, WEBHOOK_AUTH, WEBHOOK_KEY)
# Personal data that make_event puts in every event.
PERSONAL = ("Joe@Example.COM", "203.0.113.7", "+49 30 1234567")

CONFIG = f"""
[spool]
path = "spool.db"

[[destinations]]
type = "meta"
pixel_id = "1234"
access_token = "{META_TOKEN}"

[[destinations]]
type = "ga4"
measurement_id = "G-TEST"
api_secret = "{GA4_SECRET}"

[[destinations]]
type = "tiktok"
pixel_code = "CTEST123"
access_token = "{TIKTOK_TOKEN}"
endpoint = "https://tiktok.example/base/"

[[destinations]]
type = "webhook"
name = "hook"
url = "https://hooks.example/events"
headers = {{ Authorization = "{WEBHOOK_AUTH}", X-Api-Key = "{WEBHOOK_KEY}" }}
"""

META_ERROR = "meta: (#100) Invalid parameter"
GA4_ERROR = "ga4: 400 invalid measurement"


def tagd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the installed C{tagd} with C{args}; the environment has no TAGD_CONFIG unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "TAGD_CONFIG"}
    environ.update(env)
    return subprocess.run(
        [TAGD, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=60
    )


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a run that must have succeeded quietly."""
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a run that must have failed with exit status 1."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tagd: ")
    return lines[0]


def query(path: Path, sql: str) -> list[tuple]:
    """Rows read with a connection of the test's own, as another process sees the file."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


def rows(path: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """Every delivery in the file as (event_id, destination) -> (status, attempts)."""
    found = query(
        path,
        "SELECT e.event_id, d.destination, d.status, d.attempts FROM deliveries d JOIN events e ON e.id = d.event",
    )
    return {(event_id, destination): (status, attempts) for event_id, destination, status, attempts in found}


def status_table(output: str) -> dict[str, dict[str, int]]:
    """C{tagd spool status} output as destination -> status -> count."""
    first, header, *lines = output.splitlines()
    assert first.startswith("spool ")
    statuses = header.split()[1:]
    table = {}
    for line in lines:
        name, *counts = line.split()
        table[name] = dict(zip(statuses, map(int, counts)))
    return table


def dead_table(output: str) -> list[list[str]]:
    """C{tagd spool dead} rows, without the header: event_id, event, destination, attempts,
    age, last error."""
    header, *lines = output.splitlines()
    assert header.split() == ["event_id", "event", "destination", "attempts", "age", "last", "error"]
    return [line.split(maxsplit=5) for line in lines]


async def fill(spool: Spool, reactor) -> None:
    """ev-0..ev-5 for meta and ga4, then, in the file:

    meta: ev-0, ev-1 dead; ev-2 expired; ev-3, ev-4 in flight; ev-5 pending.
    ga4: ev-0 dead; ev-1..ev-5 pending.
    """
    spool.enqueue([make_event(event_id=f"ev-{n}") for n in range(6)], ["meta", "ga4"])
    await within(spool.flush())
    now = reactor.seconds() + 1
    leases = await within(spool.lease("meta", 4, now))
    assert [lease.event.event_id for lease in leases] == ["ev-0", "ev-1", "ev-2", "ev-3"]
    await within(spool.dead("meta", [leases[0].key, leases[1].key], META_ERROR))
    await within(spool.expire("meta", [leases[2].key]))
    await within(spool.lease("meta", 1, now))
    (lease,) = await within(spool.lease("ga4", 1, now))
    await within(spool.dead("ga4", [lease.key], GA4_ERROR))


STATE = {
    **{(f"ev-{n}", "ga4"): ("pending", 0) for n in range(1, 6)},
    ("ev-0", "ga4"): ("dead", 1),
    ("ev-0", "meta"): ("dead", 1),
    ("ev-1", "meta"): ("dead", 1),
    ("ev-2", "meta"): ("expired", 0),
    ("ev-3", "meta"): ("inflight", 0),
    ("ev-4", "meta"): ("inflight", 0),
    ("ev-5", "meta"): ("pending", 0),
}


@pytest.fixture
def folder(tmp_path) -> Path:
    """The working directory of the commands, with the configuration as ./tagd.toml."""
    (tmp_path / "tagd.toml").write_text(CONFIG, encoding="utf-8")
    return tmp_path


@pytest_twisted.async_fixture
async def spool_file(reactor, folder) -> Path:
    """The configured spool in the state L{fill} describes, closed as a stopped tagd leaves it
    (closing keeps in-flight rows so; only opening a Spool resets them)."""
    path = folder / "spool.db"
    spool = Spool.open(str(path), reactor=reactor)
    try:
        await fill(spool, reactor)
    finally:
        await within(spool.close())
    assert rows(path) == STATE
    return path


def test_status_counts(folder, spool_file):
    """status: every configured destination with its count per status, in-flight rows left so."""
    output = ok(tagd("spool", "status", cwd=folder))
    assert output.splitlines()[0] == f"spool {spool_file.resolve()}"
    assert status_table(output) == {
        "meta": {"pending": 1, "inflight": 2, "dead": 2, "expired": 1},
        "ga4": {"pending": 5, "inflight": 0, "dead": 1, "expired": 0},
        "tiktok": {"pending": 0, "inflight": 0, "dead": 0, "expired": 0},
        "hook": {"pending": 0, "inflight": 0, "dead": 0, "expired": 0},
    }
    assert rows(spool_file) == STATE


def test_status_counts_the_journal_s_events_not_in_the_file(folder, spool_file):
    """status: events a tagd accepted and did not commit before it stopped (in the intake
    journal beside the spool) are counted below the table, and a segment that cannot be
    read is named; none, no line."""
    assert "intake journal" not in ok(tagd("spool", "status", cwd=folder))
    lines = b"".join(
        entry_line(100 + n, 1_700_000_000.0, '["meta"]', event_to_json(make_event(event_id=f"lost-{n}")))
        for n in range(2)
    )
    (folder / f"spool.db{SEGMENT}00000001").write_bytes(lines)
    (folder / f"spool.db{SEGMENT}00000002").mkdir()  # a segment that cannot be read
    output = ok(tagd("spool", "status", cwd=folder))
    counted, unreadable = output.splitlines()[-2:]
    assert counted.startswith("intake journal: 2 accepted event(s) not in the file yet")
    assert unreadable.startswith(f"intake journal: cannot read spool.db{SEGMENT}00000002 (")
    assert "lost-" not in output
    assert rows(spool_file) == STATE


def test_status_shows_destinations_no_longer_configured(folder, spool_file):
    """Rows for a destination removed from the file still show, after the configured ones."""
    (folder / "tagd.toml").write_text('[spool]\npath = "spool.db"\n[[destinations]]\ntype = "log"\n')
    table = status_table(ok(tagd("spool", "status", cwd=folder)))
    assert list(table) == ["log", "ga4", "meta"]
    assert table["log"] == {"pending": 0, "inflight": 0, "dead": 0, "expired": 0}
    assert table["meta"]["inflight"] == 2


def test_dead_lists_reasons_without_personal_data(folder, spool_file):
    """dead: newest first, each with event name, destination, attempts, age and the reason;
    nothing of the event's personal data."""
    output = ok(tagd("spool", "dead", cwd=folder))
    letters = dead_table(output)
    assert sorted((r[0], r[1], r[2], r[3], r[5]) for r in letters) == [
        ("ev-0", "Purchase", "ga4", "1", GA4_ERROR),
        ("ev-0", "Purchase", "meta", "1", META_ERROR),
        ("ev-1", "Purchase", "meta", "1", META_ERROR),
    ]
    assert letters[0][0] == "ev-1"  # the newest event first
    assert all(r[4].endswith("s") and int(r[4][:-1]) < 120 for r in letters)
    for personal in PERSONAL:
        assert personal not in output


def test_dead_filters_and_limits(folder, spool_file):
    """--destination keeps one destination's letters; --limit cuts the list and says so."""
    only_ga4 = dead_table(ok(tagd("spool", "dead", "--destination", "ga4", cwd=folder)))
    assert [(r[0], r[2]) for r in only_ga4] == [("ev-0", "ga4")]
    output = ok(tagd("spool", "dead", "--destination", "meta", "--limit", "1", cwd=folder))
    *table, note = output.splitlines()
    assert [(r[0], r[2]) for r in dead_table("\n".join(table))] == [("ev-1", "meta")]
    assert "--limit" in note
    assert ok(tagd("spool", "dead", "--destination", "tiktok", cwd=folder)) == "no dead letters\n"


def test_dead_refuses_a_bad_limit(folder, spool_file):
    """--limit must be a count of at least one: argparse's usage error, status 2."""
    result = tagd("spool", "dead", "--limit", "0", cwd=folder)
    assert result.returncode == 2
    assert "--limit" in result.stderr


def test_retry_dead_moves_dead_rows_only(folder, spool_file):
    """retry-dead --destination: that destination's dead rows pending with no attempts, due
    now; in-flight, expired and other destinations' rows untouched.  Then all the rest."""
    before = time.time()
    output = ok(tagd("spool", "retry-dead", "--destination", "meta", cwd=folder))
    assert output.startswith("2 dead letter(s) moved back to pending")
    assert rows(spool_file) == {
        **STATE,
        ("ev-0", "meta"): ("pending", 0),
        ("ev-1", "meta"): ("pending", 0),
    }
    due = query(
        spool_file,
        "SELECT d.next_at FROM deliveries d JOIN events e ON e.id = d.event"
        " WHERE d.destination = 'meta' AND e.event_id IN ('ev-0', 'ev-1')",
    )
    assert len(due) == 2
    assert all(before - 1 <= next_at <= time.time() for (next_at,) in due)

    assert ok(tagd("spool", "retry-dead", cwd=folder)).startswith("1 dead letter(s)")
    assert rows(spool_file)[("ev-0", "ga4")] == ("pending", 0)
    assert rows(spool_file)[("ev-3", "meta")] == ("inflight", 0)
    assert ok(tagd("spool", "retry-dead", cwd=folder)) == "no dead letters: nothing moved\n"


@pytest.mark.parametrize("command", ["retry-dead", "dead"])
def test_an_unknown_destination_is_an_error(folder, spool_file, command):
    """--destination with a name neither configured nor in the spool (a typo) is one line
    naming the destinations there are, exit status 1, and the spool is left as it was;
    a configured destination without dead letters says so, exit status 0."""
    error = one_line_error(tagd("spool", command, "--destination", "mata", cwd=folder))
    assert "no destination named 'mata'" in error
    assert error.endswith("(known: meta, ga4, tiktok, hook)")
    assert rows(spool_file) == STATE
    output = ok(tagd("spool", command, "--destination", "tiktok", cwd=folder))
    assert output.startswith("no dead letters")
    assert rows(spool_file) == STATE


def test_retry_dead_refuses_a_destination_no_longer_configured(folder, spool_file):
    """A destination whose rows the spool still holds but the configuration no longer names
    is known, but retrying its dead letters is refused: tagd would dead-letter them again."""
    (folder / "tagd.toml").write_text('[spool]\npath = "spool.db"\n[[destinations]]\ntype = "log"\n')
    error = one_line_error(tagd("spool", "retry-dead", "--destination", "meta", cwd=folder))
    assert error == (
        "tagd: 'meta' is not configured in tagd.toml: tagd would dead-letter its rows again at its"
        " next start or reload; configure it first"
    )
    assert rows(spool_file) == STATE
    error = one_line_error(tagd("spool", "retry-dead", "--destination", "hook", cwd=folder))
    assert error.endswith("(known: log, ga4, meta)")


def test_retry_dead_leaves_destinations_no_longer_configured(folder, spool_file):
    """Without --destination only the configured destinations' dead letters move; those of
    the others stay dead, and a line says how many, by destination."""
    (folder / "tagd.toml").write_text(CONFIG.replace('type = "ga4"', 'type = "ga4"\nname = "ga4-new"'))
    output = ok(tagd("spool", "retry-dead", cwd=folder))
    assert output == (
        "2 dead letter(s) moved back to pending; tagd sends them within a couple of seconds (or when it starts)\n"
        "1 dead letter(s) of destinations not configured in tagd.toml left as they are (ga4: 1):"
        " tagd would dead-letter them again; configure them first\n"
    )
    assert rows(spool_file) == {**STATE, ("ev-0", "meta"): ("pending", 0), ("ev-1", "meta"): ("pending", 0)}
    output = ok(tagd("spool", "retry-dead", cwd=folder))
    assert output.startswith("no dead letters for the configured destinations: nothing moved\n1 dead letter(s)")


def test_retry_dead_without_a_configuration_file_moves_all(folder, spool_file):
    """With no configuration file the command cannot tell what the daemon runs with: it
    moves every dead letter, as asked, from the spool at the built-in path."""
    (folder / "tagd.toml").unlink()
    for suffix in ("", "-wal", "-shm"):
        if (folder / f"spool.db{suffix}").exists():
            (folder / f"spool.db{suffix}").rename(folder / f"tagd-spool.sqlite3{suffix}")
    assert ok(tagd("spool", "retry-dead", cwd=folder)).startswith("3 dead letter(s) moved back to pending")
    assert rows(folder / "tagd-spool.sqlite3") == {
        **STATE,
        ("ev-0", "ga4"): ("pending", 0),
        ("ev-0", "meta"): ("pending", 0),
        ("ev-1", "meta"): ("pending", 0),
    }


@pytest_twisted.ensureDeferred
async def test_retry_dead_beside_a_running_spool(reactor, folder):
    """With the daemon's spool open: retry-dead leaves the rows it leased in flight (they can
    still be acknowledged), and its next lease takes the revived rows."""
    path = folder / "spool.db"
    spool = Spool.open(str(path), reactor=reactor)
    try:
        await fill(spool, reactor)
        result = await within(deferToThread(tagd, "spool", "retry-dead", "--destination", "meta", cwd=folder))
        assert ok(result).startswith("2 dead letter(s)")
        status = await within(deferToThread(tagd, "spool", "status", cwd=folder))
        assert status_table(ok(status))["meta"] == {"pending": 3, "inflight": 2, "dead": 0, "expired": 1}

        leases = await within(spool.lease("meta", 10, reactor.seconds() + 1))
        assert sorted((lease.event.event_id, lease.attempts) for lease in leases) == [
            ("ev-0", 0), ("ev-1", 0), ("ev-5", 0),
        ]  # fmt: skip
        in_flight = [
            key for (key,) in query(path, "SELECT event FROM deliveries WHERE destination = 'meta' AND status = 'inflight'")
        ]
        assert len(in_flight) == 5
        assert await within(spool.ack("meta", in_flight)) == 5
    finally:
        await within(spool.close())


def test_retry_dead_waits_for_the_daemons_writer(folder, spool_file):
    """A write lock held by another connection (the daemon's group commit) is waited for,
    not reported as an error."""
    with closing(sqlite3.connect(spool_file, isolation_level=None)) as daemon:
        daemon.execute("BEGIN IMMEDIATE")
        environ = {k: v for k, v in os.environ.items() if k != "TAGD_CONFIG"}
        process = subprocess.Popen(
            [TAGD, "spool", "retry-dead"], cwd=folder, env=environ, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            assert process.poll() is None, process.communicate()
            daemon.execute("COMMIT")
            stdout, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert (process.returncode, stderr) == (0, "")
    assert stdout.startswith("3 dead letter(s)")


@pytest.mark.parametrize("where", ["option", "environment", "working-directory"])
def test_config_is_found_as_the_daemon_finds_it(tmp_path, spool_file, where):
    """--config, else $TAGD_CONFIG, else ./tagd.toml name the file, whose [spool] path is used."""
    config = tmp_path / "conf" / "tagd-main.toml"
    config.parent.mkdir()
    config.write_text(f'[spool]\npath = "{spool_file}"\n', encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if where == "option":
        result = tagd("spool", "status", "--config", str(config), cwd=elsewhere)
    elif where == "environment":
        result = tagd("spool", "status", cwd=elsewhere, TAGD_CONFIG=str(config))
    else:
        (elsewhere / "tagd.toml").write_text(config.read_text())
        result = tagd("spool", "status", cwd=elsewhere)
    assert status_table(ok(result))["meta"] == {"pending": 1, "inflight": 2, "dead": 2, "expired": 1}


def test_missing_spool_is_one_line_and_creates_nothing(tmp_path):
    """With no configuration at all the built-in spool path is used; when it does not exist,
    every spool command says so in one line, exit status 1, and leaves no file behind."""
    for command in ("status", "dead", "retry-dead"):
        line = one_line_error(tagd("spool", command, cwd=tmp_path))
        assert "there is no spool at" in line
        assert str(tmp_path.resolve() / "tagd-spool.sqlite3") in line
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_no_spool_is_one_line(folder):
    """A file that is not a spool (another database, or not SQLite at all) is named, in one line."""
    with closing(sqlite3.connect(folder / "spool.db")) as db:
        db.execute("CREATE TABLE other (x)")
    assert "is not a spool of this tagd" in one_line_error(tagd("spool", "status", cwd=folder))
    (folder / "spool.db").write_bytes(b"not a database, " * 512)
    line = one_line_error(tagd("spool", "dead", cwd=folder))
    assert "not a SQLite database" in line


def test_check_config_prints_everything_with_secrets_masked(folder):
    """check-config: every table and key with its effective value, each secret as ***, and
    the output is itself a configuration that resolves to the same."""
    output = ok(tagd("check-config", "tagd.toml", cwd=folder))
    for secret in SECRETS:
        assert secret not in output
    printed = tomllib.loads(output)
    assert set(printed) == {"proxy", "tracking", "spool", "delivery", "admin", "destinations"}
    assert printed["proxy"]["listen"] == "tcp:8080"
    assert printed["tracking"]["track_statuses"] == ["2xx"]
    assert printed["spool"] == {"path": "spool.db", "max_events": 100000, "flush_interval": 0.05}
    assert printed["delivery"]["backoff_cap"] == 600.0
    meta, ga4, tiktok, hook = printed["destinations"]
    assert meta == {
        "type": "meta", "name": "meta", "timeout": 1.5, "consent_purpose": "marketing", "concurrency": 2,
        "pixel_id": "1234", "access_token": "***",
        "api_version": "v26.0", "endpoint": "https://graph.facebook.com", "event_names": {},
        "limited_data_use": False, "max_batch": 1000,
    }  # fmt: skip
    assert "# test_event_code is not set" in output
    assert ga4["api_secret"] == "***"
    assert ga4["event_names"]["Purchase"] == "purchase"
    assert (tiktok["access_token"], tiktok["endpoint"]) == ("***", "https://tiktok.example/base")
    assert hook["headers"] == {"Authorization": "***", "X-Api-Key": "***"}
    assert hook["url"] == "https://hooks.example/events"

    (folder / "printed.toml").write_text(output, encoding="utf-8")
    again = ok(tagd("check-config", "printed.toml", cwd=folder))
    assert again.splitlines()[1:] == output.splitlines()[1:]


def test_check_config_masks_a_webhook_url_s_credentials(tmp_path):
    """A token in a webhook URL's query or user info is masked as the logs leave it out,
    and the output still checks as a configuration; an endpoint (refused with either) and a
    URL without them show as written."""
    config = (
        '[[destinations]]\ntype = "webhook"\nname = "query"\n'
        f'url = "https://hooks.example/x?key={WEBHOOK_KEY}"\n'
        '[[destinations]]\ntype = "webhook"\nname = "user"\n'
        f'url = "https://ingest:{WEBHOOK_KEY}@hooks.example/in#{WEBHOOK_KEY}"\n'
        '[[destinations]]\ntype = "webhook"\nname = "plain"\nurl = "https://hooks.example/events"\n'
        f'[[destinations]]\ntype = "tiktok"\npixel_code = "CTEST123"\naccess_token = "{TIKTOK_TOKEN}"\n'
        'endpoint = "https://tiktok.example:8443/base"\n'
    )
    (tmp_path / "tagd.toml").write_text(config, encoding="utf-8")
    output = ok(tagd("check-config", "tagd.toml", cwd=tmp_path))
    for secret in (WEBHOOK_KEY, "key=", "ingest", TIKTOK_TOKEN):
        assert secret not in output
    query, user, plain, tiktok = tomllib.loads(output)["destinations"]
    assert query["url"] == "https://hooks.example/x?***"
    assert user["url"] == "https://***@hooks.example/in#***"
    assert plain["url"] == "https://hooks.example/events"
    assert tiktok["endpoint"] == "https://tiktok.example:8443/base"
    (tmp_path / "printed.toml").write_text(output, encoding="utf-8")
    again = ok(tagd("check-config", "printed.toml", cwd=tmp_path))
    assert again.splitlines()[1:] == output.splitlines()[1:]


def test_check_config_defaults_like_the_daemon(tmp_path):
    """Without FILE it reads $TAGD_CONFIG, and with nothing at all shows the built-in defaults."""
    config = tmp_path / "env.toml"
    config.write_text('[proxy]\nlisten = "tcp:9999"\n', encoding="utf-8")
    from_env = tomllib.loads(ok(tagd("check-config", cwd=tmp_path, TAGD_CONFIG=str(config))))
    assert from_env["proxy"]["listen"] == "tcp:9999"
    (tmp_path / "env.toml").unlink()
    defaults = ok(tagd("check-config", cwd=tmp_path))
    assert defaults.startswith("# tagd: (built-in defaults): valid")
    assert "destinations" not in tomllib.loads(defaults)


@pytest.mark.parametrize(
    "text, key, spool_too",
    [
        pytest.param("[proxy\n", "(file)", True, id="bad-toml"),
        pytest.param("[proxie]\n", "proxie", True, id="unknown-table"),
        pytest.param("[proxy]\nlisen = 1\n", "proxy.lisen", False, id="unknown-key"),
        pytest.param('[spool]\npath = ""\n', "spool.path", True, id="empty-spool-path"),
        pytest.param('[spool]\nmax_events = "many"\n', "spool.max_events", True, id="spool-key-type"),
        pytest.param('[[destinations]]\ntype = "mta"\n', "destinations[0].type", True, id="unknown-type"),
        pytest.param(
            '[[destinations]]\ntype = "log"\nname = "a b"\n', "destinations[0].name", True, id="bad-name"
        ),
        pytest.param(
            f'[[destinations]]\ntype = "meta"\naccess_token = "{META_TOKEN}"\n',
            "destinations[0].pixel_id",
            False,
            id="missing-pixel-id",
        ),
        pytest.param(
            f'[[destinations]]\ntype = "webhook"\nurl = "https://h.example/"\n'
            f'headers = {{ Authorization = "{WEBHOOK_AUTH}\\n" }}\n',
            "destinations[0].headers",
            False,
            id="bad-secret-header",
        ),
        pytest.param(
            '[[destinations]]\ntype = "meta"\npixel_id = "1234"\naccess_token = ""\n',
            "destinations[0].access_token",
            False,
            id="empty-token",
        ),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, key, spool_too):
    """A configuration tagd cannot run with: exit status 1 and one line naming file and key,
    never a secret, from check-config whichever way the file is named.  The spool commands
    stop the same way for what they read (the file, [spool], the destinations' names) and
    look past the rest."""
    (tmp_path / "bad.toml").write_text(text, encoding="utf-8")
    for args in (["check-config", "bad.toml"], ["check-config", "--config", "bad.toml"]):
        line = one_line_error(tagd(*args, cwd=tmp_path))
        assert line.startswith(f"tagd: configuration error in bad.toml: {key}: ")
        for secret in SECRETS:
            assert secret not in line
    for command in ("status", "dead", "retry-dead"):
        line = one_line_error(tagd("spool", command, "--config", "bad.toml", cwd=tmp_path))
        if spool_too:
            assert line.startswith(f"tagd: configuration error in bad.toml: {key}: ")
        else:
            assert line.startswith("tagd: there is no spool at ")


SPOOL_ONLY = """
[proxy]
listen = "nonsense:1"

[spool]
path = "spool.db"

[admin]
token = { env = "TAGD_TEST_UNSET_ADMIN_TOKEN" }

[[destinations]]
type = "meta"
access_token = { credential = "meta-token" }

[[destinations]]
type = "ga4"
measurement_id = "UA-12345"
api_secret = { env = "TAGD_TEST_UNSET_GA4_SECRET" }
"""


def test_spool_commands_read_only_the_spool_and_the_names(folder, spool_file):
    """The spool commands need [spool] and the destinations' names only: an admin token from
    a variable that is not set, a credential with no $CREDENTIALS_DIRECTORY, keys missing or
    wrong elsewhere stop check-config but none of them."""
    (folder / "tagd.toml").write_text(SPOOL_ONLY, encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": ""}
    line = one_line_error(tagd("check-config", cwd=folder, **env))
    assert line.startswith("tagd: configuration error in tagd.toml: proxy.listen: ")
    table = status_table(ok(tagd("spool", "status", cwd=folder, **env)))
    assert list(table) == ["meta", "ga4"]
    assert table["meta"] == {"pending": 1, "inflight": 2, "dead": 2, "expired": 1}
    letters = dead_table(ok(tagd("spool", "dead", "--destination", "ga4", cwd=folder, **env)))
    assert [(r[0], r[2]) for r in letters] == [("ev-0", "ga4")]
    output = ok(tagd("spool", "retry-dead", "--config", "tagd.toml", cwd=folder, **env))
    assert output.startswith("3 dead letter(s) moved back to pending")


def test_missing_config_file_is_one_line(tmp_path):
    """A named file that does not exist is an error (only an unnamed ./tagd.toml may be absent)."""
    line = one_line_error(tagd("check-config", "absent.toml", cwd=tmp_path))
    assert "absent.toml: (file): cannot be read" in line


REFERENCES = """
[admin]
token = { env = "TAGD_TEST_ADMIN_TOKEN" }

[[destinations]]
type = "meta"
pixel_id = "1234"
access_token = { credential = "meta-token" }

[[destinations]]
type = "webhook"
url = "https://hooks.example/events"
headers = { Authorization = { env = "TAGD_TEST_HOOK_AUTH" }, X-Api-Key = "webhook-key-5" }
"""


def test_check_config_shows_references_not_secrets(tmp_path):
    """A secret given by reference is printed as that reference (where to read it), a
    literal one as ***; the output, checked again in the same environment, prints the same."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "meta-token").write_text(f"{META_TOKEN}\n", encoding="utf-8")
    (tmp_path / "tagd.toml").write_text(REFERENCES, encoding="utf-8")
    env = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "TAGD_TEST_ADMIN_TOKEN": "admin-token-6",
        "TAGD_TEST_HOOK_AUTH": WEBHOOK_AUTH,
    }
    output = ok(tagd("check-config", "tagd.toml", cwd=tmp_path, **env))
    for secret in (META_TOKEN, "admin-token-6", WEBHOOK_AUTH, WEBHOOK_KEY):
        assert secret not in output
    assert 'access_token = { credential = "meta-token" }' in output.splitlines()
    assert 'token = { env = "TAGD_TEST_ADMIN_TOKEN" }' in output.splitlines()
    printed = tomllib.loads(output)
    meta, hook = printed["destinations"]
    assert meta["access_token"] == {"credential": "meta-token"}
    assert hook["headers"] == {"Authorization": {"env": "TAGD_TEST_HOOK_AUTH"}, "X-Api-Key": "***"}

    (tmp_path / "printed.toml").write_text(output, encoding="utf-8")
    again = ok(tagd("check-config", "printed.toml", cwd=tmp_path, **env))
    assert again.splitlines()[1:] == output.splitlines()[1:]


def test_check_config_missing_credential_is_one_line(tmp_path):
    """Without $CREDENTIALS_DIRECTORY a credential reference stops check-config with one line
    naming the file, the key and the credential."""
    (tmp_path / "tagd.toml").write_text(REFERENCES, encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": "", "TAGD_TEST_ADMIN_TOKEN": "admin-token-6"}
    line = one_line_error(tagd("check-config", "tagd.toml", cwd=tmp_path, **env))
    assert line == (
        "tagd: configuration error in tagd.toml: destinations[0].access_token: credential "
        "'meta-token' not found (no $CREDENTIALS_DIRECTORY, or no such file in it)"
    )


# tagd send-test-event, against a fake Meta served by the tests' reactor while the command
# runs in a thread of its own.


def meta_config(base: str, token: str, extra: str = "") -> str:
    """One Meta destination sending to the fake at C{base}."""
    return (
        f'[[destinations]]\ntype = "meta"\npixel_id = "1234"\naccess_token = "{token}"\n'
        f'endpoint = "{base}"\n{extra}'
    )


@pytest_twisted.ensureDeferred
async def test_send_test_event_with_a_test_code(tmp_path, fake_meta):
    """One valid event carrying the test code reaches the platform; its answer is shown,
    the token never is, and there is nothing to warn about."""
    toml = meta_config(fake_meta.base, "meta-token", 'test_event_code = "TEST4242"\n')
    (tmp_path / "test.toml").write_text(toml, encoding="utf-8")
    result = await within(
        deferToThread(tagd, "send-test-event", "--destination", "meta", "--config", "test.toml", cwd=tmp_path)
    )
    output = ok(result)
    assert "meta-token" not in output
    assert f"POST {fake_meta.base}/v26.0/1234/events" in output.splitlines()
    assert "status: 200" in output.splitlines()
    assert "outcome: success (events_received=1 fbtrace_id=FakeTrace1)" in output.splitlines()
    assert '"events_received": 1' in output
    (request,) = fake_meta.fake.requests
    assert request.violations == []
    assert request.body["test_event_code"] == "TEST4242"
    (event,) = fake_meta.fake.events
    assert event["event_name"] == "PageView"
    assert event["event_source_url"] == "https://tagd.test/"
    assert event["user_data"]["client_ip_address"] == "192.0.2.1"


@pytest_twisted.ensureDeferred
async def test_send_test_event_shows_the_platforms_refusal(tmp_path, fake_meta):
    """A refused event: exit status 1 with Meta's own message, a warning that the event
    would have counted as real, and the (wrong) token nowhere."""
    (tmp_path / "tagd.toml").write_text(meta_config(fake_meta.base, META_TOKEN), encoding="utf-8")
    result = await within(deferToThread(tagd, "send-test-event", "--destination", "meta", cwd=tmp_path))
    assert result.returncode == 1, result.stderr
    assert "status: 400" in result.stdout.splitlines()
    assert "outcome: auth (HTTP 400, Meta error 190: Invalid OAuth access token." in result.stdout
    assert '"message": "Invalid OAuth access token."' in result.stdout
    assert "has no test_event_code" in result.stderr
    assert META_TOKEN not in result.stdout + result.stderr
    assert len(fake_meta.fake.events) == 1


class EchoingReceiver(Resource):
    """A webhook receiver that refuses everything and quotes the URL it was sent to."""

    isLeaf = True

    def render_POST(self, request) -> bytes:
        request.setResponseCode(400)
        return b"unknown key in " + request.uri

    def close(self) -> None:
        """Nothing held open (L{fakes.Served} closes what it serves)."""


@pytest_twisted.ensureDeferred
async def test_send_test_event_hides_a_webhook_url_token_the_receiver_echoes(tmp_path):
    """The key in a webhook URL's query is a secret: echoed back in the receiver's answer,
    it is masked there as in the log."""
    served = serve_quietly(EchoingReceiver())
    try:
        key = "hook-key-5f3a9c2e"
        url = f"http://127.0.0.1:{served.port.getHost().port}/collect?key={key}"
        (tmp_path / "tagd.toml").write_text(f'[[destinations]]\ntype = "webhook"\nurl = "{url}"\n')
        result = await within(deferToThread(tagd, "send-test-event", "--destination", "webhook", cwd=tmp_path))
    finally:
        await within(Deferred.fromCoroutine(served.stop()))
    assert result.returncode == 1, result.stderr
    assert "unknown key in /collect?" in result.stdout
    assert key not in result.stdout + result.stderr


def test_send_test_event_to_an_unknown_destination(folder):
    """A name that is not configured: one line listing the names that are."""
    line = one_line_error(tagd("send-test-event", "--destination", "facebook", cwd=folder))
    assert line == "tagd: no destination named 'facebook' in tagd.toml (configured: meta, ga4, tiktok, hook)"


def test_send_test_event_to_a_dry_run(tmp_path):
    """A log destination sends nothing: the dry-run lines are the answer."""
    (tmp_path / "tagd.toml").write_text('[[destinations]]\ntype = "log"\n', encoding="utf-8")
    lines = ok(tagd("send-test-event", "--destination", "log", cwd=tmp_path)).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["meta", "ga4", "tiktok"]
    for line, name in zip(lines, ('"PageView"', '"page_view"', '"Pageview"')):
        assert name in line and "https://tagd.test/" in line and "192.0.2.0" in line


# The command line itself.

# Every command that reads a configuration, with the arguments it needs besides.
CONFIG_COMMANDS = [
    ["spool", "status"],
    ["spool", "dead"],
    ["spool", "retry-dead"],
    ["check-config"],
    ["send-test-event", "--destination", "meta"],
]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_takes_config(tmp_path, command):
    """--config FILE names the file for each command that reads one, and a named file that
    does not exist is one line naming it."""
    line = one_line_error(tagd(*command, "--config", "absent.toml", cwd=tmp_path))
    assert line.startswith("tagd: configuration error in absent.toml: (file): cannot be read")


def test_check_config_takes_the_file_either_way(folder):
    """check-config FILE is check-config --config FILE; both at once must name one file."""
    by_option = ok(tagd("check-config", "--config", "tagd.toml", cwd=folder))
    assert by_option == ok(tagd("check-config", "tagd.toml", cwd=folder))
    assert by_option == ok(tagd("check-config", "tagd.toml", "--config", "tagd.toml", cwd=folder))
    (folder / "other.toml").write_text("", encoding="utf-8")
    line = one_line_error(tagd("check-config", "other.toml", "--config", "tagd.toml", cwd=folder))
    assert line == "tagd: check-config: two files named (tagd.toml and other.toml): name one"


def test_version_is_the_installed_package_s(tmp_path):
    """tagd --version prints the version pip installed, which is the package's own."""
    assert ok(tagd("--version", cwd=tmp_path)) == f"tagd {version('tagd')}\n"
    assert version("tagd") == __version__


# Each command (and group of commands) with the words its help is expected to hold.
HELPS = {
    (): ["COMMAND", "--version", "twistd -n --pidfile= tagd --config FILE"],
    ("spool",): ["status", "dead", "retry-dead", "no secret"],
    ("spool", "status"): ["--config FILE"],
    ("spool", "dead"): ["--config FILE", "--destination NAME", "--limit N"],
    ("spool", "retry-dead"): ["--config FILE", "--destination NAME"],
    ("check-config",): ["--config FILE", "the same as --config FILE"],
    ("send-test-event",): ["--config FILE", "--destination NAME"],
    ("demo",): ["--port PORT", "--shop-port PORT", "--admin-port PORT"],
}


def words(text: str) -> str:
    """C{text} with its line breaks and runs of spaces as single spaces (argparse wraps)."""
    return " ".join(text.split())


@pytest.mark.parametrize("command", list(HELPS), ids=lambda c: " ".join(c) or "tagd")
def test_help_reads_alike_everywhere(tmp_path, command):
    """Each --help: the usage, a sentence saying what the command does (the words its
    parent lists it with), then its options; the configuration file is always --config FILE
    with the same default, as twistd's tagd has it."""
    output = ok(tagd(*command, "--help", cwd=tmp_path))
    usage, description, *_ = output.split("\n\n")
    assert usage.startswith(f"usage: {' '.join(['tagd', *command])} [-h]")
    assert description[0].isupper() and description.endswith("."), output
    for expected in HELPS[command]:
        assert expected in words(output)
    if "[--config FILE]" in usage:
        assert "--config FILE TOML configuration file [default: $TAGD_CONFIG or ./tagd.toml]" in words(output)
    if command:
        parent = words(ok(tagd(*command[:-1], "--help", cwd=tmp_path)))
        summary = words(description)[:-1]
        assert f"{command[-1]} {summary[0].lower()}{summary[1:]}" in parent
