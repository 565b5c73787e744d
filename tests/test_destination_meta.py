"""The Meta Conversions API destination: payloads, batching, names, secrecy, verdicts."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from destination_helpers import ALREADY_HASHED, assert_batches, assert_secret_hidden, body, h, numbered_events
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import meta

TOKEN = "EAAB-secret/token+value=="
FBP = "fb.1.1700000000000.1234567890"
FBC = "fb.1.1700000000000.IwAR2xYz-CaseSensitive.extra"


def destination(**settings):
    """A Meta destination built as tagd.daemon.config would: only the required keys given."""
    return meta.build("fb-main", {"pixel_id": "1234", "access_token": TOKEN, **settings})


# A purchase with every field Meta reads; event(n, **fields) replaces any of them.
event = numbered_events(
    source_url="https://shop.example/checkout/done?order=77",
    client_ip="2001:db8::1",
    user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
    custom_data={"currency": "EUR", "value": 42.5},
    contents=(
        {"id": "sku-1", "quantity": 2, "item_price": 10.0, "title": "Mug"},
        {"id": "sku-2", "item_price": 22.5},
    ),
    user_data={"em": ("Jane@Example.com ",), "ph": ("+33 6 12 34 56 78",)},
    fbp=FBP,
    fbc=FBC,
)


def test_payload_shape():
    """One event carries exactly the fields Meta documents, with the values expected."""
    assert destination().payload(event()) == {
        "event_name": "Purchase",
        "event_time": 1_700_000_001,
        "event_id": "ev-1",
        "action_source": "website",
        "event_source_url": "https://shop.example/checkout/done?order=77",
        "referrer_url": "https://shop.example/checkout",
        "user_data": {
            "client_ip_address": "2001:db8::1",
            "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
            "fbp": FBP,
            "fbc": FBC,
            "em": [h("jane@example.com")],
            "ph": [h("33612345678")],
        },
        "custom_data": {
            "currency": "EUR",
            "value": 42.5,
            "contents": [
                {"id": "sku-1", "quantity": 2, "item_price": 10.0, "title": "Mug"},
                {"id": "sku-2", "item_price": 22.5},
            ],
            "content_ids": ["sku-1", "sku-2"],
            "content_type": "product",
            "num_items": 3,
        },
        "data_processing_options": [],
    }


def test_payload_matches_meta_sdk_event():
    """The event built by Meta's own SDK from the same facts serialises to the same JSON
    (the SDK leaves out data_processing_options when not set; tagd sends [] for "off")."""
    pytest.importorskip("facebook_business")
    from facebook_business.adobjects.serverside.action_source import ActionSource
    from facebook_business.adobjects.serverside.content import Content
    from facebook_business.adobjects.serverside.custom_data import CustomData
    from facebook_business.adobjects.serverside.event import Event as SdkEvent
    from facebook_business.adobjects.serverside.user_data import UserData

    sdk_event = SdkEvent(
        event_name="Purchase",
        event_time=1_700_000_001,
        event_id="ev-1",
        event_source_url="https://shop.example/checkout/done?order=77",
        referrer_url="https://shop.example/checkout",
        action_source=ActionSource.WEBSITE,
        user_data=UserData(
            client_ip_address="2001:db8::1",
            client_user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
            fbp=FBP,
            fbc=FBC,
            emails=["Jane@Example.com "],
            phones=["+33 6 12 34 56 78"],
        ),
        custom_data=CustomData(
            currency="eur",
            value=42.5,
            contents=[
                Content(product_id="sku-1", quantity=2, item_price=10.0, title="Mug"),
                Content(product_id="sku-2", item_price=22.5),
            ],
            content_ids=["sku-1", "sku-2"],
            content_type="product",
            num_items=3,
        ),
    ).normalize()
    ours = destination().payload(event(custom_data={"currency": "eur", "value": 42.5}))
    assert ours.pop("data_processing_options") == []
    assert ours == sdk_event


def test_request_url_headers_and_body():
    """The token is in the query string of C{url} only; C{log_url} is the same endpoint
    without it; the body is C{{"data": [...]}} and the event ids are listed."""
    [request] = destination().encode([event(1), event(2)])
    url = urlsplit(request.url)
    assert (url.scheme, url.netloc, url.path) == ("https", "graph.facebook.com", "/v26.0/1234/events")
    assert parse_qs(url.query) == {"access_token": [TOKEN]}
    assert request.log_url == "https://graph.facebook.com/v26.0/1234/events"
    assert request.method == "POST"
    assert request.headers == {"Content-Type": "application/json"}
    assert request.positions == (0, 1)
    assert body(request) == {"data": [destination().payload(event(1)), destination().payload(event(2))]}


def test_endpoint_version_and_test_code_settings():
    """A configured endpoint (trailing slash or not), API version and test event code are
    used as given; the test code goes in the body, next to the data."""
    dest = destination(endpoint="http://127.0.0.1:9001/", api_version="v99.0", test_event_code="TEST123")
    [request] = dest.encode([event()])
    assert request.log_url == "http://127.0.0.1:9001/v99.0/1234/events"
    assert request.url.startswith(request.log_url + "?access_token=")
    assert body(request)["test_event_code"] == "TEST123"
    assert "test_event_code" not in body(destination().encode([event()])[0])


@pytest.mark.parametrize(("count", "sizes"), [(1, [1]), (1000, [1000]), (1001, [1000, 1]), (2500, [1000, 1000, 500])])
def test_batches_of_at_most_1000(count, sizes):
    """Meta takes at most 1000 events per request: more are split, order kept."""
    events = [event(n) for n in range(count)]
    assert_batches(destination().encode(events), events, sizes)


def test_smaller_batch_setting():
    """C{max_batch} splits at the configured size; no events means no request."""
    requests = destination(max_batch=2).encode([event(n) for n in range(5)])
    assert [r.positions for r in requests] == [(0, 1), (2, 3), (4,)]
    assert destination().encode([]) == []


@pytest.mark.parametrize("size", [0, -1, 1001])
def test_batch_setting_out_of_range_refused(size):
    """A batch size Meta would refuse every time (or no batch at all) stops start-up."""
    with pytest.raises(ValueError, match="^max_batch: "):
        destination(max_batch=size)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pixel_id", "1/../x"),
        ("pixel_id", "12 34"),
        ("pixel_id", "act_1234"),
        ("pixel_id", "\uff11\uff12"),  # fullwidth digits are no URL path Meta knows
        ("pixel_id", ""),
        ("api_version", "24.0"),
        ("api_version", "v24"),
        ("api_version", "V24.0"),
        ("api_version", "v24.0/"),
        ("api_version", "latest"),
    ],
)
def test_ids_pasted_into_the_url_are_checked(key, value):
    """The pixel id and the API version are path segments of every request's URL: a
    value that is not digits, or not C{v<major>.<minor>}, stops start-up under its key
    with a reason that is the same whatever the value, which is never quoted (it could be
    a token pasted into the wrong key)."""
    with pytest.raises(ValueError) as raised:
        destination(**{key: value})
    assert str(raised.value) == f"{key}: must be {meta.FORMATS[key][1]}"


def test_event_names_unchanged_by_default():
    """tagd's names are Meta's: standard and custom names pass as they are."""
    dest = destination()
    for name in ("Purchase", "ViewContent", "Lead", "PageView", "Newsletter_Signup"):
        assert dest.payload(event(event_name=name))["event_name"] == name


def test_event_names_overrides():
    """An override renames only the events it names."""
    dest = destination(event_names={"Purchase": "OrderPlaced", "Lead": "Enquiry"})
    assert dest.payload(event())["event_name"] == "OrderPlaced"
    assert dest.payload(event(event_name="Lead"))["event_name"] == "Enquiry"
    assert dest.payload(event(event_name="AddToCart"))["event_name"] == "AddToCart"


@pytest.mark.parametrize("names", [{"Purchase": 7}, {"Purchase": ""}])
def test_event_names_must_be_names(names):
    """An override that is not a non-empty string would reach Meta as a bad name: refused."""
    with pytest.raises(ValueError, match="^event_names: 'Purchase' "):
        destination(event_names=names)


def test_raw_identifiers_never_hashed():
    """IP (IPv6 kept as IPv6), user agent, fbp and fbc (with its case and fifth segment)
    go exactly as tagd got them, even when they look like hashes."""
    looks_hashed = "a" * 64
    user = destination().payload(event(user_agent=looks_hashed))["user_data"]
    assert user["client_ip_address"] == "2001:db8::1"
    assert user["client_user_agent"] == looks_hashed
    assert (user["fbp"], user["fbc"]) == (FBP, FBC)


def test_missing_raw_identifiers_left_out():
    """No cookie, no key: Meta gets no empty fbp/fbc."""
    user = destination().payload(event(fbp=None, fbc=None, user_data={}))["user_data"]
    assert set(user) == {"client_ip_address", "client_user_agent"}


def test_hashed_values_never_rehashed():
    """An origin's own SHA-256 is sent as it is (lower-cased), next to values tagd hashes."""
    user_data = {"em": (ALREADY_HASHED.upper(), "other@example.com"), "external_id": ("U-1",)}
    user = destination().payload(event(user_data=user_data))["user_data"]
    assert user["em"] == [ALREADY_HASHED, h("other@example.com")]
    assert user["external_id"] == [h("u-1")]
    assert "ph" not in user


