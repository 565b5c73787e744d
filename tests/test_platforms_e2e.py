"""Pinterest, Snapchat, Reddit and Microsoft end to end: a real C{twistd -n tagd} with its
spool, in front of a real origin, sending to the four fakes (tests/fakes.py) served from
threads on loopback, which check every request the way each platform documents it.

Visitors come from ads of all four (each click id in the landing URL) while the platforms
are down (one not listening, the others failing); tagd keeps the events in its spool, is
killed with SIGKILL and started again, and once the platforms are back every event
reaches each of them, with the click ids and the pixels' cookies, and nothing they object
to.  The visitors get the click-id cookies the pixels read.
"""

from __future__ import annotations

import hashlib

from conftest import destinations_toml, toml_table
from fakes import FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat
from helpers import ADMIN_TOML, TagdProcess, ThreadedPlatform, TrackedOrigin, browser_get, free_port, spool_rows, wait_until

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
