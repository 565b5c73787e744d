"""The tracker hands over a reactor turn's events together: one submit per set of allowed
destinations, each response's events in order, one response's failure costing no other
its events; and through a real tagd, concurrent visitors' events all arrive once."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.web.http_headers import Headers

from tagd.admin.metrics import Metrics
from tagd.daemon.config import parse_config
from tagd.tagging.hook import Visit
from tagd.tagging.tracker import Tracker

from conftest import within
from test_tracking_e2e import delivered

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

# Meta needs marketing consent; the webhook none: a visitor who refused (GPC) reaches it only.
CONFIG = """
[tracking]
honor_gpc = true

[[destinations]]
type = "meta"
pixel_id = "1234"
access_token = "token"

[[destinations]]
type = "webhook"
name = "hook"
url = "http://127.0.0.1:9/events"
consent_purpose = "none"
"""


def tracker(submit) -> Tracker:
    config = parse_config(CONFIG, "test.toml")
    return Tracker(config=config.tracking, submit=submit, metrics=Metrics(), destinations=config.destinations)


def response(track, event_id: str, gpc: bool = False):
    headers = Headers({b"user-agent": [FIREFOX], **({b"sec-gpc": [b"1"]} if gpc else {})})
    visit = Visit("192.0.2.1", "https", b"GET", b"/page", b"shop.example", headers, 200)
    return track([json.dumps({"event_name": "PageView", "event_id": event_id}).encode()], visit)


def test_a_turn_s_events_go_in_one_submit_per_set_of_destinations():
    """Deliveries gather; the hand-over submits each set of allowed destinations' events in
    one call, in the order of the responses, and then nothing more until more gather."""
    calls = []
    track = tracker(lambda events, allowed: calls.append(([e.event_id for e in events], tuple(allowed))))
    responses = [response(track, "a"), response(track, "refused", gpc=True), response(track, "b")]
    for tracked in responses:
        tracked.deliver()
    assert calls == []
    responses[0].hand_over()
    assert sorted(calls) == [(["a", "b"], ("meta", "hook")), (["refused"], ("hook",))]
    responses[2].hand_over()
    assert len(calls) == 2


def test_one_response_that_cannot_be_submitted_costs_no_other_its_events(logged_failures):
    """Should the turn's submit fail, each response's events are submitted on their own:
    only the one that fails again is lost, and logged."""
    accepted = []

    def submit(events, allowed):
        if any(e.event_id == "bad" for e in events):
            raise ValueError("cannot be stored")
        accepted.extend(e.event_id for e in events)

    track = tracker(submit)
    responses = [response(track, name) for name in ("a", "bad", "b")]
    for tracked in responses:
        tracked.deliver()
    responses[0].hand_over()
    assert accepted == ["a", "b"]
    assert [e["log_failure"].type for e in logged_failures] == [ValueError]


@pytest_twisted.ensureDeferred
async def test_concurrent_visitors_events_each_arrive_once(start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok):
    """Twenty visitors at once, whose heads go out in as few reactor turns as the reactor
    makes of them: every event is accepted once and reaches every platform once."""
    tagd = await start_tracking_tagd()
    visitors = [await connect(tagd.port) for _ in range(20)]
    spec = json.dumps({"event_name": "PageView"}).encode()
    answers = await within(
        gatherResults(
            [v.request(b"GET", b"/page", headers=[(b"User-Agent", FIREFOX), (b"X-Track", spec)]) for v in visitors]
        )
    )
    assert all(a.status == 200 for a in answers)
    by_platform = await delivered([fake_meta, fake_ga4, fake_tiktok], count=20)
    for events in by_platform:
        assert len(events) == 20
    assert tagd.metrics.value("events_accepted") == 20
