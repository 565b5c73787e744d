"""The TikTok Events API 2.0 destination: payloads, batching, names, secrecy, verdicts."""

from __future__ import annotations

import json

import pytest

from destination_helpers import ALREADY_HASHED, assert_batches, assert_secret_hidden, body, h, numbered_events
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import tiktok

TOKEN = "tt-secret-token-0123456789abcdef"
TTCLID = "E.C.P.CvQBAbCdEf-CaseSensitive"
TTP = "2aBcDeFgHiJkLmNoPqRsTuVwXyZ"


def destination(**settings):
    """A TikTok destination built as tagd.daemon.config would: only the required keys given."""
    return tiktok.build("tt-main", {"pixel_code": "C4PIXEL", "access_token": TOKEN, **settings})


# A purchase seen by a visitor who came from a TikTok ad; event(n, **fields) replaces any value.
event = numbered_events(
    source_url="https://shop.example/thanks?ttclid=abc",
    client_ip="203.0.113.9",
    user_agent="Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
    referrer="https://shop.example/cart",
    custom_data={"currency": "USD", "value": 30, "order_id": "A-77"},
    contents=({"id": "sku-1", "quantity": 3, "item_price": 10.0, "title": "Mug", "category": "Kitchen"},),
    user_data={"em": (" Jane@Example.com",), "ph": ("+1 (650) 555-1234",), "external_id": ("U-9",)},
    ttclid=TTCLID,
    ttp=TTP,
)


def test_payload_shape():
    """One event carries exactly the fields TikTok documents, with the values expected."""
    assert destination().payload(event()) == {
        "event": "CompletePayment",
        "event_time": 1_700_000_001,
        "event_id": "ev-1",
        "user": {
            "ip": "203.0.113.9",
            "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
            "ttclid": TTCLID,
            "ttp": TTP,
            "email": h("jane@example.com"),
            "phone": h("+16505551234"),
            "external_id": h("u-9"),
        },
        "page": {"url": "https://shop.example/thanks?ttclid=abc", "referrer": "https://shop.example/cart"},
        "properties": {
            "contents": [
                {
                    "content_id": "sku-1",
                    "content_type": "product",
                    "content_name": "Mug",
                    "content_category": "Kitchen",
                    "price": 10.0,
                    "quantity": 3,
                }
            ],
            "content_type": "product",
            "value": 30,
            "currency": "USD",
            "order_id": "A-77",
        },
        "limited_data_use": False,
    }


def test_request_url_headers_and_body():
    """The token is only in the C{Access-Token} header, so the URL is loggable as it is;
    the body names the pixel and carries the events."""
    [request] = destination().encode([event(1), event(2)])
    assert request.url == "https://business-api.tiktok.com/open_api/v1.3/event/track/"
    assert request.log_url == request.url
    assert request.method == "POST"
    assert request.headers == {"Access-Token": TOKEN, "Content-Type": "application/json"}
    assert request.positions == (0, 1)
    document = body(request)
    assert document == {
        "event_source": "web",
        "event_source_id": "C4PIXEL",
        "data": [destination().payload(event(1)), destination().payload(event(2))],
    }


def test_endpoint_and_test_code_settings():
    """A configured endpoint (trailing slash or not) and test event code are used."""
    dest = destination(endpoint="http://127.0.0.1:9002/", test_event_code="TEST42")
    [request] = dest.encode([event()])
    assert request.url == "http://127.0.0.1:9002/open_api/v1.3/event/track/"
    assert body(request)["test_event_code"] == "TEST42"


@pytest.mark.parametrize(("count", "sizes"), [(1000, [1000]), (1001, [1000, 1])])
def test_batches_at_default_limit(count, sizes):
    """The default batch is 1000 events (the commonly quoted limit), order kept."""
    events = [event(n) for n in range(count)]
    assert_batches(destination().encode(events), events, sizes)


def test_batch_size_is_a_setting():
    """TikTok's limit is unconfirmed, so the size is a setting, smaller or larger."""
    requests = destination(max_batch=3).encode([event(n) for n in range(7)])
    assert [r.positions for r in requests] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert len(destination(max_batch=2000).encode([event(n) for n in range(1500)])) == 1
    with pytest.raises(ValueError, match="^max_batch: "):
        destination(max_batch=0)


