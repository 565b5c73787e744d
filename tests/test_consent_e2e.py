"""Consent decided per destination, end to end: tagd as users run it (C{twistd -n tagd}),
a shop whose OneTrust banner records the visitor's choices, the fake Meta, GA4 (its
validation endpoint, C{debug = true}) and TikTok from tests/fakes.py, on loopback.

Each visitor's choice sends the event to exactly the destinations whose purpose it
grants, sets exactly the cookies of the platforms it allows, on the registrable domain of
the shop's host, and GA4 is told the visitor's ad consent; the counters say what was
withheld and which match keys each destination got.  The same for Pinterest, Snapchat,
Reddit and Microsoft under a Cookiebot banner, whose events for a visitor who refused
marketing carry each platform's limited-use flag where the destination needs no
marketing consent.
"""

from __future__ import annotations

import http.client
import time
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOML, destinations_toml, platform_destinations, threaded_platforms, toml_table
from fakes import FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat
from helpers import (
    BROWSER_UA,
    TagdProcess,
    ThreadedPlatform,
    TrackedOrigin,
    event_ids_in,
    free_port,
    http_get,
    tagd_up,
    wait_until,
)

HOST = "checkout.shop.example.co.uk"


def onetrust(groups: str) -> str:
    """OptanonConsent as OneTrust writes it, with the visitor's C{groups}."""
    return "OptanonConsent=isGpcEnabled=0&version=202409.1.0&interactionCount=1&groups=" + quote(groups, safe="")


def cookiebot(marketing: bool, statistics: bool) -> str:
    """CookieConsent as Cookiebot writes it: a JavaScript object, percent-encoded."""
    choice = f"statistics:{str(statistics).lower()},marketing:{str(marketing).lower()}"
    text = f"{{stamp:'-8cbmCjKzlmdtTiSEAxXlpgLQ98FA5IDpbDHy1oVsSgpjBsVXR1L3g==',necessary:true,{choice},ver:1}}"
    return "CookieConsent=" + quote(text, safe="")


def visit(port: int, event_id: str, cookie: str | None, gpc: bool = False, query: str | None = None) -> dict[str, str]:
    """A browser's page view of C{HOST} (from a Meta ad unless C{query} says which), with
    the consent C{cookie} (C{name=value}); the cookies tagd set, by name, as full headers."""
    headers = {"User-Agent": BROWSER_UA, "Host": HOST}
    if cookie is not None:
        headers["Cookie"] = cookie
    if gpc:
        headers["Sec-GPC"] = "1"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", f"/e/{event_id}?{query or f'fbclid=IwAR-{event_id}'}", headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        set_cookies = [value for name, value in response.getheaders() if name.lower() == "set-cookie"]
    finally:
        connection.close()
    return {value.partition("=")[0]: value for value in set_cookies}


def metrics(admin_port: int) -> dict[tuple, float]:
    _, _, body = http_get(admin_port, "/metrics")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def write_config(directory, port: int, origin: TrackedOrigin, consent_source: str, tables: list[dict]):
    """tagd's configuration file in C{directory}: the proxy in front of C{origin}, a spool,
    the consent source and the destinations C{tables}."""
    config = directory / "tagd.toml"
    config.write_text(
        toml_table("[proxy]", {"listen": f"tcp:{port}:interface=127.0.0.1", "origin": origin.url})
        + ADMIN_TOML
        + toml_table("[spool]", {"path": str(directory / "spool.sqlite3")})
        + toml_table("[delivery]", {"poll_interval": 0.1})
        + toml_table("[tracking]", {"consent_source": consent_source})
        + destinations_toml(tables)
    )
    return config


