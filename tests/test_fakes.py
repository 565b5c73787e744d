"""The fake platforms accept each platform's documented example and flag what breaks its
rules, over real loopback HTTP: tests that trust the fakes need to know the fakes are strict."""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import socket
import struct
import time

import attrs
import pytest
import pytest_twisted
import treq

from conftest import within
from destination_helpers import fake_violations
from fakes import FakeGA4, FakeMeta, FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat, FakeTikTok, make_event, serve
from tagd.delivery.destinations import microsoft, pinterest, reddit, snapchat
from helpers import ThreadedPlatform, wait_until


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def post(url: str, body, headers: dict | None = None) -> tuple[int, object]:
    """POST C{body} (JSON, or bytes as they are) and return the status and parsed answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await within(treq.post(url, data=data, headers=headers or {}, persistent=False))
    content = await within(response.content())
    return response.code, (json.loads(content) if content else None)


async def _served(fake):
    served = serve(fake)
    yield served
    await served.stop()


@pytest_twisted.async_yield_fixture
async def meta():
    """A fake Meta for pixel 1234 and token meta-token, on loopback."""
    async for served in _served(FakeMeta()):
        yield served


@pytest_twisted.async_yield_fixture
async def ga4():
    """A fake GA4 stream G-TEST with secret ga-secret, on loopback."""
    async for served in _served(FakeGA4()):
        yield served


@pytest_twisted.async_yield_fixture
async def tiktok():
    """A fake TikTok pixel CTEST123 with token tt-token, on loopback."""
    async for served in _served(FakeTikTok()):
        yield served


# -- Meta -----------------------------------------------------------------------------

META_PATH = "/v24.0/1234/events?access_token=meta-token"


def meta_example() -> dict:
    """Meta's documented website purchase, with the times made current."""
    return {
        "data": [
            {
                "event_name": "Purchase",
                "event_time": int(time.time()) - 60,
                "event_id": "event.id.123",
                "action_source": "website",
                "event_source_url": "https://shop.example/checkout",
                "user_data": {
                    "em": [sha("joe@example.com")],
                    "ph": [sha("4930123456")],
                    "client_ip_address": "2001:db8::1",
                    "client_user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
                    "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
                    "fbp": "fb.1.1558571054389.1098115397",
                },
                "custom_data": {"currency": "usd", "value": 123.45},
            }
        ],
        "test_event_code": "TEST123",
    }


def _set(path: str, value):
    """A change to an example: set C{path} (dotted, C{data.0.x}) to C{value}, or delete it."""

    def change(body: dict) -> None:
        *parents, last = path.split(".")
        node = body
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


_DELETE = object()


@pytest_twisted.ensureDeferred
async def test_meta_accepts_documented_example(meta):
    """A documented website event gets C{events_received} and no violation."""
    status, answer = await post(meta.base + META_PATH, meta_example())
    assert status == 200
    assert answer["events_received"] == 1 and answer["messages"] == []
    assert answer["fbtrace_id"]
    assert meta.fake.violations == []
    assert meta.fake.events[0]["event_id"] == "event.id.123"


@pytest_twisted.ensureDeferred
async def test_meta_records_request(meta):
    """The fake records the path, query, headers and parsed body of each request."""
    await post(meta.base + META_PATH, meta_example(), {"Content-Type": "application/json"})
    (recorded,) = meta.fake.requests
    assert recorded.method == "POST"
    assert recorded.path == "/v24.0/1234/events"
    assert recorded.query == {"access_token": ["meta-token"]}
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.body == json.loads(recorded.raw)


@pytest_twisted.ensureDeferred
async def test_meta_token_in_body_accepted(meta):
    """The token may travel as a body field instead of the query."""
    body = {**meta_example(), "access_token": "meta-token"}
    status, _ = await post(meta.base + "/v24.0/1234/events", body)
    assert status == 200
    assert meta.fake.violations == []


NOW = int(time.time())