def test_origin_custom_data_wins_over_contents():
    """Values the origin gave are never overwritten by those derived from the contents."""
    custom = {"content_ids": ["bundle-9"], "content_type": "product_group", "num_items": 1}
    data = destination().payload(event(custom_data=custom))["custom_data"]
    assert data["content_ids"] == ["bundle-9"]
    assert data["content_type"] == "product_group"
    assert data["num_items"] == 1
    assert [c["id"] for c in data["contents"]] == ["sku-1", "sku-2"]


def test_num_items_only_for_checkout_and_purchase():
    """num_items is Meta's parameter for InitiateCheckout and Purchase, not a product view."""
    dest = destination()
    assert dest.payload(event(event_name="InitiateCheckout"))["custom_data"]["num_items"] == 3
    assert "num_items" not in dest.payload(event(event_name="ViewContent"))["custom_data"]


def test_no_contents_no_product_fields():
    """Without contents nothing is invented; without any custom data there is none."""
    bare = destination().payload(event(contents=(), custom_data={}, referrer=None))
    assert "custom_data" not in bare
    assert "referrer_url" not in bare
    only_value = destination().payload(event(contents=(), custom_data={"value": 0}))
    assert only_value["custom_data"] == {"value": 0}


def test_a_visitor_who_refused_marketing_is_limited_data_use():
    """An event of a visitor without marketing consent (it reaches a destination needing
    no such consent) carries LDU; with marketing granted, or no record read, it does not."""
    refused = destination().payload(event(consent=frozenset({"analytics"})))
    assert refused["data_processing_options"] == ["LDU"]
    assert destination().payload(event(consent=frozenset()))["data_processing_options"] == ["LDU"]
    assert destination().payload(event(consent=None))["data_processing_options"] == []
    assert destination().payload(event())["data_processing_options"] == []


