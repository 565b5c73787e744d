"""The cookies tagd sets on a tracked response, end to end: origin → tagd → fake platforms.

Which first-party cookies a visitor gets depends on the destinations configured and on
C{[tracking] first_party_cookies}; the event-id cookies give the page each event's id.
Every test checks the visitor's C{Set-Cookie} headers against what the platforms received,
so that a cookie and an event never disagree.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator
from urllib.parse import unquote

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from conftest import eventually, serve_quietly, sleep, within
from fakes import Answer, FakePlatform, Recorded, Violation
from origin import PAGE

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HEX32 = re.compile(r"[0-9a-f]{32}")
AD_COOKIES = {"_fbp", "_fbc", "ttclid", "_ga", "_tagd_sid"}
# A first visit from an ad click on three networks: every ad cookie of Meta's, TikTok's and
# GA4's that tagd can set is called for, and Pinterest's when it is configured.
CLICK = b"/page?fbclid=IwAR3Click&ttclid=E.C.P.Tt-42&epik=dj0yJnU9Q2xpY2s"


class FakeWebhook(FakePlatform):
    """A receiver for the webhook destination: records each batch and answers 200."""

    events_key = "events"

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        if not self.events_of(recorded.body):
            yield Violation("events", "the body is not an object with a list of events")

    def answer(self, recorded: Recorded) -> Answer:
        return Answer(200)


@pytest_twisted.async_yield_fixture
async def fake_webhook():
    """A webhook receiver on loopback, whose URL is C{base + "/events"}."""
    served = serve_quietly(FakeWebhook())
    yield served
    await within(Deferred.fromCoroutine(served.stop()))


def cookies_set(response) -> dict[str, str]:
    """The response's C{Set-Cookie} headers as name → value."""
    cookies = {}
    for line in response.header(b"set-cookie"):
        name, _, value = line.decode("ascii").split(";", 1)[0].partition("=")
        cookies[name.strip()] = value
    return cookies


async def tracked_visit(visitor, spec: Any, path: bytes = b"/page", headers=()):
    """GET C{path} with the origin asked to mark it with C{spec} as the tracking header."""
    response = await within(
        visitor.request(
            b"GET", path, headers=[(b"User-Agent", FIREFOX), *headers, (b"X-Track", json.dumps(spec).encode())]
        )
    )
    assert response.status == 200 and bytes(response.body) == PAGE
    return response


def destination(kind: str, meta, ga4, tiktok, webhook) -> dict:
    """A C{[[destinations]]} table of type C{kind}, pointing at its fake."""
    tables = {
        "meta": {"type": "meta", "name": "meta", "pixel_id": "1234", "access_token": "meta-token",
                 "endpoint": meta.base},
        "ga4": {"type": "ga4", "name": "ga4", "measurement_id": "G-TEST", "api_secret": "ga-secret",
                "endpoint": ga4.base},
        "tiktok": {"type": "tiktok", "name": "tiktok", "pixel_code": "CTEST123", "access_token": "tt-token",
                   "endpoint": tiktok.base},
        "webhook": {"type": "webhook", "name": "hook", "url": webhook.base + "/events"},
        "log": {"type": "log", "name": "dry-run"},
        "log of tiktok and pinterest": {"type": "log", "name": "dry-run", "platforms": ["tiktok", "pinterest"]},
    }  # fmt: skip
    return tables[kind]


