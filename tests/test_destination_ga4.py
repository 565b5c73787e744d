"""Tests for L{tagd.delivery.destinations.ga4}: the Measurement Protocol payload, its limits, and
how GA4's answers are judged."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
import treq
from hypothesis import given, strategies as st

from conftest import within
from fakes import FakeGA4, make_event, serve
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import ga4
from tagd.tagging.events import Event

SECRET = "s3cr3t-ga4-api-secret"
GA4_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")


def destination(**settings) -> ga4.Ga4Destination:
    """A GA4 destination with test credentials and C{settings}."""
    return ga4.build("ga-main", {"measurement_id": "G-TEST", "api_secret": SECRET, **settings})


def payloads(requests) -> list[dict]:
    return [json.loads(r.body) for r in requests]


def only_event(event: Event, **settings) -> dict:
    """The one GA4 event that C{event} becomes."""
    (request,) = destination(**settings).encode([event])
    (encoded,) = json.loads(request.body)["events"]
    return encoded


# -- the module's contract ------------------------------------------------------------


def test_module_contract():
    """The module declares its type, keys, secrets and timeout for the configuration."""
    assert ga4.TYPE == "ga4"
    assert ga4.SECRETS == ("api_secret",)
    assert ga4.DEFAULT_TIMEOUT == 5.0
    assert {k for k, (_, required, _) in ga4.KEYS.items() if required} == {"measurement_id", "api_secret"}
    assert ga4.KEYS["endpoint"][2] == "https://www.google-analytics.com"
    assert ga4.KEYS["debug"] == ((bool,), False, False)
    assert ga4.KEYS["max_batch"][2] == 25


def test_build_defaults():
    """A minimal table gives the public endpoint, production path and GA4's batch size."""
    dest = destination()
    assert (dest.name, dest.type, dest.max_batch, dest.debug) == ("ga-main", "ga4", 25, False)
    assert dest.endpoint == "https://www.google-analytics.com"


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"measurement_id": ""}, "measurement_id"),
        ({"api_secret": ""}, "api_secret"),
        ({"max_batch": 26}, "max_batch"),
        ({"max_batch": 0}, "max_batch"),
        ({"endpoint": "ftp://example.com"}, "endpoint"),
        ({"event_names": {"Purchase": "bad name"}}, "event_names"),
        ({"event_names": {"Purchase": "session_start"}}, "event_names"),
    ],
)
def test_build_rejects(settings, key):
    """Bad settings raise a ValueError that starts with the key and never shows the secret."""
    with pytest.raises(ValueError) as raised:
        destination(**settings)
    assert str(raised.value).startswith(key)
    assert SECRET not in str(raised.value)


@given(st.from_regex(r"G-[A-Za-z0-9]{1,16}", fullmatch=True))
def test_a_measurement_id_as_ga4_shows_it_is_taken(measurement_id):
    """G- and letters and digits: a web data stream's id, taken as written."""
    assert destination(measurement_id=measurement_id).measurement_id == measurement_id


@given(st.text(max_size=20).filter(lambda text: not re.fullmatch(r"G-[A-Za-z0-9]+", text)))
def test_any_other_measurement_id_is_refused(measurement_id):
    """Anything else (UA-12345, a pasted URL, a space too many) would be sent in every
    request and answered 2xx while GA4 drops it: refused, without quoting it."""
    with pytest.raises(ValueError) as raised:
        destination(measurement_id=measurement_id)
    assert str(raised.value).startswith('measurement_id: must be a GA4 measurement id, "G-" then letters and digits')
    assert repr(measurement_id) not in str(raised.value)
    assert ("Universal Analytics" in str(raised.value)) == measurement_id.startswith("UA-")


@pytest.mark.parametrize(
    ("measurement_id", "said"),
    [
        ("UA-12345", '"G-" then letters and digits (a UA- id is Universal Analytics, which takes no Measurement Protocol events)'),
        ("UA-12345-1", '"G-" then letters and digits (a UA- id is Universal Analytics, which takes no Measurement Protocol events)'),
        ("G-", '"G-" then letters and digits'),
        ("g-abc123", '"G-" then letters and digits'),
        ("G-ABC 123", '"G-" then letters and digits'),
    ],
)
def test_only_a_ua_id_is_told_about_universal_analytics(measurement_id, said):
    """The mistake named is the one made: an old UA- property's id, or a GA4 id mistyped."""
    with pytest.raises(ValueError) as raised:
        destination(measurement_id=measurement_id)
    assert str(raised.value) == "measurement_id: must be a GA4 measurement id, " + said