@pytest.mark.parametrize(
    ("meta_name", "tiktok_name"),
    [
        ("Purchase", "CompletePayment"),
        ("InitiateCheckout", "InitiateCheckout"),
        ("ViewContent", "ViewContent"),
        ("AddToCart", "AddToCart"),
        ("Search", "Search"),
        ("Lead", "SubmitForm"),
        ("CompleteRegistration", "CompleteRegistration"),
        ("AddPaymentInfo", "AddPaymentInfo"),
        ("AddToWishlist", "AddToWishlist"),
        ("Newsletter_Signup", "Newsletter_Signup"),
    ],
)
def test_default_event_names(meta_name, tiktok_name):
    """PLATFORMS.md's mapping by default; names without a mapping pass unchanged."""
    assert destination().payload(event(event_name=meta_name))["event"] == tiktok_name


def test_event_name_overrides_win():
    """An override replaces the default mapping, and can rename an unmapped event."""
    dest = destination(event_names={"Purchase": "PlaceAnOrder", "Contact": "ClickButton"})
    assert dest.payload(event())["event"] == "PlaceAnOrder"
    assert dest.payload(event(event_name="Contact"))["event"] == "ClickButton"
    assert dest.payload(event(event_name="Lead"))["event"] == "SubmitForm"


def test_raw_identifiers_never_hashed():
    """IP, user agent, ttclid and ttp go exactly as tagd got them (case, IPv6 and all),
    even when they look like hashes."""
    looks_hashed = "b" * 64
    user = destination().payload(event(client_ip="2001:db8::7", ttp=looks_hashed))["user"]
    assert (user["ip"], user["ttp"], user["ttclid"]) == ("2001:db8::7", looks_hashed, TTCLID)
    assert user["user_agent"].startswith("Mozilla/5.0 (iPhone")


def test_hashed_values_never_rehashed_and_lists_kept():
    """An origin's own hash goes as it is; several values become a list, one a string."""
    user_data = {"em": (ALREADY_HASHED.upper(), "Other@example.com"), "external_id": ("U-9",)}
    user = destination().payload(event(user_data=user_data))["user"]
    assert user["email"] == [ALREADY_HASHED, h("other@example.com")]
    assert user["external_id"] == h("u-9")
    assert "phone" not in user


def test_absent_identifiers_left_out():
    """No cookie, no click id, no user data: no empty keys reach TikTok."""
    user = destination().payload(event(ttclid=None, ttp=None, user_data={}))["user"]
    assert set(user) == {"ip", "user_agent"}


def test_properties_from_meta_style_custom_data():
    """Meta's C{search_string} becomes TikTok's C{query}; no contents, no content type."""
    props = destination().payload(
        event(event_name="Search", contents=(), custom_data={"search_string": "blue mug"})
    )["properties"]
    assert props == {"query": "blue mug"}
    origin_type = destination().payload(event(custom_data={"content_type": "product_group"}))
    assert origin_type["properties"]["content_type"] == "product_group"


def test_no_referrer_and_no_properties():
    """Unknown referrer and empty properties are left out, the page URL never is."""
    bare = destination().payload(event(referrer=None, contents=(), custom_data={}))
    assert bare["page"] == {"url": "https://shop.example/thanks?ttclid=abc"}
    assert "properties" not in bare


def test_limited_data_use_on_every_event():
    """C{limited_data_use} is a per-event boolean, always sent so TikTok never guesses."""
    [request] = destination(limited_data_use=True).encode([event(1), event(2)])
    assert [e["limited_data_use"] for e in body(request)["data"]] == [True, True]
    assert destination().payload(event())["limited_data_use"] is False


def test_a_visitor_who_refused_marketing_is_limited_data_use():
    """TikTok's flag for an event of a visitor without marketing consent."""
    assert destination().payload(event(consent=frozenset({"analytics"})))["limited_data_use"] is True
    assert destination().payload(event(consent=None))["limited_data_use"] is False


