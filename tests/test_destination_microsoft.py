"""The Microsoft Advertising (UET) Conversions API destination: payloads, single hashed
strings, names, secrecy, verdicts."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destination_helpers import assert_secret_hidden, body, fake_violations, h, numbered_events
from fakes import FakeMicrosoft, make_event
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import microsoft

TOKEN = "ms-secret-token-0123456789abcdef"
TAG = "343000123"


def destination(**settings):
    return microsoft.build("bing", {"tag_id": TAG, "access_token": TOKEN, **settings})


event = numbered_events(
    source_url="https://shop.example/thanks?msclkid=a1b2c3",
    client_ip="203.0.113.9",
    user_agent="Mozilla/5.0 (Windows NT 10.0)",
    referrer="https://www.bing.com/",
    custom_data={"currency": "eur", "value": 30, "order_id": 77},
    contents=({"id": "sku-1", "quantity": 3, "item_price": 10.0, "title": "Mug"},),
    user_data={"em": ("J.ane+shop@Example.com", "other@example.com"), "ph": ("+1 (425) 555-0100",)},
    msclkid="a1b2c3",
    uetvid="0d3c2b1a9f8e7d6c5b4a39281706f5e4",
)


def test_payload_shape():
    """UET's camel-case keys, seconds, GA4-style names, one hashed string per field
    (the first value), the click id and UET's visitor id raw."""
    assert destination().payload(event()) == {
        "eventType": "custom",
        "eventName": "purchase",
        "eventId": "ev-1",
        "eventTime": 1_700_000_001,
        "eventSourceUrl": "https://shop.example/thanks?msclkid=a1b2c3",
        "referrerUrl": "https://www.bing.com/",
        "adStorageConsent": "G",
        "userData": {
            "clientIpAddress": "203.0.113.9",
            "clientUserAgent": "Mozilla/5.0 (Windows NT 10.0)",
            "msclkid": "a1b2c3",
            "anonymousId": "0d3c2b1a9f8e7d6c5b4a39281706f5e4",
            "em": h("jane@example.com"),
            "ph": h("+14255550100"),
        },
        "customData": {
            "value": 30,
            "currency": "EUR",
            "transactionId": "77",
            "items": [{"id": "sku-1", "name": "Mug", "price": 10.0, "quantity": 3}],
            "itemIds": ["sku-1"],
            "pageType": "purchase",
        },
    }


def test_a_page_view_is_a_page_load():
    page = destination().payload(event(event_name="PageView", contents=(), custom_data={}))
    assert page["eventType"] == "pageLoad" and "eventName" not in page


@pytest.mark.parametrize(
    ("meta_name", "name"),
    [("ViewContent", "view_item"), ("AddToCart", "add_to_cart"), ("InitiateCheckout", "begin_checkout"),
     ("Lead", "generate_lead"), ("Search", "search"), ("CompleteRegistration", "sign_up"), ("Donate", "Donate")],
)  # fmt: skip
def test_custom_event_names(meta_name, name):
    assert destination().payload(event(event_name=meta_name))["eventName"] == name


def test_request_and_batches():
    events = [event(n) for n in range(1001)]
    requests = destination().encode(events)
    assert [len(body(r)["data"]) for r in requests] == [1000, 1]
    assert [e["eventId"] for r in requests for e in body(r)["data"]] == [e.event_id for e in events]
    assert requests[0].url == requests[0].log_url == f"https://capi.uet.microsoft.com/v1/{TAG}/events"
    assert requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_token_hidden():
    dest = destination()
    [request] = dest.encode([event()])
    echo = json.dumps({"error": {"code": "Unauthorized", "message": f"token {TOKEN}"}}).encode()
    assert_secret_hidden(TOKEN, dest, request, ((401, echo), (400, echo)))


@pytest.mark.parametrize(
    ("status", "document", "outcome", "quoted"),
    [
        (200, {"eventsReceived": 2}, Outcome.SUCCESS, "eventsReceived=2"),
        (400, {"error": {"code": "ValidationError", "message": "Invalid",
                         "details": [{"index": 0, "propertyName": "em", "errorMessage": "'em' must be a valid SHA256 string"}]}},
         Outcome.PERMANENT, "0.em: 'em' must be a valid SHA256 string"),
        (401, {"error": {"code": "Unauthorized"}}, Outcome.AUTH, "Unauthorized"),
        (429, {}, Outcome.THROTTLE, "HTTP 429"),
        (502, {}, Outcome.TRANSIENT, "HTTP 502"),
    ],
)  # fmt: skip
def test_answers(status, document, outcome, quoted):
    verdict = destination().classify(status, json.dumps(document).encode())
    assert verdict.outcome is outcome
    assert quoted in verdict.message


@settings(max_examples=200, deadline=None)
@given(
    emails=st.lists(st.text(max_size=40), max_size=3),
    custom=st.dictionaries(st.sampled_from(["value", "currency", "order_id", "search_string"]),
                           st.one_of(st.text(max_size=10), st.integers(), st.floats(allow_nan=False), st.booleans())),
    name=st.sampled_from(["Purchase", "PageView", "Search", "Donate"]),
)  # fmt: skip
def test_any_event_is_one_microsoft_takes(emails, custom, name):
    sample = make_event(event_name=name, custom_data=custom, user_data={"em": tuple(emails)}, event_time=int(time.time()))
    [request] = destination().encode([sample])
    assert fake_violations(FakeMicrosoft(tag_id=TAG, access_token=TOKEN), request) == []


@pytest.mark.parametrize(
    ("consent", "ad_storage"),
    [(frozenset({"marketing", "analytics"}), "G"), (frozenset({"analytics"}), "D"), (frozenset(), "D"), (None, None)],
)
def test_ad_storage_consent_says_the_marketing_choice_whenever_a_record_was_read(consent, ad_storage):
    """G with marketing consent, D without (such an event reaches a destination whose
    purpose needs none), nothing when no consent record was read; the fake takes each."""
    [request] = destination().encode([event(consent=consent, event_time=int(time.time()))])
    assert body(request)["data"][0].get("adStorageConsent") == ad_storage
    assert fake_violations(FakeMicrosoft(tag_id=TAG, access_token=TOKEN), request) == []
