"""Reloading the configuration (SIGHUP): what changed, what is applied, what waits for a
restart, what an invalid file does, and the rows of destinations that are gone.

The diff is tested as pure functions; the reload itself in-process, against the real
fake platforms and a real spool file, with the reload called as the SIGHUP handler calls
it; and SIGHUP itself on tagd run as users run it (C{twistd -n tagd --config FILE}),
over a keep-alive connection that must survive the reload.
"""

from __future__ import annotations

import gc
import http.client
import json
import signal
import weakref
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.logger import formatEvent
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from conftest import (
    FAKE_META_TOKEN,
    _listening_port,
    destinations_toml,
    eventually,
    platform_destinations,
    sleep,
    threaded_platforms,
    toml_table,
    within,
)
from fakes import make_event
from helpers import (
    ADMIN_TOML,
    BROWSER_UA,
    REPO_ROOT,
    TRACKED_PAGE,
    TagdProcess,
    TrackedOrigin,
    free_port,
    spool_rows,
    wait_until,
)
from test_tracking_e2e import FIREFOX, tracked_visit
from tagd.admin.listener import AdminService
from tagd.daemon.config import parse_config
from tagd.daemon.configdiff import Changes, diff
from tagd.delivery.destinations.registry import DESTINATION_TYPES
from tagd.admin.metrics import Metrics
from tagd.delivery.service import ABANDONED
from tagd.daemon.reload import ReloadOnHangup, Reloader
from tagd.delivery.spool import Spool, read_dead_letters, retry_dead_letters
from tagd.daemon.tap import build_service, config_loader
from tagd.tagging.hook import Visit

PAGE_VIEW = {"event_name": "PageView"}
NEW_TOKEN = "rotated-meta-token"


# -- the diff ----------------------------------------------------------------------------


def config(destinations: list[dict], **tables: dict) -> str:
    """A configuration file's text: C{tables} by name, then the destinations."""
    text = "".join(toml_table(f"[{name}]", values) for name, values in tables.items())
    return text + destinations_toml(destinations)


@attrs.frozen
class Endpoint:
    """Stands in for a served fake where only its base URL is needed."""

    base: str


ENDPOINTS = [Endpoint(f"http://127.0.0.1:{port}") for port in (9001, 9002, 9003)]


def test_diff_names_destinations_tables_and_restart_keys():
    """A changed token makes its destination changed, a new name added, a missing one
    removed; [tracking] and [delivery] are flagged; [proxy] and [admin] keys are named
    for a restart; the summary holds names only, never a token."""
    meta, ga4, _ = platform_destinations(*ENDPOINTS)
    dry = {"type": "log", "name": "dry"}
    hook = {"type": "webhook", "name": "hook", "url": "http://127.0.0.1:9004/e"}
    old = parse_config(config([meta, ga4, dry], admin={"token": "old-admin"}), "old.toml")
    new = parse_config(
        config(
            [{**meta, "access_token": NEW_TOKEN}, ga4, hook],
            proxy={"origin": "http://127.0.0.1:9999"},
            tracking={"exclude_paths": ["/static/*"]},
            delivery={"concurrency": 3},
            admin={"token": "new-admin"},
        ),
        "new.toml",
    )
    changes = diff(old, new)
    assert changes == Changes(
        added=("hook",),
        removed=("dry",),
        changed=("meta",),
        tracking=True,
        delivery=True,
        restart=("proxy.origin", "admin.token"),
    )
    summary = changes.summary()
    assert summary == (
        "destinations added: hook; destinations removed: dry; destinations changed: meta; "
        "[tracking] changed; [delivery] changed"
    )
    assert not {FAKE_META_TOKEN, NEW_TOKEN, "old-admin", "new-admin"} & set(summary.split())


def test_the_same_file_read_twice_changes_nothing():
    """Meta and TikTok destinations compare by identity; read twice, they still count as
    unchanged, so a reload of an unchanged file keeps every lane."""
    text = config(platform_destinations(*ENDPOINTS), tracking={"extra_bots": ["probe"]})
    changes = diff(parse_config(text, "a.toml"), parse_config(text, "a.toml"))
    assert changes == Changes() and not changes.reloadable
    assert changes.summary() == "nothing changed"