@pytest_twisted.ensureDeferred
async def test_every_event_of_an_array_has_its_own_id_cookie(
    tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """An array of two events, one with the origin's id (with characters a cookie cannot
    hold) and one without: the configured cookie holds the first event's id, and
    C{tagd_event_id_<event_name>} each event's own, percent-encoded where needed; decoded,
    each is exactly the id that Meta and TikTok got for that event."""
    specs = [
        {"event_name": "AddToCart", "event_id": "cart 7;ä", "contents": [{"id": "sku-2", "quantity": 1}]},
        {"event_name": "Purchase", "custom_data": {"currency": "EUR", "value": 9.5}},
    ]
    visitor = await connect(tracking_tagd.port)
    response = await tracked_visit(visitor, specs)
    await eventually(lambda: len(fake_meta.fake.events) == 2 and len(fake_tiktok.fake.events) == 2)
    assert fake_meta.fake.violations == [] and fake_tiktok.fake.violations == []
    meta_ids = {e["event_name"]: e["event_id"] for e in fake_meta.fake.events}
    tiktok_ids = {e["event"]: e["event_id"] for e in fake_tiktok.fake.events}
    assert meta_ids["AddToCart"] == tiktok_ids["AddToCart"] == "cart 7;ä"
    assert HEX32.fullmatch(meta_ids["Purchase"]) and tiktok_ids["CompletePayment"] == meta_ids["Purchase"]

    cookies = cookies_set(response)
    ids = {name: value for name, value in cookies.items() if name.startswith("tagd_event_id")}
    assert set(ids) == {"tagd_event_id", "tagd_event_id_AddToCart", "tagd_event_id_Purchase"}
    assert unquote(ids["tagd_event_id"]) == unquote(ids["tagd_event_id_AddToCart"]) == "cart 7;ä"
    assert ids["tagd_event_id_AddToCart"] == "cart%207%3B%C3%A4"
    assert ids["tagd_event_id_Purchase"] == meta_ids["Purchase"]


@pytest_twisted.ensureDeferred
async def test_repeated_event_name_keeps_the_first_id(tracking_tagd, connect, fake_meta):
    """Two events of one name in one header: one cookie for that name, holding the first
    event's id (as the configured cookie does), never two cookies of one name."""
    specs = [{"event_name": "AddToCart", "event_id": "first"}, {"event_name": "AddToCart", "event_id": "second"}]
    visitor = await connect(tracking_tagd.port)
    response = await tracked_visit(visitor, specs)
    names = [line.split(b"=", 1)[0] for line in response.header(b"set-cookie")]
    assert names.count(b"tagd_event_id_AddToCart") == 1
    assert cookies_set(response)["tagd_event_id_AddToCart"] == "first"
    await eventually(lambda: len(fake_meta.fake.events) == 2)
    assert [e["event_id"] for e in fake_meta.fake.events] == ["first", "second"]


@pytest_twisted.ensureDeferred
async def test_without_first_party_cookies_no_id_is_invented(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """With C{first_party_cookies = false} a visitor without cookies gets only the
    event-id cookies; Meta gets no C{fbp} (none that a browser holds), GA4 gets nothing
    (an invented client id would be a new user on every page) and the event is counted
    dead for it.  A visitor with C{_ga} reaches GA4 under that client id."""
    tagd = await start_tracking_tagd(tracking={"first_party_cookies": False})
    visitor = await connect(tagd.port)
    response = await tracked_visit(visitor, {"event_name": "ViewContent", "event_id": "anon-1"})
    assert set(cookies_set(response)) == {"tagd_event_id", "tagd_event_id_ViewContent"}
    await eventually(lambda: fake_meta.fake.events and fake_tiktok.fake.events)
    [meta] = fake_meta.fake.events
    assert meta["event_id"] == "anon-1"
    assert "fbp" not in meta["user_data"] and "fbc" not in meta["user_data"]
    await eventually(lambda: tagd.delivered("ga4", "dead") == 1)
    assert fake_ga4.fake.requests == []

    response = await tracked_visit(
        visitor,
        {"event_name": "ViewContent", "event_id": "known-1"},
        headers=[(b"Cookie", b"_ga=GA1.1.1234567890.1706540400")],
    )
    assert set(cookies_set(response)) == {"tagd_event_id", "tagd_event_id_ViewContent"}
    await eventually(lambda: fake_ga4.fake.requests)
    [request] = fake_ga4.fake.requests
    assert request.body["client_id"] == "1234567890.1706540400"
    assert [e["name"] for e in request.body["events"]] == ["view_item"]
    assert fake_ga4.fake.violations == []
    await eventually(lambda: len(fake_meta.fake.events) == 2)
    assert "fbp" not in fake_meta.fake.events[1]["user_data"]


@pytest.mark.parametrize(
    "kinds, expected",
    [
        (["webhook"], set()),
        (["meta"], {"_fbp", "_fbc"}),
        (["tiktok"], {"ttclid"}),
        (["ga4"], {"_ga", "_tagd_sid"}),
        (["meta", "webhook"], {"_fbp", "_fbc"}),
        (["log"], AD_COOKIES),
        (["log of tiktok and pinterest"], {"ttclid", "_epik"}),
    ],
    ids=["webhook", "meta", "tiktok", "ga4", "meta+webhook", "log", "log of some platforms"],
)
@pytest_twisted.ensureDeferred
async def test_ad_cookies_only_for_configured_platforms(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, fake_webhook, kinds, expected
):
    """A first visit from a click on the ad networks gets the cookies of the configured
    platforms only (the log destination those of the platforms its C{platforms} names,
    by default Meta, GA4 and TikTok); the event-id cookies are set whatever the
    destinations."""
    fakes = (fake_meta, fake_ga4, fake_tiktok, fake_webhook)
    tagd = await start_tracking_tagd(destinations=[destination(kind, *fakes) for kind in kinds])
    visitor = await connect(tagd.port)
    response = await tracked_visit(visitor, {"event_name": "PageView", "event_id": "pv-1"}, path=CLICK)
    cookies = cookies_set(response)
    assert set(cookies) == expected | {"tagd_event_id", "tagd_event_id_PageView"}
    assert cookies["tagd_event_id"] == cookies["tagd_event_id_PageView"] == "pv-1"
    await eventually(lambda: tagd.metrics.value("events_accepted") == 1)
    if "meta" in kinds:
        await eventually(lambda: fake_meta.fake.events)
        user_data = fake_meta.fake.events[0]["user_data"]
        assert (user_data["fbp"], user_data["fbc"]) == (cookies["_fbp"], cookies["_fbc"])


@pytest_twisted.ensureDeferred
async def test_webhook_only_passes_the_ids_the_visitor_has(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, fake_webhook
):
    """With only a webhook, tagd sets no ad cookie and invents no id: the webhook gets the
    visitor's own C{_fbp} and C{_ga} client id, the click ids of the URL, and no id
    for what the visitor does not have."""
    tagd = await start_tracking_tagd(
        destinations=[destination("webhook", fake_meta, fake_ga4, fake_tiktok, fake_webhook)]
    )
    visitor = await connect(tagd.port)
    fbp = "fb.1.1706540400000.1234567890"
    response = await tracked_visit(
        visitor,
        {"event_name": "ViewContent", "event_id": "hook-1"},
        path=CLICK,
        headers=[(b"Cookie", f"_fbp={fbp}; _ga=GA1.2.55.1706540400".encode())],
    )
    assert set(cookies_set(response)) == {"tagd_event_id", "tagd_event_id_ViewContent"}
    await eventually(lambda: fake_webhook.fake.events)
    assert fake_webhook.fake.violations == []
    [event] = fake_webhook.fake.events
    assert event["event_id"] == "hook-1"
    assert (event["fbp"], event["ga_client_id"], event["ttclid"]) == (fbp, "55.1706540400", "E.C.P.Tt-42")
    assert re.fullmatch(r"fb\.1\.\d{13}\.IwAR3Click\.AQICAAEA", event["fbc"])
    assert event["ga_session_id"] is None and event["ttp"] is None

    response = await tracked_visit(visitor, {"event_name": "ViewContent", "event_id": "hook-2"})
    assert set(cookies_set(response)) == {"tagd_event_id", "tagd_event_id_ViewContent"}
    await eventually(lambda: len(fake_webhook.fake.events) == 2)
    second = fake_webhook.fake.events[1]
    assert (second["fbp"], second["fbc"], second["ga_client_id"], second["ttclid"]) == (None, None, None, None)
    await sleep(0.1)  # nothing may arrive anywhere else
    assert fake_meta.fake.requests == fake_ga4.fake.requests == fake_tiktok.fake.requests == []


def test_every_destination_type_says_which_cookies_it_calls_for() -> None:
    """An ad platform's destination calls for its own platform's cookies, a webhook for
    none, the dry run for those its platforms setting names; every type the configuration
    accepts gets an answer, so that none can fail the tracker's start."""
    from types import SimpleNamespace

    from tagd.delivery.destinations.registry import DESTINATION_TYPES
    from tagd.tagging.identity import PLATFORMS
    from tagd.tagging.tracker import called_for

    def destination(kind: str, platforms=()):
        return SimpleNamespace(type=kind, destination=SimpleNamespace(platforms=platforms))

    assert {kind: called_for(destination(kind)) for kind in DESTINATION_TYPES if kind != "log"} == {
        kind: frozenset({kind}) if kind in PLATFORMS else frozenset() for kind in DESTINATION_TYPES if kind != "log"
    }
    assert PLATFORMS <= set(DESTINATION_TYPES)
    assert called_for(destination("webhook")) == frozenset()
    assert called_for(destination("log", ("tiktok", "pinterest"))) == {"tiktok", "pinterest"}


@pytest_twisted.ensureDeferred
async def test_a_destination_needing_no_consent_gets_a_gpc_visitor_s_event_and_no_cookie_is_set(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, fake_webhook
):
    """Sec-GPC: 1 refuses every purpose: Meta gets nothing, the shop's own webhook (purpose
    none) gets the event with its consent empty, and the response sets no cookie at all,
    not even the pixel's event-id cookies; a Meta table asking for no consent would get
    it with Limited Data Use."""
    fakes = (fake_meta, fake_ga4, fake_tiktok, fake_webhook)
    meta = {**destination("meta", *fakes), "consent_purpose": "none"}
    tagd = await start_tracking_tagd(destinations=[destination("webhook", *fakes), meta])
    visitor = await connect(tagd.port)
    response = await tracked_visit(visitor, {"event_name": "ViewContent", "event_id": "gpc-1"}, path=CLICK, headers=[(b"Sec-GPC", b"1")])
    assert cookies_set(response) == {}
    await eventually(lambda: fake_webhook.fake.events and fake_meta.fake.events)
    [record] = fake_webhook.fake.events
    assert (record["event_id"], record["consent"]) == ("gpc-1", [])
    [event] = fake_meta.fake.events
    assert event["data_processing_options"] == ["LDU"]
    assert fake_meta.fake.violations == []