def test_module_payload_is_the_destination_payload():
    """The per-event function (for the log destination) gives what the destination sends."""
    dest = destination(event_names={"Lead": "Contact"}, limited_data_use=True)
    lead = event(event_name="Lead")
    assert tiktok.payload(lead, {"Lead": "Contact"}, True) == dest.payload(lead)
    assert tiktok.payload(lead) == destination().payload(lead)


@pytest.mark.parametrize("code", ["C-123", "C123 ", "C123/x", ""])
def test_pixel_code_is_letters_and_digits(code):
    """TikTok's pixel codes are letters and digits: anything else would be refused with
    every request, so it stops start-up, naming the key, with a reason that never quotes
    the value."""
    with pytest.raises(ValueError) as raised:
        destination(pixel_code=code)
    assert str(raised.value) == f"pixel_code: must be {tiktok.FORMATS['pixel_code'][1]}"


def test_build_defaults_and_contract():
    """Module constants are the configuration contract tagd.daemon.config reads."""
    dest = destination()
    assert (tiktok.TYPE, dest.type, dest.name) == ("tiktok", "tiktok", "tt-main")
    assert (dest.endpoint, dest.max_batch, dest.test_event_code) == ("https://business-api.tiktok.com", 1000, None)
    assert (dest.event_names, dest.limited_data_use) == ({}, False)
    assert tiktok.SECRETS == ("access_token",)
    assert tiktok.DEFAULT_TIMEOUT > 0
    assert {k for k, (_, required, _) in tiktok.KEYS.items() if required} == {"pixel_code", "access_token"}


def test_token_never_in_repr_log_url_body_or_messages():
    """The token is absent from the repr, the loggable URL, the body and every message,
    even when an answer echoes it."""
    dest = destination()
    [request] = dest.encode([event()])
    echo = json.dumps({"code": 40001, "message": f"token {TOKEN} has no permission"}).encode()
    answers = ((200, echo), (502, f"upstream said {TOKEN}".encode()))
    assert_secret_hidden(TOKEN, dest, request, answers)


def tiktok_answer(code: int, message: str = "OK") -> bytes:
    """TikTok's answer document."""
    return json.dumps({"code": code, "message": message, "request_id": "REQ-1", "data": {}}).encode()


def test_success_is_code_zero():
    """HTTP 200 with C{code == 0} is the only success."""
    verdict = destination().classify(200, tiktok_answer(0))
    assert verdict.outcome is Outcome.SUCCESS
    assert "REQ-1" in verdict.message


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (40100, Outcome.THROTTLE),
        (40001, Outcome.AUTH),
        (40002, Outcome.PERMANENT),
        (40700, Outcome.TRANSIENT),
        (40105, Outcome.AUTH),
        (40999, Outcome.PERMANENT),
        (50000, Outcome.TRANSIENT),
    ],
)
def test_failures_inside_http_200(code, outcome):
    """TikTok answers 200 even when it refuses: its code decides (40001 and 40105 refuse
    the token, not the events), its message is kept."""
    verdict = destination().classify(200, tiktok_answer(code, f"reason {code}"))
    assert verdict.outcome is outcome
    assert verdict.retry_after is None
    assert f"code {code}" in verdict.message and f"reason {code}" in verdict.message


@pytest.mark.parametrize(
    ("status", "answer", "outcome"),
    [
        (429, tiktok_answer(0), Outcome.THROTTLE),
        (502, b"<html>Bad gateway</html>", Outcome.TRANSIENT),
        (503, tiktok_answer(0), Outcome.TRANSIENT),
        (500, tiktok_answer(40001), Outcome.TRANSIENT),
        (200, b"<html>maintenance</html>", Outcome.TRANSIENT),
        (200, b'{"code": "0"}', Outcome.TRANSIENT),
        (400, tiktok_answer(0), Outcome.PERMANENT),
    ],
)
def test_http_status_and_unreadable_answers(status, answer, outcome):
    """HTTP 408, 429 and 5xx decide before any code; a 200 that cannot be read is retried
    (it proves nothing was accepted); other 4xx are permanent (empty bodies:
    test_destination_common)."""
    verdict = destination().classify(status, answer)
    assert verdict.outcome is outcome
    assert f"HTTP {status}" in verdict.message