META_BAD = {
    "milliseconds": (_set("data.0.event_time", NOW * 1000), "event_time", 100),
    "future": (_set("data.0.event_time", NOW + 3600), "event_time", 100),
    "no action_source": (_set("data.0.action_source", _DELETE), "action_source", 100),
    "no source url": (_set("data.0.event_source_url", _DELETE), "event_source_url", 100),
    "no user agent": (_set("data.0.user_data.client_user_agent", _DELETE), "client_user_agent", 100),
    "raw email": (_set("data.0.user_data.em", ["joe@example.com"]), "user_data.em", 100),
    "upper-case hex": (_set("data.0.user_data.em", [sha("joe@example.com").upper()]), "user_data.em", 100),
    "hashed user agent": (
        _set("data.0.user_data.client_user_agent", sha("Mozilla")), "client_user_agent", 100
    ),
    "hashed fbp": (_set("data.0.user_data.fbp", sha("fb.1.1.1")), "user_data.fbp", 100),
    "bad ip": (_set("data.0.user_data.client_ip_address", "not-an-ip"), "client_ip_address", 100),
    "no event name": (_set("data.0.event_name", _DELETE), "event_name", 100),
}


@pytest.mark.parametrize("change, field, code", META_BAD.values(), ids=list(META_BAD))
@pytest_twisted.ensureDeferred
async def test_meta_flags_malformed(meta, change, field, code):
    """Each documented rule broken is a violation and an error answer with Meta's code."""
    body = meta_example()
    change(body)
    status, answer = await post(meta.base + META_PATH, body)
    assert status == 400
    assert answer["error"]["code"] == code
    assert any(field in v.field for v in meta.fake.violations), meta.fake.violations


@pytest_twisted.ensureDeferred
async def test_meta_too_old_event_sinks_request(meta):
    """An event over 7 days old rejects the whole request with subcode 2804003."""
    body = meta_example()
    body["data"].append(copy.deepcopy(body["data"][0]))
    body["data"][1]["event_time"] = NOW - 8 * 86400
    status, answer = await post(meta.base + META_PATH, body)
    assert status == 400
    assert (answer["error"]["code"], answer["error"]["error_subcode"]) == (100, 2804003)


@pytest_twisted.ensureDeferred
async def test_meta_wrong_token(meta):
    """A wrong token is error 190 and is recorded."""
    status, answer = await post(meta.base + "/v24.0/1234/events?access_token=nope", meta_example())
    assert status == 400
    assert answer["error"]["code"] == 190
    assert [v.field for v in meta.fake.violations] == ["access_token"]


@pytest_twisted.ensureDeferred
async def test_meta_wrong_pixel_and_too_many_events(meta):
    """Another pixel's path and more than 1000 events are both flagged."""
    body = meta_example()
    body["data"] = body["data"] * 1001
    status, _ = await post(meta.base + "/v24.0/999/events?access_token=meta-token", body)
    assert status == 400
    assert {"path", "data"} <= {v.field for v in meta.fake.violations}


# -- GA4 ------------------------------------------------------------------------------

GA4_QUERY = "?measurement_id=G-TEST&api_secret=ga-secret"


def ga4_example() -> dict:
    """GA4's documented purchase, with session and engagement as its reports need, and the
    reference's visitor fields: user agent, consent and user-provided data."""
    return {
        "client_id": "123456.7654321",
        "timestamp_micros": (int(time.time()) - 60) * 10**6,
        "ip_override": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        "user_data": {
            "sha256_email_address": ["a" * 64],
            "sha256_phone_number": ["b" * 64],
            "address": [{"sha256_first_name": "c" * 64, "sha256_last_name": "d" * 64, "city": "berlin"}],
        },
        "events": [
            {
                "name": "purchase",
                "params": {
                    "session_id": "1706540400",
                    "engagement_time_msec": 100,
                    "currency": "USD",
                    "value": 30.03,
                    "transaction_id": "T_12345",
                    "page_location": "https://shop.example/" + "p" * 900,
                    "items": [
                        {"item_id": "SKU_12345", "item_name": "Stan and Friends Tee", "price": 10.01, "quantity": 3}
                    ],
                },
            }
        ],
    }


@pytest_twisted.ensureDeferred
async def test_ga4_accepts_documented_example(ga4):
    """The documented example gets 204, as from the real GA4, and no violation."""
    status, answer = await post(ga4.base + "/mp/collect" + GA4_QUERY, ga4_example())
    assert (status, answer) == (204, None)
    assert ga4.fake.violations == []
    assert ga4.fake.events[0]["name"] == "purchase"


@pytest_twisted.ensureDeferred
async def test_ga4_debug_accepts_documented_example(ga4):
    """The validation server answers an empty C{validationMessages} for a good payload."""
    status, answer = await post(ga4.base + "/debug/mp/collect" + GA4_QUERY, ga4_example())
    assert status == 200
    assert answer == {"validationMessages": []}


def _params(**changes):
    def change(body: dict) -> None:
        params = body["events"][0]["params"]
        for key, value in changes.items():
            if value is _DELETE:
                del params[key]
            else:
                params[key] = value

    return change


