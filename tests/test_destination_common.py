"""What every destination type does alike: how a bare HTTP status is judged (a timeout
included), how a bad setting is reported, and which destination describes instead of
sending.  Each platform's own tests cover what only that platform does."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import make_event
from tagd.daemon.config import ConfigError, parse_config
from tagd.delivery.destinations import Describing, Outcome
from tagd.delivery.destinations._common import MAX_MESSAGE, public_url
from tagd.delivery.destinations.registry import DESTINATION_TYPES, destination_module

# The required keys of each type, with usable values.
REQUIRED = {
    "meta": {"pixel_id": "1234", "access_token": "token-0123456789"},
    "ga4": {"measurement_id": "G-TEST", "api_secret": "token-0123456789"},
    "tiktok": {"pixel_code": "C4PIXEL", "access_token": "token-0123456789"},
    "pinterest": {"ad_account_id": "549755885175", "access_token": "token-0123456789"},
    "snapchat": {"pixel_id": "b2c1e5a0-pixel", "access_token": "token-0123456789"},
    "reddit": {"pixel_id": "t2_abc123", "access_token": "token-0123456789"},
    "microsoft": {"tag_id": "343000123", "access_token": "token-0123456789"},
    "webhook": {"url": "https://warehouse.example/events"},
    "log": {},
}
# The log destination sends nothing, so no answer ever reaches it to be judged.
SENDING = [kind for kind in DESTINATION_TYPES if kind != "log"]


def destination(kind: str):
    """A destination of type C{kind} built from its required keys only."""
    return destination_module(kind).build(kind, REQUIRED[kind])


@pytest.mark.parametrize("kind", DESTINATION_TYPES)
def test_required_keys(kind):
    """L{REQUIRED} names exactly the keys each module declares required."""
    keys = destination_module(kind).KEYS
    assert set(REQUIRED[kind]) == {key for key, (_, required, _) in keys.items() if required}


# What a bare status says, to every destination that sends.
BY_STATUS = {
    Outcome.THROTTLE: [429],
    Outcome.TRANSIENT: [408, 500, 502, 503],
    Outcome.AUTH: [401, 403],
    Outcome.PERMANENT: [301, 400, 404],
}


@pytest.mark.parametrize("kind", SENDING)
@pytest.mark.parametrize(
    ("status", "outcome"), [(status, outcome) for outcome, statuses in BY_STATUS.items() for status in statuses]
)
def test_empty_answer_judged_by_status(kind, status, outcome):
    """Without a body to read, every destination judges the status alike: 429 slows
    down, a timeout (408) or 5xx is retried, 401 and 403 refuse the credentials (not the
    events), any other error never will succeed."""
    verdict = destination(kind).classify(status, b"")
    assert verdict.outcome is outcome
    assert verdict.retry_after is None
    assert f"HTTP {status}" in verdict.message


@pytest.mark.parametrize("kind", SENDING)
@pytest.mark.parametrize(
    "answer",
    [
        b"<html><body><h1>408 Request Time-out</h1></body></html>",
        b'{"error": {"code": 99999, "message": "Request timed out"}}',
        b'{"code": 40001, "message": "Request timed out"}',
    ],
)
def test_request_timeout_is_transient(kind, answer):
    """HTTP 408 is a timeout (the receiver, or a proxy before it, gave up waiting for the
    request): it is retried later, whether the body is a proxy's page or a platform's
    answer that the status outranks (only Meta's documented codes outrank a status)."""
    assert destination(kind).classify(408, answer).outcome is Outcome.TRANSIENT


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        *[(kind, "max_batch", 0) for kind in DESTINATION_TYPES],
        ("meta", "max_batch", 1001),
        ("ga4", "max_batch", 26),
        ("webhook", "max_batch", 1001),
        ("pinterest", "max_batch", 1001),
        ("snapchat", "max_batch", 2001),
        ("reddit", "max_batch", 1001),
        ("microsoft", "max_batch", 1001),
        ("pinterest", "event_names", "{ Purchase = 'purchase' }"),
        ("snapchat", "event_names", "{ Donate = 'DONATE' }"),
        ("reddit", "event_names", "{ Donate = '%s' }" % ("x" * 65)),
        ("microsoft", "event_names", "{ Purchase = '' }"),
        ("pinterest", "ad_account_id", "'act_123'"),
        ("snapchat", "pixel_id", "'pixel/../x'"),
        ("reddit", "pixel_id", "'t2 abc'"),
        ("microsoft", "tag_id", "'UET-1'"),
        *[(kind, "access_token", "'two words'") for kind in ("pinterest", "reddit", "microsoft")],
        ("pinterest", "test", "'yes'"),
        ("meta", "event_names", "{ Purchase = '' }"),
        ("tiktok", "event_names", "{ Purchase = 7 }"),
        ("ga4", "event_names", "{ Purchase = 'bad name' }"),
        ("ga4", "endpoint", "'ftp://example.com'"),
        ("ga4", "api_secret", "''"),
        ("webhook", "url", "'ftp://warehouse.example/x'"),
        ("webhook", "headers", "{ Content-Type = 'text/plain' }"),
        ("log", "platforms", "['meta', 'bing']"),
        ("log", "platforms", "'meta'"),
    ],
)
def test_bad_setting_reported_under_its_key(kind, key, value):
    """C{build} raises C{ValueError("key: reason")}, so the configuration error names the
    very key of the very table, and gives the reason without repeating the key.  Values
    are TOML literals."""
    required = "".join(f'{name} = "{text}"\n' for name, text in REQUIRED[kind].items() if name != key)
    text = f'[[destinations]]\ntype = "{kind}"\n{required}{key} = {value}\n'
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "tagd.toml")
    assert raised.value.key == f"destinations[0].{key}"
    assert not raised.value.reason.startswith(key)