def test_limited_data_use():
    """LDU on: the flag with country and state 0 (Meta geolocates); off: an empty list."""
    on = destination(limited_data_use=True).payload(event())
    assert on["data_processing_options"] == ["LDU"]
    assert on["data_processing_options_country"] == 0
    assert on["data_processing_options_state"] == 0
    off = destination().payload(event())
    assert off["data_processing_options"] == []
    assert "data_processing_options_country" not in off


def test_module_payload_is_the_destination_payload():
    """The per-event function (for the log destination) gives what the destination sends."""
    dest = destination(event_names={"Purchase": "Buy"}, limited_data_use=True)
    assert meta.payload(event(), {"Purchase": "Buy"}, True) == dest.payload(event())
    assert meta.payload(event()) == destination().payload(event())


def test_build_defaults_and_contract():
    """Module constants are the configuration contract tagd.daemon.config reads."""
    dest = destination()
    assert (meta.TYPE, dest.type, dest.name) == ("meta", "meta", "fb-main")
    assert (dest.api_version, dest.endpoint, dest.max_batch) == ("v26.0", "https://graph.facebook.com", 1000)
    assert (dest.test_event_code, dest.event_names, dest.limited_data_use) == (None, {}, False)
    assert meta.SECRETS == ("access_token",)
    assert meta.DEFAULT_TIMEOUT == 1.5
    assert {k for k, (_, required, _) in meta.KEYS.items() if required} == {"pixel_id", "access_token"}


def test_token_never_in_repr_log_url_or_messages():
    """The token is absent from the destination's repr, the loggable URL, the body and
    every verdict message, even when Meta (or a proxy) echoes it back raw or
    percent-encoded."""
    dest = destination()
    [request] = dest.encode([event()])
    assert "access_token" not in request.log_url
    echo = f'{{"error": {{"code": 190, "message": "token {TOKEN} bad", "fbtrace_id": "T"}}}}'
    proxy = f"<html>GET {request.url} failed</html>".encode()
    answers = ((400, echo.encode()), (502, proxy), (200, proxy))
    assert_secret_hidden(TOKEN, dest, request, answers)


