"""Event ids end to end: shops reuse them (a product id as the event id), so tagd must
deliver and settle each event by what it is, never by its id alone.

Over real loopback sockets: origin → tagd (real tracker, SQLite spool, dispatcher) → the
fake platforms.
"""

from __future__ import annotations

import json

import pytest_twisted

from conftest import eventually, within
from origin import PAGE

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
SHARED_ID = "sku-42"  # the product id the shop uses as the event id, for every visitor
VISITORS = {  # GA client id → the visitor's cookies
    "111.1706540400": "_ga=GA1.1.111.1706540400; _fbp=fb.1.1706540400000.111.Bg",
    "222.1706540400": "_ga=GA1.1.222.1706540400; _fbp=fb.1.1706540400000.222.Bg",
}


async def visit(connect, port: int, cookies: str) -> None:
    """One visitor views the product, the origin naming the event by the shared id."""
    visitor = await connect(port)
    spec = json.dumps({"event_name": "ViewContent", "event_id": SHARED_ID}).encode()
    headers = [(b"User-Agent", FIREFOX), (b"Cookie", cookies.encode()), (b"X-Track", spec)]
    response = await within(visitor.request(b"GET", b"/page", headers=headers))
    assert response.status == 200 and bytes(response.body) == PAGE


@pytest_twisted.ensureDeferred
async def test_two_visitors_with_one_event_id_both_reach_ga4_and_meta(
    start_tracking_tagd, connect, fake_meta, fake_ga4
):
    """Two visitors' events with the same id, leased together: GA4 gets one request per
    visitor, under each one's client id, and Meta gets both events in one request; every
    event is counted delivered once, none dead.

    A throttle on the first visitor's event holds each destination for a second, so the
    second visitor's event joins it in the same lease, where the ids collide.
    """
    tagd = await start_tracking_tagd()
    fake_ga4.fake.inject(1, status=429)
    fake_meta.fake.inject(1, status=429, code=17)
    first, second = VISITORS.values()

    await visit(connect, tagd.port, first)
    await eventually(lambda: tagd.delivered("ga4", "throttle") == tagd.delivered("meta", "throttle") == 1)
    await visit(connect, tagd.port, second)
    await eventually(lambda: tagd.delivered("ga4") == tagd.delivered("meta") == 2)

    ga4_sent = fake_ga4.fake.requests[1:]
    assert sorted(r.body["client_id"] for r in ga4_sent) == sorted(VISITORS)
    assert [len(r.body["events"]) for r in ga4_sent] == [1, 1]
    [meta_sent] = fake_meta.fake.requests[1:]
    meta_events = meta_sent.body["data"]
    assert [e["event_id"] for e in meta_events] == [SHARED_ID, SHARED_ID]
    assert [e["user_data"]["fbp"] for e in meta_events] == [
        cookies.split("_fbp=")[1] for cookies in VISITORS.values()
    ]
    assert fake_ga4.fake.violations == fake_meta.fake.violations == []
    for name in ("ga4", "meta"):
        assert tagd.delivered(name, "dead") == tagd.delivered(name, "permanent") == 0
