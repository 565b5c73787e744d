"""A destination's outage state and its lines (tagd.delivery.outage), the spool's backlog and
postponement, per-destination concurrency, and Meta's ageing API versions."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import LogLevel, formatEvent
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from conftest import eventually, within
from fakes import make_event, serve
from tagd.daemon.config import parse_config
from tagd.delivery.direct import Route
from tagd.delivery.destinations import Outcome, meta
from tagd.delivery.dispatcher import Dispatcher
from tagd.admin.metrics import Metrics
from tagd.delivery.outage import Outage, duration
from tagd.delivery.spool import Backlog, Spool


class Top(random.Random):
    """Jitter at its upper bound, so each pause shows its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def outage(**settings) -> Outage:
    return Outage("meta", **{"base": 1.0, "cap": 5.0, "reminder": 300.0, "rand": Top(), **settings})


def lines(log_events, level=None) -> list[str]:
    return [
        formatEvent(e)
        for e in log_events
        if e.get("log_namespace") == "tagd.delivery.outage" and (level is None or e["log_level"] is level)
    ]


def test_the_first_failure_after_a_success_is_the_rows_own_the_next_the_destination_s():
    """A success, then a failure: the rows' own.  Another failure right after it, with
    nothing succeeding since it was sent: the destination is out, and its pauses double
    from base up to the cap; failures of requests sent before a pause began double nothing."""
    state = outage()
    state.succeeded(10.0, 5)
    assert state.failed(11.0, 10.5, "HTTP 503") == (False, None)
    assert not state.out
    assert state.failed(12.0, 11.5, "HTTP 503") == (True, 1.0)
    assert state.out and state.since == 12.0
    assert state.failed(12.1, 11.6, "HTTP 503") == (True, None)  # sent before the pause
    pauses = [state.failed(now, now - 0.1, "HTTP 503")[1] for now in (14.0, 17.0, 22.0, 28.0)]
    assert pauses == [2.0, 4.0, 5.0, 5.0]
    assert state.succeeded(30.0, 1)
    assert not state.out and state.failures == 0


def test_a_failure_while_another_request_succeeded_since_it_left_is_the_rows_own():
    state = outage()
    state.failed(1.0, 0.5, "x")  # nothing before: the destination's
    assert state.out
    state.succeeded(2.0, 1)
    assert state.failed(2.1, 1.9, "x") == (False, None)
    assert state.failed(2.2, 1.95, "x") == (False, None)  # still: a success came after it left


def test_lines_warn_once_remind_then_say_the_end(log_events):
    """One warning with why and the backlog, a reminder per interval, one line at the end
    with how long and how many were sent since; nothing in between."""
    state = outage(reminder=300.0)
    state.failed(1000.0, 999.0, "no answer: ConnectionRefusedError")
    backlog = Backlog(owed=1200, oldest=990.0)
    for now in (1002.0, 1007.0, 1100.0):
        state.report(now, backlog)
    state.report(1303.0, Backlog(owed=5000, oldest=990.0))
    state.report(1310.0, Backlog(owed=5000, oldest=990.0))
    state.succeeded(1400.0, 1000)
    state.succeeded(1401.0, 4000)
    state.report(1402.0, None)
    state.report(1500.0, None)
    warned, said = lines(log_events, LogLevel.warn), lines(log_events)
    assert warned == [
        "meta: the platform stopped accepting events 2 s ago: no answer: ConnectionRefusedError. Nothing is"
        " lost: 1200 event(s) wait, the oldest accepted 12 s ago; tagd tries one request at a time and"
        " sends them all once it answers again",
        "meta: still not accepting events, for 5 min 3 s: no answer: ConnectionRefusedError; 5000 event(s)"
        " wait, the oldest accepted 5 min 13 s ago",
    ]
    assert said[2:] == ["meta: delivering again after 6 min 40 s out (since 2 s ago); 5000 event(s) sent since, no event waits"]


def test_brief_outages_are_counted_in_one_line_per_reminder(log_events):
    """A flaky platform: outages that end with the next request, hundreds of them, make
    one information line per reminder interval, and no warning."""
    state = outage(reminder=60.0)
    for n in range(300):
        now = 1000.0 + n
        state.failed(now, now - 0.5, "HTTP 503")  # the rows' own: a success came just before
        state.failed(now + 0.05, now - 0.4, "HTTP 503")  # then the destination's
        state.succeeded(now + 0.1, 1)
        if n % 5 == 0:
            state.report(now + 0.2, None)
    said = lines(log_events)
    assert lines(log_events, LogLevel.warn) == []
    assert 4 <= len(said) <= 6
    assert said[0].startswith("meta: 1 brief outage(s) since the last such line")
    assert all("brief outage(s)" in line and "HTTP 503" in line for line in said)


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0.4, "0 s"), (59, "59 s"), (61, "1 min 1 s"), (7322, "2 h 2 min")]
)
def test_durations_read_as_people_say_them(seconds, shown):
    assert duration(seconds) == shown


