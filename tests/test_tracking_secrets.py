"""Tokens never reach a log line or a metric, whatever the platforms answer.

Every log event emitted during the run is captured, formatted as an observer would write
it (and, for failures, with the traceback), and searched for the access tokens and the
API secret in every spelling a URL could give them.  The platforms here are fakes that
make it as hard as possible: some refuse with an error that quotes the token back.
"""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import pytest_twisted
from prometheus_client import generate_latest
from twisted.logger import formatEvent

from twisted.internet.defer import Deferred

from conftest import (
    FAKE_GA4_SECRET,
    FAKE_META_TOKEN,
    FAKE_TIKTOK_TOKEN,
    eventually,
    platform_destinations,
    serve_quietly,
    within,
)
from fakes import Answer, FakeGA4, FakeMeta, FakeTikTok
from helpers import free_port

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
META_TOKEN = "EAAMeta/Secret+Token=42"
GA4_SECRET = "GA4-api-SECRET_value/9"
TIKTOK_TOKEN = "TikTok+Secret/Token=77"


def spellings(secret: str) -> set[str]:
    """A secret as it is, and as a URL or a query string could carry it."""
    return {secret, quote(secret, safe=""), quote_plus(secret), secret.lower()}


def logged_text(log_events) -> str:
    """Everything the captured log events say: formatted text, tracebacks, field values."""
    parts = []
    for event in log_events:
        parts.append(formatEvent(event))
        if "log_failure" in event:
            parts.append(event["log_failure"].getTraceback())
        parts.extend(repr(value) for key, value in event.items() if key not in ("log_logger", "log_source"))
    return "\n".join(parts)


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        for spelling in spellings(secret):
            assert spelling not in text, f"a token ({spelling[:4]}...) appears"


class EchoingMeta(FakeMeta):
    """Meta refusing every request with an error that quotes the token and the request."""

    def answer(self, recorded):
        token = self._token(recorded) or ""
        message = f"Invalid OAuth access token {token} for /events?access_token={quote_plus(token)}"
        return self._error(400, 190, None, message)


class EchoingGA4(FakeGA4):
    """GA4 behind a broken load balancer: a 500 page repeating the query with the secret."""

    def answer(self, recorded):
        secret = recorded.query.get("api_secret", [""])[0]
        return Answer(500, {"error": f"upstream failed for api_secret={quote_plus(secret)} ({secret})"})


class EchoingTikTok(FakeTikTok):
    """TikTok refusing the token and quoting it back, with HTTP 200 as TikTok does."""

    def answer(self, recorded):
        token = recorded.headers.get("access-token", "")
        return self._reply(40001, f"Access token {token} is incorrect or has been revoked.")


@pytest_twisted.async_yield_fixture
async def echoing_platforms():
    """The three echoing fakes, knowing the test's tokens, on loopback."""
    served = [
        serve_quietly(EchoingMeta(access_token=META_TOKEN)),
        serve_quietly(EchoingGA4(api_secret=GA4_SECRET)),
        serve_quietly(EchoingTikTok(access_token=TIKTOK_TOKEN)),
    ]
    yield served
    for one in served:
        await within(Deferred.fromCoroutine(one.stop()))


def destinations(meta_base: str, ga4_base: str, tiktok_base: str, **extra) -> list[dict]:
    """The three platform tables with the test's tokens."""
    return [
        {"type": "meta", "name": "fb-main", "pixel_id": "1234", "access_token": META_TOKEN,
         "endpoint": meta_base, **extra},
        {"type": "ga4", "name": "ga4-main", "measurement_id": "G-TEST", "api_secret": GA4_SECRET,
         "endpoint": ga4_base, **extra},
        {"type": "tiktok", "name": "tt-main", "pixel_code": "CTEST123", "access_token": TIKTOK_TOKEN,
         "endpoint": tiktok_base, **extra},
    ]  # fmt: skip


async def tracked_visits(tagd, connect, count: int = 1) -> None:
    """C{count} tracked page views, each with personal data, each answered in full."""
    visitor = await connect(tagd.port)
    spec = {"event_name": "Purchase", "custom_data": {"currency": "EUR", "value": 5},
            "user_data": {"em": "joe@example.com"}}  # fmt: skip
    for _ in range(count):
        response = await within(
            visitor.request(
                b"GET", b"/page", headers=[(b"User-Agent", FIREFOX), (b"X-Track", json.dumps(spec).encode())]
            )
        )
        assert response.status == 200


def outcomes(tagd, name: str) -> dict[str, float]:
    """The delivery outcomes counted for destination C{name}."""
    return {o: tagd.delivered(name, o) for o in ("success", "transient", "throttle", "auth", "permanent")}


