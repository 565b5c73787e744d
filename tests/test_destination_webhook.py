"""Tests for L{tagd.delivery.destinations.webhook}: normalised events as JSON to the shop's own URL."""

from __future__ import annotations

import json

import attrs
import pytest

from destination_helpers import assert_batches, h
from fakes import make_event
from tagd.delivery.destinations import Outcome
from tagd.delivery.destinations import meta, webhook
from tagd.tagging.events import Event

TOKEN = "Bearer wh-secret-token-0123456789"
URL = "https://warehouse.example:8443/ingest/events?key=query-secret-42#frag"


def destination(**settings) -> webhook.WebhookDestination:
    """A webhook with an Authorization header and a token in its URL, plus C{settings}."""
    return webhook.build("warehouse", {"url": URL, "headers": {"Authorization": TOKEN}, **settings})


def test_module_contract():
    """The module declares its type, keys, secrets and timeout for the configuration."""
    assert webhook.TYPE == "webhook"
    assert webhook.SECRETS == ("headers",)
    assert webhook.KEYS["url"][1] is True
    assert webhook.KEYS["max_batch"][2] == 100
    assert dict(webhook.KEYS["headers"][2]) == {}
    assert webhook.DEFAULT_TIMEOUT > 0


def test_body_has_every_event_field():
    """The body is C{{"events": [...]}} with every field of the Event, in a stable shape."""
    event = make_event(ttclid=None)
    (request,) = destination().encode([event])
    (record,) = json.loads(request.body)["events"]
    assert set(record) == {field.name for field in attrs.fields(Event)}
    assert record["ttclid"] is None
    assert record["event_name"] == "Purchase" and record["event_time"] == event.event_time
    assert record["client_ip"] == "203.0.113.7"
    assert record["user_agent"] == event.user_agent
    assert record["fbp"] == event.fbp and record["ga_client_id"] == event.ga_client_id
    assert record["custom_data"] == {"currency": "EUR", "value": 25.0, "order_id": "A-1001"}
    assert record["contents"] == [dict(event.contents[0])]
    assert request.positions == (0,)


def test_body_lists_the_event_before_the_visitor_ids():
    """A person reading a webhook body sees the event's name, id and time first, and the
    visitor's ids last, as in the body of earlier versions."""
    (request,) = destination().encode([make_event()])
    (record,) = json.loads(request.body)["events"]
    assert list(record)[:3] == ["event_name", "event_id", "event_time"]
    visitor_ids = ["fbp", "fbc", "ttclid", "ttp", "ga_client_id", "ga_session_id"]
    visitor_ids += ["epik", "scclid", "scid", "rdt_cid", "rdt_uuid", "msclkid", "uetvid"]
    assert list(record)[-len(visitor_ids) :] == visitor_ids


def test_user_data_hashed():
    """user_data values are normalised field by field as for Meta, then SHA-256 hashed;
    digests are not hashed again, only lower-cased."""
    digest = h("someone@example.com")
    user_data = {
        "em": (" Joe@Example.COM", digest.upper()),
        "ph": ("+49 (0)170 123-4567",),
        "fn": ("O'Brien",),
        "external_id": ("Customer-77",),
    }
    event = make_event(user_data=user_data)
    (request,) = destination().encode([event])
    (record,) = json.loads(request.body)["events"]
    assert record["user_data"] == {
        "em": [h("joe@example.com"), digest],
        "ph": [h("491701234567")],
        "fn": [h("obrien")],
        "external_id": [h("customer-77")],
    }
    assert b"Joe@Example" not in request.body and b"(0)170" not in request.body


def test_user_data_hashes_join_with_meta():
    """The webhook's hashes are the very ones Meta gets for the same event, so that a
    warehouse can join its rows with Meta's matches, whatever spelling the origin used."""
    event = make_event(
        user_data={"em": ("Jane@Example.com ",), "ph": ("+49 170 1234567",), "ct": ("São Paulo",),
                   "db": ("31.01.1990",), "country": (" DE ",)}  # fmt: skip
    )
    (request,) = destination().encode([event])
    (record,) = json.loads(request.body)["events"]
    sent_to_meta = meta.payload(event)["user_data"]
    assert record["user_data"] == {key: sent_to_meta[key] for key in event.user_data}


def test_headers_sent():
    """The configured headers go with every request, after tagd's Content-Type."""
    (request,) = destination().encode([make_event()])
    assert request.headers == {"Content-Type": "application/json", "Authorization": TOKEN}
    assert request.url == URL