@pytest_twisted.ensureDeferred
async def test_the_spool_s_backlog_and_postponed_rows(reactor, tmp_path):
    """backlog() counts what each destination is owed and dates its oldest event;
    postpone() keeps the error, counts no attempt and makes the row due later."""
    spool = Spool.open(tmp_path / "spool.sqlite", reactor=reactor)
    try:
        assert spool.enqueue([make_event(event_id=f"e{n}") for n in range(3)], ["meta", "ga4"]) == 3
        await within(spool.flush())
        accepted = reactor.seconds()
        (first, *_) = await within(spool.lease("meta", 10, reactor.seconds()))
        await within(spool.ack("ga4", [lease.key for lease in await within(spool.lease("ga4", 1, reactor.seconds()))]))
        backlog = await within(spool.backlog())
        assert backlog["meta"].owed == 3 and backlog["ga4"].owed == 2
        assert accepted - 5 < backlog["meta"].oldest <= accepted
        later = reactor.seconds() + 60
        await within(spool.postpone("meta", [first.key], later, "HTTP 503"))
        due = await within(spool.lease("meta", 10, reactor.seconds()))
        assert due == []  # the other two are still in flight, the postponed one not due
        assert await within(spool.next_due("meta")) == later
        (again,) = await within(spool.lease("meta", 10, later))
        assert (again.key, again.attempts) == (first.key, 0)
    finally:
        await within(spool.close())


DESTINATIONS = """
[[destinations]]
type = "meta"
pixel_id = "1"
access_token = "t"

[[destinations]]
type = "ga4"
measurement_id = "G-1"
api_secret = "s"

[[destinations]]
type = "tiktok"
pixel_code = "C1"
access_token = "t"
concurrency = 7
"""


@pytest.mark.parametrize(
    ("delivery", "expected"), [("", (2, 64, 7)), ("[delivery]\nconcurrency = 3\n", (3, 3, 7))]
)
def test_concurrency_by_type_by_delivery_table_by_destination(delivery, expected):
    """Each type's default, unless [delivery] concurrency says for all, unless a
    destination says for itself."""
    config = parse_config(delivery + DESTINATIONS, "tagd.toml")
    assert tuple(d.concurrency for d in config.destinations) == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [("outage_backoff_cap", 0), ("outage_reminder", -1), ("max_attempts", 0), ("max_attempts", 1.5)],
)
def test_outage_settings_are_checked(key, value):
    from tagd.daemon.config import ConfigError

    with pytest.raises(ConfigError, match=f"delivery.{key}"):
        parse_config(f"[delivery]\n{key} = {value}\n", "tagd.toml")


def test_meta_s_api_version_defaults_to_the_newest_and_older_ones_are_outdated():
    assert meta.build("m", {"pixel_id": "1", "access_token": "t"}).api_version == meta.NEWEST_API_VERSION == "v26.0"
    assert meta.outdated("v26.0") is None and meta.outdated("v27.1") is None
    why = meta.outdated("v24.0")
    assert "v24.0" in why and 'api_version = "v26.0"' in why


def test_meta_s_retired_version_is_an_outage_with_advice():
    """Error 2635 is transient (every request meets it, the events wait); the advice says
    the fix, and so does the warning header of a call Meta upgraded; never the token."""
    destination = meta.build("m", {"pixel_id": "1", "access_token": "secret-token", "api_version": "v22.0"})
    body = json.dumps({"error": {"code": 2635, "message": "You are calling a deprecated version of the Ads API."}})
    assert destination.classify(400, body.encode()).outcome is Outcome.TRANSIENT
    advice = destination.advice(400, Headers(), body.encode())
    assert "v22.0" in advice and 'set api_version = "v26.0"' in advice
    header = Headers({b"X-Ad-Api-Version-Warning": [b"The call was upgraded to v23.0 (secret-token)"]})
    upgraded = destination.advice(200, header, b'{"events_received": 1}')
    assert "upgraded to v23.0" in upgraded and "secret-token" not in upgraded
    assert destination.advice(200, Headers(), b'{"events_received": 1}') is None


class UpgradingMeta(Resource):
    """Meta accepting every event, each answer with the version warning header."""

    isLeaf = True

    def render_POST(self, request) -> bytes:
        received = len(json.loads(request.content.read())["data"])
        request.setHeader(b"X-Ad-Api-Version-Warning", b"v20.0 is deprecated; the call was upgraded")
        return json.dumps({"events_received": received}).encode()

    def close(self) -> None:
        """Nothing waits (as L{fakes.Served} asks of a fake)."""


@pytest_twisted.ensureDeferred
async def test_the_dispatcher_logs_the_advice_once(reactor, platforms, log_events, tmp_path):
    served = serve(UpgradingMeta())
    spool = Spool.open(tmp_path / "spool.sqlite", reactor=reactor)
    destination = meta.build("meta", {"pixel_id": "1", "access_token": "meta-token", "api_version": "v20.0",
                                      "endpoint": served.base, "max_batch": 1})  # fmt: skip
    dispatcher = Dispatcher(reactor=reactor, spool=spool, routes=[Route(destination, 2.0)], http=platforms,
                            metrics=Metrics(), poll_interval=0.05)  # fmt: skip
    spool.enqueue([make_event(event_id=f"e{n}") for n in range(3)], ["meta"])
    dispatcher.startService()
    try:
        await eventually(lambda: spool.undelivered == 0)
    finally:
        await within(dispatcher.stopService())
        await within(spool.close())
        await served.stop()
    advice = [formatEvent(e) for e in log_events if "is retired or retiring" in formatEvent(e)]
    assert len(advice) == 1 and advice[0].startswith("meta: Meta says API version v20.0")


def test_check_config_warns_about_an_old_api_version(tmp_path: Path):
    command = Path(sys.executable).with_name("tagd")
    (tmp_path / "tagd.toml").write_text(
        '[[destinations]]\ntype = "meta"\npixel_id = "1"\naccess_token = "t"\napi_version = "v24.0"\n'
    )
    done = subprocess.run([str(command), "check-config", "tagd.toml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("tagd: warning: meta: api_version v24.0 is older than v26.0")
    assert 'api_version = "v24.0"' in done.stdout  # the output itself stays the configuration
