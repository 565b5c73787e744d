"""The dashboard's feed in memory: the ring keeps the last entries only, filters select by
destination and outcome, streams come and go, and no entry says anything of the visitor."""

from __future__ import annotations

import json

import pytest

import tagd.admin.feed
from fakes import make_event
from tagd.admin.feed import MAX_MESSAGE, MAX_NAMED_EVENTS, Feed, matches


def feed(**kw) -> Feed:
    return Feed(lambda: 1764230400.0, ["meta", "ga4"], **kw)


def test_the_ring_keeps_the_last_entries_in_order():
    """Past its size the ring forgets the oldest entries; the numbers go on rising."""
    ring = feed(size=3)
    for number in range(5):
        ring.accepted([make_event(event_id=f"e{number}")])
    assert [(e["id"], e["event_id"]) for e in ring.recent()] == [(3, "e2"), (4, "e3"), (5, "e4")]


def test_accepted_events_are_owed_to_every_destination():
    """One entry per accepted event, with its name, id, time and every destination."""
    ring = feed()
    ring.accepted([make_event(event_id="a", event_name="ViewContent"), make_event(event_id="b")])
    assert ring.recent() == [
        {"outcome": "accepted", "event_name": "ViewContent", "event_id": "a", "destinations": ["meta", "ga4"],
         "id": 1, "time": 1764230400.0},
        {"outcome": "accepted", "event_name": "Purchase", "event_id": "b", "destinations": ["meta", "ga4"],
         "id": 2, "time": 1764230400.0},
    ]  # fmt: skip


def test_a_delivery_names_its_first_events_and_clips_the_answer():
    """A large batch's entry counts every event but names only the first ones; a long
    answer from the platform is clipped."""
    ring = feed()
    events = [make_event(event_id=f"e{n}", event_name="AddToCart" if n % 2 else "Purchase") for n in range(50)]
    ring.delivered("meta", "permanent", events, 400, "x" * 5000)
    (entry,) = ring.recent()
    assert entry["count"] == 50 and entry["status"] == 400 and entry["destination"] == "meta"
    assert entry["event_ids"] == [f"e{n}" for n in range(MAX_NAMED_EVENTS)]
    assert entry["event_names"] == ["AddToCart", "Purchase"]
    assert entry["message"] == "x" * MAX_MESSAGE


def test_filters_by_destination_and_outcome():
    """An accepted event matches each of its destinations; a delivery its own; None is any."""
    ring = feed()
    ring.accepted([make_event()])
    ring.delivered("meta", "success", [make_event()], 200)
    ring.delivered("ga4", "dead", [make_event()], None, "no client id")
    accepted, meta, ga4 = ring.recent()

    def chosen(destination, outcome):
        return [e["id"] for e in (accepted, meta, ga4) if matches(e, destination, outcome)]

    assert chosen(None, None) == [1, 2, 3]
    assert chosen("meta", None) == [1, 2]
    assert chosen("ga4", None) == [1, 3]
    assert chosen("tiktok", None) == []
    assert chosen(None, "accepted") == [1]
    assert chosen("ga4", "dead") == [3]
    assert chosen("meta", "dead") == []


def test_subscribers_get_the_recent_entries_then_each_new_one_until_they_leave():
    """Subscribing returns what the ring holds; each later entry reaches the subscriber
    with its JSON text, until it unsubscribes (twice is harmless)."""
    ring = feed()
    ring.accepted([make_event(event_id="old")])
    seen = []

    def subscriber(entry, text):
        seen.append((entry["event_id"], json.loads(text) == entry))

    assert [e["event_id"] for e in ring.subscribe(subscriber)] == ["old"]
    assert ring.subscribers == 1
    ring.accepted([make_event(event_id="new")])
    ring.unsubscribe(subscriber)
    ring.unsubscribe(subscriber)
    ring.accepted([make_event(event_id="unseen")])
    assert seen == [("new", True)]
    assert ring.subscribers == 0


def test_nobody_watching_means_no_encoding(monkeypatch):
    """Without subscribers an entry is only kept: no JSON is made on the delivery path."""

    def refuse(entry):
        raise AssertionError("encoded with nobody watching")

    monkeypatch.setattr(tagd.admin.feed, "encode", refuse)
    ring = feed()
    ring.accepted([make_event()])
    ring.delivered("meta", "success", [make_event()], 200)
    assert len(ring.recent()) == 2


@pytest.mark.parametrize("outcome", ["accepted", "success", "dead"])
def test_no_entry_holds_what_the_event_knows_of_the_visitor(outcome):
    """Neither an accepted event's entry nor a delivery's holds the visitor's IP, user
    agent, referrer, URL, cookies, click ids or user data, raw or in any other field."""
    event = make_event(
        source_url="https://shop.example/done?token=url-secret",
        client_ip="2001:db8::7",
        user_data={"em": ("jane@example.com",), "ph": ("+4930123456",), "external_id": ("customer-77",)},
    )
    ring = feed()
    if outcome == "accepted":
        ring.accepted([event])
    else:
        ring.delivered("meta", outcome, [event], 200, "ok")
    text = tagd.admin.feed.encode(ring.recent()[0])
    private = [
        event.client_ip, event.user_agent, "Mozilla", event.referrer, event.source_url, "url-secret",
        "jane@example.com", "4930123456", "customer-77", event.fbp, event.fbc, event.ttclid,
        event.ttp, event.ga_client_id, event.ga_session_id, "A-1001", "sku-1",
    ]  # fmt: skip
    assert [value for value in private if value in text] == []


def test_dead_letters_made_without_a_delivery_are_counted_unnamed():
    """Rows dead-lettered in bulk (their destination was removed) make one entry: the
    count and the reason, no HTTP status, no ids or names; it passes the filters as a
    delivery does."""
    ring = feed()
    ring.counted("tiktok", "dead", 7, "destination no longer configured")
    (entry,) = ring.recent()
    assert entry == {
        "outcome": "dead", "destination": "tiktok", "status": None, "count": 7, "event_ids": [],
        "event_names": [], "message": "destination no longer configured", "id": 1, "time": 1764230400.0,
    }  # fmt: skip
    assert matches(entry, "tiktok", "dead") and not matches(entry, "meta", None)


def test_a_failing_stream_is_dropped_and_stops_nothing(logged_failures):
    """A stream that raises is logged and unsubscribed; the entry is kept, the other
    streams get it, and the publisher (tracking, delivery) never sees the error."""
    feed = Feed(lambda: 0.0, ["meta"])
    got = []

    def broken(entry, text):
        raise OSError("the browser went away mid-write")

    feed.subscribe(broken)
    feed.subscribe(lambda entry, text: got.append(entry["event_id"]))
    feed.accepted([make_event(event_id="a")])
    feed.accepted([make_event(event_id="b")])
    assert got == ["a", "b"]
    assert feed.subscribers == 1
    assert [e["event_id"] for e in feed.recent()] == ["a", "b"]
    assert [e["log_failure"].type for e in logged_failures] == [OSError]
