"""Pinterest, Snapchat, Reddit and Microsoft end to end: a real C{twistd -n tagd} with its
spool, in front of a real origin, sending to the four fakes (tests/fakes.py) served from
threads on loopback, which check every request the way each platform documents it.

Visitors come from ads of all four (each click id in the landing URL) while the platforms
are down (one not listening, the others failing); tagd keeps the events in its spool, is
killed with SIGKILL and started again, and once the platforms are back every event
reaches each of them, with the click ids and the pixels' cookies, and nothing they object
to.  The visitors get the click-id cookies the pixels read.  A tagd in the tests' own
reactor shows which cookies are set for which configured platforms, and none without
consent.
"""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.internet.defer import Deferred

from conftest import destinations_toml, eventually, serve_quietly, toml_table, within
from fakes import FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat
from helpers import ADMIN_TOML, TagdProcess, ThreadedPlatform, TrackedOrigin, browser_get, free_port, spool_rows, wait_until
from test_tracking_e2e import cookies_set, tracked_visit, trusting_loopback

CLICKS = "epik=dj0yJnU9Pin&ScCid=6f1e2a3b-snap&rdt_cid=3184742045291813272&msclkid=a1b2c3d4e5f6"
TOKENS = {"pinterest": "pin-token", "snapchat": "snap-token", "reddit": "rdt-token", "microsoft": "ms-token"}


def platforms() -> dict[str, ThreadedPlatform]:
    return {
        "pinterest": ThreadedPlatform("pinterest", FakePinterest(access_token=TOKENS["pinterest"])),
        "snapchat": ThreadedPlatform("snapchat", FakeSnapchat(access_token=TOKENS["snapchat"])),
        "reddit": ThreadedPlatform("reddit", FakeReddit(access_token=TOKENS["reddit"])),
        "microsoft": ThreadedPlatform("microsoft", FakeMicrosoft(access_token=TOKENS["microsoft"])),
    }


def config(port: int, origin: TrackedOrigin, spool, served: dict[str, ThreadedPlatform]) -> str:
    ids = {
        "pinterest": {"ad_account_id": "549755885175"},
        "snapchat": {"pixel_id": "snap-pixel-1"},
        "reddit": {"pixel_id": "t2_abc123"},
        "microsoft": {"tag_id": "343000123"},
    }
    destinations = [
        {"type": kind, "name": kind, **ids[kind], "access_token": TOKENS[kind], "endpoint": platform.base, "timeout": 2}
        for kind, platform in served.items()
    ]
    return (
        toml_table("[proxy]", {"listen": f"tcp:{port}:interface=127.0.0.1", "origin": origin.url})
        + ADMIN_TOML
        + toml_table("[spool]", {"path": str(spool)})
        + toml_table("[delivery]", {"poll_interval": 0.1, "backoff_base": 0.05, "backoff_cap": 0.5})
        + destinations_toml(destinations)
    )


def test_events_wait_in_the_spool_through_an_outage_and_a_kill_then_reach_all_four(tmp_path):
    origin = TrackedOrigin()
    served = platforms()
    port = free_port()
    spool = tmp_path / "spool.sqlite3"
    (tmp_path / "tagd.toml").write_text(config(port, origin, spool, served))
    tagd = TagdProcess(tmp_path / "tagd.toml", tmp_path)
    ids = [f"visit-{n}" for n in range(6)]
    try:
        # Down: Pinterest does not listen, the others answer 503.
        for kind in ("snapchat", "reddit", "microsoft"):
            served[kind].failing = 503
            served[kind].up()
        tagd.start()
        cookies = {}
        for event_id in ids:
            status, headers, _ = browser_get(port, f"/e/{event_id}?{CLICKS}")
            assert status == 200
            cookies |= {v.split("=", 1)[0]: v.split(";", 1)[0].split("=", 1)[1] for k, v in headers if k.lower() == "set-cookie"}
        assert cookies["_epik"] == "dj0yJnU9Pin"
        assert cookies["_scclid"] == "6f1e2a3b-snap"
        assert cookies["_rdt_cid"] == "3184742045291813272"
        assert cookies["_uetmsclkid"] == "_ueta1b2c3d4e5f6"
        wait_until(lambda: all(p.received for k, p in served.items() if k != "pinterest"), 10, "tried")
        wait_until(lambda: {row[0] for row in spool_rows(spool)} >= set(ids), 10, "in the spool")
        tagd.kill()

        for platform in served.values():
            platform.failing = None
        served["pinterest"].up()
        tagd.start()
        for kind, platform in served.items():
            wait_until(lambda: platform.delivered_ids() >= set(ids), 20, f"delivered to {kind}")
        for kind, platform in served.items():
            assert platform.violations == [], (kind, platform.violations)
        # Every delivery acknowledged: the spool keeps no row (dead or expired would stay).
        wait_until(lambda: spool_rows(spool) == [], 10, "acknowledged")
        assert_click_ids(served)
    finally:
        tagd.close()
        for platform in served.values():
            platform.close()
        origin.close()