def test_a_timeout_or_type_change_is_a_change():
    """Same name, other timeout or other type: changed."""
    meta, _, tiktok = platform_destinations(*ENDPOINTS)
    old = parse_config(config([meta, tiktok]), "a.toml")
    new = parse_config(config([{**meta, "timeout": 9}, {"type": "log", "name": "tiktok"}]), "a.toml")
    assert diff(old, new).changed == ("meta", "tiktok")


def test_a_consent_purpose_change_is_a_change():
    """A destination whose consent_purpose changes is changed: the new tracker routes by it."""
    meta, ga4, _ = platform_destinations(*ENDPOINTS)
    old = parse_config(config([meta, ga4]), "a.toml")
    new = parse_config(config([{**meta, "consent_purpose": "analytics"}, ga4]), "a.toml")
    assert diff(old, new).changed == ("meta",)


# -- in-process reloads ----------------------------------------------------------------------


@attrs.define
class Running:
    """A tagd built from a file, which a test rewrites and reloads."""

    port: int
    metrics: Metrics
    service: MultiService
    path: Path

    def reload(self, text: str):
        """Write C{text} to the file and reload, as SIGHUP does; a Deferred."""
        self.path.write_text(text)
        return self.hangup()

    def hangup(self):
        """Reload, as SIGHUP does, whatever the file holds now; a Deferred."""
        return within(reloader(self.service).reload())

    def reloads(self, result: str) -> float:
        return self.metrics.value("config_reloads", result=result)


def reloader(service: MultiService) -> Reloader:
    """The reloader that SIGHUP calls in C{service}."""
    (hangup,) = [s for s in service if isinstance(s, ReloadOnHangup)]
    return hangup.reloader


@pytest_twisted.async_yield_fixture
async def start_tagd(reactor, tmp_path):
    """C{await start_tagd(text)}: tagd from C{text}, written to tmp_path/tagd.toml and named
    by --config, reloading from that file; with C{named=False} no option names it, so the
    test's working directory must be tmp_path."""
    started = []

    async def start(text: str, *, named: bool = True) -> Running:
        path = tmp_path / "tagd.toml"
        path.write_text(text)
        metrics = Metrics()
        load = config_loader({"config": str(path)} if named else {}, environ={})
        service = build_service(load(), reactor, metrics, load=load)
        service.startService()
        started.append(service)
        return Running(await within(_listening_port(service)), metrics, service, path)

    yield start
    for service in started:
        await within(service.stopService())


def tagd_toml(origin, spool: Path, destinations: list[dict], **tables: dict) -> str:
    """tagd on a free loopback port in front of the test origin, its spool at C{spool},
    polling often and backing off briefly; C{tables} add keys by table name."""
    proxy = {"listen": "tcp:0:interface=127.0.0.1", "origin": f"http://127.0.0.1:{origin.port}", "pool_size": 4}
    delivery = {"poll_interval": 0.05, "backoff_base": 0.05, "backoff_cap": 0.2}
    text = toml_table("[proxy]", {**proxy, **tables.pop("proxy", {})}) + ADMIN_TOML
    text += toml_table("[spool]", {"path": str(spool)})
    text += toml_table("[delivery]", {**delivery, **tables.pop("delivery", {})})
    text += "".join(toml_table(f"[{name}]", values) for name, values in tables.items())
    return text + destinations_toml(destinations)


def reload_lines(log_events) -> list[tuple[str, str]]:
    """(level, text) of what the reload logged."""
    return [
        (event["log_level"].name, formatEvent(event))
        for event in log_events
        if event.get("log_namespace") in ("tagd.daemon.reload", "tagd.delivery.service")
    ]


def event_ids(served) -> list[str]:
    return [event.get("event_id") for event in served.fake.events]


async def visit(port: int, connect, event_id: str, path: bytes = b"/page") -> None:
    visitor = await connect(port)
    await tracked_visit(visitor, {**PAGE_VIEW, "event_id": event_id}, path=path)


