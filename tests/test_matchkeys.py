"""Match-key coverage (L{tagd.tagging.matchkeys}): which keys each platform counts, the panel's
shares and advice, and the counters Prometheus reads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from fakes import make_event
from tagd.tagging.matchkeys import ADVICE, PLATFORM_KEYS, Coverage, carried, coverage, event_label


def test_each_platform_s_keys() -> None:
    """Meta's em, ph, external_id, fbp, fbc, IP and user agent; TikTok's and GA4's own."""
    assert PLATFORM_KEYS["meta"] == ("email", "phone", "external_id", "fbp", "fbc", "client_ip", "user_agent")
    assert set(ADVICE) == {key for keys in PLATFORM_KEYS.values() for key in keys}
    assert set(carried("tiktok", make_event())) == {"email", "phone", "ttclid", "ttp", "client_ip", "user_agent"}
    assert set(carried("ga4", make_event(user_data={}))) == {"client_id", "session_id", "client_ip", "user_agent"}
    assert carried("webhook", make_event()) == frozenset()
    assert all(advice and "\n" not in advice for advice in ADVICE.values())


def test_custom_events_share_one_label() -> None:
    assert event_label("Purchase") == "Purchase"
    assert event_label("MyOwnEvent") == "custom"


def test_62_percent_of_purchases_carry_an_e_mail() -> None:
    """The panel's sentence, from the counts: 5 of 8 purchases with an e-mail is 62 %."""
    counted = Coverage()
    with_email = [make_event(user_data={"em": ("a@b.c",)}) for _ in range(5)]
    without = [make_event(user_data={}, fbc=None) for _ in range(3)]
    counted.count("meta", "meta", with_email + without)
    counted.count("hook", "webhook", with_email + without)
    [row] = coverage(*counted.totals())
    assert (row["destination"], row["event"], row["events"]) == ("meta", "Purchase", 8)
    shares = {key["key"]: key["percent"] for key in row["keys"]}
    assert shares["email"] == 62 and shares["phone"] == 0 and shares["fbc"] == 62 and shares["fbp"] == 100
    assert row["keys"][0]["key"] in ("external_id", "phone")  # the least carried first
    email = next(key for key in row["keys"] if key["key"] == "email")
    assert email["carry"] == "an e-mail" and email["advice"] == ADVICE["email"]


def test_prometheus_reads_every_key_from_the_first_event() -> None:
    """A key no event carried yet has its series at 0, for alerts and rates."""
    registry = CollectorRegistry()
    counted = Coverage()
    registry.register(counted)
    counted.count("meta", "meta", [make_event(event_name="AddToCart", user_data={})])
    text = generate_latest(registry).decode()
    assert 'tagd_match_key_events_total{destination="meta",event="AddToCart"} 1.0' in text
    assert 'tagd_match_keys_total{destination="meta",event="AddToCart",key="email"} 0.0' in text
    assert 'tagd_match_keys_total{destination="meta",event="AddToCart",key="fbp"} 1.0' in text


def test_snapchat_counts_the_customer_id_it_sends() -> None:
    """Snapchat's payload carries the hashed external id, so its row counts it."""
    from tagd.delivery.destinations import snapchat

    event = make_event(user_data={"em": ("a@b.c",), "external_id": ("cust-7",)})
    sent = snapchat.build("snap", {"pixel_id": "p-1", "access_token": "t"}).payload(event)
    assert "external_id" in sent["user_data"]
    assert "external_id" in carried("snapchat", event)


def test_only_a_success_counts_and_only_at_a_destination_with_keys() -> None:
    """Outcomes counts coverage of the events a platform took: no other outcome, no
    webhook; a destination a reload removed still counts what its lane settles."""
    from types import SimpleNamespace

    from tagd.admin.metrics import Metrics
    from tagd.delivery.outcomes import OUTCOMES, Outcomes

    metrics = Metrics()
    outcomes = Outcomes(metrics)
    outcomes.configured([SimpleNamespace(name="meta", type="meta"), SimpleNamespace(name="hook", type="webhook")])
    for outcome in OUTCOMES:
        outcomes.delivered("meta", outcome, [make_event()])
        outcomes.delivered("hook", outcome, [make_event()])
    outcomes.configured([SimpleNamespace(name="hook", type="webhook")])
    outcomes.delivered("meta", "success", [make_event(event_name="AddToCart")])
    assert metrics.match_keys.totals()[0] == {("meta", "Purchase"): 1, ("meta", "AddToCart"): 1}