# The key holding each sending destination's URL.
URL_KEYS = {kind: "url" if kind == "webhook" else "endpoint" for kind in SENDING}
BASE_URL_KINDS = [kind for kind, key in URL_KEYS.items() if key == "endpoint"]


@pytest.mark.parametrize("kind", SENDING)
@pytest.mark.parametrize(
    "url",
    [
        "graph.example",  # no scheme: read as a path
        "//graph.example/v1",
        "ftp://graph.example",
        "https://",
        "https://graph.example:99999",
        "https://graph.example:https",
        "https://graph.example /v1",
        "https://graph.example\n",
        "https://graph.example\t/x",
    ],
)
def test_unusable_urls_refused_at_start_up(kind, url):
    """Every destination refuses a URL it could never send to, under its key, with a
    reason that does not quote the URL (it may carry a credential)."""
    key = URL_KEYS[kind]
    with pytest.raises(ValueError) as raised:
        destination_module(kind).build(kind, REQUIRED[kind] | {key: url})
    assert str(raised.value).startswith(f"{key}: ")
    assert "graph.example" not in str(raised.value)


@pytest.mark.parametrize("kind", BASE_URL_KINDS)
@pytest.mark.parametrize(
    "url",
    ["https://user:pw@graph.example", "https://graph.example/?a=1", "https://graph.example/#v1", "https://graph.example?"],
)
def test_endpoint_is_a_base_url(kind, url):
    """A platform's endpoint is a base that tagd appends a path to and logs: user info
    (a password in every log line), a query or a fragment (which would swallow the path)
    are refused."""
    with pytest.raises(ValueError, match="^endpoint: must be a base URL"):
        destination_module(kind).build(kind, REQUIRED[kind] | {"endpoint": url})


@pytest.mark.parametrize("kind", BASE_URL_KINDS)
@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://127.0.0.1:9001/", "http://127.0.0.1:9001"),
        ("https://proxy.example/meta/", "https://proxy.example/meta"),
        ("http://[2001:db8::5]:8443", "http://[2001:db8::5]:8443"),
    ],
)
def test_endpoint_accepted_without_trailing_slash(kind, url, endpoint):
    """Any http(s) base URL works, with a port, an IPv6 host or a path prefix (a proxy);
    its trailing slash goes, since the platform's path is appended to it."""
    assert destination_module(kind).build(kind, REQUIRED[kind] | {"endpoint": url}).endpoint == endpoint


@pytest.mark.parametrize(
    ("url", "logged", "shown"),
    [
        ("https://hooks.example/x?key=SECRET", "https://hooks.example/x", "https://hooks.example/x?***"),
        (
            "https://user:pw@hooks.example:8443/x?k=1#frag",
            "https://hooks.example:8443/x",
            "https://***@hooks.example:8443/x?***#***",
        ),
        ("http://[2001:db8::5]:8443/in", "http://[2001:db8::5]:8443/in", "http://[2001:db8::5]:8443/in"),
    ],
)
def test_public_url_hides_what_may_carry_a_credential(url, logged, shown):
    """User info, query and fragment are left out of a log line, or masked where the URL
    must stay recognisable as one (check-config); a URL without them is shown as it is."""
    assert public_url(url) == logged
    assert public_url(url, "***") == shown
    assert destination_module("webhook").build("hook", {"url": url}).log_url == logged


@pytest.mark.parametrize("kind", DESTINATION_TYPES)
def test_only_the_log_describes(kind):
    """The sender logs, in place of sending, for exactly the destinations that are
    L{Describing}: the dry run, whose C{encode} has nothing to send and which describes
    an event in one line per platform (Meta, GA4, TikTok by default)."""
    dest = destination(kind)
    assert isinstance(dest, Describing) is (kind == "log")
    if isinstance(dest, Describing):
        assert dest.encode([make_event()]) == []
        assert len(dest.describe([make_event()])) == 3


# What a platform, a proxy before it or a broken network may answer: JSON of any shape
# (the platforms' keys among others), HTML, or bytes.
_KEYS = st.sampled_from(["code", "message", "error", "status", "events", "details", "data", "reason", "x"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)
_ANSWERS = st.one_of(_JSON.map(lambda value: json.dumps(value).encode()), st.binary(max_size=200))


@settings(max_examples=600, deadline=None)
@given(kind=st.sampled_from([kind for kind in SENDING if kind != "webhook"]), status=st.integers(100, 599), answer=_ANSWERS)
def test_any_answer_is_judged_without_a_crash_or_the_token(kind, status, answer):
    """Whatever comes back, the destination gives a verdict, whose messages (its own and
    those of events refused one by one) are bounded and never hold the token."""
    token = REQUIRED[kind].get("access_token") or REQUIRED[kind].get("api_secret")
    echoed = answer.replace(b"x", token.encode())
    verdict = destination(kind).classify(status, echoed)
    for message in (verdict.message, *(reason for _, reason in verdict.refused)):
        assert token not in message and len(message) <= MAX_MESSAGE
    assert all(isinstance(index, int) for index, _ in verdict.refused)