@pytest_twisted.ensureDeferred
async def test_reload_swaps_destinations(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events
):
    """Meta replaced by GA4: the visit before the reload reaches Meta, the one after it
    GA4 only (with the _ga cookie the new tracker now sets), on the same visitor
    connection; one info line names what changed, and the reload is counted."""
    meta, ga4, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]))
    visitor = await connect(tagd.port)
    await tracked_visit(visitor, {**PAGE_VIEW, "event_id": "before"})
    await eventually(lambda: event_ids(fake_meta) == ["before"])

    await tagd.reload(tagd_toml(origin, spool, [ga4]))
    # The added destination's series are there at once, at 0; the removed one's keep counting.
    assert tagd.metrics.registry.get_sample_value(
        "tagd_events_delivered_total", {"destination": "ga4", "outcome": "dead"}
    ) == 0
    assert tagd.metrics.registry.get_sample_value("tagd_delivery_retries_total", {"destination": "ga4"}) == 0
    assert tagd.metrics.value("events_delivered", destination="meta", outcome="success") == 1
    response = await tracked_visit(visitor, {**PAGE_VIEW, "event_id": "after"})
    assert any(cookie.startswith(b"_ga=") for cookie in response.header(b"set-cookie"))
    await eventually(lambda: len(fake_ga4.fake.events) == 1)
    await sleep(0.2)
    assert event_ids(fake_meta) == ["before"]
    assert fake_ga4.fake.violations == []
    assert tagd.reloads("ok") == 1 and tagd.reloads("failed") == 0
    assert reload_lines(log_events) == [
        ("info", f"configuration reloaded from {tagd.path}: destinations added: ga4; destinations removed: meta")
    ]


@pytest_twisted.ensureDeferred
async def test_a_tracker_a_reload_replaces_is_freed_though_start_up_was_frozen(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path
):
    """C{twistd tagd} freezes start-up's objects out of the garbage collector (see
    tagd.daemon.collection), which then never frees one caught in a reference cycle: the tracker
    a reload replaces, with its caches and bot detector, is freed all the same."""
    meta, _, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]))
    await visit(tagd.port, connect, "fills-the-caches")
    await eventually(lambda: event_ids(fake_meta) == ["fills-the-caches"])
    tracker = reloader(tagd.service)._proxy.on_tracking
    replaced = [weakref.ref(tracker), weakref.ref(tracker._bots)]
    del tracker
    gc.freeze()
    try:
        await tagd.reload(tagd_toml(origin, spool, [meta], tracking={"honor_gpc": False}))
        gc.collect()
        assert [ref() for ref in replaced] == [None, None]
    finally:
        gc.unfreeze()


@pytest_twisted.ensureDeferred
async def test_invalid_file_keeps_the_running_configuration(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events, monkeypatch
):
    """A missing credential, then a TOML syntax error: each reload logs one error naming
    the file and the key, counts a failure, and changes nothing; no token is logged."""
    meta, _, tiktok = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]))
    monkeypatch.delenv("TAGD_TEST_UNSET", raising=False)
    missing = tagd_toml(origin, spool, [tiktok]) + (
        '[[destinations]]\ntype = "meta"\nname = "meta"\npixel_id = "1234"\n'
        f'endpoint = "{fake_meta.base}"\naccess_token = {{ env = "TAGD_TEST_UNSET" }}\n'
    )
    await tagd.reload(missing)
    await tagd.reload(tagd_toml(origin, spool, [{**meta, "access_token": NEW_TOKEN}]) + "[tracking\n")

    await visit(tagd.port, connect, "still-meta")
    await eventually(lambda: event_ids(fake_meta) == ["still-meta"])
    await sleep(0.2)
    assert fake_tiktok.fake.events == []
    assert tagd.reloads("failed") == 2 and tagd.reloads("ok") == 0
    [(level, missing), (level_too, syntax)] = reload_lines(log_events)
    assert level == level_too == "error"
    prefix = f"configuration not reloaded, the running one stays: tagd: configuration error in {tagd.path}: "
    assert missing == prefix + "destinations[1].access_token: environment variable TAGD_TEST_UNSET is not set"
    assert syntax.startswith(prefix + "(file): not valid TOML: ")
    text = "\n".join(formatEvent(event) for event in log_events)
    assert FAKE_META_TOKEN not in text and NEW_TOKEN not in text


