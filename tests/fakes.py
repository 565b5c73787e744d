"""Fake Meta, GA4 and TikTok servers that check payloads as each platform documents them.

Each fake is a Twisted C{Resource} for a C{Site} on loopback (L{serve}).  It records
every request (L{Recorded}: path, query, headers, parsed body and the violations found)
and answers the way the real platform does:

  - Meta rejects a bad request with C{{"error": {...}}} (code 190 for a wrong token,
    code 100 for a bad parameter, subcode 2804003 for an event older than 7 days);
  - GA4 answers 204 to anything, so its violations are only recorded, except on
    C{/debug/mp/collect}, which answers them as C{validationMessages};
  - TikTok answers HTTP 200 even on failure, with C{code} 0 for success, 40105 for a
    missing or wrong token ("Access token is incorrect or has been revoked") and 40002
    for bad parameters.

A wrong token is refused whole, before any event is looked at, as the platforms do.

The checks are written from the platforms' documentation (the project's PLATFORMS.md),
not from tagd's encoders, so that an encoder mistake shows up as a violation.

L{FakePlatform.inject} makes the next N answers failures (an HTTP status, a platform
code, a delay), for the tests of retries, throttling and timeouts.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections import deque
from typing import Any, Iterator

import attrs
from twisted.internet import reactor as _global_reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tagd.events import Event

DAY = 86400
HEX64 = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class Violation:
    """One way a request breaks the platform's documented rules."""

    field: str
    message: str
    code: str = "VALUE_INVALID"  # GA4's validationCode; informative for the others

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@attrs.define
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names, the last value of each
    raw: bytes
    body: Any  # the parsed JSON, or None when it was not JSON
    violations: list[Violation] = attrs.field(factory=list)

    def framing(self) -> str:
        """How the body came, for a violation about its shape: a body cut short by a
        closed connection reads differently from one sent malformed."""
        return (
            f"({len(self.raw)} bytes received, Content-Length {self.headers.get('content-length')}, "
            f"Transfer-Encoding {self.headers.get('transfer-encoding')}, starting {self.raw[:40]!r})"
        )


@attrs.frozen
class Injection:
    """How to answer one request instead of the normal way.

    C{status} and C{code} replace the HTTP status and the platform's code; with neither,
    the normal answer is given, only C{delay} seconds late.
    """

    status: int | None = None
    code: int | None = None
    subcode: int | None = None
    delay: float = 0.0

    @property
    def fails(self) -> bool:
        return self.status is not None or self.code is not None


@attrs.frozen
class Answer:
    status: int
    body: Any = None  # a JSON value, or None for an empty body


def _json_bytes(value: Any) -> bytes:
    return b"" if value is None else json.dumps(value).encode("utf-8")


def is_hashed(value: Any) -> bool:
    """A SHA-256 digest as the platforms want it: 64 lower-case hex characters."""
    return isinstance(value, str) and bool(HEX64.fullmatch(value))


def _values(value: Any) -> list[Any]:
    """A field the platforms accept as one value or a list of values, as a list."""
    return value if isinstance(value, list) else [value]


def check_ip(field: str, value: Any) -> Iterator[Violation]:
    try:
        ipaddress.ip_address(value)
    except (ValueError, TypeError):
        yield Violation(field, f"{value!r} is not an IP address")


def check_hashed(field: str, value: Any) -> Iterator[Violation]:
    for item in _values(value):
        if not is_hashed(item):
            yield Violation(field, "must be a SHA-256 digest in lower-case hex")


def check_not_hashed(field: str, value: Any) -> Iterator[Violation]:
    if not isinstance(value, str) or not value:
        yield Violation(field, "must be a non-empty string")
    elif is_hashed(value):
        yield Violation(field, "must be sent as is, never hashed")