def test_each_destination_gets_what_its_purpose_allows(tmp_path):
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    meta, ga4, tiktok = platforms
    port = free_port()
    tables = platform_destinations(meta, ga4, tiktok, extra={"ga4": {"debug": True}})
    tagd = TagdProcess(write_config(tmp_path, port, origin, "onetrust", tables), tmp_path)
    try:
        for platform in platforms:
            platform.up()
        tagd.start()
        _, admin = tagd_up(tagd.process, tagd.runs[-1][1])

        analytics_only = visit(port, "analytics", onetrust("C0001:1,C0002:1,C0003:0,C0004:0"))
        marketing_only = visit(port, "marketing", onetrust("C0001:1,C0002:0,C0003:0,C0004:1"))
        both = visit(port, "both", onetrust("C0001:1,C0002:1,C0004:1"))
        nothing = visit(port, "none", onetrust("C0001:1,C0002:0,C0004:0"))
        unanswered = visit(port, "unanswered", None)
        gpc = visit(port, "gpc", onetrust("C0001:1,C0002:1,C0004:1"), gpc=True)

        wait_until(
            lambda: ga4.delivered_ids() == {"analytics", "both"}
            and meta.delivered_ids() == tiktok.delivered_ids() == {"marketing", "both"},
            15,
            "the allowed events delivered",
        )
        time.sleep(0.5)  # nothing else comes later
        assert ga4.delivered_ids() == {"analytics", "both"}
        assert meta.delivered_ids() == tiktok.delivered_ids() == {"marketing", "both"}
        for platform in platforms:
            assert platform.violations == [], platform.platform

        # The cookies of the allowed platforms only, on the registrable domain.
        assert {"_ga", "_tagd_sid"} <= set(analytics_only) and "_fbp" not in analytics_only
        assert {"_fbp", "_fbc"} <= set(marketing_only) and "_ga" not in marketing_only
        assert {"_fbp", "_fbc", "_ga"} <= set(both)
        for cookies in (analytics_only, marketing_only, both):
            assert all("Domain=example.co.uk" in header for header in cookies.values())
        assert nothing == unanswered == gpc == {}
        fbp = marketing_only["_fbp"].split(";")[0].partition("=")[2]
        assert fbp.startswith("fb.2.") and fbp.endswith(".AQICAAEA")

        # GA4 is told the ad consent; Meta gets the click in its fifth-segment form.
        consent = {
            r.body["events"][0]["params"]["probe"]: r.body["consent"]
            for r in ga4.fake.requests
            if r.path == "/debug/mp/collect"
        }
        assert consent == {
            "analytics": {"ad_user_data": "DENIED", "ad_personalization": "DENIED"},
            "both": {"ad_user_data": "GRANTED", "ad_personalization": "GRANTED"},
        }
        meta_events = [e for r in meta.fake.requests for e in r.body["data"]]
        assert {e["user_data"]["fbc"].split(".")[3] for e in meta_events} == {"IwAR-marketing", "IwAR-both"}

        # Withheld: events others got; a response no destination may have is dropped.
        counted = metrics(admin)
        assert counted[("tagd_consent_withheld_total", (("destination", "meta"),))] == 1
        assert counted[("tagd_consent_withheld_total", (("destination", "ga4"),))] == 1
        assert counted[("tagd_tracking_dropped_total", (("reason", "consent"),))] == 3
        assert counted[("tagd_match_key_events_total", (("destination", "meta"), ("event", "PageView")))] == 2
        fbc_key = (("destination", "meta"), ("event", "PageView"), ("key", "fbc"))
        assert counted[("tagd_match_keys_total", fbc_key)] == 2
        email_key = (("destination", "meta"), ("event", "PageView"), ("key", "email"))
        assert counted[("tagd_match_keys_total", email_key)] == 0
    finally:
        tagd.close()
        for platform in platforms:
            platform.close()
        origin.close()


# The four later platforms: a destination of each with the default purpose (marketing), and
# one with consent_purpose = "analytics", which takes a refusing visitor's events limited.
LATER_IDS = {
    "pinterest": {"ad_account_id": "549755885175"},
    "snapchat": {"pixel_id": "snap-pixel-1"},
    "reddit": {"pixel_id": "t2_abc123"},
    "microsoft": {"tag_id": "343000123"},
}
LATER_FAKES = {"pinterest": FakePinterest, "snapchat": FakeSnapchat, "reddit": FakeReddit, "microsoft": FakeMicrosoft}
CLICKS = "epik=dj0yJnU9Pin&ScCid=6f1e2a3b-snap&rdt_cid=3184742045291813272&msclkid=a1b2c3d4e5f6"
CLICK_COOKIES = {"_epik", "_scclid", "_rdt_cid", "_uetmsclkid"}