@pytest_twisted.ensureDeferred
async def test_restart_keys_are_named_and_the_rest_is_applied(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events
):
    """A new origin and a new [tracking] filter: the filter applies at once, the proxy
    keeps its origin, and the reload's one line, a warning, names proxy.origin, at every
    reload until a restart."""
    meta, _, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]))
    changed = tagd_toml(
        origin, spool, [meta], proxy={"origin": f"http://127.0.0.1:{free_port()}"},
        tracking={"exclude_paths": ["/page/skip*"]},
    )  # fmt: skip
    await tagd.reload(changed)
    await visit(tagd.port, connect, "excluded", path=b"/page/skip")  # the running origin answers
    await visit(tagd.port, connect, "tracked")
    await eventually(lambda: event_ids(fake_meta) == ["tracked"])
    assert tagd.metrics.value("tracking_dropped", reason="path") == 1
    await tagd.reload(changed)

    restart = (
        "proxy.origin changed, which tagd reads only at start-up: the running values stay "
        "until a restart (systemctl restart tagd)"
    )
    assert reload_lines(log_events) == [
        ("warn", f"configuration reloaded from {tagd.path}: [tracking] changed; {restart}"),
        ("warn", f"configuration reloaded from {tagd.path}: {restart}"),
    ]


@pytest_twisted.ensureDeferred
async def test_destinations_for_a_tagd_started_without_any_wait_for_a_restart(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events
):
    """Started without destinations, tagd has no spool: a reload that adds one says it
    needs a restart, and tracking headers are still only removed."""
    meta, _, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, []))
    await tagd.reload(tagd_toml(origin, spool, [meta]))
    await visit(tagd.port, connect, "untracked")
    await sleep(0.3)
    assert fake_meta.fake.events == [] and not spool.exists()
    assert tagd.reloads("ok") == 1
    assert reload_lines(log_events) == [
        ("info", "no [[destinations]] configured: tracking headers are removed, no events sent"),
        ("warn", f"configuration reloaded from {tagd.path}: destinations (tagd started without any, so "
                 "it has no spool yet) changed, which tagd reads only at start-up: the running values "
                 "stay until a restart (systemctl restart tagd)"),
    ]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_every_destination_removed_and_added_back(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path
):
    """Without destinations after a reload the tracking header is only removed (no event);
    the spool stays open, so a later reload that adds Meta back tracks again."""
    meta, _, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]))
    await tagd.reload(tagd_toml(origin, spool, []))
    await visit(tagd.port, connect, "nowhere")
    await tagd.reload(tagd_toml(origin, spool, [meta]))
    await visit(tagd.port, connect, "back")
    await eventually(lambda: event_ids(fake_meta) == ["back"])
    await sleep(0.2)
    assert event_ids(fake_meta) == ["back"]
    assert {row[0] for row in spool_rows(spool)} <= {"back"}


@pytest_twisted.ensureDeferred
async def test_events_of_a_response_tracked_as_every_destination_goes_are_counted_as_dropped(
    start_tagd, origin, fake_meta, fake_ga4, fake_tiktok, tmp_path
):
    """A response tracked just before a reload removes every destination hands its events
    over after it (two reactor turns after its head): nobody is left to deliver them to,
    so they are counted as dropped for that reason, never as accepted."""
    meta, _, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]))
    tracker = reloader(tagd.service)._proxy.on_tracking
    visit = Visit(
        client_ip="192.0.2.1",
        scheme="https",
        method=b"GET",
        uri=b"/page",
        host=b"shop.example",
        request_headers=Headers({b"user-agent": [FIREFOX]}),
        status=200,
    )
    tracked = tracker([json.dumps(PAGE_VIEW).encode()], visit)
    await tagd.reload(tagd_toml(origin, spool, []))
    tracked.deliver()
    tracked.hand_over()
    assert tagd.metrics.value("tracking_dropped", reason="no_destination") == 1
    assert tagd.metrics.value("events_accepted") == 0