# -- names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta, expected",
    [
        ("ViewContent", "view_item"),
        ("AddToCart", "add_to_cart"),
        ("InitiateCheckout", "begin_checkout"),
        ("AddPaymentInfo", "add_payment_info"),
        ("Purchase", "purchase"),
        ("Search", "search"),
        ("Lead", "generate_lead"),
        ("CompleteRegistration", "sign_up"),
        ("PageView", "page_view"),
    ],
)
def test_default_names(meta, expected):
    """Meta's standard names map to GA4's recommended events, as PLATFORMS.md lists."""
    assert only_event(make_event(event_name=meta))["name"] == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("AddToWishlist", "add_to_wishlist"),
        ("newsletter_signup", "newsletter_signup"),
        ("MyCustom_Event2", "my_custom_event2"),
        ("session_start", "custom_session_start"),
        ("ga_internal", "custom_ga_internal"),
        ("A" + "b" * 39, "a" + "b" * 39),
        ("Very" * 10 + "Long", ("very_" * 8)[:40].rstrip("_")),
    ],
)
def test_other_names_converted(name, expected):
    """Names without a mapping become valid, unreserved snake_case names of at most 40."""
    converted = ga4.ga4_event_name(name)
    assert converted == expected
    assert GA4_NAME.fullmatch(converted)


def test_name_override():
    """C{event_names} replaces a default mapping and adds new ones, keeping the rest."""
    dest = destination(event_names={"Lead": "request_quote", "Subscribe": "subscribe_newsletter"})
    names = [json.loads(r.body)["events"][0]["name"] for r in dest.encode(
        [make_event(event_name=n, ga_client_id=n) for n in ("Lead", "Subscribe", "Purchase")]
    )]
    assert names == ["request_quote", "subscribe_newsletter", "purchase"]


# -- payload --------------------------------------------------------------------------


def test_payload_shape():
    """One request: client id, time in microseconds, visitor IP, and the event's params."""
    event = make_event()
    (request,) = destination().encode([event])
    body = json.loads(request.body)
    assert body["client_id"] == "1234567890.1706540400"
    assert body["timestamp_micros"] == event.event_time * 1_000_000
    assert body["ip_override"] == "203.0.113.7"
    (encoded,) = body["events"]
    assert encoded["timestamp_micros"] == event.event_time * 1_000_000
    assert encoded["params"] == {
        "session_id": "1706540400",
        "engagement_time_msec": ga4.ENGAGEMENT_TIME_MSEC,
        "page_location": event.source_url,
        "page_referrer": event.referrer,
        "currency": "EUR",
        "value": 25.0,
        "transaction_id": "A-1001",
        "items": [
            {"item_id": "sku-1", "item_name": "Blue mug", "item_category": "Kitchen", "price": 12.5, "quantity": 2}
        ],
    }
    assert request.positions == (0,)
    assert request.headers["Content-Type"] == "application/json"


def test_no_unhashed_personal_data_sent():
    """The e-mail and phone go only hashed, in user_data; the user agent as it is, in the
    reference's top-level user_agent field."""
    body = destination().encode([make_event()])[0].body.decode()
    assert "Joe@Example" not in body and "joe@example" not in body.lower()
    assert "30 1234567" not in body and "49301234567" not in body
    assert json.loads(body)["user_agent"] == make_event().user_agent


def test_user_data_normalised_as_google_asks():
    """E-mail trimmed and lower-cased, gmail's dots before the "@" removed; phone in E.164
    with its "+"; names in one address; a phone pre-hashed the Meta way is left out."""
    from tagd.tagging.hashing import sha256_hex

    event = make_event(
        user_data={
            "em": (" Jo.E.Doe@GMail.com ", "x@example.org"),
            "ph": ("+49 (0)30 1234567", "a" * 64),
            "fn": ("  Mary  Ann ",),
            "ln": ("Doe",),
            "ct": ("Berlin",),
        }
    )
    (body,) = payloads(destination().encode([event]))
    assert body["user_data"] == {
        "sha256_email_address": [sha256_hex("joedoe@gmail.com"), sha256_hex("x@example.org")],
        "sha256_phone_number": [sha256_hex("+49301234567")],
        "address": [{"sha256_first_name": sha256_hex("mary ann"), "sha256_last_name": sha256_hex("doe")}],
    }
    assert "Berlin" not in json.dumps(body)