GA4_BAD = {
    "26 events": (lambda b: b.update(events=b["events"] * 26), "events"),
    "bad name": (_set("events.0.name", "_badEventName"), "name"),
    "long name": (_set("events.0.name", "a" * 41), "name"),
    "reserved name": (_set("events.0.name", "session_start"), "name"),
    "26 params": (_params(**{f"p{i}": i for i in range(20)}), "params"),
    "no session": (_params(session_id=_DELETE), "session_id"),
    "no engagement": (_params(engagement_time_msec=_DELETE), "engagement_time_msec"),
    "zero engagement": (_params(engagement_time_msec=0), "engagement_time_msec"),
    "long value": (_params(coupon="c" * 101), "coupon"),
    "long page_location": (_params(page_location="https://x/" + "p" * 991), "page_location"),
    "long page_referrer": (_params(page_referrer="https://x/" + "p" * 411), "page_referrer"),
    "reserved param": (_params(ga_thing="x"), "ga_thing"),
    "lower-case currency": (_params(currency="usd"), "currency"),
    "item without id": (_params(items=[{"price": 1}]), "items"),
    "no client_id": (_set("client_id", _DELETE), "client_id"),
    "seconds timestamp": (_set("timestamp_micros", NOW), "timestamp_micros"),
    "73 hours old": (_set("timestamp_micros", (NOW - 73 * 3600) * 10**6), "timestamp_micros"),
    "unknown field": (_set("user_agent_override", "Mozilla/5.0"), "user_agent_override"),
    "empty user_agent": (_set("user_agent", ""), "user_agent"),
    "unknown consent type": (_set("consent", {"ad_storage": "GRANTED"}), "consent.ad_storage"),
    "bad consent state": (_set("consent", {"ad_user_data": "granted"}), "consent.ad_user_data"),
    "unhashed e-mail": (_set("user_data", {"sha256_email_address": ["joe@example.com"]}), "sha256_email_address"),
    "unknown user_data field": (_set("user_data", {"email": ["a" * 64]}), "user_data.email"),
    "unhashed name": (_set("user_data", {"address": [{"sha256_first_name": "Joe"}]}), "sha256_first_name"),
    "unknown address field": (_set("user_data", {"address": [{"street": "x"}]}), "address[0].street"),
    "bad ip_override": (_set("ip_override", "localhost"), "ip_override"),
    "oversized body": (_set("user_properties", {"blob": {"value": "x" * 130_000}}), "body"),
}


@pytest.mark.parametrize("change, field", GA4_BAD.values(), ids=list(GA4_BAD))
@pytest_twisted.ensureDeferred
async def test_ga4_flags_malformed(ga4, change, field):
    """Each documented limit broken is recorded, though GA4 still answers 204."""
    body = ga4_example()
    change(body)
    status, _ = await post(ga4.base + "/mp/collect" + GA4_QUERY, body)
    assert status == 204
    assert any(field in v.field for v in ga4.fake.violations), ga4.fake.violations


@pytest_twisted.ensureDeferred
async def test_ga4_debug_answers_validation_messages(ga4):
    """The debug path answers violations in GA4's validationMessages shape."""
    body = ga4_example()
    body["events"][0]["name"] = "_badEventName"
    status, answer = await post(ga4.base + "/debug/mp/collect" + GA4_QUERY, body)
    assert status == 200
    (message,) = answer["validationMessages"]
    assert message["fieldPath"] == "events[0].name"
    assert message["validationCode"] == "NAME_INVALID"
    assert "_badEventName" in message["description"]


@pytest_twisted.ensureDeferred
async def test_ga4_wrong_secret_recorded(ga4):
    """A wrong api_secret is answered 204, as GA4 does, but recorded."""
    status, _ = await post(ga4.base + "/mp/collect?measurement_id=G-TEST&api_secret=x", ga4_example())
    assert status == 204
    assert [v.field for v in ga4.fake.violations] == ["api_secret"]


# -- TikTok ---------------------------------------------------------------------------

TIKTOK_PATH = "/open_api/v1.3/event/track/"
TIKTOK_HEADERS = {"Access-Token": "tt-token", "Content-Type": "application/json"}