def limited_use(kind: str, event: dict) -> object:
    """The platform's limited-use flag on one event as it arrived (None: not sent)."""
    if kind == "pinterest":
        return event.get("opt_out")
    if kind == "snapchat":
        return event.get("data_processing_options")
    if kind == "reddit":
        return event["user"].get("data_processing_options")
    return event.get("adStorageConsent")


LIMITED = {"pinterest": True, "snapchat": ["LDU"], "reddit": {"modes": ["LDU"]}, "microsoft": "D"}
UNLIMITED = {"pinterest": None, "snapchat": None, "reddit": None, "microsoft": "G"}


def test_the_later_platforms_under_cookiebot_by_purpose_with_their_limited_use_flags(tmp_path):
    """A Cookiebot shop on C{checkout.shop.example.co.uk}: a visitor who grants marketing
    gets the four click-id cookies on C{example.co.uk}, and every destination gets the
    event unflagged; one who refuses marketing (statistics granted) gets no click-id
    cookie, the default (marketing) destinations nothing, and the analytics ones the
    event with each platform's limited-use flag.  Coverage counts what each took."""
    origin = TrackedOrigin()
    served = {
        (kind, purpose): ThreadedPlatform(kind, LATER_FAKES[kind](access_token=f"{kind}-token"))
        for kind in LATER_FAKES
        for purpose in ("marketing", "analytics")
    }
    tables = [
        {"type": kind, "name": f"{kind}-{purpose}", **LATER_IDS[kind], "access_token": f"{kind}-token",
         "endpoint": platform.base, "timeout": 2}
        | ({"consent_purpose": "analytics"} if purpose == "analytics" else {})
        for (kind, purpose), platform in served.items()
    ]  # fmt: skip
    port = free_port()
    tagd = TagdProcess(write_config(tmp_path, port, origin, "cookiebot", tables), tmp_path)
    try:
        for platform in served.values():
            platform.up()
        tagd.start()
        _, admin = tagd_up(tagd.process, tagd.runs[-1][1])

        granted = visit(port, "granted", cookiebot(marketing=True, statistics=True), query=CLICKS)
        refused = visit(port, "refused", cookiebot(marketing=False, statistics=True), query=CLICKS)
        nothing = visit(port, "nothing", cookiebot(marketing=False, statistics=False), query=CLICKS)

        expected = {"marketing": {"granted"}, "analytics": {"granted", "refused"}}
        wait_until(
            lambda: all(p.delivered_ids() == expected[purpose] for (_, purpose), p in served.items()),
            15,
            "each destination's events delivered",
        )
        time.sleep(0.5)  # nothing else comes later
        for (kind, purpose), platform in served.items():
            assert platform.delivered_ids() == expected[purpose], (kind, purpose)
            assert platform.violations == [], (kind, purpose, platform.violations)
            flags = {
                event_id: limited_use(kind, event)
                for request in platform.fake.requests
                for event_id, event in zip(event_ids_in(kind, request.body), platform.fake.events_of(request.body))
            }
            assert flags == {"granted": UNLIMITED[kind]} | ({"refused": LIMITED[kind]} if purpose == "analytics" else {})

        # The click-id cookies only with marketing consent, on the registrable domain.
        assert CLICK_COOKIES <= set(granted)
        assert all("Domain=example.co.uk" in granted[name] for name in CLICK_COOKIES)
        assert not CLICK_COOKIES & set(refused) and nothing == {}

        # Coverage of what each destination took: the refused visitor's event only where sent.
        counted = metrics(admin)
        for (kind, purpose) in served:
            key = (("destination", f"{kind}-{purpose}"), ("event", "PageView"))
            assert counted[("tagd_match_key_events_total", key)] == len(expected[purpose]), (kind, purpose)
    finally:
        tagd.close()
        for platform in served.values():
            platform.close()
        origin.close()
