"""Consent decided per destination, end to end: tagd as users run it (C{twistd -n tagd}),
a shop whose OneTrust banner records the visitor's choices, the fake Meta, GA4 (its
validation endpoint, C{debug = true}) and TikTok from tests/fakes.py, on loopback.

Each visitor's choice sends the event to exactly the destinations whose purpose it
grants, sets exactly the cookies of the platforms it allows, on the registrable domain of
the shop's host, and GA4 is told the visitor's ad consent; the counters say what was
withheld and which match keys each destination got.
"""

from __future__ import annotations

import http.client
import time
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOML, destinations_toml, platform_destinations, threaded_platforms, toml_table
from helpers import BROWSER_UA, TagdProcess, TrackedOrigin, free_port, http_get, tagd_up, wait_until

HOST = "checkout.shop.example.co.uk"


def onetrust(groups: str) -> str:
    return "isGpcEnabled=0&version=202409.1.0&interactionCount=1&groups=" + quote(groups, safe="")


def visit(port: int, event_id: str, cookie: str | None, gpc: bool = False) -> dict[str, str]:
    """A browser's page view of C{HOST}; the cookies tagd set, by name, as full headers."""
    headers = {"User-Agent": BROWSER_UA, "Host": HOST}
    if cookie is not None:
        headers["Cookie"] = f"OptanonConsent={cookie}"
    if gpc:
        headers["Sec-GPC"] = "1"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", f"/e/{event_id}?fbclid=IwAR-{event_id}", headers=headers)
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


def test_each_destination_gets_what_its_purpose_allows(tmp_path):
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    meta, ga4, tiktok = platforms
    port = free_port()
    config = tmp_path / "tagd.toml"
    config.write_text(
        toml_table("[proxy]", {"listen": f"tcp:{port}:interface=127.0.0.1", "origin": origin.url})
        + ADMIN_TOML
        + toml_table("[spool]", {"path": str(tmp_path / "spool.sqlite3")})
        + toml_table("[delivery]", {"poll_interval": 0.1})
        + toml_table("[tracking]", {"consent_source": "onetrust"})
        + destinations_toml(platform_destinations(meta, ga4, tiktok, extra={"ga4": {"debug": True}}))
    )
    tagd = TagdProcess(config, tmp_path)
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
