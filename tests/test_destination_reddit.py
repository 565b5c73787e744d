"""The Reddit Conversions API v3 destination: payloads in milliseconds, Reddit's own
hashing (against its documented examples), custom events, test mode, secrecy, verdicts."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destination_helpers import assert_secret_hidden, body, fake_violations, h, numbered_events
from fakes import FakeReddit, make_event
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import reddit
from tagd.tagging.hashing import reddit_user_fields

TOKEN = "rdt-secret-token-0123456789abcdef"
PIXEL = "t2_abc123"


def destination(**settings):
    return reddit.build("rdt", {"pixel_id": PIXEL, "access_token": TOKEN, **settings})


event = numbered_events(
    source_url="https://shop.example/checkout?rdt_cid=3184742045291813272",
    client_ip="203.0.113.9",
    user_agent="Mozilla/5.0 (Macintosh)",
    custom_data={"currency": "usd", "value": "100.00"},
    contents=({"id": "sku-1", "quantity": 2, "item_price": 50.0, "title": "Mug", "category": "Kitchen"},),
    user_data={"em": ("Al.ice+Apple@Example.Com",), "ph": ("+1 555 444 1234",), "external_id": ("customer12345",)},
    rdt_cid="3184742045291813272",
    rdt_uuid="1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132",
)


def test_hashing_matches_reddits_documented_examples():
    """Reddit's documentation: both spellings of Alice's address hash to ff8d98...; the
    phone +15554441234 to e5b124...; the external id customer12345 to a4cc2fc5..."""
    alice = "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"
    for email in ("alice@example.com", "Al.ice+Apple@Example.Com"):
        assert reddit_user_fields({"em": (email,)})["email"] == [alice]
    assert reddit_user_fields({"ph": ("+1 (555) 444-1234",)})["phone_number"] == [
        "e5b124c58580eb16bd959b8d0cac12b12c952e2ceae0203d416cff94f10b994a"
    ]
    assert reddit_user_fields({"external_id": ("customer12345",)})["external_id"][0].startswith("a4cc2fc5")


def test_payload_shape():
    """Milliseconds, the standard tracking type, the click id, tagd's event id as the
    conversion id Reddit deduplicates on, one value per user field."""
    assert destination().payload(event()) == {
        "event_at": 1_700_000_001_000,
        "action_source": "WEBSITE",
        "type": {"tracking_type": "PURCHASE"},
        "click_id": "3184742045291813272",
        "event_source_url": "https://shop.example/checkout?rdt_cid=3184742045291813272",
        "user": {
            "ip_address": "203.0.113.9",
            "user_agent": "Mozilla/5.0 (Macintosh)",
            "uuid": "1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132",
            "email": h("alice@example.com"),
            "phone_number": h("+15554441234"),
            "external_id": h("customer12345"),
        },
        "metadata": {
            "conversion_id": "ev-1",
            "currency": "USD",
            "value": 100.0,
            "item_count": 2,
            "products": [{"id": "sku-1", "name": "Mug", "category": "Kitchen", "quantity": 2, "item_price": 50.0}],
        },
    }


def test_request_shape_and_user_agent():
    [request] = destination().encode([event(1), event(2)])
    assert request.url == request.log_url == f"https://ads-api.reddit.com/api/v3/pixels/{PIXEL}/conversion_events"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["User-Agent"].startswith("tagd/")
    assert [e["metadata"]["conversion_id"] for e in body(request)["data"]["events"]] == ["ev-1", "ev-2"]
    assert "test_id" not in body(request)["data"]


def test_test_id_sends_one_event_per_request():
    """Event Testing shows one event per request: with a C{test_id}, each goes alone."""
    requests = destination(test_id="t2_test_9").encode([event(n) for n in range(3)])
    assert [r.positions for r in requests] == [(0,), (1,), (2,)]
    assert all(body(r)["data"]["test_id"] == "t2_test_9" for r in requests)


def test_batches_of_1000():
    requests = destination().encode([event(n) for n in range(1001)])
    assert [len(body(r)["data"]["events"]) for r in requests] == [1000, 1]


@pytest.mark.parametrize(
    ("meta_name", "expected"),
    [
        ("PageView", {"tracking_type": "PAGE_VISIT"}),
        ("ViewContent", {"tracking_type": "VIEW_CONTENT"}),
        ("AddToCart", {"tracking_type": "ADD_TO_CART"}),
        ("Lead", {"tracking_type": "LEAD"}),
        ("Search", {"tracking_type": "SEARCH"}),
        ("CompleteRegistration", {"tracking_type": "SIGN_UP"}),
        ("InitiateCheckout", {"tracking_type": "CUSTOM", "custom_event_name": "InitiateCheckout"}),
        ("AddPaymentInfo", {"tracking_type": "CUSTOM", "custom_event_name": "AddPaymentInfo"}),
        ("Newsletter_Signup", {"tracking_type": "CUSTOM", "custom_event_name": "Newsletter_Signup"}),
    ],
)
def test_event_types(meta_name, expected):
    """Reddit's tracking types for Meta's names; every other event is CUSTOM, named."""
    assert destination().payload(event(event_name=meta_name))["type"] == expected


def test_overrides_choose_a_tracking_type_or_a_custom_name():
    dest = destination(event_names={"InitiateCheckout": "LEAD", "Contact": "Contact form"})
    assert dest.payload(event(event_name="InitiateCheckout"))["type"] == {"tracking_type": "LEAD"}
    assert dest.payload(event(event_name="Contact"))["type"]["custom_event_name"] == "Contact form"


def test_token_hidden():
    dest = destination()
    [request] = dest.encode([event()])
    echo = json.dumps({"error": {"code": 401, "message": f"bad {TOKEN}"}}).encode()
    assert_secret_hidden(TOKEN, dest, request, ((401, echo), (400, echo)))


@pytest.mark.parametrize(
    ("status", "document", "outcome", "quoted"),
    [
        (200, {"data": {"message": "Successfully processed 2 conversion events."}}, Outcome.SUCCESS, "Successfully"),
        (400, {"error": {"code": 400, "message": "There were 1 invalid conversion events. None were processed.",
                         "fields": [{"field": "events[0].type", "message": "required"}]}},
         Outcome.PERMANENT, "events[0].type: required"),
        (401, {"error": {"code": 401, "message": "UNAUTHORIZED"}}, Outcome.AUTH, "UNAUTHORIZED"),
        (403, {"error": {"code": 403, "message": "Missing adsconversions scope"}}, Outcome.AUTH, "scope"),
        (429, {"error": {"code": 429, "message": "Too many requests"}}, Outcome.THROTTLE, "Too many"),
        (500, {"error": {"code": 500, "message": "unavailable"}}, Outcome.TRANSIENT, "unavailable"),
    ],
)  # fmt: skip
def test_documented_answers(status, document, outcome, quoted):
    verdict = destination().classify(status, json.dumps(document).encode())
    assert verdict.outcome is outcome
    assert quoted in verdict.message


@settings(max_examples=200, deadline=None)
@given(
    emails=st.lists(st.text(max_size=40), max_size=3),
    value=st.one_of(st.text(max_size=10), st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**6, 10**6)),
    name=st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=80),
)
def test_any_event_is_one_reddit_takes(emails, value, name):
    sample = make_event(event_name=name, custom_data={"value": value}, user_data={"em": tuple(emails)}, event_time=int(time.time()))
    [request] = destination().encode([sample])
    assert fake_violations(FakeReddit(pixel_id=PIXEL, access_token=TOKEN), request) == []


@pytest.mark.parametrize(
    ("consent", "options"),
    [(frozenset({"analytics"}), {"modes": ["LDU"]}), (frozenset(), {"modes": ["LDU"]}),
     (frozenset({"marketing"}), None), (None, None)],
)  # fmt: skip
def test_a_visitor_who_refused_marketing_is_limited_data_use(consent, options):
    """An event of a visitor without marketing consent carries Reddit's Limited Data Use
    in its user; with marketing granted, or no record read, nothing; the fake takes each."""
    [request] = destination().encode([event(consent=consent, event_time=int(time.time()))])
    assert body(request)["data"]["events"][0]["user"].get("data_processing_options") == options
    assert fake_violations(FakeReddit(pixel_id=PIXEL, access_token=TOKEN), request) == []