@pytest_twisted.ensureDeferred
async def test_a_reload_reads_the_file_found_at_start_up(
    start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events, monkeypatch
):
    """tagd found ./tagd.toml at start-up (no --config, no $TAGD_CONFIG).  Renamed away (an
    editor saving it) when SIGHUP comes, from another working directory: the reload fails
    with one error line naming the file, and Meta keeps its lane and its rows, where the
    built-in defaults would have removed it.  Back in place, that same file is read."""
    meta, _, tiktok = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    monkeypatch.chdir(tmp_path)
    tagd = await start_tagd(tagd_toml(origin, spool, [meta]), named=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tagd.toml").write_text(tagd_toml(origin, spool, []))
    monkeypatch.chdir(elsewhere)
    saved = tagd.path.rename(tmp_path / "tagd.toml~")

    await tagd.hangup()
    assert reload_lines(log_events) == [
        (
            "error",
            "configuration not reloaded, the running one stays: tagd: configuration error in "
            f"{tagd.path}: (file): cannot be read: No such file or directory",
        )
    ]
    assert tagd.reloads("failed") == 1 and tagd.reloads("ok") == 0
    await visit(tagd.port, connect, "kept")
    await eventually(lambda: event_ids(fake_meta) == ["kept"])
    assert read_dead_letters(str(spool), "meta") == []

    saved.rename(tagd.path)
    await tagd.reload(tagd_toml(origin, spool, [meta, tiktok]))
    assert reload_lines(log_events)[1:] == [
        ("info", f"configuration reloaded from {tagd.path}: destinations added: tiktok")
    ]


@pytest_twisted.ensureDeferred
async def test_a_tagd_started_on_its_defaults_looks_for_tagd_toml_again(
    reactor, origin, tmp_path, log_events, monkeypatch
):
    """No file at start-up: tagd runs on its built-in defaults, and each reload looks for
    ./tagd.toml of the directory it started in.  Still none: nothing changes, and the line
    says so.  One written since: it is read, and what it sets waits for a restart."""
    monkeypatch.chdir(tmp_path)
    overrides = {"listen": "tcp:0:interface=127.0.0.1", "origin": f"http://127.0.0.1:{origin.port}"}
    load = config_loader(overrides, environ={})
    reload = reloader(build_service(load(), reactor, Metrics(), load=load)).reload
    monkeypatch.chdir(tmp_path.parent)
    log_events.clear()  # what start-up logged

    await within(reload())
    (tmp_path / "tagd.toml").write_text(toml_table("[admin]", {"listen": "tcp:0:interface=127.0.0.1"}))
    await within(reload())
    assert reload_lines(log_events) == [
        ("info", "configuration reloaded from (built-in defaults): nothing changed"),
        ("warn", f"configuration reloaded from {tmp_path / 'tagd.toml'}: admin.listen changed, which "
                 "tagd reads only at start-up: the running values stay until a restart (systemctl restart tagd)"),
    ]  # fmt: skip


# -- rows of destinations that are gone ------------------------------------------------------


def dead_reasons(spool: Path, destination: str) -> list[str]:
    return [letter.last_error for letter in read_dead_letters(str(spool), destination)]


@pytest_twisted.ensureDeferred
async def test_a_removed_destination_s_rows_become_dead_letters_and_come_back(
    reactor, start_tagd, origin, connect, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events
):
    """Meta fails while two events wait for it; a reload removes Meta: its rows become dead
    letters ("destination no longer configured"), no longer counted as undelivered, and
    one line says how many.  The dashboard's live table shows them as one entry, counted
    (the spool dead-letters them without reading them, so no ids), and its counters keep
    Meta's but list only TikTok as configured.  Configured again, retry-dead sends them
    to Meta."""
    meta, _, tiktok = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool = tmp_path / "spool.sqlite3"
    tagd = await start_tagd(tagd_toml(origin, spool, [meta, tiktok]))
    fake_meta.fake.inject(1000, status=503)
    for event_id in ("m-1", "m-2"):
        await visit(tagd.port, connect, event_id)
    await eventually(lambda: len(fake_tiktok.fake.events) == 2)
    await eventually(lambda: not [row for row in spool_rows(spool) if row[1] == "tiktok"])  # acknowledged
    await eventually(lambda: tagd.metrics.value("events_delivered", destination="meta", outcome="transient") >= 2)

    await tagd.reload(tagd_toml(origin, spool, [tiktok]))
    assert dead_reasons(spool, "meta") == [ABANDONED, ABANDONED]
    assert tagd.metrics.value("events_delivered", destination="meta", outcome="dead") == 2
    (delivery,) = [s for s in tagd.service if hasattr(s, "spool")]
    assert delivery.spool.undelivered == 0
    assert [text for level, text in reload_lines(log_events) if level == "warn"] == [
        "dead-lettered the pending deliveries to destinations no longer configured (meta: 2); "
        "`tagd spool retry-dead --destination NAME` sends them once NAME is configured again"
    ]
    (admin,) = [s for s in tagd.service if isinstance(s, AdminService)]
    (dead,) = [entry for entry in admin._root.events._feed.recent() if entry["outcome"] == "dead"]
    assert dead == {
        "outcome": "dead", "destination": "meta", "status": None, "count": 2, "event_ids": [],
        "event_names": [], "message": ABANDONED, "id": dead["id"], "time": dead["time"],
    }  # fmt: skip
    stats_url = b"http://127.0.0.1:%d/stats.json" % admin.port.getHost().port
    stats = json.loads(await within(readBody(await within(Agent(reactor).request(b"GET", stats_url)))))
    assert stats["destinations"] == ["tiktok"] and stats["delivered"]["meta"]["dead"] == 2

    fake_meta.fake._injections.clear()
    refused = len(event_ids(fake_meta))  # the fake records the events of refused requests too
    await tagd.reload(tagd_toml(origin, spool, [meta, tiktok]))
    assert retry_dead_letters(str(spool), ["meta"]) == 2
    await eventually(lambda: sorted(event_ids(fake_meta)[refused:]) == ["m-1", "m-2"])


@pytest_twisted.ensureDeferred
async def test_rows_of_unknown_destinations_are_dead_letters_after_a_start(
    reactor, start_tagd, origin, fake_meta, fake_ga4, fake_tiktok, tmp_path, log_events
):
    """A spool holding rows for a destination renamed away ("old-meta") and for one still
    configured: at start-up the first become dead letters, the others are delivered."""
    meta, _, _ = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    spool_path = tmp_path / "spool.sqlite3"
    spool = Spool.open(str(spool_path), reactor=reactor)
    spool.enqueue([make_event(event_id="kept")], ["meta", "old-meta"])
    spool.enqueue([make_event(event_id="orphan")], ["old-meta"])
    await within(spool.close())

    await start_tagd(tagd_toml(origin, spool_path, [meta]))
    await eventually(lambda: event_ids(fake_meta) == ["kept"])
    await eventually(lambda: len(dead_reasons(spool_path, "old-meta")) == 2)
    assert dead_reasons(spool_path, "old-meta") == [ABANDONED, ABANDONED]
    assert dead_reasons(spool_path, "meta") == []
    assert [text for level, text in reload_lines(log_events) if level == "warn"] == [
        "dead-lettered the pending deliveries to destinations no longer configured (old-meta: 2); "
        "`tagd spool retry-dead --destination NAME` sends them once NAME is configured again"
    ]


# -- SIGHUP to tagd run by twistd ------------------------------------------------------------


@attrs.define
class Shop:
    """An origin, the three platforms, and tagd's configuration file in front of them."""

    origin: TrackedOrigin
    platforms: tuple
    port: int
    spool: Path
    tagd: TagdProcess

    def write(self, destinations: list[str], **tables: dict) -> None:
        """tagd.toml with the named platforms (meta, ga4, tiktok) as destinations."""
        chosen = [d for d in platform_destinations(*self.platforms) if d["name"] in destinations]
        proxy = {"listen": f"tcp:{self.port}:interface=127.0.0.1", "origin": self.origin.url}
        self.tagd.config.write_text(
            toml_table("[proxy]", proxy)
            + ADMIN_TOML
            + toml_table("[spool]", {"path": str(self.spool)})
            + toml_table("[delivery]", {"poll_interval": 0.1})
            + "".join(toml_table(f"[{name}]", values) for name, values in tables.items())
            + destinations_toml(chosen)
        )


@pytest.fixture
def shop(tmp_path):
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    for platform in platforms:
        platform.up()
    made = Shop(origin, platforms, free_port(), tmp_path / "spool.sqlite3", TagdProcess(tmp_path / "tagd.toml", tmp_path))
    try:
        yield made
    finally:
        made.tagd.close()
        for platform in platforms:
            platform.close()
        origin.close()


def get(connection: http.client.HTTPConnection, path: str) -> int:
    """GET C{path} on the kept connection as a browser; the status."""
    connection.request("GET", path, headers={"User-Agent": BROWSER_UA, "Host": "shop.example"})
    response = connection.getresponse()
    assert response.read() == TRACKED_PAGE
    return response.status


def hangup(tagd: TagdProcess, reloads: int) -> str:
    """Send SIGHUP and wait until tagd has logged C{reloads} reload results in all."""
    tagd.process.send_signal(signal.SIGHUP)
    return wait_until(
        lambda: (log := tagd.logs()).count("configuration reloaded from") + log.count("configuration not reloaded") >= reloads and log,
        10,
        "reloaded",
    )


def test_sighup_reloads_without_dropping_a_kept_connection(shop):
    """twistd -n tagd with Meta: SIGHUP after the file gains TikTok and an excluded path.
    The visitor's keep-alive connection goes on (same socket), the excluded page is no
    event, the next page reaches Meta and TikTok.  An invalid file on the next SIGHUP
    changes nothing and is one error line naming file and key, with no token."""
    meta, _, tiktok = shop.platforms
    shop.write(["meta"])
    port = shop.tagd.start()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        assert get(connection, "/e/first") == 200
        wait_until(lambda: meta.delivered_ids() == {"first"}, 10, "delivered to Meta")
        socket_before = connection.sock

        shop.write(["meta", "tiktok"], tracking={"exclude_paths": ["/e/skip*"]})
        log = hangup(shop.tagd, 1)
        assert f"configuration reloaded from {shop.tagd.config}: destinations added: tiktok; [tracking] changed" in log
        assert get(connection, "/e/skip-1") == 200
        assert get(connection, "/e/second") == 200
        wait_until(lambda: "second" in meta.delivered_ids() and tiktok.delivered_ids() == {"second"}, 10, "delivered")
        assert connection.sock is socket_before

        shop.tagd.config.write_text(shop.tagd.config.read_text().replace('"meta"', '"nonsense"', 1))
        log = hangup(shop.tagd, 2)
        assert get(connection, "/e/third") == 200
        wait_until(lambda: "third" in tiktok.delivered_ids() and "third" in meta.delivered_ids(), 10, "delivered")
        assert connection.sock is socket_before
        assert (meta.cut, tiktok.cut) == (0, 0)  # no request cut by a reload
    finally:
        connection.close()
    assert "skip-1" not in meta.delivered_ids() | tiktok.delivered_ids()
    assert "skip-1" not in {row[0] for row in spool_rows(shop.spool)}
    errors = [line for line in log.splitlines() if "configuration not reloaded" in line]
    assert len(errors) == 1, log
    assert (
        f"tagd: configuration error in {shop.tagd.config}: destinations[0].type: must be one of "
        f"{', '.join(DESTINATION_TYPES)}, got 'nonsense'"
    ) in errors[0]
    assert FAKE_META_TOKEN not in log and "tt-token" not in log
    assert "Traceback" not in log


def test_the_unit_reloads_with_sighup():
    """systemctl reload tagd sends SIGHUP to the main process."""
    unit = (REPO_ROOT / "contrib" / "systemd" / "tagd.service").read_text()
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in unit
