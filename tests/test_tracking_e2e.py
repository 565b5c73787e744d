"""Tracking end to end over real loopback sockets: origin → tagd → fake Meta, GA4 and TikTok.

The web origin sets the tracking header to the value of the request's C{X-Track}; tagd runs
its real tracker and sends to the three fakes, which check each payload the way the
platform documents it and record it.  Every test looks at what the platforms got, that they
found nothing to object to, and at the cookies the visitor got.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from urllib.parse import unquote

import pytest
import pytest_twisted

from conftest import eventually, within
from origin import PAGE, TRACKING_HEADER

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HEX32 = re.compile(r"[0-9a-f]{32}")

VIEW_CONTENT = {
    "event_name": "ViewContent",
    "custom_data": {"currency": "EUR", "value": 12.5, "shelf": "kitchen"},
    "contents": [
        {"id": "sku-1", "title": "Blue mug", "item_price": 12.5, "quantity": 1, "category": "Kitchen"}
    ],
}

# The documented lifetimes of each first-party cookie tagd sets, in seconds.
LIFETIMES = {
    "_fbp": 90 * 86400,
    "_fbc": 90 * 86400,
    "ttclid": 30 * 86400,
    "_ga": 400 * 86400,
    "_tagd_sid": 1800,
    "tagd_event_id": 60,
    "tagd_event_id_PageView": 60,
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def header_value(spec) -> bytes:
    return json.dumps(spec).encode("utf-8")


def cookies_set(response) -> dict[str, tuple[str, dict[str, str | None]]]:
    """The response's C{Set-Cookie} headers: name → (value, attributes by lower-case name)."""
    cookies = {}
    for line in response.header(b"set-cookie"):
        first, *attributes = line.decode("ascii").split(";")
        name, _, value = first.strip().partition("=")
        attrs = {}
        for attribute in attributes:
            key, sep, val = attribute.strip().partition("=")
            attrs[key.lower()] = val if sep else None
        cookies[name] = (value, attrs)
    return cookies


async def tracked_visit(visitor, spec, path=b"/page", headers=()):
    """GET C{path} with the origin asked to mark it with C{spec} as the tracking header."""
    value = spec if isinstance(spec, bytes) else header_value(spec)
    response = await within(
        visitor.request(b"GET", path, headers=[(b"User-Agent", FIREFOX), *headers, (b"X-Track", value)])
    )
    assert response.status == 200 and bytes(response.body) == PAGE
    assert TRACKING_HEADER.lower() not in response.names()
    return response


async def delivered(fakes, count=1):
    """Wait until every fake has received C{count} events; return their events by platform."""
    await eventually(lambda: all(len(f.fake.events) >= count for f in fakes))
    for served in fakes:
        assert served.fake.violations == [], served.fake.violations
    return [served.fake.events for served in fakes]


def trusting_loopback(**proxy):
    """C{[proxy]} keys that make the test's own connection a trusted proxy (Cloudflare)."""
    return {"trusted_proxies": ["127.0.0.1/32"], **proxy}