def tiktok_example() -> dict:
    """TikTok's documented web purchase."""
    return {
        "event_source": "web",
        "event_source_id": "CTEST123",
        "data": [
            {
                "event": "CompletePayment",
                "event_time": int(time.time()) - 60,
                "event_id": "order-1001",
                "user": {
                    "email": sha("joe@example.com"),
                    "phone": sha("+4930123456"),
                    "external_id": sha("customer-77"),
                    "ip": "13.57.97.131",
                    "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
                    "ttclid": "E.C.P.v3AbCd",
                    "ttp": "2Hk4x7bFq9",
                },
                "page": {"url": "https://shop.example/checkout", "referrer": "https://www.tiktok.com/"},
                "properties": {
                    "contents": [
                        {
                            "content_id": "1077218",
                            "content_type": "product",
                            "content_name": "shirt",
                            "price": 8,
                            "quantity": 2,
                        }
                    ],
                    "currency": "USD",
                    "value": 16,
                },
            }
        ],
    }


@pytest_twisted.ensureDeferred
async def test_tiktok_accepts_documented_example(tiktok):
    """The documented event gets HTTP 200 with code 0 and no violation."""
    status, answer = await post(tiktok.base + TIKTOK_PATH, tiktok_example(), TIKTOK_HEADERS)
    assert status == 200
    assert (answer["code"], answer["message"]) == (0, "OK")
    assert tiktok.fake.violations == []
    assert tiktok.fake.requests[0].headers["access-token"] == "tt-token"


TIKTOK_BAD = {
    "app source": (_set("event_source", "app"), "event_source"),
    "other pixel": (_set("event_source_id", "C999"), "event_source_id"),
    "no event": (_set("data.0.event", _DELETE), "event"),
    "no event_id": (_set("data.0.event_id", _DELETE), "event_id"),
    "milliseconds": (_set("data.0.event_time", NOW * 1000), "event_time"),
    "raw email": (_set("data.0.user.email", "joe@example.com"), "user.email"),
    "hashed ip": (_set("data.0.user.ip", sha("13.57.97.131")), "user.ip"),
    "hashed user agent": (_set("data.0.user.user_agent", sha("Mozilla")), "user.user_agent"),
    "unknown content key": (_set("data.0.properties.contents.0.sku", "x"), "contents"),
    "empty data": (_set("data", []), "data"),
}


@pytest.mark.parametrize("change, field", TIKTOK_BAD.values(), ids=list(TIKTOK_BAD))
@pytest_twisted.ensureDeferred
async def test_tiktok_flags_malformed(tiktok, change, field):
    """Each documented rule broken is a violation and a non-zero code under HTTP 200."""
    body = tiktok_example()
    change(body)
    status, answer = await post(tiktok.base + TIKTOK_PATH, body, TIKTOK_HEADERS)
    assert status == 200
    assert answer["code"] == 40002
    assert any(field in v.field for v in tiktok.fake.violations), tiktok.fake.violations


@pytest_twisted.ensureDeferred
async def test_tiktok_wrong_token(tiktok):
    """A wrong Access-Token is code 40105 under HTTP 200."""
    status, answer = await post(tiktok.base + TIKTOK_PATH, tiktok_example(), {"Access-Token": "nope"})
    assert (status, answer["code"]) == (200, 40105)


# -- injected failures ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_injected_status_for_next_requests(ga4):
    """C{inject(2, status=503)} fails exactly the next two requests."""
    ga4.fake.inject(2, status=503)
    url = ga4.base + "/mp/collect" + GA4_QUERY
    statuses = [(await post(url, ga4_example()))[0] for _ in range(3)]
    assert statuses == [503, 503, 204]
    assert len(ga4.fake.requests) == 3


@pytest_twisted.ensureDeferred
async def test_injected_meta_code(meta):
    """An injected Meta code comes back in Meta's error shape."""
    meta.fake.inject(code=17, status=400)
    status, answer = await post(meta.base + META_PATH, meta_example())
    assert status == 400
    assert answer["error"]["code"] == 17
    status, _ = await post(meta.base + META_PATH, meta_example())
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_injected_tiktok_code(tiktok):
    """An injected TikTok code comes back under HTTP 200, as TikTok answers failures."""
    tiktok.fake.inject(code=40100)
    status, answer = await post(tiktok.base + TIKTOK_PATH, tiktok_example(), TIKTOK_HEADERS)
    assert (status, answer["code"]) == (200, 40100)


@pytest_twisted.ensureDeferred
async def test_injected_delay(meta):
    """A delay alone holds the normal answer back for that long."""
    meta.fake.inject(delay=0.3)
    started = time.monotonic()
    status, answer = await post(meta.base + META_PATH, meta_example())
    assert time.monotonic() - started >= 0.3
    assert (status, answer["events_received"]) == (200, 1)