@pytest.mark.parametrize("max_batch, sizes", [(100, [100, 100, 50]), (250, [250])])
def test_batches(max_batch, sizes):
    """250 events go out in requests of at most C{max_batch}, in order."""
    events = [make_event(event_id=f"e{i}") for i in range(250)]
    assert_batches(destination(max_batch=max_batch).encode(events), events, sizes, key="events")
    assert destination().encode([]) == []


def test_unicode_survives_as_ascii_json():
    """Non-ASCII text is escaped, so the body is ASCII, and reads back unchanged."""
    (request,) = destination().encode([make_event(custom_data={"city": "Zürich"})])
    request.body.decode("ascii")
    assert json.loads(request.body)["events"][0]["custom_data"] == {"city": "Zürich"}


def test_secrets_never_shown():
    """Header values and the URL's query are absent from repr, the log URL and messages."""
    dest = destination()
    (request,) = dest.encode([make_event()])
    assert request.log_url == "https://warehouse.example:8443/ingest/events"
    for text in (repr(dest), request.log_url):
        assert "wh-secret-token" not in text and "query-secret-42" not in text
    assert "wh-secret-token" not in repr(request) and "query-secret-42" not in repr(request)
    echo = b"401 Unauthorized: got Authorization: Bearer wh-secret-token-0123456789 for key=query-secret-42"
    message = dest.classify(401, echo).message
    assert "wh-secret-token" not in message and "query-secret-42" not in message
    assert message.startswith("HTTP 401:")


def test_echoed_token_alone_redacted():
    """A bare token echoed without its C{Bearer} word, or percent-encoded, is redacted too."""
    dest = destination()
    assert "wh-secret-token" not in dest.classify(500, b"token wh-secret-token-0123456789 expired").message
    message = dest.classify(400, b"bad header Bearer%20wh-secret-token-0123456789").message
    assert "wh-secret-token" not in message


def test_short_header_values_not_redacted():
    """A short, non-secret header value does not garble the status in messages."""
    dest = destination(headers={"X-Version": "1", "Authorization": TOKEN})
    assert dest.classify(401, b"version 1 refused").message == "HTTP 401: version 1 refused"


def test_log_url_ipv6_and_user_info():
    """The log URL keeps an IPv6 host in brackets and drops user info."""
    dest = webhook.build("w", {"url": "http://user:pw@[2001:db8::5]:9000/e"})
    assert dest.log_url == "http://[2001:db8::5]:9000/e"
    assert "pw" not in dest.classify(500, b"auth user:pw failed").message
    dest = webhook.build("w", {"url": "http://user:long-password@warehouse.example/e"})
    assert "long-password" not in dest.classify(500, b"bad password long-password").message


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"url": None}, "url"),
        ({"url": "ftp://warehouse.example/x"}, "url"),
        ({"url": "https:///nohost"}, "url"),
        ({"headers": {"X-Token": "line1\r\nInjected: yes"}}, "headers"),
        ({"headers": {"Bad Name": "v"}}, "headers"),
        ({"headers": {"Content-Type": "text/plain"}}, "headers"),
        ({"headers": {"X-Number": 5}}, "headers"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_build_rejects(settings, key):
    """Bad settings raise a ValueError that starts with the key and quotes no secret."""
    with pytest.raises(ValueError) as raised:
        destination(**settings)
    assert str(raised.value).startswith(key)
    assert "line1" not in str(raised.value) and "query-secret" not in str(raised.value)


@pytest.mark.parametrize("status", [200, 202, 204, 301, 401])
def test_classify_message_is_the_status(status):
    """By status alone: 2xx delivered, and an empty answer's message is its status only
    (the outcome of every other status: test_destination_common)."""
    verdict = destination().classify(status, b"")
    assert (verdict.outcome is Outcome.SUCCESS) == (200 <= status < 300)
    assert verdict.message == f"HTTP {status}"


def test_classify_quotes_start_of_body():
    """An error message quotes the start of the answer, whitespace collapsed."""
    verdict = destination().classify(422, b"field\n  'events' " + b"x" * 1000)
    assert verdict.message.startswith("HTTP 422: field 'events' xxx")
    assert len(verdict.message) <= len("HTTP 422: ") + 200


def test_the_record_says_the_visitor_s_consent():
    """The purposes granted, sorted, or null when no consent record was read."""
    (request,) = destination().encode([make_event(), make_event(consent=None), make_event(consent=frozenset())])
    records = json.loads(request.body)["events"]
    assert [r["consent"] for r in records] == [["analytics", "marketing"], None, []]
