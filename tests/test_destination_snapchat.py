"""The Snapchat Conversions API destination: payloads, names, refusals, secrecy, verdicts."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destination_helpers import assert_batches, assert_secret_hidden, body, fake_violations, h, numbered_events
from fakes import FakeSnapchat, make_event
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import snapchat

TOKEN = "snap-secret-token/0123456789+abc"
PIXEL = "b2c1e5a0-1f2e-4d3c-9b8a-7f6e5d4c3b2a"


def destination(**settings):
    return snapchat.build("snap", {"pixel_id": PIXEL, "access_token": TOKEN, **settings})


event = numbered_events(
    source_url="https://shop.example/thanks?ScCid=6f1e2a3b",
    client_ip="2001:db8::7",
    user_agent="Mozilla/5.0 (Android 14)",
    custom_data={"currency": "EUR", "value": 30, "order_id": "A-77", "shelf": "top"},
    contents=({"id": "sku-1", "quantity": 3, "item_price": 10.0, "title": "Mug"},),
    user_data={"em": ("Jane@Example.com ",), "ph": ("0049 30 1234567",), "db": ("1990-01-31",), "fn": ("José",)},
    scclid="6f1e2a3b",
    scid="9a8b7c6d-5e4f",
)


def test_payload_shape():
    """Snapchat's keys, Meta's normalisation (phone without "+"), no date of birth, the
    click id and the pixel's cookie raw, and only the custom data keys Snapchat knows."""
    assert destination().payload(event()) == {
        "event_name": "PURCHASE",
        "event_time": 1_700_000_001,
        "event_id": "ev-1",
        "action_source": "WEB",
        "event_source_url": "https://shop.example/thanks?ScCid=6f1e2a3b",
        "user_data": {
            "client_ip_address": "2001:db8::7",
            "client_user_agent": "Mozilla/5.0 (Android 14)",
            "sc_click_id": "6f1e2a3b",
            "sc_cookie1": "9a8b7c6d-5e4f",
            "em": [h("jane@example.com")],
            "ph": [h("49301234567")],
            "fn": [h("josé")],
        },
        "custom_data": {
            "contents": [{"id": "sku-1", "quantity": 3, "item_price": 10.0}],
            "content_ids": ["sku-1"],
            "num_items": 3,
            "currency": "EUR",
            "value": 30,
            "order_id": "A-77",
        },
    }


def test_token_in_the_query_only_and_test_code_in_the_body():
    [request] = destination(test_event_code="TEST7").encode([event()])
    assert request.log_url == f"https://tr.snapchat.com/v3/{PIXEL}/events"
    assert request.url.startswith(request.log_url + "?access_token=")
    assert request.headers == {"Content-Type": "application/json"}
    assert body(request)["test_event_code"] == "TEST7"
    assert "test_event_code" not in body(destination().encode([event()])[0])


def test_batches():
    events = [event(n) for n in range(2001)]
    assert_batches(destination().encode(events), events, [1000, 1000, 1])
    assert_batches(destination(max_batch=2000).encode(events), events, [2000, 1])


@pytest.mark.parametrize(
    ("meta_name", "name"),
    [
        ("PageView", "PAGE_VIEW"), ("ViewContent", "VIEW_CONTENT"), ("AddToCart", "ADD_CART"),
        ("InitiateCheckout", "START_CHECKOUT"), ("AddPaymentInfo", "ADD_BILLING"),
        ("Purchase", "PURCHASE"), ("Lead", "SIGN_UP"), ("Search", "SEARCH"),
        ("CompleteRegistration", "SIGN_UP"),
    ],
)  # fmt: skip
def test_default_event_names(meta_name, name):
    assert destination().payload(event(event_name=meta_name))["event_name"] == name


def test_an_event_without_a_snapchat_name_is_refused_unless_mapped():
    """Snapchat has no free custom names: an unmapped custom event is not sent, and says
    how to map it; a mapping to a numbered custom event sends it."""
    custom = event(2, event_name="Newsletter_Signup")
    requests = destination().encode([event(1), custom])
    assert [r.positions for r in requests] == [(0,)]
    assert "CUSTOM_EVENT_1 to 5" in destination().refusal(custom)
    mapped = destination(event_names={"Newsletter_Signup": "CUSTOM_EVENT_2"})
    assert mapped.refusal(custom) is None
    assert mapped.payload(custom)["event_name"] == "CUSTOM_EVENT_2"
    with pytest.raises(ValueError, match="not a Snapchat event name"):
        destination(event_names={"Donate": "DONATE"})


def test_a_purchase_without_currency_and_value_is_refused():
    assert "currency and value" in destination().refusal(event(custom_data={"value": 3}))
    assert destination().refusal(event(event_name="AddToCart", custom_data={})) is None


def test_token_hidden():
    dest = destination()
    [request] = dest.encode([event()])
    echo = json.dumps({"status": "INVALID", "reason": f"bad token {TOKEN}"}).encode()
    assert_secret_hidden(TOKEN, dest, request, ((401, echo), (200, echo)))


@pytest.mark.parametrize(
    ("status", "document", "outcome"),
    [
        (200, {"status": "VALID", "reason": "ok"}, Outcome.SUCCESS),
        (200, {"status": "INVALID", "reason": "event_name missing"}, Outcome.PERMANENT),
        (400, {"status": "INVALID", "errors": {"error_msgs": ["bad em"]}}, Outcome.PERMANENT),
        (200, {}, Outcome.TRANSIENT),
        (401, {"status": "INVALID", "reason": "Invalid access token"}, Outcome.AUTH),
        (429, {"status": "INVALID"}, Outcome.THROTTLE),
        (503, {"status": "INVALID"}, Outcome.TRANSIENT),
    ],
)
def test_answers(status, document, outcome):
    """C{VALID} is the only success; C{INVALID} is the events' fault unless the status
    says it is the token's, the rate's or Snapchat's own trouble."""
    verdict = destination().classify(status, json.dumps(document).encode())
    assert verdict.outcome is outcome
    assert f"HTTP {status}" in verdict.message


values = st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=False), st.none())


@settings(max_examples=200, deadline=None)
@given(
    custom=st.dictionaries(st.sampled_from(["value", "currency", "order_id", "search_string", "x"]), values),
    phones=st.lists(st.text(max_size=20), max_size=3),
    name=st.sampled_from(["Purchase", "PageView", "Lead", "AddToCart", "X_1"]),
)
def test_what_is_sent_is_what_snapchat_takes(custom, phones, name):
    """An event tagd sends passes the fake Snapchat; the others have a reason."""
    sample = make_event(event_name=name, custom_data=custom, user_data={"ph": tuple(phones)}, event_time=int(time.time()))
    dest = destination()
    requests = dest.encode([sample])
    assert bool(requests) is (dest.refusal(sample) is None)
    for request in requests:
        assert fake_violations(FakeSnapchat(pixel_id=PIXEL, access_token=TOKEN), request) == []


@pytest.mark.parametrize(
    ("consent", "options"),
    [(frozenset({"analytics"}), ["LDU"]), (frozenset(), ["LDU"]), (frozenset({"marketing"}), None), (None, None)],
)
def test_a_visitor_who_refused_marketing_is_limited_data_use(consent, options):
    """An event of a visitor without marketing consent carries Snapchat's Limited Data
    Use; with marketing granted, or no record read, nothing; the fake takes each."""
    [request] = destination().encode([event(consent=consent, event_time=int(time.time()))])
    assert body(request)["data"][0].get("data_processing_options") == options
    assert fake_violations(FakeSnapchat(pixel_id=PIXEL, access_token=TOKEN), request) == []