def test_consent_object_follows_marketing_consent():
    """GRANTED for both ad signals only with marketing consent; no object when no consent
    record was read; no user_data when ad_user_data is denied."""
    granted = payloads(destination().encode([make_event(consent=frozenset({"marketing", "analytics"}))]))[0]
    assert granted["consent"] == {"ad_user_data": "GRANTED", "ad_personalization": "GRANTED"}
    assert "user_data" in granted
    denied = payloads(destination().encode([make_event(consent=frozenset({"analytics"}))]))[0]
    assert denied["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
    assert "user_data" not in denied
    unknown = payloads(destination().encode([make_event(consent=None)]))[0]
    assert "consent" not in unknown and "user_data" in unknown


def test_one_request_per_visitor_fields():
    """The user agent, consent and user data are one value per request: events of one
    client that differ in them go in separate requests, alike ones together."""
    events = [
        make_event(event_id="a"),
        make_event(event_id="b"),
        make_event(event_id="c", user_agent="Other/1.0"),
        make_event(event_id="d", consent=frozenset({"analytics"})),
    ]
    requests = destination().encode(events)
    assert [r.positions for r in requests] == [(0, 1), (2,), (3,)]


def test_search_and_content_ids():
    """search_string becomes search_term; Meta-style content_ids become items."""
    event = make_event(
        event_name="Search", contents=(), custom_data={"search_string": "blue mug", "content_ids": ["a", 7]}
    )
    params = only_event(event)["params"]
    assert params["search_term"] == "blue mug"
    assert params["items"] == [{"item_id": "a"}, {"item_id": "7"}]


def test_numeric_strings_and_odd_values():
    """A price written as a string is a number; a bad currency and empty values are left out."""
    custom = {"value": "19.90", "currency": "euro", "order_id": 1001}
    params = only_event(make_event(custom_data=custom))["params"]
    assert params["value"] == 19.9
    assert "currency" not in params
    assert params["transaction_id"] == "1001"
    params = only_event(make_event(referrer=None, custom_data={"value": "n/a", "currency": "eur"}))["params"]
    assert "page_referrer" not in params and "value" not in params
    assert params["currency"] == "EUR"
    for not_a_number in ("NaN", "inf", True, [1]):
        assert "value" not in only_event(make_event(custom_data={"value": not_a_number}))["params"]


def test_session_from_ga_cookie_or_window():
    """GA's session id is used when known; otherwise events share one per half hour."""
    start = 1_706_540_400  # a multiple of 1800
    assert only_event(make_event(ga_session_id="999"))["params"]["session_id"] == "999"
    ids = [
        only_event(make_event(ga_session_id=None, event_time=start + offset))["params"]["session_id"]
        for offset in (0, 1799, 1800)
    ]
    assert ids[0] == ids[1] == str(start)
    assert ids[2] == str(start + 1800)


def test_custom_data_passed_through():
    """Other custom_data scalars become parameters when GA4 accepts their names."""
    custom = {
        "coupon": "SUMMER",
        "shipping": 4.9,
        "_private": "x",
        "ga_x": "y",
        "bad-name": 1,
        "nested": {"a": 1},
        "flag": True,
    }
    params = only_event(make_event(custom_data=custom))["params"]
    assert params["coupon"] == "SUMMER" and params["shipping"] == 4.9
    assert not {"_private", "ga_x", "bad-name", "nested", "flag"} & set(params)


def test_at_most_25_params_standard_first():
    """With many custom values, 25 parameters are sent and the standard ones are kept."""
    custom = {"currency": "EUR", "value": 1, **{f"extra_{i:02}": i for i in range(40)}}
    params = only_event(make_event(custom_data=custom))["params"]
    assert len(params) == 25
    assert {"session_id", "engagement_time_msec", "page_location", "currency", "value", "items"} <= set(params)
    assert "extra_00" in params and "extra_39" not in params


def test_values_truncated_to_ga4_limits():
    """Values are cut to 100 characters, the page parameters to their larger limits."""
    event = make_event(
        source_url="https://shop.example/" + "p" * 2000,
        referrer="https://ref.example/" + "r" * 2000,
        custom_data={"order_id": "o" * 300, "note": "n" * 300},
        contents=({"id": "i" * 300, "title": "t" * 300},),
    )
    params = only_event(event)["params"]
    assert len(params["page_location"]) == 1000
    assert len(params["page_referrer"]) == 420
    assert len(params["transaction_id"]) == len(params["note"]) == 100
    assert len(params["items"][0]["item_id"]) == len(params["items"][0]["item_name"]) == 100


# -- batching -------------------------------------------------------------------------


def test_one_client_per_request_and_skipped_events():
    """Events are grouped by client id, in order; events without one are not sent."""
    events = [
        make_event(event_id="a1", ga_client_id="A"),
        make_event(event_id="b1", ga_client_id="B"),
        make_event(event_id="x", ga_client_id=None),
        make_event(event_id="a2", ga_client_id="A"),
    ]
    requests = destination().encode(events)
    assert [r.positions for r in requests] == [(0, 3), (1,)]
    assert [p["client_id"] for p in payloads(requests)] == ["A", "B"]


def test_a_shared_event_id_keeps_each_event_in_its_own_request():
    """Two visitors' events with one id (a shop's product id as the event id) go in two
    requests, each naming its own event's position, so that each is settled apart."""
    events = [
        make_event(event_id="sku-9", ga_client_id="A", event_time=1_700_000_001),
        make_event(event_id="sku-9", ga_client_id="B", event_time=1_700_000_002),
        make_event(event_id="sku-9", ga_client_id="A", event_time=1_700_000_003),
    ]
    requests = destination().encode(events)
    assert [r.positions for r in requests] == [(0, 2), (1,)]
    assert [p["client_id"] for p in payloads(requests)] == ["A", "B"]
    assert [[e["timestamp_micros"] for e in p["events"]] for p in payloads(requests)] == [
        [1_700_000_001_000_000, 1_700_000_003_000_000],
        [1_700_000_002_000_000],
    ]


def test_one_ip_per_request():
    """One client seen from two addresses gets one request per address (ip_override)."""
    requests = destination().encode([make_event(client_ip="203.0.113.7"), make_event(client_ip="2001:db8::1")])
    assert [p["ip_override"] for p in payloads(requests)] == ["203.0.113.7", "2001:db8::1"]


def test_no_events_no_requests():
    """Nothing to send gives no request."""
    assert destination().encode([]) == []
    assert destination().encode([make_event(ga_client_id=None)]) == []


@pytest.mark.parametrize("max_batch, sizes", [(25, [25, 25, 10]), (10, [10] * 6)])
def test_batches_of_at_most_max_batch(max_batch, sizes):
    """One client's 60 events go out in requests of at most C{max_batch} events."""
    events = [make_event(event_id=f"e{i}") for i in range(60)]
    requests = destination(max_batch=max_batch).encode(events)
    assert [len(p["events"]) for p in payloads(requests)] == sizes
    assert [i for r in requests for i in r.positions] == list(range(60))


def test_body_stays_under_130_kb():
    """Large events are split over more requests so every body stays under 130 kB."""
    contents = tuple({"id": f"{n:03}" + "é" * 97, "title": "ü" * 100, "item_price": 1.0} for n in range(100))
    events = [make_event(event_id=f"e{i}", contents=contents) for i in range(25)]
    requests = destination().encode(events)
    assert len(requests) > 1
    assert all(len(r.body) < 130_000 for r in requests)
    assert [i for r in requests for i in r.positions] == list(range(25))


def test_one_huge_event_keeps_the_items_that_fit():
    """A single event too large for one body is sent with its first items only."""
    contents = tuple(
        {"id": f"{n:03}" + "é" * 97, "title": "ü" * 100, "category": "ß" * 100} for n in range(300)
    )
    (request,) = destination().encode([make_event(contents=contents)])
    assert len(request.body) < 130_000
    items = json.loads(request.body)["events"][0]["params"]["items"]
    assert 0 < len(items) < 300
    assert [item["item_id"][:3] for item in items] == [f"{n:03}" for n in range(len(items))]


# -- URLs and secrets -----------------------------------------------------------------


def test_urls():
    """The secret is in the request URL only; the log URL has the stream but not the secret."""
    (request,) = destination(endpoint="https://region1.google-analytics.com/").encode([make_event()])
    collect = "https://region1.google-analytics.com/mp/collect?measurement_id=G-TEST"
    assert request.url == f"{collect}&api_secret={SECRET}"
    assert request.log_url == collect


def test_debug_url():
    """Debug mode sends to the validation server."""
    (request,) = destination(debug=True).encode([make_event()])
    assert request.url.startswith("https://www.google-analytics.com/debug/mp/collect?")
    assert request.log_url.startswith("https://www.google-analytics.com/debug/mp/collect?")


def test_secret_never_shown():
    """The API secret is absent from repr, log URLs, request repr and verdict messages."""
    dest = destination(debug=True)
    (request,) = dest.encode([make_event()])
    assert SECRET not in repr(dest)
    assert SECRET not in request.log_url
    echoed = f"bad request for api_secret={SECRET}".encode()
    assert SECRET not in dest.classify(400, echoed).message
    debug_answer = json.dumps({"validationMessages": [{"fieldPath": "x", "description": SECRET}]}).encode()
    assert SECRET not in dest.classify(200, debug_answer).message


def test_request_repr_hides_secret():
    """An OutgoingRequest printed in a log line or a failing assertion hides the secret."""
    (request,) = destination().encode([make_event()])
    assert SECRET not in repr(request)


# -- classify -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 204])
def test_classify_success(status):
    """2xx is delivered (every other status: test_destination_common)."""
    verdict = destination().classify(status, b"")
    assert verdict.outcome is Outcome.SUCCESS
    assert verdict.retry_after is None


def test_classify_debug_messages():
    """In debug mode, validation messages make the answer permanent and are quoted."""
    message = {
        "fieldPath": "events",
        "description": "Event at index: [0] has invalid name",
        "validationCode": "NAME_INVALID",
    }
    body = json.dumps({"validationMessages": [message]}).encode()
    verdict = destination(debug=True).classify(200, body)
    assert verdict.outcome is Outcome.PERMANENT
    assert "events: Event at index: [0] has invalid name" in verdict.message


def test_classify_debug_clean_and_unreadable():
    """An empty message list is success; an unreadable validation answer is permanent."""
    dest = destination(debug=True)
    assert dest.classify(200, b'{"validationMessages": []}').outcome is Outcome.SUCCESS
    assert dest.classify(200, b"<html>").outcome is Outcome.PERMANENT
    assert dest.classify(503, b"").outcome is Outcome.TRANSIENT


def test_classify_ignores_messages_outside_debug():
    """Outside debug mode the body is never read: GA4's 2xx means delivered."""
    verdict = destination().classify(200, b'{"validationMessages": [{"description": "x"}]}')
    assert verdict.outcome is Outcome.SUCCESS


# -- against the fake GA4 -------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def fake_ga4():
    """The fake GA4 for stream G-TEST with the test secret, on loopback."""
    served = serve(FakeGA4(api_secret=SECRET))
    yield served
    await served.stop()


async def send(requests) -> list[tuple[int, bytes]]:
    answers = []
    for request in requests:
        response = await within(
            treq.post(request.url, data=request.body, headers=dict(request.headers), persistent=False)
        )
        answers.append((response.code, await within(response.content())))
    return answers


@pytest_twisted.ensureDeferred
async def test_fake_ga4_accepts_encoded_events(fake_ga4):
    """Everything the encoder produces passes the fake's documented checks."""
    names = ["PageView", "ViewContent", "AddToCart", "Purchase", "Subscribe", "session_start"] * 10
    events = [
        make_event(
            event_id=f"e{i}",
            event_name=name,
            ga_client_id=f"c{i % 3}",
            custom_data={"currency": "EUR", "value": i, "note": "x" * 500},
        )
        for i, name in enumerate(names)
    ]
    requests = destination(endpoint=fake_ga4.base).encode(events)
    answers = await send(requests)
    assert {status for status, _ in answers} == {204}
    assert fake_ga4.fake.violations == []
    assert len(fake_ga4.fake.events) == 60


@pytest_twisted.ensureDeferred
async def test_fake_ga4_debug_round_trip(fake_ga4):
    """Through the validation path, a clean payload is judged a success."""
    dest = destination(endpoint=fake_ga4.base, debug=True)
    ((status, body),) = await send(dest.encode([make_event()]))
    assert dest.classify(status, body).outcome is Outcome.SUCCESS
    assert fake_ga4.fake.requests[0].path == "/debug/mp/collect"