def failed(tagd, name: str) -> float:
    """How many of C{name}'s delivery attempts did not succeed."""
    return sum(count for outcome, count in outcomes(tagd, name).items() if outcome != "success")


def tagd_lines(log_events) -> list[str]:
    """The formatted lines that tagd's own modules logged."""
    return [formatEvent(e) for e in log_events if str(e.get("log_namespace", "")).startswith("tagd")]


async def logged(log_events, *fragments: str) -> None:
    """Wait until, for each fragment, some line that tagd logged contains it."""
    await eventually(lambda: all(any(f in line for line in tagd_lines(log_events)) for f in fragments))


@pytest_twisted.ensureDeferred
async def test_no_token_in_logs_when_platforms_quote_it_back(
    start_tracking_tagd, connect, echoing_platforms, log_events
):
    """Every platform refuses and quotes the token (raw and URL-encoded) in its answer:
    tagd logs each refusal with the platform's message, but no token in any spelling
    reaches a log line, a logged traceback or the metrics."""
    meta, ga4, tiktok = echoing_platforms
    tagd = await start_tracking_tagd(destinations=destinations(meta.base, ga4.base, tiktok.base))
    await tracked_visits(tagd, connect)
    for name in ("fb-main", "ga4-main", "tt-main"):
        await eventually(lambda: failed(tagd, name) >= 1)
    # The fakes got the right tokens, so their answers did quote them: a leak would show.
    assert meta.fake._token(meta.fake.requests[0]) == META_TOKEN
    assert ga4.fake.requests[0].query["api_secret"] == [GA4_SECRET]
    assert tiktok.fake.requests[0].headers["access-token"] == TIKTOK_TOKEN
    assert meta.fake.violations == ga4.fake.violations == tiktok.fake.violations == []
    await logged(log_events, "fb-main", "ga4-main", "tt-main")
    await logged(log_events, "Invalid OAuth access token", "incorrect or has been revoked")
    assert_no_secret(logged_text(log_events), META_TOKEN, GA4_SECRET, TIKTOK_TOKEN)
    assert_no_secret(generate_latest(tagd.metrics.registry).decode(), META_TOKEN, GA4_SECRET, TIKTOK_TOKEN)


@pytest_twisted.ensureDeferred
async def test_no_token_in_logs_on_injected_errors_and_successes(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, log_events
):
    """The standard fakes answer the first request with an error (Meta 400/100, GA4 503,
    TikTok's throttle code) and later ones normally; neither the failures nor the
    successes (logged at debug level) show a token."""
    fake_meta.fake.inject(status=400, code=100)
    fake_ga4.fake.inject(status=503)
    fake_tiktok.fake.inject(code=40100)
    tagd = await start_tracking_tagd()
    await tracked_visits(tagd, connect, count=2)
    for name in ("meta", "ga4", "tiktok"):
        await eventually(lambda: failed(tagd, name) >= 1 and outcomes(tagd, name)["success"] >= 1)
    await logged(log_events, "meta", "ga4", "tiktok", "Injected failure")
    assert_no_secret(logged_text(log_events), FAKE_META_TOKEN, FAKE_GA4_SECRET, FAKE_TIKTOK_TOKEN)
    assert_no_secret(
        generate_latest(tagd.metrics.registry).decode(), FAKE_META_TOKEN, FAKE_GA4_SECRET, FAKE_TIKTOK_TOKEN
    )


@pytest_twisted.ensureDeferred
async def test_no_token_in_logs_on_timeouts_and_refused_connections(
    start_tracking_tagd, connect, fake_meta, fake_ga4, fake_tiktok, log_events
):
    """Meta and GA4 answer too late for the destination's timeout; TikTok's endpoint
    refuses connections: each failure is logged, naming the URL without its token."""
    fake_meta.fake.inject(delay=3.0)
    fake_ga4.fake.inject(delay=3.0)
    tables = platform_destinations(fake_meta, fake_ga4, fake_tiktok)
    for table in tables:
        table["timeout"] = 0.3
    tables[2]["endpoint"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tagd = await start_tracking_tagd(destinations=tables)
    await tracked_visits(tagd, connect)
    for name in ("meta", "ga4", "tiktok"):
        await eventually(lambda: outcomes(tagd, name)["transient"] >= 1)
    await logged(
        log_events,
        f"{fake_meta.base}/v24.0/1234/events",
        f"{fake_ga4.base}/mp/collect",
        f"{tables[2]['endpoint']}/open_api/v1.3/event/track/",
    )
    assert_no_secret(logged_text(log_events), FAKE_META_TOKEN, FAKE_GA4_SECRET, FAKE_TIKTOK_TOKEN)