def meta_error(code: int, **extra) -> bytes:
    """A Graph API error document."""
    error = {"code": code, "message": f"problem {code}", "type": "OAuthException", "fbtrace_id": "AbC123"}
    return json.dumps({"error": error | extra}).encode()


@pytest.mark.parametrize("code", [1, 2, 341, 368, 5000])
def test_transient_codes(code):
    """Meta's temporary errors are retried later, whatever the HTTP status says."""
    for status in (400, 500):
        assert destination().classify(status, meta_error(code)).outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("code", [4, 17, 613, 80003, 80004])
def test_throttle_codes(code):
    """Meta's rate-limit codes slow the destination down; Meta gives no delay to wait."""
    verdict = destination().classify(400, meta_error(code))
    assert verdict.outcome is Outcome.THROTTLE
    assert verdict.retry_after is None


@pytest.mark.parametrize(
    ("code", "subcode", "outcome"),
    [
        (100, 2804003, Outcome.PERMANENT),
        (803, None, Outcome.PERMANENT),
        (190, 460, Outcome.AUTH),
        (102, None, Outcome.AUTH),
        (10, None, Outcome.AUTH),
        (200, None, Outcome.AUTH),
        (299, None, Outcome.AUTH),
    ],
)
def test_refusals_carry_meta_message(code, subcode, outcome):
    """Bad parameters (e.g. an event too old) and unknown 4xx codes are the events'
    fault, permanent; a bad or expired token (190), an expired session (102) and missing
    permissions (10, 200-299) are the destination's.  Each verdict carries Meta's code,
    subcode, message and fbtrace_id."""
    extra = {"error_subcode": subcode} if subcode else {}
    verdict = destination().classify(400, meta_error(code, **extra))
    assert verdict.outcome is outcome
    assert f"error {code}" in verdict.message
    assert f"problem {code}" in verdict.message
    assert "AbC123" in verdict.message
    if subcode:
        assert f"/{subcode}" in verdict.message


def test_unknown_code_follows_http_status():
    """An error code Meta has not documented is judged by its HTTP status, or by Meta's
    own C{is_transient} flag when it sets it."""
    assert destination().classify(500, meta_error(99999)).outcome is Outcome.TRANSIENT
    assert destination().classify(429, meta_error(99999)).outcome is Outcome.THROTTLE
    assert destination().classify(400, meta_error(99999)).outcome is Outcome.PERMANENT
    flagged = meta_error(99999, is_transient=True)
    assert destination().classify(400, flagged).outcome is Outcome.TRANSIENT


@pytest.mark.parametrize(
    ("status", "answer", "outcome"),
    [
        (500, b"<html>Internal error</html>", Outcome.TRANSIENT),
        (404, b"<html>Not found</html>", Outcome.PERMANENT),
        (400, b'{"unexpected": true}', Outcome.PERMANENT),
        (400, b"[1, 2]", Outcome.PERMANENT),
        (400, b"\xff\xfe", Outcome.PERMANENT),
        (400, b'{"error": {"code": true}}', Outcome.PERMANENT),
    ],
)
def test_unparseable_answers(status, answer, outcome):
    """Bodies that are not Meta's JSON are judged by the HTTP status, never crash (empty
    bodies: test_destination_common)."""
    verdict = destination().classify(status, answer)
    assert verdict.outcome is outcome
    assert f"HTTP {status}" in verdict.message


def test_success_checks_events_received():
    """2xx is success, reporting how many events Meta received; a 2xx saying it received
    none is not a delivery and is not retried as is."""
    ok = destination().classify(200, b'{"events_received": 2, "messages": [], "fbtrace_id": "Z9"}')
    assert ok.outcome is Outcome.SUCCESS
    assert "events_received=2" in ok.message and "Z9" in ok.message
    assert destination().classify(200, b"").outcome is Outcome.SUCCESS
    assert destination().classify(204, b"{}").outcome is Outcome.SUCCESS
    none = destination().classify(200, b'{"events_received": 0, "messages": ["dropped"]}')
    assert none.outcome is Outcome.PERMANENT
    assert "dropped" in none.message


def test_long_message_is_bounded():
    """A huge error message is cut so that one answer cannot flood the logs."""
    verdict = destination().classify(400, meta_error(100, message="x" * 10_000))
    assert verdict.outcome is Outcome.PERMANENT
    assert len(verdict.message) <= 300
