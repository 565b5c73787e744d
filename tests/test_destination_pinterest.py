"""The Pinterest API for Conversions destination: payloads, batching, names, refusals,
secrecy, and verdicts on each event."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destination_helpers import ALREADY_HASHED, assert_batches, assert_secret_hidden, body, fake_violations, h, numbered_events
from fakes import FakePinterest, make_event
from tagd.delivery.destinations import Outcome, Selective
from tagd.delivery.destinations import pinterest

TOKEN = "pina_secret-token-0123456789abcdef"
ACCOUNT = "549755885175"


def destination(**settings):
    """A Pinterest destination built as tagd.daemon.config would: only the required keys given."""
    return pinterest.build("pin", {"ad_account_id": ACCOUNT, "access_token": TOKEN, **settings})


event = numbered_events(
    source_url="https://shop.example/thanks?epik=dj0yJnU9",
    client_ip="203.0.113.9",
    user_agent="Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
    custom_data={"currency": "usd", "value": 30, "order_id": "A-77"},
    contents=({"id": "sku-1", "quantity": 3, "item_price": 10.0, "title": "Mug", "category": "Kitchen"},),
    user_data={"em": (" Jane@Example.com",), "ph": ("+1 (650) 555-1234",), "ge": ("Nonbinary",)},
    epik="dj0yJnU9",
)


def test_payload_shape():
    """One event carries exactly the keys Pinterest documents: hashed fields as lists,
    money as decimal strings, the click id raw."""
    assert destination().payload(event()) == {
        "event_name": "checkout",
        "action_source": "web",
        "event_time": 1_700_000_001,
        "event_id": "ev-1",
        "event_source_url": "https://shop.example/thanks?epik=dj0yJnU9",
        "user_data": {
            "client_ip_address": "203.0.113.9",
            "client_user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
            "click_id": "dj0yJnU9",
            "em": [h("jane@example.com")],
            "ph": [h("16505551234")],
            "ge": [h("n")],
        },
        "custom_data": {
            "currency": "USD",
            "value": "30",
            "content_ids": ["sku-1"],
            "contents": [{"id": "sku-1", "item_price": "10.0", "quantity": 3, "item_name": "Mug", "item_category": "Kitchen"}],
            "order_id": "A-77",
            "num_items": 3,
        },
    }


def test_request_url_headers_and_test_mode():
    """The token is a Bearer header only; C{test = true} adds C{?test=true}; the body is the
    data array and nothing else."""
    [request] = destination().encode([event(1), event(2)])
    assert request.url == request.log_url == f"https://api.pinterest.com/v5/ad_accounts/{ACCOUNT}/events"
    assert request.headers == {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    assert set(body(request)) == {"data"}
    [test] = destination(test=True, endpoint="http://127.0.0.1:9/").encode([event()])
    assert test.url == f"http://127.0.0.1:9/v5/ad_accounts/{ACCOUNT}/events?test=true"


@pytest.mark.parametrize(("count", "sizes"), [(1000, [1000]), (1001, [1000, 1])])
def test_batches_at_the_documented_limit(count, sizes):
    events = [event(n) for n in range(count)]
    assert_batches(destination().encode(events), events, sizes)


@pytest.mark.parametrize(
    ("meta_name", "name"),
    [
        ("PageView", "page_visit"), ("ViewContent", "view_content"), ("AddToCart", "add_to_cart"),
        ("InitiateCheckout", "initiate_checkout"), ("AddPaymentInfo", "add_payment_info"),
        ("Purchase", "checkout"), ("Lead", "lead"), ("Search", "search"),
        ("CompleteRegistration", "signup"), ("Donate", "custom"), ("Newsletter_Signup", "custom"),
    ],
)  # fmt: skip
def test_default_event_names(meta_name, name):
    """Pinterest's own words for Meta's names; anything else is Pinterest's C{custom}."""
    assert destination().payload(event(event_name=meta_name))["event_name"] == name


def test_event_name_overrides_must_be_pinterest_names():
    dest = destination(event_names={"Newsletter_Signup": "signup"})
    assert dest.payload(event(event_name="Newsletter_Signup"))["event_name"] == "signup"
    with pytest.raises(ValueError, match="^event_names: 'Purchase' maps to 'purchase'"):
        destination(event_names={"Purchase": "purchase"})


def test_already_hashed_values_pass_and_lists_stay_lists():
    user = destination().payload(event(user_data={"em": (ALREADY_HASHED.upper(), "b@x.io")}))["user_data"]
    assert user["em"] == [ALREADY_HASHED, h("b@x.io")]


def test_unknown_custom_data_never_reaches_pinterest():
    """Pinterest's custom_data is a closed set: a shop's own keys would sink the request."""
    custom = destination().payload(event(custom_data={"shelf": "top", "value": "12.50", "search_string": 7}))["custom_data"]
    assert custom["value"] == "12.50" and custom["search_string"] == "7"
    assert "shelf" not in custom


