"""Tests for L{tagd.destinations.log}: the dry run that describes events instead of sending."""

from __future__ import annotations

import json

import pytest

from destination_helpers import h
from fakes import make_event
from tagd.destinations import Outcome
from tagd.destinations import log


def test_module_contract():
    """The module declares its type, and has neither required keys nor secrets."""
    assert log.TYPE == "log"
    assert log.SECRETS == ()
    assert not any(required for _, required, _ in log.KEYS.values())


def test_sends_nothing():
    """encode makes no request, whatever the events."""
    dest = log.build("dry", {})
    assert (dest.name, dest.type, dest.max_batch) == ("dry", "log", 100)
    assert dest.encode([make_event(), make_event()]) == []
    assert dest.classify(200, b"").outcome is Outcome.SUCCESS


def test_describe_one_json_line_per_event():
    """Each event becomes one line of JSON with the normalised event, in order."""
    events = [make_event(event_id="a"), make_event(event_id="b", event_name="AddToCart")]
    lines = log.build("dry", {}).describe(events)
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    records = [json.loads(line) for line in lines]
    assert [(r["event_id"], r["event_name"]) for r in records] == [("a", "Purchase"), ("b", "AddToCart")]
    assert records[0]["source_url"] == events[0].source_url
    assert records[0]["custom_data"]["order_id"] == "A-1001"


def test_describe_masks_ip_and_hashes_user_data():
    """The visitor IP is masked and user_data hashed, so a log never keeps them raw."""
    (line,) = log.describe([make_event(client_ip="203.0.113.7", user_data={"em": (" Joe@Example.COM",)})])
    record = json.loads(line)
    assert record["client_ip"] == "203.0.113.0"
    assert record["user_data"] == {"em": [h("joe@example.com")]}
    assert "203.0.113.7" not in line and "Joe@Example" not in line


@pytest.mark.parametrize(
    "address, masked",
    [
        ("198.51.100.23", "198.51.100.0"),
        ("2001:db8:85a3:1234:5678:8a2e:370:7334", "2001:db8:85a3::"),
        ("::ffff:198.51.100.23", "::"),
        ("::1", "::"),
        ("not an ip", log.NOT_AN_IP),
    ],
)
def test_mask_ip(address, masked):
    """The last IPv4 octet, or the last 80 bits of IPv6, are zeroed; IPv6 stays IPv6."""
    assert log.mask_ip(address) == masked


def test_build_rejects_bad_batch():
    """A batch size below one is refused, naming the key."""
    with pytest.raises(ValueError, match="^max_batch:"):
        log.build("dry", {"max_batch": 0})