@pytest_twisted.ensureDeferred
async def test_non_post_flagged(tiktok):
    """A GET is recorded as a violation."""
    response = await within(treq.get(tiktok.base + TIKTOK_PATH, persistent=False))
    await within(response.content())
    assert [v.field for v in tiktok.fake.violations] == ["method"]


def test_a_threaded_platform_ignores_a_request_cut_short():
    """A POST whose connection closes, or is reset, before its whole body came is never
    handled, as by a real server (tagd cuts one when it stops with a POST in flight: the
    client writes the head first and the body later; a cancelled request is aborted, a
    reset), only counted; the next, whole request is handled."""
    platform = ThreadedPlatform("meta", FakeMeta(pixel_id="1234", access_token="token"))
    platform.up()
    try:
        body = json.dumps({"data": [{"event_name": "PageView"}]}).encode()
        head = (
            "POST /v21.0/1234/events?access_token=token HTTP/1.1\r\nHost: graph.facebook.com\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", platform.port), timeout=5) as cut:
            cut.sendall(head + body[:10])
            cut.shutdown(socket.SHUT_WR)
            assert cut.recv(1024) == b""  # closed unanswered
        with socket.create_connection(("127.0.0.1", platform.port), timeout=5) as reset:
            reset.sendall(head + body[:10])
            time.sleep(0.1)  # the head is read: the server waits for the body
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_until(lambda: platform.cut == 2, 5, "the reset request counted")
        connection = http.client.HTTPConnection("127.0.0.1", platform.port, timeout=5)
        connection.request("POST", "/v21.0/1234/events?access_token=token", body, {"Content-Type": "application/json"})
        connection.getresponse().read()
        connection.close()
    finally:
        platform.close()
    assert len(platform.received) == 1 and platform.cut == 2
    assert all("data list" not in violation for violation in platform.violations)


def _flagged(platform: str, flag):
    """A request of C{platform}'s destination for a visitor who refused marketing, with
    its limited-use flag replaced by C{flag}, and the fake that checks it."""
    kinds = {
        "pinterest": (pinterest, FakePinterest(), {"ad_account_id": "549755885175", "access_token": "pin-token"}),
        "snapchat": (snapchat, FakeSnapchat(), {"pixel_id": "snap-pixel-1", "access_token": "snap-token"}),
        "reddit": (reddit, FakeReddit(), {"pixel_id": "t2_abc123", "access_token": "rdt-token"}),
        "microsoft": (microsoft, FakeMicrosoft(), {"tag_id": "343000123", "access_token": "ms-token"}),
    }
    module, fake, settings = kinds[platform]
    [request] = module.build(platform, settings).encode([make_event(consent=frozenset({"analytics"}))])
    document = json.loads(request.body)
    events = document["data"]["events"] if platform == "reddit" else document["data"]
    holder = events[0]["user"] if platform == "reddit" else events[0]
    key = {"pinterest": "opt_out", "microsoft": "adStorageConsent"}.get(platform, "data_processing_options")
    holder[key] = flag
    return fake_violations(fake, attrs.evolve(request, body=json.dumps(document).encode()))


@pytest.mark.parametrize(
    "platform, flag",
    [("pinterest", True), ("snapchat", ["LDU"]), ("reddit", {"modes": ["LDU"], "country": "US"}), ("microsoft", "D")],
)
def test_the_later_platforms_fakes_take_their_limited_use_flags(platform, flag):
    assert _flagged(platform, flag) == []


LIMITED_USE_BAD = {
    "pinterest opt_out not a boolean": ("pinterest", "true", "opt_out"),
    "snapchat options not LDU": ("snapchat", ["RESTRICTED"], "data_processing_options"),
    "reddit options without modes": ("reddit", ["LDU"], "data_processing_options"),
    "reddit options of an unknown key": ("reddit", {"modes": ["LDU"], "state": 1}, "data_processing_options"),
    "microsoft consent not G or D": ("microsoft", "denied", "adStorageConsent"),
}


@pytest.mark.parametrize("platform, flag, field", LIMITED_USE_BAD.values(), ids=list(LIMITED_USE_BAD))
def test_the_later_platforms_fakes_check_their_limited_use_flags(platform, flag, field):
    """Each fake takes its platform's flag as sent (the destinations' tests show it) and
    flags anything else in its place."""
    violations = _flagged(platform, flag)
    assert violations and all(field in violation for violation in violations), violations