class FakePlatform(Resource):
    """What every fake shares: recording, injected failures, delayed answers."""

    isLeaf = True

    def __init__(self, reactor=None, skew: float = 60.0) -> None:
        super().__init__()
        self.reactor = reactor if reactor is not None else _global_reactor
        self.skew = skew  # how far in the future an event time may be (clock skew)
        self.requests: list[Recorded] = []
        self._injections: deque[Injection] = deque()
        self._pending: list = []

    # For tests.

    def inject(self, count: int = 1, *, status=None, code=None, subcode=None, delay=0.0) -> None:
        """Answer the next C{count} requests with this failure (or only this delay)."""
        self._injections.extend([Injection(status, code, subcode, delay)] * count)

    @property
    def violations(self) -> list[Violation]:
        """Every violation in every request so far."""
        return [v for recorded in self.requests for v in recorded.violations]

    @property
    def events(self) -> list[Any]:
        """Every event received so far, from every well-formed request."""
        return [e for r in self.requests for e in self.events_of(r.body)]

    def close(self) -> None:
        """Drop answers still waiting on a delay (the test is over)."""
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()

    def now(self) -> float:
        return self.reactor.seconds()

    # For subclasses.

    events_key = "data"  # where the platform's body holds its list of events

    def events_of(self, body: Any) -> list[Any]:
        events = body.get(self.events_key) if isinstance(body, dict) else None
        return events if isinstance(events, list) else []

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        raise NotImplementedError

    def answer(self, recorded: Recorded) -> Answer:
        raise NotImplementedError

    def injected_answer(self, injection: Injection) -> Answer:
        raise NotImplementedError

    # Twisted.

    def render(self, request) -> bytes | int:
        recorded = self._record(request)
        if recorded.method == "POST":
            recorded.violations.extend(self.check(recorded))
        else:
            recorded.violations.append(Violation("method", f"{recorded.method} instead of POST"))
        self.requests.append(recorded)
        injection = self._injections.popleft() if self._injections else Injection()
        answer = self.injected_answer(injection) if injection.fails else self.answer(recorded)
        if not injection.delay:
            return self._write(request, answer)
        call = self.reactor.callLater(injection.delay, self._finish_late, request, answer)
        self._pending.append(call)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET

    def _write(self, request, answer: Answer) -> bytes:
        request.setResponseCode(answer.status)
        if answer.body is not None:
            request.setHeader(b"content-type", b"application/json")
        return _json_bytes(answer.body)

    def _finish_late(self, request, answer: Answer) -> None:
        request.write(self._write(request, answer))
        request.finish()

    def _record(self, request) -> Recorded:
        request.content.seek(0)
        raw = request.content.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        return Recorded(
            method=request.method.decode("ascii"),
            path=request.path.decode("utf-8", "replace"),
            query={
                k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                for k, vs in request.args.items()
            },
            headers={
                name.decode("latin-1").lower(): values[-1].decode("latin-1")
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            raw=raw,
            body=body,
        )

    def _check_event_time(self, field: str, value: Any, max_age: float) -> Iterator[Violation]:
        """Unix seconds (not milliseconds), not too old, not in the future."""
        if isinstance(value, bool) or not isinstance(value, int):
            yield Violation(field, "must be a whole number of Unix seconds")
        elif value > 1e11:
            yield Violation(field, "looks like milliseconds; Unix seconds are expected")
        elif value > self.now() + self.skew:
            yield Violation(field, "is in the future")
        elif value < self.now() - max_age:
            yield Violation(field, f"is more than {max_age / DAY:g} days old", "TOO_OLD")


# -- Meta ---------------------------------------------------------------------------

META_HASHED = ("em", "ph", "fn", "ln", "db", "ge", "ct", "st", "zp", "country", "external_id")
META_ACTION_SOURCES = frozenset(
    {"email", "website", "app", "phone_call", "chat", "physical_store", "system_generated",
     "business_messaging", "other"}
)  # fmt: skip
META_BROWSER_ID = re.compile(r"fb\.\d+\.\d+\.[^.\s]+(\.[^.\s]+)?")


class FakeMeta(FakePlatform):
    """Meta's Conversions API: C{POST /{version}/{pixel_id}/events?access_token=...}."""

    def __init__(self, pixel_id="1234", access_token="meta-token", max_events=1000, **kw) -> None:
        super().__init__(**kw)
        self.pixel_id, self.access_token, self.max_events = pixel_id, access_token, max_events

    def _token(self, recorded: Recorded) -> str | None:
        if "access_token" in recorded.query:
            return recorded.query["access_token"][-1]
        if isinstance(recorded.body, dict):
            return recorded.body.get("access_token")
        return None

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        match = re.fullmatch(r"/v\d+\.\d+/([^/]+)/events", recorded.path)
        if not match or match.group(1) != self.pixel_id:
            yield Violation("path", f"{recorded.path} is not /{{version}}/{self.pixel_id}/events")
        if self._token(recorded) != self.access_token:
            yield Violation("access_token", "does not match", "BAD_TOKEN")
        body = recorded.body
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            yield Violation("data", f"the body must be a JSON object with a data list {recorded.framing()}")
            return
        if not 1 <= len(body["data"]) <= self.max_events:
            yield Violation("data", f"must hold 1 to {self.max_events} events")
        if "test_event_code" in body and not isinstance(body["test_event_code"], str):
            yield Violation("test_event_code", "must be a string")
        for i, event in enumerate(body["data"]):
            yield from self._check_event(f"data[{i}]", event)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        if not isinstance(event, dict):
            yield Violation(where, "must be an object")
            return
        if not isinstance(event.get("event_name"), str) or not event["event_name"]:
            yield Violation(f"{where}.event_name", "is required")
        yield from self._check_event_time(f"{where}.event_time", event.get("event_time"), 7 * DAY)
        if event.get("action_source") not in META_ACTION_SOURCES:
            yield Violation(f"{where}.action_source", "is required and must be a known source")
        user_data = event.get("user_data")
        if not isinstance(user_data, dict):
            yield Violation(f"{where}.user_data", "is required")
            user_data = {}
        if event.get("action_source") == "website":
            url = event.get("event_source_url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                yield Violation(f"{where}.event_source_url", "is required for website events")
            if "client_user_agent" not in user_data:
                yield Violation(f"{where}.user_data.client_user_agent", "is required for website events")
        yield from self._check_user_data(f"{where}.user_data", user_data)
        if "custom_data" in event and not isinstance(event["custom_data"], dict):
            yield Violation(f"{where}.custom_data", "must be an object")

    def _check_user_data(self, where: str, user_data: dict) -> Iterator[Violation]:
        for key in META_HASHED:
            if key in user_data:
                yield from check_hashed(f"{where}.{key}", user_data[key])
        for key in ("client_user_agent", "fbp", "fbc"):
            if key in user_data:
                yield from check_not_hashed(f"{where}.{key}", user_data[key])
        for key in ("fbp", "fbc"):
            if isinstance(user_data.get(key), str) and not META_BROWSER_ID.fullmatch(user_data[key]):
                yield Violation(f"{where}.{key}", "must look like fb.{subdomain_index}.{creation_ms}.{value}")
        if "client_ip_address" in user_data:
            yield from check_ip(f"{where}.client_ip_address", user_data["client_ip_address"])

    def answer(self, recorded: Recorded) -> Answer:
        codes = {v.code for v in recorded.violations}
        if "BAD_TOKEN" in codes:
            return self._error(400, 190, None, "Invalid OAuth access token.")
        if "TOO_OLD" in codes:
            return self._error(400, 100, 2804003, "Invalid parameter: event_time is too far in the past")
        if recorded.violations:
            problems = "; ".join(map(str, recorded.violations))
            return self._error(400, 100, None, f"Invalid parameter: {problems}")
        received = len(recorded.body["data"])
        return Answer(200, {"events_received": received, "messages": [], "fbtrace_id": self._trace()})

    def injected_answer(self, injection: Injection) -> Answer:
        status, code = injection.status or 400, injection.code or 1
        return self._error(status, code, injection.subcode, "Injected failure")

    def _error(self, status: int, code: int, subcode: int | None, message: str) -> Answer:
        error = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": self._trace()}
        if subcode is not None:
            error["error_subcode"] = subcode
        return Answer(status, {"error": error})

    def _trace(self) -> str:
        return f"FakeTrace{len(self.requests)}"


# -- GA4 ----------------------------------------------------------------------------

GA4_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
GA4_RESERVED_EVENTS = frozenset(
    {"ad_activeview", "ad_click", "ad_exposure", "ad_impression", "ad_query", "adunit_exposure",
     "app_clear_data", "app_install", "app_update", "app_remove", "error", "first_open",
     "first_visit", "in_app_purchase", "notification_dismiss", "notification_foreground",
     "notification_open", "notification_receive", "os_update", "screen_view", "session_start",
     "user_engagement"}
)  # fmt: skip
GA4_RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
GA4_BODY_KEYS = frozenset(
    {"client_id", "user_id", "timestamp_micros", "user_properties", "user_data", "consent",
     "non_personalized_ads", "user_location", "ip_override", "device", "user_agent",
     "validation_behavior", "events"}
)  # fmt: skip
# The Measurement Protocol reference's consent object and user-provided data.
GA4_CONSENT_KEYS = frozenset({"ad_user_data", "ad_personalization"})
GA4_CONSENT_STATES = frozenset({"GRANTED", "DENIED"})
GA4_USER_DATA_LISTS = ("sha256_email_address", "sha256_phone_number")
GA4_ADDRESS_HASHED = frozenset({"sha256_first_name", "sha256_last_name", "sha256_street"})
GA4_ADDRESS_PLAIN = frozenset({"city", "region", "postal_code", "country"})
GA4_LONG_VALUES = {"page_location": 1000, "page_referrer": 420, "page_title": 300}
GA4_MAX_BODY = 130_000
GA4_MAX_AGE = 72 * 3600


class FakeGA4(FakePlatform):
    """GA4's Measurement Protocol: C{POST /mp/collect} and C{/debug/mp/collect}."""

    events_key = "events"

    def __init__(self, measurement_id: str = "G-TEST", api_secret: str = "ga-secret", **kw):
        super().__init__(**kw)
        self.measurement_id, self.api_secret = measurement_id, api_secret

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        if recorded.path not in ("/mp/collect", "/debug/mp/collect"):
            yield Violation("path", f"{recorded.path} is not /mp/collect")
        for key, expected in (("measurement_id", self.measurement_id), ("api_secret", self.api_secret)):
            if recorded.query.get(key) != [expected]:
                yield Violation(key, "missing or not this stream's")
        if len(recorded.raw) >= GA4_MAX_BODY:
            size = len(recorded.raw)
            yield Violation("body", f"is {size} bytes; must be under 130 kB", "VALUE_OUT_OF_BOUNDS")
        body = recorded.body
        if not isinstance(body, dict):
            yield Violation("body", f"must be a JSON object {recorded.framing()}")
            return
        yield from self._check_body(body)

    def _check_body(self, body: dict) -> Iterator[Violation]:
        for key in sorted(set(body) - GA4_BODY_KEYS):
            yield Violation(key, "is not a Measurement Protocol field", "NAME_INVALID")
        if not isinstance(body.get("client_id"), str) or not body["client_id"]:
            yield Violation("client_id", "is required for a web stream", "VALUE_REQUIRED")
        if "timestamp_micros" in body:
            yield from self._check_micros("timestamp_micros", body["timestamp_micros"])
        if "ip_override" in body:
            yield from check_ip("ip_override", body["ip_override"])
        if "user_agent" in body and (not isinstance(body["user_agent"], str) or not body["user_agent"]):
            yield Violation("user_agent", "must be a user agent string")
        if "consent" in body:
            yield from self._check_consent(body["consent"])
        if "user_data" in body:
            yield from self._check_user_data(body["user_data"])
        events = body.get("events")
        if not isinstance(events, list) or not 1 <= len(events) <= 25:
            yield Violation("events", "must hold 1 to 25 events", "EXCEEDED_MAX_ENTITIES")
            return
        for i, event in enumerate(events):
            yield from self._check_event(f"events[{i}]", event)

    def _check_consent(self, consent: Any) -> Iterator[Violation]:
        if not isinstance(consent, dict):
            yield Violation("consent", "must be an object")
            return
        for key, value in consent.items():
            if key not in GA4_CONSENT_KEYS:
                yield Violation(f"consent.{key}", "is not a consent type", "NAME_INVALID")
            elif value not in GA4_CONSENT_STATES:
                yield Violation(f"consent.{key}", "must be GRANTED or DENIED")

    def _check_user_data(self, user_data: Any) -> Iterator[Violation]:
        if not isinstance(user_data, dict):
            yield Violation("user_data", "must be an object")
            return
        for key in sorted(set(user_data) - {*GA4_USER_DATA_LISTS, "address"}):
            yield Violation(f"user_data.{key}", "is not a user-provided data field", "NAME_INVALID")
        for key in GA4_USER_DATA_LISTS:
            values = user_data.get(key, [])
            if not isinstance(values, list) or not values and key in user_data:
                yield Violation(f"user_data.{key}", "must be a non-empty list")
                continue
            for value in values:
                yield from check_hashed(f"user_data.{key}[]", value)
        addresses = user_data.get("address", [])
        if not isinstance(addresses, list) or not all(isinstance(a, dict) and a for a in addresses):
            yield Violation("user_data.address", "must be a list of address objects")
            return
        for i, address in enumerate(addresses):
            for key, value in address.items():
                where = f"user_data.address[{i}].{key}"
                if key in GA4_ADDRESS_HASHED:
                    yield from check_hashed(where, value)
                elif key not in GA4_ADDRESS_PLAIN:
                    yield Violation(where, "is not an address field", "NAME_INVALID")

    def _check_micros(self, field: str, value: Any) -> Iterator[Violation]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 10**15:
            yield Violation(field, "must be Unix time in microseconds")
            return
        yield from self._check_event_time(field, value // 10**6, GA4_MAX_AGE)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        if not isinstance(event, dict) or not isinstance(event.get("params", {}), dict):
            yield Violation(where, "must be an object with a params object")
            return
        for key in sorted(set(event) - {"name", "params", "timestamp_micros"}):
            yield Violation(f"{where}.{key}", "is not an event field", "NAME_INVALID")
        name = event.get("name")
        if not isinstance(name, str) or not GA4_NAME.fullmatch(name):
            rule = "letters, digits, _, from a letter, <= 40"
            yield Violation(f"{where}.name", f"{name!r}: {rule}", "NAME_INVALID")
        elif name in GA4_RESERVED_EVENTS:
            yield Violation(f"{where}.name", f"{name} is reserved", "NAME_RESERVED")
        if "timestamp_micros" in event:
            yield from self._check_micros(f"{where}.timestamp_micros", event["timestamp_micros"])
        yield from self._check_params(f"{where}.params", event.get("params", {}))

    def _check_params(self, where: str, params: dict) -> Iterator[Violation]:
        if len(params) > 25:
            yield Violation(where, f"has {len(params)} parameters; at most 25", "EXCEEDED_MAX_ENTITIES")
        for key in ("session_id", "engagement_time_msec"):
            if key not in params:
                needed = "is needed for the event to appear in reports"
                yield Violation(f"{where}.{key}", needed, "VALUE_REQUIRED")
        engagement = params.get("engagement_time_msec", 1)
        if isinstance(engagement, bool) or not isinstance(engagement, (int, float)) or engagement <= 0:
            yield Violation(f"{where}.engagement_time_msec", "must be a number above 0")
        currency = params.get("currency")
        if currency is not None and not (isinstance(currency, str) and re.fullmatch(r"[A-Z]{3}", currency)):
            yield Violation(f"{where}.currency", "must be an upper-case ISO 4217 code")
        for key, value in params.items():
            if key == "items":
                yield from self._check_items(f"{where}.items", value)
            else:
                yield from self._check_param(where, key, value)

    def _check_param(self, where: str, key: Any, value: Any, limit: int | None = None) -> Iterator[Violation]:
        if not isinstance(key, str) or not GA4_NAME.fullmatch(key) or key.startswith(GA4_RESERVED_PREFIXES):
            yield Violation(f"{where}.{key}", "is not a valid parameter name", "NAME_INVALID")
        limit = limit or GA4_LONG_VALUES.get(key, 100)
        if isinstance(value, str):
            if len(value) > limit:
                too_long = f"is {len(value)} characters; at most {limit}"
                yield Violation(f"{where}.{key}", too_long, "VALUE_OUT_OF_BOUNDS")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            yield Violation(f"{where}.{key}", "must be a string or a number")

    def _check_items(self, where: str, items: Any) -> Iterator[Violation]:
        if not isinstance(items, list) or not items:
            yield Violation(where, "must be a non-empty list")
            return
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not ({"item_id", "item_name"} & set(item)):
                yield Violation(f"{where}[{i}]", "needs item_id or item_name", "VALUE_REQUIRED")
                continue
            for key, value in item.items():
                yield from self._check_param(f"{where}[{i}]", key, value, 100)

    def answer(self, recorded: Recorded) -> Answer:
        if recorded.path == "/debug/mp/collect":
            messages = [
                {"fieldPath": v.field, "description": v.message, "validationCode": v.code}
                for v in recorded.violations
            ]
            return Answer(200, {"validationMessages": messages})
        return Answer(204)

    def injected_answer(self, injection: Injection) -> Answer:
        return Answer(injection.status or 500)


# -- TikTok -------------------------------------------------------------------------

TIKTOK_PATH = "/open_api/v1.3/event/track/"
TIKTOK_HASHED = ("email", "phone", "external_id")
TIKTOK_RAW = ("ip", "user_agent", "ttclid", "ttp")
TIKTOK_CONTENT_KEYS = frozenset(
    {"content_id", "content_type", "content_name", "content_category", "price", "quantity", "brand"}
)


class FakeTikTok(FakePlatform):
    """TikTok's Events API 2.0: C{POST /open_api/v1.3/event/track/} with C{Access-Token}."""

    def __init__(self, pixel_code="CTEST123", access_token="tt-token", max_events=1000, **kw) -> None:
        super().__init__(**kw)
        self.pixel_code, self.access_token, self.max_events = pixel_code, access_token, max_events

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        if recorded.path != TIKTOK_PATH:
            yield Violation("path", f"{recorded.path} is not {TIKTOK_PATH}")
        if recorded.headers.get("access-token") != self.access_token:
            yield Violation("Access-Token", "missing or wrong", "BAD_TOKEN")
        body = recorded.body
        if not isinstance(body, dict):
            yield Violation("body", f"must be a JSON object {recorded.framing()}")
            return
        if body.get("event_source") != "web":
            yield Violation("event_source", "must be 'web'")
        if body.get("event_source_id") != self.pixel_code:
            yield Violation("event_source_id", "must be the pixel code")
        data = body.get("data")
        if not isinstance(data, list) or not 1 <= len(data) <= self.max_events:
            yield Violation("data", f"must be a list of 1 to {self.max_events} events")
            return
        for i, event in enumerate(data):
            yield from self._check_event(f"data[{i}]", event)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        if not isinstance(event, dict):
            yield Violation(where, "must be an object")
            return
        for key in ("event", "event_id"):
            if not isinstance(event.get(key), str) or not event[key]:
                yield Violation(f"{where}.{key}", "is required")
        yield from self._check_event_time(f"{where}.event_time", event.get("event_time"), 7 * DAY)
        user = event.get("user", {})
        if not isinstance(user, dict):
            yield Violation(f"{where}.user", "must be an object")
            user = {}
        for key in TIKTOK_HASHED:
            if key in user:
                yield from check_hashed(f"{where}.user.{key}", user[key])
        for key in TIKTOK_RAW:
            if key in user:
                yield from check_not_hashed(f"{where}.user.{key}", user[key])
        if "ip" in user:
            yield from check_ip(f"{where}.user.ip", user["ip"])
        page = event.get("page", {})
        if not isinstance(page, dict):
            page = {"url": None}
        if "url" in page and not str(page["url"]).startswith(("http://", "https://")):
            yield Violation(f"{where}.page.url", "must be an http(s) URL")
        yield from self._check_properties(f"{where}.properties", event.get("properties", {}))

    def _check_properties(self, where: str, properties: Any) -> Iterator[Violation]:
        if not isinstance(properties, dict):
            yield Violation(where, "must be an object")
            return
        contents = properties.get("contents", [])
        if not isinstance(contents, list):
            yield Violation(f"{where}.contents", "must be a list")
            return
        for i, content in enumerate(contents):
            if not isinstance(content, dict) or not set(content) <= TIKTOK_CONTENT_KEYS:
                yield Violation(f"{where}.contents[{i}]", f"keys must be among {sorted(TIKTOK_CONTENT_KEYS)}")

    def answer(self, recorded: Recorded) -> Answer:
        codes = {v.code for v in recorded.violations}
        if "BAD_TOKEN" in codes:
            return self._reply(40105, "Access token is incorrect or has been revoked.")
        if recorded.violations:
            return self._reply(40002, "Invalid parameters: " + "; ".join(map(str, recorded.violations)))
        return self._reply(0, "OK")

    def injected_answer(self, injection: Injection) -> Answer:
        code = injection.code if injection.code is not None else 40700
        return self._reply(code, "Injected failure", injection.status or 200)

    def _reply(self, code: int, message: str, status: int = 200) -> Answer:
        request_id = f"fake-request-{len(self.requests)}"
        return Answer(status, {"code": code, "message": message, "request_id": request_id, "data": {}})


# -- serving ------------------------------------------------------------------------


@attrs.define
class Served:
    """A fake listening on loopback."""

    fake: FakePlatform
    port: Any  # the IListeningPort

    @property
    def base(self) -> str:
        """The base URL to configure as a destination's C{endpoint}."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        self.fake.close()
        await self.port.stopListening()


def serve(fake: FakePlatform, reactor=None) -> Served:
    """Listen for C{fake} on a free loopback port."""
    site = Site(fake)
    site.noisy = False
    reactor = reactor if reactor is not None else _global_reactor
    return Served(fake, reactor.listenTCP(0, site, interface="127.0.0.1"))


# -- sample events ------------------------------------------------------------------


def make_event(**fields: Any) -> Event:
    """A fully enriched purchase happening now; C{fields} override any attribute."""
    values: dict[str, Any] = {
        "event_name": "Purchase",
        "event_id": "evt-1",
        "event_time": int(time.time()),
        "source_url": "https://shop.example/checkout/done?order=A-1001",
        "client_ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "referrer": "https://shop.example/checkout",
        "custom_data": {"currency": "EUR", "value": 25.0, "order_id": "A-1001"},
        "contents": (
            {"id": "sku-1", "title": "Blue mug", "item_price": 12.5, "quantity": 2, "category": "Kitchen"},
        ),
        "user_data": {"em": (" Joe@Example.COM",), "ph": ("+49 30 1234567",)},
        "fbp": "fb.1.1706540400000.1234567890",
        "fbc": "fb.1.1706540400000.IwAR2xYz",
        "ttclid": "E.C.P.abc123",
        "ttp": "2Hk4x7bFq9",
        "ga_client_id": "1234567890.1706540400",
        "ga_session_id": "1706540400",
        "consent": frozenset({"marketing", "analytics"}),
    }
    values.update(fields)
    return Event(**values)