def test_an_event_without_email_ip_or_user_agent_is_refused_not_sent():
    """Pinterest takes no event without the e-mail or both IP and user agent: it is left
    out of every request, with the reason the sender dead-letters it with."""
    dest = destination()
    assert isinstance(dest, Selective)
    bare = event(2, user_agent="", user_data={})
    requests = dest.encode([event(1), bare, event(3)])
    assert [r.positions for r in requests] == [(0, 2)]
    assert [e["event_id"] for e in body(requests[0])["data"]] == ["ev-1", "ev-3"]
    assert "e-mail" in dest.refusal(bare)
    assert dest.refusal(event(user_agent="")) is None  # the e-mail is enough


def test_token_hidden():
    dest = destination()
    [request] = dest.encode([event()])
    echo = json.dumps({"code": 2, "message": f"token {TOKEN} refused"}).encode()
    assert_secret_hidden(TOKEN, dest, request, ((401, echo), (500, TOKEN.encode())))


def answer(*statuses: str) -> bytes:
    events = [{"status": s, "error_message": None if s == "processed" else f"bad {i}"} for i, s in enumerate(statuses)]
    processed = statuses.count("processed")
    return json.dumps({"num_events_received": len(statuses), "num_events_processed": processed, "events": events}).encode()


def test_all_processed_is_success():
    verdict = destination().classify(200, answer("processed", "processed"))
    assert (verdict.outcome, verdict.refused) == (Outcome.SUCCESS, ())
    assert "2 of 2" in verdict.message


@pytest.mark.parametrize("status", [200, 422])
def test_partial_success_refuses_only_the_failed_events(status):
    """Pinterest lists each event's status; the failed ones are refused with its message,
    the others delivered, whether it answers 200 or 422."""
    document = json.loads(answer("processed", "failed", "processed", "failed"))
    wrapped = document if status == 200 else {"code": 1, "message": "Not all events processed", "details": document}
    verdict = destination().classify(status, json.dumps(wrapped).encode())
    assert verdict.outcome is Outcome.SUCCESS
    assert verdict.refused == ((1, "Pinterest refused the event: bad 1"), (3, "Pinterest refused the event: bad 3"))


@pytest.mark.parametrize(
    ("status", "document", "outcome"),
    [
        (400, {"code": 4196, "message": "The request was invalid."}, Outcome.PERMANENT),
        (401, {"code": 2, "message": "Authentication failed."}, Outcome.AUTH),
        (403, {"code": 29, "message": "You are not permitted to access that resource."}, Outcome.AUTH),
        (429, {"code": 8, "message": "rate limit"}, Outcome.THROTTLE),
        (503, {"code": 4197, "message": "ramped down"}, Outcome.TRANSIENT),
        (422, {"code": 1, "message": "Not all events processed", "details": {}}, Outcome.PERMANENT),
        (200, {"unexpected": True}, Outcome.TRANSIENT),
    ],
)
def test_documented_answers(status, document, outcome):
    """The OpenAPI description's answers; a 422 whose details say nothing per event is
    permanent (the sender halves the batch to find the bad ones), a 2xx without the
    events' statuses proves nothing was taken."""
    verdict = destination().classify(status, json.dumps(document).encode())
    assert verdict.outcome is outcome
    assert f"HTTP {status}" in verdict.message


def test_a_real_event_passes_the_fake_pinterest():
    [request] = destination().encode([make_event(), make_event(event_name="PageView", contents=(), user_data={})])
    assert fake_violations(FakePinterest(ad_account_id=ACCOUNT, access_token=TOKEN), request) == []


values = st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())


@settings(max_examples=200, deadline=None)
@given(
    custom=st.dictionaries(st.sampled_from(["value", "currency", "order_id", "search_string", "content_ids", "x"]), values),
    emails=st.lists(st.text(max_size=40), max_size=3),
    name=st.sampled_from(["Purchase", "PageView", "Donate", "AddToCart", "X_1"]),
)
def test_any_event_is_one_pinterest_takes(custom, emails, name):
    """Whatever a shop's header holds, what tagd sends is what Pinterest documents."""
    sample = make_event(event_name=name, custom_data=custom, user_data={"em": tuple(emails)}, event_time=int(time.time()))
    [request] = destination().encode([sample])
    assert fake_violations(FakePinterest(ad_account_id=ACCOUNT, access_token=TOKEN), request) == []


@pytest.mark.parametrize(
    ("consent", "opt_out"),
    [(frozenset({"analytics"}), True), (frozenset(), True), (frozenset({"marketing"}), None), (None, None)],
)
def test_a_visitor_who_refused_marketing_is_opted_out(consent, opt_out):
    """An event of a visitor without marketing consent (it reaches a destination whose
    purpose needs none) says opt_out: true; with marketing granted, or no record read,
    nothing; the fake takes each."""
    [request] = destination().encode([event(consent=consent, event_time=int(time.time()))])
    assert body(request)["data"][0].get("opt_out") is opt_out
    assert fake_violations(FakePinterest(ad_account_id=ACCOUNT, access_token=TOKEN), request) == []
