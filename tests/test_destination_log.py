"""Tests for L{tagd.delivery.destinations.log}: the dry run that shows what each platform would get."""

from __future__ import annotations

import json

import pytest

from destination_helpers import body
from fakes import make_event
from tagd.delivery.destinations import Outcome, ga4, log, meta, tiktok

MASKED_IP = "203.0.113.0"  # make_event's visitor is 203.0.113.7


def logged(lines: list[str]) -> list[tuple[str, str]]:
    """Each line as (platform, the rest), the two parts a line is made of."""
    pairs = [line.partition(": ") for line in lines]
    assert all(sep for _, sep, _ in pairs) and all("\n" not in line for line in lines)
    return [(platform, rest) for platform, _, rest in pairs]


def sent(event) -> dict[str, dict]:
    """What each platform's own destination sends for C{event} alone, with the visitor's
    IP replaced by the masked one: the payload the dry run must show."""
    tokens = {"access_token": "token-0123456789"}
    meta_event = body(meta.build("m", {"pixel_id": "1234", **tokens}).encode([event])[0])["data"][0]
    meta_event["user_data"]["client_ip_address"] = MASKED_IP
    ga4_body = body(ga4.build("g", {"measurement_id": "G-1", "api_secret": "s3cret"}).encode([event])[0])
    ga4_body["ip_override"] = MASKED_IP
    tiktok_event = body(tiktok.build("t", {"pixel_code": "C1", **tokens}).encode([event])[0])["data"][0]
    tiktok_event["user"]["ip"] = MASKED_IP
    return {"meta": meta_event, "ga4": ga4_body, "tiktok": tiktok_event}


def test_module_contract():
    """The module declares its type and keys (all three platforms by default), and has
    neither required keys nor secrets."""
    assert log.TYPE == "log"
    assert log.SECRETS == ()
    assert not any(required for _, required, _ in log.KEYS.values())
    assert log.KEYS["platforms"][2] == ("meta", "ga4", "tiktok")
    assert log.KEYS["max_batch"][2] == 100


def test_sends_nothing():
    """encode makes no request, whatever the events."""
    dest = log.build("dry", {})
    assert (dest.name, dest.type, dest.max_batch, dest.platforms) == ("dry", "log", 100, log.PLATFORMS)
    assert dest.encode([make_event(), make_event()]) == []
    assert dest.classify(200, b"").outcome is Outcome.SUCCESS


@pytest.mark.parametrize("consent", [frozenset({"marketing"}), frozenset({"analytics"}), None])
def test_each_platform_payload_as_its_destination_sends_it(consent):
    """Per event, one line per platform: Meta's and TikTok's event object and GA4's
    request body, equal to what each platform's destination sends, but for the IP; for
    a visitor who refused marketing, with the limited-use flags as sent."""
    event = make_event(user_data={"em": (" Joe@Example.COM",), "ph": ("+49 170 1234567",)}, consent=consent)
    lines = logged(log.build("dry", {}).describe([event]))
    assert [platform for platform, _ in lines] == ["meta", "ga4", "tiktok"]
    assert {platform: json.loads(text) for platform, text in lines} == sent(event)


def test_lines_follow_the_events_and_the_platforms_setting():
    """Events in order, and for each the platforms in the order configured."""
    events = [make_event(event_id="a"), make_event(event_id="b", event_name="Lead")]
    lines = logged(log.build("dry", {"platforms": ["tiktok", "meta"]}).describe(events))
    assert [platform for platform, _ in lines] == ["tiktok", "meta", "tiktok", "meta"]
    documents = [json.loads(text) for _, text in lines]
    assert [d["event_id"] for d in documents] == ["a", "a", "b", "b"]
    assert [d.get("event") or d.get("event_name") for d in documents] == ["CompletePayment", "Purchase",
                                                                          "SubmitForm", "Lead"]  # fmt: skip


@pytest.mark.parametrize(
    ("address", "masked"),
    [("203.0.113.7", "203.0.113.0"), ("2001:db8:85a3:1234:5678:8a2e:370:7334", "2001:db8:85a3::")],
)
def test_no_line_holds_the_ip_or_raw_user_data(address, masked):
    """The visitor's address is masked wherever a platform carries it (IPv6 stays IPv6),
    and user data appears only hashed, so a log never keeps either raw."""
    event = make_event(client_ip=address, user_data={"em": ("Joe@Example.COM",), "fn": ("Jøhn",)})
    lines = logged(log.build("dry", {}).describe([event]))
    text = "\n".join(rest for _, rest in lines)
    assert address not in text and "Joe@Example" not in text and "Jøhn" not in text
    meta_event, ga4_body, tiktok_event = (json.loads(rest) for _, rest in lines)
    assert meta_event["user_data"]["client_ip_address"] == masked
    assert ga4_body["ip_override"] == masked
    assert tiktok_event["user"]["ip"] == masked


def test_an_event_ga4_would_not_get_says_so():
    """Without a GA4 client id GA4 gets nothing, and its line says why; the other
    platforms' lines are there as ever."""
    lines = logged(log.build("dry", {}).describe([make_event(ga_client_id=None)]))
    assert dict(lines)["ga4"] == log.GA4_NOT_SENT
    assert json.loads(dict(lines)["meta"])["event_id"] == "evt-1"


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


@pytest.mark.parametrize(
    "settings", [{"max_batch": 0}, {"platforms": []}, {"platforms": ["meta", "meta"]},
                 {"platforms": ["meta", "bing"]}, {"platforms": [{"meta": 1}]}],  # fmt: skip
)
def test_build_rejects(settings):
    """A batch size below one, and a platforms list that is empty, repeats a platform or
    names one tagd does not know, are refused, naming the key."""
    key = next(iter(settings))
    with pytest.raises(ValueError, match=f"^{key}: "):
        log.build("dry", settings)


def test_the_later_platforms_on_request_with_their_reasons():
    """Pinterest, Snapchat, Reddit and Microsoft are shown when named: each line is what
    that destination sends for the event (IP masked), or why it would not send it."""
    from tagd.delivery.destinations import microsoft, pinterest, reddit, snapchat

    dry_run = log.build("dry", {"platforms": ["pinterest", "snapchat", "reddit", "microsoft"]})
    event = make_event()
    lines = dict(logged(dry_run.describe([event])))
    masked = make_event(client_ip=MASKED_IP)
    tokens = {"access_token": "token-0123456789"}
    assert json.loads(lines["pinterest"]) == pinterest.build("p", {"ad_account_id": "1", **tokens}).payload(masked)
    assert json.loads(lines["snapchat"]) == snapchat.build("s", {"pixel_id": "1", **tokens}).payload(masked)
    assert json.loads(lines["reddit"]) == reddit.build("r", {"pixel_id": "t2_1", **tokens}).payload(masked)
    assert json.loads(lines["microsoft"]) == microsoft.build("m", {"tag_id": "1", **tokens}).payload(masked)
    custom = dict(logged(dry_run.describe([make_event(event_name="Newsletter_Signup")])))
    assert custom["snapchat"].startswith("not sent: snapchat has no name for 'Newsletter_Signup'")
    assert json.loads(custom["pinterest"])["event_name"] == "custom"
    with pytest.raises(ValueError, match="^platforms: must list some of meta, ga4, tiktok, pinterest"):
        log.build("dry", {"platforms": ["bing"]})