def assert_click_ids(served: dict[str, ThreadedPlatform]) -> None:
    """Each platform got its click id (raw, never hashed) in its own field."""
    fields = {
        "pinterest": lambda e: e["user_data"]["click_id"],
        "snapchat": lambda e: e["user_data"]["sc_click_id"],
        "reddit": lambda e: e["click_id"],
        "microsoft": lambda e: e["userData"]["msclkid"],
    }
    expected = {"pinterest": "dj0yJnU9Pin", "snapchat": "6f1e2a3b-snap", "reddit": "3184742045291813272", "microsoft": "a1b2c3d4e5f6"}
    for kind, platform in served.items():
        events = [event for request in platform.fake.requests for event in platform.fake.events_of(request.body)]
        assert events and {fields[kind](event) for event in events} == {expected[kind]}, kind
        assert expected[kind] != hashlib.sha256(expected[kind].encode()).hexdigest()


# In-process: the real tracker and dispatcher of a tagd in the tests' reactor, the fakes on
# loopback, to see which cookies a visitor gets and what each platform receives.


@pytest_twisted.ensureDeferred
async def test_click_id_cookies_only_for_the_configured_platforms_and_only_with_consent(start_tracking_tagd, connect):
    """With Pinterest and Reddit configured, a visitor from an ad of each of the four gets
    C{_epik} and C{_rdt_cid}, never C{_scclid} or C{_uetmsclkid}; the two platforms get
    their click ids and the event id of the C{tagd_event_id} cookie, which their pixels
    send too.  A visitor who refuses tracking (C{Sec-GPC: 1}) gets no cookie and no event."""
    fakes = {"pinterest": FakePinterest(access_token="pin-token"), "reddit": FakeReddit(access_token="rdt-token")}
    served = {kind: serve_quietly(fake) for kind, fake in fakes.items()}
    try:
        tables = [
            {"type": "pinterest", "ad_account_id": "549755885175", "access_token": "pin-token", "endpoint": served["pinterest"].base},
            {"type": "reddit", "pixel_id": "t2_abc123", "access_token": "rdt-token", "endpoint": served["reddit"].base},
        ]
        tagd = await start_tracking_tagd(destinations=tables, proxy=trusting_loopback())
        visitor = await connect(tagd.port)
        response = await tracked_visit(visitor, {"event_name": "Purchase", "custom_data": {"currency": "EUR", "value": 9}},
                                       path=f"/page?{CLICKS}".encode())  # fmt: skip
        cookies = cookies_set(response)
        assert {"_epik", "_rdt_cid"} <= set(cookies)
        assert not {"_scclid", "_uetmsclkid", "_fbp", "_ga"} & set(cookies)
        await eventually(lambda: all(fake.events for fake in fakes.values()))
        [pin], [rdt] = fakes["pinterest"].events, fakes["reddit"].events
        assert pin["user_data"]["click_id"] == cookies["_epik"][0] == "dj0yJnU9Pin"
        assert rdt["click_id"] == cookies["_rdt_cid"][0]
        assert pin["event_id"] == rdt["metadata"]["conversion_id"] == cookies["tagd_event_id"][0]
        assert (pin["event_name"], rdt["type"]) == ("checkout", {"tracking_type": "PURCHASE"})
        assert fakes["pinterest"].violations == [] and fakes["reddit"].violations == []

        refusing = await connect(tagd.port)
        refused = await tracked_visit(refusing, {"event_name": "PageView"}, path=f"/page?{CLICKS}".encode(),
                                      headers=[(b"Sec-GPC", b"1")])  # fmt: skip
        assert refused.header(b"set-cookie") == []
        assert tagd.dropped("consent") == 1
    finally:
        for one in served.values():
            await within(Deferred.fromCoroutine(one.stop()))