@pytest_twisted.ensureDeferred
async def test_view_content_reaches_every_platform_with_every_field(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """A returning visitor behind a trusted proxy (https, IPv6) views a product: each
    platform gets one request with the event and every documented field, the visitor's
    own cookies are used as they are and not set again, and delivery is counted."""
    tagd = await start_tracking_tagd(proxy=trusting_loopback())
    fbp, fbc = "fb.1.1706540400000.1234567890.Bg", "fb.1.1706540400000.IwAR2xYz.Bg"
    cookies = (
        f"_fbp={fbp}; _fbc={fbc}; _ga=GA1.1.1234567890.1706540400; _ttp=2Hk4x7bFq9; "
        "_ga_TEST123=GS2.1.s1706540400$o3$g1$t1706540500$j0$l0$h0"
    )
    visitor = await connect(tagd.port)
    before = int(time.time())
    response = await tracked_visit(
        visitor,
        VIEW_CONTENT,
        path=b"/page?color=blue&size=L",
        headers=[
            (b"CF-Connecting-IP", b"2001:DB8::7"),
            (b"X-Forwarded-Proto", b"https"),
            (b"Referer", b"https://shop.example/category/mugs"),
            (b"Cookie", cookies.encode("ascii")),
        ],
    )
    [[meta], [ga4], [tiktok]] = await delivered([fake_meta, fake_ga4, fake_tiktok])
    after = int(time.time())
    url = "https://shop.example/page?color=blue&size=L"

    # The visitor: only the event-id cookies, secure since the visitor came over https.
    set_cookies = cookies_set(response)
    assert set(set_cookies) == {"tagd_event_id", "tagd_event_id_ViewContent"}
    assert set_cookies["tagd_event_id_ViewContent"] == set_cookies["tagd_event_id"]
    event_id, attributes = set_cookies["tagd_event_id"]
    assert HEX32.fullmatch(event_id)
    assert attributes["samesite"] == "Lax" and "secure" in attributes and "httponly" not in attributes

    # Meta.
    assert len(fake_meta.fake.requests) == 1
    documented = {
        "event_name", "event_time", "event_id", "action_source", "event_source_url",
        "referrer_url", "user_data", "custom_data",
    }  # fmt: skip
    assert documented <= set(meta) <= documented | {"data_processing_options"}
    assert meta.get("data_processing_options", []) == []  # no LDU unless configured
    assert meta["event_name"] == "ViewContent"
    assert before <= meta["event_time"] <= after
    assert meta["event_id"] == event_id
    assert meta["action_source"] == "website"
    assert meta["event_source_url"] == url
    assert meta["referrer_url"] == "https://shop.example/category/mugs"
    assert meta["user_data"] == {
        "client_ip_address": "2001:db8::7",
        "client_user_agent": FIREFOX.decode(),
        "fbp": fbp,
        "fbc": fbc,
    }
    custom = meta["custom_data"]
    assert (custom["currency"], custom["value"], custom["shelf"]) == ("EUR", 12.5, "kitchen")
    assert custom["contents"] == VIEW_CONTENT["contents"]
    assert custom["content_ids"] == ["sku-1"] and custom["content_type"] == "product"

    # GA4.
    [request] = fake_ga4.fake.requests
    assert request.body["client_id"] == "1234567890.1706540400"
    assert request.body["ip_override"] == "2001:db8::7"
    assert ga4["name"] == "view_item"
    params = ga4["params"]
    assert params["session_id"] in ("1706540400", 1706540400)
    assert params["engagement_time_msec"] > 0
    assert params["page_location"] == url
    assert params["page_referrer"] == "https://shop.example/category/mugs"
    assert (params["currency"], params["value"]) == ("EUR", 12.5)
    assert params["items"] == [
        {"item_id": "sku-1", "item_name": "Blue mug", "item_category": "Kitchen", "price": 12.5, "quantity": 1}
    ]

    # TikTok.
    [request] = fake_tiktok.fake.requests
    assert request.headers["access-token"] == "tt-token"
    assert (request.body["event_source"], request.body["event_source_id"]) == ("web", "CTEST123")
    assert "test_event_code" not in request.body
    assert tiktok["event"] == "ViewContent"
    assert tiktok["event_id"] == event_id
    assert before <= tiktok["event_time"] <= after
    assert tiktok["user"] == {"ip": "2001:db8::7", "user_agent": FIREFOX.decode(), "ttp": "2Hk4x7bFq9"}
    assert tiktok["page"] == {"url": url, "referrer": "https://shop.example/category/mugs"}
    properties = tiktok["properties"]
    assert (properties["currency"], properties["value"]) == ("EUR", 12.5)
    assert properties["contents"] == [
        {"content_id": "sku-1", "content_type": "product", "content_name": "Blue mug",
         "content_category": "Kitchen", "price": 12.5, "quantity": 1}
    ]  # fmt: skip

    await eventually(lambda: all(tagd.delivered(name) == 1 for name in ("meta", "ga4", "tiktok")))
    assert tagd.metrics.value("events_accepted") == 1


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_new_visitor_gets_first_party_cookies_that_match_the_events(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, scheme
):
    """A first visit from an ad click (C{fbclid} and C{ttclid} in the URL, no cookies):
    tagd sets C{_fbp}, C{_fbc}, C{ttclid}, C{_ga}, its session cookie and the event-id
    cookies, each with C{Path=/}, C{SameSite=Lax}, the platform's lifetime, and C{Secure}
    exactly when the visitor's scheme is https; the platforms get the very same ids."""
    tagd = await start_tracking_tagd(proxy=trusting_loopback())
    visitor = await connect(tagd.port)
    before_ms = int(time.time() * 1000)
    response = await tracked_visit(
        visitor,
        {"event_name": "PageView"},
        path=b"/page?utm_source=fb&fbclid=IwAR3Case_Sens-itive&ttclid=E.C.P.Tt-42",
        headers=[(b"X-Forwarded-Proto", scheme.encode()), (b"CF-Connecting-IP", b"198.51.100.23")],
    )
    [[meta], [ga4], [tiktok]] = await delivered([fake_meta, fake_ga4, fake_tiktok])
    after_ms = int(time.time() * 1000)

    cookies = cookies_set(response)
    assert set(cookies) == set(LIFETIMES)
    for name, (value, attributes) in cookies.items():
        assert attributes["path"] == "/", name
        assert attributes["samesite"] == "Lax", name
        assert attributes["max-age"] == str(LIFETIMES[name]), name
        assert "expires" in attributes, name
        assert ("secure" in attributes) == (scheme == "https"), name
        assert "httponly" not in attributes, name

    fbp = cookies["_fbp"][0]
    match = re.fullmatch(r"fb\.1\.(\d{13})\.(\d{10})\.AQICAAEA", fbp)
    assert match and before_ms <= int(match[1]) <= after_ms
    fbc = cookies["_fbc"][0]
    match = re.fullmatch(r"fb\.1\.(\d{13})\.IwAR3Case_Sens-itive\.AQICAAEA", fbc)
    assert match and before_ms <= int(match[1]) <= after_ms
    assert cookies["ttclid"][0] == "E.C.P.Tt-42"
    ga_match = re.fullmatch(r"GA1\.1\.(\d+\.\d+)", cookies["_ga"][0])
    assert ga_match
    event_id = cookies["tagd_event_id"][0]
    assert HEX32.fullmatch(event_id)

    url = f"{scheme}://shop.example/page?utm_source=fb&fbclid=IwAR3Case_Sens-itive&ttclid=E.C.P.Tt-42"
    assert meta["event_source_url"] == url
    assert (meta["user_data"]["fbp"], meta["user_data"]["fbc"]) == (fbp, fbc)
    assert meta["user_data"]["client_ip_address"] == "198.51.100.23"
    assert meta["event_id"] == event_id and meta["event_name"] == "PageView"
    assert "referrer_url" not in meta  # no Referer, no referrer

    [ga4_request] = fake_ga4.fake.requests
    assert ga4_request.body["client_id"] == ga_match[1]
    assert ga4["name"] == "page_view"
    assert str(ga4["params"]["session_id"]) == cookies["_tagd_sid"][0]
    assert ga4["params"]["engagement_time_msec"] > 0
    assert ga4["params"]["page_location"] == url

    assert tiktok["event_id"] == event_id
    assert tiktok["user"]["ttclid"] == "E.C.P.Tt-42"
    assert "ttp" not in tiktok["user"]  # no _ttp cookie: TikTok's pixel sets that one
    assert tiktok["page"] == {"url": url}


@pytest_twisted.ensureDeferred
async def test_a_new_fbclid_replaces_the_fbc_cookie(
    tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """A visitor with C{_fbc} from an earlier click arrives from a new ad click: the new
    C{fbclid} makes a new C{_fbc} (the old C{_fbp} and C{_ga} are kept, not set again),
    and Meta gets the new one."""
    visitor = await connect(tracking_tagd.port)
    fbp, old_fbc = "fb.1.1706540400000.1234567890.Bg", "fb.1.1706540400000.OldClick.Bg"
    response = await tracked_visit(
        visitor,
        {"event_name": "ViewContent"},
        path=b"/page?fbclid=NewClick",
        headers=[(b"Cookie", f"_fbp={fbp}; _fbc={old_fbc}; _ga=GA1.2.55.1706540400".encode())],
    )
    [[meta], [ga4], _] = await delivered([fake_meta, fake_ga4, fake_tiktok])
    cookies = cookies_set(response)
    assert "_fbp" not in cookies and "_ga" not in cookies
    new_fbc = cookies["_fbc"][0]
    assert re.fullmatch(r"fb\.1\.\d{13}\.NewClick\.AQIDAAEA", new_fbc)
    assert meta["user_data"]["fbp"] == fbp
    assert meta["user_data"]["fbc"] == new_fbc
    assert fake_ga4.fake.requests[0].body["client_id"] == "55.1706540400"


@pytest_twisted.ensureDeferred
async def test_user_data_is_hashed_per_platform_and_identifiers_are_not(
    tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """A logged-in visitor's raw e-mail, phone and first name reach Meta and TikTok only
    as SHA-256 of the normalised values; an already hashed last name passes unchanged
    (never hashed twice); IP, user agent, C{fbp}, C{fbc} and C{ttclid} are never hashed;
    GA4 gets the same, hashed by Google's rules, in the reference's user_data fields, and
    nothing unhashed."""
    hashed_last_name = sha("smith")
    spec = {
        "event_name": "Purchase",
        "custom_data": {"currency": "EUR", "value": 25.0, "order_id": "A-1001"},
        "contents": [{"id": "sku-1", "quantity": 2, "item_price": 12.5}],
        "user_data": {
            "em": "  Joe.Doe@Example.COM ",
            "ph": "+49 (0)30 1234-5678",
            "fn": "Zoe\u0308-Ann",  # "Zoë" with a combining diaeresis: hashed in NFC
            "ln": hashed_last_name,
            "external_id": "Customer-77",
        },
    }
    visitor = await connect(tracking_tagd.port)
    fbp, fbc = "fb.1.1706540400000.1234567890.Bg", "fb.1.1706540400000.IwAR2xYz.Bg"
    await tracked_visit(
        visitor,
        spec,
        path=b"/page?ttclid=E.C.P.abc",
        headers=[(b"Cookie", f"_fbp={fbp}; _fbc={fbc}".encode())],
    )
    [[meta], [ga4], [tiktok]] = await delivered([fake_meta, fake_ga4, fake_tiktok])

    email, phone = "joe.doe@example.com", "493012345678"
    assert meta["user_data"] == {
        "client_ip_address": "127.0.0.1",
        "client_user_agent": FIREFOX.decode(),
        "fbp": fbp,
        "fbc": fbc,
        "em": [sha(email)],
        "ph": [sha(phone)],
        "fn": [sha(unicodedata.normalize("NFC", "zoëann"))],
        "ln": [hashed_last_name],
        "external_id": [sha("customer-77")],
    }
    user = tiktok["user"]
    assert user["email"] in (sha(email), [sha(email)])
    assert user["phone"] in (sha("+" + phone), [sha("+" + phone)])
    assert user["external_id"] in (sha("customer-77"), [sha("customer-77")])
    assert (user["ip"], user["user_agent"], user["ttclid"]) == ("127.0.0.1", FIREFOX.decode(), "E.C.P.abc")
    assert tiktok["event"] == "CompletePayment"
    assert tiktok["properties"]["order_id"] == "A-1001"

    ga4_raw = fake_ga4.fake.requests[0].raw.decode("ascii").lower()
    for personal in ("joe", "493012345678", "customer-77"):
        assert personal not in ga4_raw
    assert fake_ga4.fake.requests[0].body["user_data"] == {
        "sha256_email_address": [sha(email)],
        "sha256_phone_number": [sha("+" + phone)],
        "address": [{"sha256_first_name": sha(unicodedata.normalize("NFC", "zoë-ann")), "sha256_last_name": hashed_last_name}],
    }
    assert fake_ga4.fake.violations == []
    assert ga4["name"] == "purchase"
    assert ga4["params"]["transaction_id"] == "A-1001"


@pytest_twisted.ensureDeferred
async def test_an_array_of_two_events_is_one_request_per_platform(
    tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """An array of two events (an add to cart and a purchase, ids from the header) makes
    one request per platform carrying both, in order, with each platform's names; the
    event-id cookie carries the first event's id."""
    specs = [
        {"event_name": "AddToCart", "event_id": "cart-7", "contents": [{"id": "sku-2", "quantity": 1}]},
        {"event_name": "Purchase", "event_id": "order-7",
         "custom_data": {"currency": "USD", "value": 9.99}, "contents": [{"id": "sku-2", "quantity": 1}]},
    ]  # fmt: skip
    visitor = await connect(tracking_tagd.port)
    response = await tracked_visit(visitor, specs)
    await delivered([fake_meta, fake_ga4, fake_tiktok], count=2)
    for served in (fake_meta, fake_ga4, fake_tiktok):
        assert len(served.fake.requests) == 1
    meta, ga4, tiktok = (served.fake.events for served in (fake_meta, fake_ga4, fake_tiktok))
    assert [(e["event_name"], e["event_id"]) for e in meta] == [("AddToCart", "cart-7"), ("Purchase", "order-7")]
    assert meta[1]["custom_data"]["num_items"] == 1
    assert [e["name"] for e in ga4] == ["add_to_cart", "purchase"]
    assert [(e["event"], e["event_id"]) for e in tiktok] == [("AddToCart", "cart-7"), ("CompletePayment", "order-7")]
    assert cookies_set(response)["tagd_event_id"][0] == "cart-7"
    assert tracking_tagd.metrics.value("events_accepted") == 2


@pytest_twisted.ensureDeferred
async def test_header_event_id_and_time_are_used_as_is_and_test_event_code_is_passed(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """The origin's C{event_id} (any characters) and C{event_time} reach every platform
    unchanged; the cookie holds the id percent-encoded where a cookie cannot hold it, so
    that the page decodes the same id; C{test_event_code} goes to Meta and TikTok."""
    tagd = await start_tracking_tagd(
        platform={"meta": {"test_event_code": "TEST123"}, "tiktok": {"test_event_code": "TT-TEST9"}}
    )
    event_time = int(time.time()) - 3600
    event_id = "order 1001;ä"
    visitor = await connect(tagd.port)
    response = await tracked_visit(
        visitor, {"event_name": "Lead", "event_id": event_id, "event_time": event_time}
    )
    [[meta], [ga4], [tiktok]] = await delivered([fake_meta, fake_ga4, fake_tiktok])
    assert (meta["event_id"], meta["event_time"], meta["event_name"]) == (event_id, event_time, "Lead")
    assert (tiktok["event_id"], tiktok["event_time"], tiktok["event"]) == (event_id, event_time, "SubmitForm")
    assert ga4["name"] == "generate_lead"
    assert ga4["timestamp_micros"] == event_time * 1_000_000
    assert fake_meta.fake.requests[0].body["test_event_code"] == "TEST123"
    assert fake_tiktok.fake.requests[0].body["test_event_code"] == "TT-TEST9"
    assert "test_event_code" not in fake_ga4.fake.requests[0].body
    cookie = cookies_set(response)["tagd_event_id"][0]
    assert unquote(cookie) == event_id
    assert ";" not in cookie and " " not in cookie


@pytest_twisted.ensureDeferred
async def test_spoofed_client_ip_header_from_an_untrusted_peer_is_ignored(
    tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """With the default C{trusted_proxies} (Cloudflare's ranges), a visitor on 127.0.0.1
    sending C{CF-Connecting-IP} and C{X-Forwarded-Proto: https} is believed in neither:
    every platform gets 127.0.0.1 and an http URL, and no cookie is marked Secure."""
    visitor = await connect(tracking_tagd.port)
    response = await tracked_visit(
        visitor,
        {"event_name": "ViewContent"},
        headers=[(b"CF-Connecting-IP", b"203.0.113.99"), (b"X-Forwarded-Proto", b"https")],
    )
    [[meta], [ga4], [tiktok]] = await delivered([fake_meta, fake_ga4, fake_tiktok])
    assert meta["user_data"]["client_ip_address"] == "127.0.0.1"
    assert fake_ga4.fake.requests[0].body["ip_override"] == "127.0.0.1"
    assert tiktok["user"]["ip"] == "127.0.0.1"
    assert meta["event_source_url"] == "http://shop.example/page"
    assert tiktok["page"]["url"] == ga4["params"]["page_location"] == "http://shop.example/page"
    for raw in (fake_meta.fake.requests[0].raw, fake_ga4.fake.requests[0].raw, fake_tiktok.fake.requests[0].raw):
        assert b"203.0.113.99" not in raw
    cookies = cookies_set(response)
    assert cookies and not any("secure" in attributes for _, attributes in cookies.values())


@pytest_twisted.ensureDeferred
async def test_ipv4_mapped_and_ipv6_addresses_from_a_trusted_peer(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """From a trusted peer, an IPv6 visitor address stays IPv6 (as the browser pixel would
    report it) and an IPv4-mapped one is sent as the IPv4 address it is."""
    tagd = await start_tracking_tagd(proxy=trusting_loopback())
    visitor = await connect(tagd.port)
    for address in (b"2a02:8070:a2:1::42", b"::ffff:192.0.2.10"):
        await tracked_visit(visitor, {"event_name": "ViewContent"}, headers=[(b"CF-Connecting-IP", address)])
    await delivered([fake_meta, fake_ga4, fake_tiktok], count=2)
    meta_ips = [e["user_data"]["client_ip_address"] for e in fake_meta.fake.events]
    tiktok_ips = [e["user"]["ip"] for e in fake_tiktok.fake.events]
    ga4_ips = [r.body["ip_override"] for r in fake_ga4.fake.requests]
    # Two visits, two deliveries: their order of arrival is not the point.
    expected = sorted(["2a02:8070:a2:1::42", "192.0.2.10"])
    assert sorted(meta_ips) == sorted(tiktok_ips) == sorted(ga4_ips) == expected


@pytest_twisted.ensureDeferred
async def test_event_older_than_72_hours_is_not_sent_to_ga4_as_it_is(
    tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok
):
    """An event four days old is within Meta's and TikTok's seven days and reaches both;
    GA4 takes events at most 72 hours old, so it must not be sent a timestamp older than
    that: it is expired before batching, and counted as such."""
    event_time = int(time.time()) - 4 * 86400
    visitor = await connect(tracking_tagd.port)
    await tracked_visit(visitor, {"event_name": "Purchase", "event_id": "late-1", "event_time": event_time})
    await eventually(lambda: fake_meta.fake.events and fake_tiktok.fake.events)
    assert fake_meta.fake.events[0]["event_time"] == fake_tiktok.fake.events[0]["event_time"] == event_time
    await eventually(lambda: tracking_tagd.delivered("ga4", "expired") == 1)
    assert fake_ga4.fake.requests == []
    assert fake_ga4.fake.violations == []


@pytest_twisted.async_yield_fixture
async def demo_shop(reactor):
    """The demo shop (tagd.demo.shop) as the origin, on a free loopback port."""
    from twisted.web.server import Site

    from tagd.demo.shop import shop_resource

    site = Site(shop_resource())
    site.noisy = False
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield port.getHost().port
    await within(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_demo_shop_visit_reaches_every_platform(
    start_tracking_tagd, demo_shop, connect, fake_meta, fake_ga4, fake_tiktok
):
    """A visitor walks through the demo shop (home, a product, checkout) keeping the
    cookies tagd set: each page's event reaches every platform under the platform's own
    name and with the page's data, all three share the visitor's ids, and the pages come
    through as the shop wrote them."""
    tagd = await start_tracking_tagd(proxy={"origin": f"http://127.0.0.1:{demo_shop}"})
    visitor = await connect(tagd.port)
    jar: dict[str, str] = {}
    for path in (b"/", b"/product/123", b"/checkout"):
        headers = [(b"User-Agent", FIREFOX)]
        if jar:
            headers.append((b"Cookie", "; ".join(f"{k}={v}" for k, v in jar.items()).encode()))
        response = await within(visitor.request(b"GET", path, headers=headers))
        assert response.status == 200 and b"<html" in bytes(response.body)
        assert TRACKING_HEADER.lower() not in response.names()
        jar.update({name: value for name, (value, _) in cookies_set(response).items() if name != "tagd_event_id"})
    await delivered([fake_meta, fake_ga4, fake_tiktok], count=3)
    meta = sorted(fake_meta.fake.events, key=lambda e: e["event_source_url"])
    assert [(e["event_name"], e["event_source_url"]) for e in meta] == [
        ("PageView", "http://shop.example/"),
        ("InitiateCheckout", "http://shop.example/checkout"),
        ("ViewContent", "http://shop.example/product/123"),
    ]
    assert meta[2]["custom_data"]["contents"] == [{"id": "123", "quantity": 1}]
    assert (meta[2]["custom_data"]["value"], meta[1]["custom_data"]["value"]) == (3.5, 15.5)
    assert len({e["user_data"]["fbp"] for e in meta}) == 1  # one visitor throughout
    assert sorted(e["name"] for e in fake_ga4.fake.events) == ["begin_checkout", "page_view", "view_item"]
    assert len({r.body["client_id"] for r in fake_ga4.fake.requests}) == 1
    assert sorted(e["event"] for e in fake_tiktok.fake.events) == ["InitiateCheckout", "Pageview", "ViewContent"]
    [view] = [e for e in fake_tiktok.fake.events if e["event"] == "ViewContent"]
    assert view["properties"]["contents"] == [{"content_id": "123", "content_type": "product", "quantity": 1}]


@pytest_twisted.ensureDeferred
async def test_a_full_spool_refuses_the_newest_events_and_counts_them_as_dropped(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, log_events
):
    """With C{[spool] max_events = 2} and platforms failing every request (so nothing
    leaves the spool), five tracked visits in turn: each visitor gets the page and the
    event-id cookie as always; the first two events are accepted, the other three are
    dropped as C{queue_full} and never counted as accepted, and one warning says so."""
    for fake in (fake_meta, fake_ga4, fake_tiktok):
        fake.fake.inject(100, status=503)
    tagd = await start_tracking_tagd(spool={"max_events": 2})
    visitor = await connect(tagd.port)
    for _ in range(5):
        response = await tracked_visit(visitor, {"event_name": "PageView"})
        assert "tagd_event_id" in cookies_set(response)
    await eventually(lambda: tagd.dropped("queue_full") == 3)
    assert tagd.metrics.value("events_accepted") == 2
    warnings = [e for e in log_events if str(e.get("log_format", "")).startswith("spool full")]
    assert [w["count"] for w in warnings] == [1]
    assert all(fake.fake.events == [] for fake in (fake_meta, fake_ga4, fake_tiktok))
