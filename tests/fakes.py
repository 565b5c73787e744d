"""Fake Meta, GA4, TikTok, Pinterest, Snapchat, Reddit and Microsoft servers that check
payloads as each platform documents them.

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
  - Pinterest answers each event's status, C{processed} or C{failed} (those in
    C{refuse_ids}), 401 code 2 for a wrong token and 400 code 4196 for a bad request;
  - Snapchat answers C{{"status": "VALID"}}, or C{INVALID} with its reasons (HTTP 400,
    401 for a wrong token);
  - Reddit answers C{{"data": {"message": ...}}}, or 400 with the fields at fault (none
    of the batch processed), 401 C{UNAUTHORIZED};
  - Microsoft answers C{{"eventsReceived": N}}, or 400 C{ValidationError} with details
    by event index, 401 for a wrong token.

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

from tagd.tagging.events import Event

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


# -- Pinterest, Snapchat, Reddit, Microsoft ----------------------------------------


def check_bearer(recorded: Recorded, token: str) -> Iterator[Violation]:
    if recorded.headers.get("authorization") != f"Bearer {token}":
        yield Violation("Authorization", "missing or not Bearer and the token", "BAD_TOKEN")


def check_hashed_strings(where: str, fields: dict, keys: tuple[str, ...], *, lists: bool | None) -> Iterator[Violation]:
    """Hashed fields: lists of digests (C{lists}), single digests (not C{lists}), or either."""
    for key in keys:
        if key not in fields:
            continue
        value = fields[key]
        if lists is True and not isinstance(value, list):
            yield Violation(f"{where}.{key}", "must be a list of SHA-256 digests")
        elif lists is False and not isinstance(value, str):
            yield Violation(f"{where}.{key}", "must be one SHA-256 digest, not a list")
        else:
            yield from check_hashed(f"{where}.{key}", value)


def check_raw(where: str, fields: dict, keys: tuple[str, ...], ip_key: str) -> Iterator[Violation]:
    for key in keys:
        if key in fields:
            yield from check_not_hashed(f"{where}.{key}", fields[key])
    if ip_key in fields:
        yield from check_ip(f"{where}.{ip_key}", fields[ip_key])


def check_keys(where: str, document: Any, allowed: frozenset[str]) -> Iterator[Violation]:
    if not isinstance(document, dict):
        yield Violation(where, "must be an object")
        return
    for key in sorted(set(document) - allowed):
        yield Violation(f"{where}.{key}", "is not a documented key", "EXTRA_KEY")


class FakeConversions(FakePlatform):
    """What the fakes of the four later platforms share: an id in the path, a token, a
    limit of events per request, and a body whose C{data} list holds the events."""

    body_keys: frozenset[str] = frozenset({"data"})

    def __init__(self, platform_id: str, access_token: str, max_events: int, **kw) -> None:
        super().__init__(**kw)
        self.platform_id, self.access_token, self.max_events = platform_id, access_token, max_events

    def check_data(self, recorded: Recorded) -> Iterator[Violation]:
        body = recorded.body
        yield from check_keys("body", body, self.body_keys)
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            yield Violation("data", f"the body must hold a data list {recorded.framing()}")
            return
        if not 1 <= len(body["data"]) <= self.max_events:
            yield Violation("data", f"must hold 1 to {self.max_events} events")
        for i, event in enumerate(body["data"]):
            yield from self._check_event(f"data[{i}]", event)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        raise NotImplementedError


PINTEREST_EVENT_NAMES = frozenset(
    {"add_payment_info", "add_to_cart", "add_to_wishlist", "app_install", "app_open", "checkout",
     "contact", "custom", "customize_product", "find_location", "initiate_checkout", "lead",
     "page_visit", "schedule", "search", "signup", "start_trial", "submit_application",
     "subscribe", "view_category", "view_content", "watch_video"}
)  # fmt: skip
PINTEREST_EVENT_KEYS = frozenset(
    {"event_name", "action_source", "event_time", "event_id", "event_source_url", "opt_out",
     "partner_name", "user_data", "custom_data", "app_id", "app_name", "app_version",
     "device_brand", "device_carrier", "device_model", "device_type", "os_version", "wifi",
     "language", "app_info", "device_info"}
)  # fmt: skip
PINTEREST_HASHED = ("em", "ph", "ge", "db", "ln", "fn", "ct", "st", "zp", "country", "external_id", "hashed_maids")
PINTEREST_RAW = ("client_ip_address", "client_user_agent", "click_id", "partner_id")
PINTEREST_CUSTOM_KEYS = frozenset(
    {"currency", "value", "content_ids", "content_name", "content_category", "content_brand",
     "contents", "num_items", "order_id", "search_string", "opt_out_type", "np", "predicted_ltv"}
)  # fmt: skip
PINTEREST_CONTENT_KEYS = frozenset({"id", "item_price", "quantity", "item_name", "item_category", "item_brand"})
DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class FakePinterest(FakeConversions):
    """Pinterest's API for Conversions: C{POST /v5/ad_accounts/{id}/events}, Bearer token.

    It answers each event's status (C{processed} or C{failed}); those whose event id is in
    C{refuse_ids} fail, answered with C{partial_status} (200 as documented, or a 422).
    """

    def __init__(self, ad_account_id="549755885175", access_token="pin-token", max_events=1000, **kw) -> None:
        super().__init__(ad_account_id, access_token, max_events, **kw)
        self.refuse_ids: set[str] = set()
        self.partial_status = 200

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        path = f"/v5/ad_accounts/{self.platform_id}/events"
        if recorded.path != path:
            yield Violation("path", f"{recorded.path} is not {path}")
        if recorded.query not in ({}, {"test": ["true"]}):
            yield Violation("query", "may only be ?test=true")
        yield from check_bearer(recorded, self.access_token)
        yield from self.check_data(recorded)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        yield from check_keys(where, event, PINTEREST_EVENT_KEYS)
        if not isinstance(event, dict):
            return
        for key in ("event_name", "action_source", "event_time", "user_data", "event_id"):
            if key not in event:
                yield Violation(f"{where}.{key}", "is required")
        if event.get("event_name") not in PINTEREST_EVENT_NAMES:
            yield Violation(f"{where}.event_name", f"{event.get('event_name')!r} is not a Pinterest event name")
        if event.get("action_source") not in ("web", "app_android", "app_ios", "offline"):
            yield Violation(f"{where}.action_source", "must be web, app_android, app_ios or offline")
        if not isinstance(event.get("event_id"), str):
            yield Violation(f"{where}.event_id", "must be a string")
        yield from self._check_event_time(f"{where}.event_time", event.get("event_time"), 7 * DAY)
        if not isinstance(event.get("opt_out", False), bool):
            yield Violation(f"{where}.opt_out", "must be a boolean")
        user = event.get("user_data", {})
        if isinstance(user, dict):
            yield from check_hashed_strings(f"{where}.user_data", user, PINTEREST_HASHED, lists=True)
            yield from check_raw(f"{where}.user_data", user, PINTEREST_RAW, "client_ip_address")
            if "em" not in user and not {"client_ip_address", "client_user_agent"} <= set(user):
                yield Violation(f"{where}.user_data", "needs em, or client_ip_address and client_user_agent")
        yield from self._check_custom(f"{where}.custom_data", event.get("custom_data", {}))

    def _check_custom(self, where: str, custom: Any) -> Iterator[Violation]:
        yield from check_keys(where, custom, PINTEREST_CUSTOM_KEYS)
        if not isinstance(custom, dict):
            return
        for key in ("value", "predicted_ltv"):
            if key in custom and not (isinstance(custom[key], str) and DECIMAL.fullmatch(custom[key])):
                yield Violation(f"{where}.{key}", "must be a decimal string")
        if "content_ids" in custom and not all(isinstance(i, str) for i in _values(custom["content_ids"])):
            yield Violation(f"{where}.content_ids", "must be a list of strings")
        for i, content in enumerate(custom.get("contents", [])):
            yield from check_keys(f"{where}.contents[{i}]", content, PINTEREST_CONTENT_KEYS)
            if isinstance(content, dict) and not isinstance(content.get("item_price", ""), str):
                yield Violation(f"{where}.contents[{i}].item_price", "must be a string")
            if isinstance(content, dict) and not isinstance(content.get("quantity", 0), int):
                yield Violation(f"{where}.contents[{i}].quantity", "must be a whole number")

    def answer(self, recorded: Recorded) -> Answer:
        codes = {v.code for v in recorded.violations}
        if "BAD_TOKEN" in codes:
            return Answer(401, {"code": 2, "message": "Authentication failed."})
        if recorded.violations:
            return Answer(400, {"code": 4196, "message": "; ".join(map(str, recorded.violations))})
        data = recorded.body["data"]
        statuses = [
            {"status": "failed", "error_message": "Event refused by the fake", "warning_message": None}
            if event["event_id"] in self.refuse_ids
            else {"status": "processed", "error_message": None, "warning_message": None}
            for event in data
        ]
        processed = sum(s["status"] == "processed" for s in statuses)
        document = {"num_events_received": len(data), "num_events_processed": processed, "events": statuses}
        return Answer(self.partial_status if processed < len(data) else 200, document)

    def injected_answer(self, injection: Injection) -> Answer:
        status = injection.status or 503
        code = injection.code if injection.code is not None else {429: 8, 401: 2, 403: 29}.get(status, 4197)
        return Answer(status, {"code": code, "message": "Injected failure"})


SNAPCHAT_EVENT_NAMES = frozenset(
    {"PAGE_VIEW", "VIEW_CONTENT", "LIST_VIEW", "ADD_CART", "ADD_TO_WISHLIST", "START_CHECKOUT",
     "ADD_BILLING", "PURCHASE", "SIGN_UP", "LOGIN", "SEARCH", "SUBSCRIBE", "START_TRIAL", "SAVE",
     "SHARE", "INVITE", "RESERVE", "RATE", "AD_CLICK", "AD_VIEW", "COMPLETE_TUTORIAL",
     "LEVEL_COMPLETE", "ACHIEVEMENT_UNLOCKED", "SPENT_CREDITS", "APP_INSTALL", "APP_OPEN",
     "CUSTOM_EVENT_1", "CUSTOM_EVENT_2", "CUSTOM_EVENT_3", "CUSTOM_EVENT_4", "CUSTOM_EVENT_5"}
)  # fmt: skip
SNAPCHAT_HASHED = ("em", "ph", "fn", "ln", "ge", "ct", "st", "zp", "country", "external_id")
SNAPCHAT_RAW = ("client_ip_address", "client_user_agent", "sc_click_id", "sc_cookie1")


class FakeSnapchat(FakeConversions):
    """Snapchat's Conversions API: C{POST /v3/{pixel_id}/events?access_token=...}."""

    body_keys = frozenset({"data", "test_event_code"})

    def __init__(self, pixel_id="snap-pixel-1", access_token="snap-token", max_events=2000, **kw) -> None:
        super().__init__(pixel_id, access_token, max_events, **kw)

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        path = f"/v3/{self.platform_id}/events"
        if recorded.path != path:
            yield Violation("path", f"{recorded.path} is not {path}")
        if recorded.query.get("access_token") != [self.access_token]:
            yield Violation("access_token", "missing or wrong", "BAD_TOKEN")
        yield from self.check_data(recorded)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        if not isinstance(event, dict):
            yield Violation(where, "must be an object")
            return
        name = event.get("event_name")
        if name not in SNAPCHAT_EVENT_NAMES:
            yield Violation(f"{where}.event_name", f"{name!r} is not a Snapchat event name")
        yield from self._check_event_time(f"{where}.event_time", event.get("event_time"), 37 * DAY)
        if event.get("action_source") != "WEB":
            yield Violation(f"{where}.action_source", "must be WEB for a website's event")
        if not str(event.get("event_source_url", "")).startswith(("http://", "https://")):
            yield Violation(f"{where}.event_source_url", "is required for WEB events")
        user = event.get("user_data")
        if not isinstance(user, dict):
            yield Violation(f"{where}.user_data", "is required")
            user = {}
        yield from check_hashed_strings(f"{where}.user_data", user, SNAPCHAT_HASHED, lists=None)
        yield from check_raw(f"{where}.user_data", user, SNAPCHAT_RAW, "client_ip_address")
        if not ({"em", "ph"} & set(user) or {"client_ip_address", "client_user_agent"} <= set(user)):
            yield Violation(f"{where}.user_data", "needs em, ph, or client_ip_address and client_user_agent")
        if event.get("data_processing_options", ["LDU"]) != ["LDU"]:
            yield Violation(f"{where}.data_processing_options", 'must be ["LDU"] when present')
        custom = event.get("custom_data", {})
        if name == "PURCHASE" and not (isinstance(custom, dict) and {"currency", "value"} <= set(custom)):
            yield Violation(f"{where}.custom_data", "a PURCHASE needs currency and value")

    def answer(self, recorded: Recorded) -> Answer:
        if "BAD_TOKEN" in {v.code for v in recorded.violations}:
            return Answer(401, {"status": "INVALID", "reason": "Invalid access token"})
        if recorded.violations:
            messages = [str(v) for v in recorded.violations]
            return Answer(400, {"status": "INVALID", "reason": "Invalid events", "errors": {"error_msgs": messages}})
        return Answer(200, {"status": "VALID", "reason": f"{len(recorded.body['data'])} events received"})

    def injected_answer(self, injection: Injection) -> Answer:
        return Answer(injection.status or 500, {"status": "INVALID", "reason": "Injected failure"})


REDDIT_TRACKING_TYPES = frozenset(
    {"PAGE_VISIT", "VIEW_CONTENT", "SEARCH", "ADD_TO_CART", "ADD_TO_WISHLIST", "PURCHASE", "LEAD", "SIGN_UP"}
)
REDDIT_HASHED = ("email", "phone_number", "external_id")
REDDIT_RAW = ("ip_address", "user_agent", "uuid")
REDDIT_LIMITED_DATA_USE = {"modes": ["LDU"]}
REDDIT_UUID = re.compile(r"\d{13}\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class FakeReddit(FakeConversions):
    """Reddit's Conversions API v3: C{POST /api/v3/pixels/{pixel_id}/conversion_events}."""

    def __init__(self, pixel_id="t2_abc123", access_token="rdt-token", max_events=1000, **kw) -> None:
        super().__init__(pixel_id, access_token, max_events, **kw)

    def events_of(self, body: Any) -> list[Any]:
        data = body.get("data") if isinstance(body, dict) else None
        return super().events_of({"data": data.get("events")} if isinstance(data, dict) else None)

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        path = f"/api/v3/pixels/{self.platform_id}/conversion_events"
        if recorded.path != path:
            yield Violation("path", f"{recorded.path} is not {path}")
        yield from check_bearer(recorded, self.access_token)
        agent = recorded.headers.get("user-agent", "")
        if not agent or agent.lower().startswith(("python", "twisted", "curl")):
            yield Violation("User-Agent", "a default user agent is throttled: name the sender")
        body = recorded.body
        data = body.get("data") if isinstance(body, dict) else None
        yield from check_keys("body", body, frozenset({"data"}))
        yield from check_keys("data", data, frozenset({"events", "test_id", "partner"}))
        events = data.get("events") if isinstance(data, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= self.max_events:
            yield Violation("data.events", f"must be a list of 1 to {self.max_events} events", "TOO_MANY")
            return
        for i, event in enumerate(events):
            yield from self._check_event(f"data.events[{i}]", event)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        if not isinstance(event, dict):
            yield Violation(where, "must be an object")
            return
        at = event.get("event_at")
        if isinstance(at, bool) or not isinstance(at, int) or at < 10**11:
            yield Violation(f"{where}.event_at", "must be Unix time in milliseconds")
        else:
            yield from self._check_event_time(f"{where}.event_at", at // 1000, 7 * DAY)
        if event.get("action_source") not in ("WEBSITE", "APP", "PHYSICAL_STORE", "OTHER"):
            yield Violation(f"{where}.action_source", "is required: WEBSITE, APP, PHYSICAL_STORE or OTHER")
        kind = event.get("type")
        tracking = kind.get("tracking_type") if isinstance(kind, dict) else None
        if tracking == "CUSTOM":
            custom_name = kind.get("custom_event_name")
            if not isinstance(custom_name, str) or not 1 <= len(custom_name) <= 64:
                yield Violation(f"{where}.type.custom_event_name", "a CUSTOM event needs a name of 1 to 64 characters")
        elif tracking not in REDDIT_TRACKING_TYPES:
            yield Violation(f"{where}.type.tracking_type", f"{tracking!r} is not a tracking type")
        user = event.get("user", {})
        if isinstance(user, dict):
            yield from check_hashed_strings(f"{where}.user", user, REDDIT_HASHED, lists=False)
            yield from check_raw(f"{where}.user", user, REDDIT_RAW, "ip_address")
            if "uuid" in user and not REDDIT_UUID.fullmatch(str(user["uuid"])):
                yield Violation(f"{where}.user.uuid", "must be {ms}.{RFC 4122 uuid}")
            options = user.get("data_processing_options", REDDIT_LIMITED_DATA_USE)
            if not isinstance(options, dict) or options.get("modes") != ["LDU"] or set(options) - {"modes", "country", "region"}:
                yield Violation(f"{where}.user.data_processing_options", 'must be {"modes": ["LDU"]}, with country and region')
        metadata = event.get("metadata", {})
        if isinstance(metadata, dict):
            if not isinstance(metadata.get("conversion_id"), str):
                yield Violation(f"{where}.metadata.conversion_id", "must carry the event id, to deduplicate")
            value = metadata.get("value", 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                yield Violation(f"{where}.metadata.value", "must be a number")

    def answer(self, recorded: Recorded) -> Answer:
        codes = {v.code for v in recorded.violations}
        if "BAD_TOKEN" in codes:
            return Answer(401, {"error": {"code": 401, "message": "UNAUTHORIZED"}})
        if "TOO_MANY" in codes:
            return Answer(400, {"error": {"code": 400, "message": "Bad Request"}})
        if recorded.violations:
            fields = [{"field": v.field, "message": v.message} for v in recorded.violations]
            count = len({v.field.split("]")[0] for v in recorded.violations})
            message = f"There were {count} invalid conversion events. None were processed."
            return Answer(400, {"error": {"code": 400, "message": message, "fields": fields}})
        count = len(self.events_of(recorded.body))
        return Answer(200, {"data": {"message": f"Successfully processed {count} conversion events."}})

    def injected_answer(self, injection: Injection) -> Answer:
        status = injection.status or 500
        return Answer(status, {"error": {"code": status, "message": "Injected failure"}})


MICROSOFT_HASHED = ("em", "ph", "externalId")
MICROSOFT_RAW = ("clientIpAddress", "clientUserAgent", "msclkid", "anonymousId")


class FakeMicrosoft(FakeConversions):
    """Microsoft's UET Conversions API: C{POST /v1/{tag_id}/events}, Bearer token."""

    body_keys = frozenset({"data", "dataProvider", "continueOnValidationError"})

    def __init__(self, tag_id="343000123", access_token="ms-token", max_events=1000, **kw) -> None:
        super().__init__(tag_id, access_token, max_events, **kw)

    def check(self, recorded: Recorded) -> Iterator[Violation]:
        path = f"/v1/{self.platform_id}/events"
        if recorded.path != path:
            yield Violation("path", f"{recorded.path} is not {path}")
        yield from check_bearer(recorded, self.access_token)
        yield from self.check_data(recorded)

    def _check_event(self, where: str, event: Any) -> Iterator[Violation]:
        if not isinstance(event, dict):
            yield Violation(where, "must be an object")
            return
        kind = event.get("eventType")
        if kind not in ("pageLoad", "custom"):
            yield Violation(f"{where}.eventType", "must be pageLoad or custom")
        if kind == "custom" and not event.get("eventName"):
            yield Violation(f"{where}.eventName", "is required for a custom event")
        if kind == "pageLoad" and not str(event.get("eventSourceUrl", "")).startswith(("http://", "https://")):
            yield Violation(f"{where}.eventSourceUrl", "is required for a pageLoad")
        if not isinstance(event.get("eventId"), str):
            yield Violation(f"{where}.eventId", "must carry the event id, to deduplicate")
        yield from self._check_event_time(f"{where}.eventTime", event.get("eventTime"), 7 * DAY)
        if event.get("adStorageConsent", "G") not in ("G", "D"):
            yield Violation(f"{where}.adStorageConsent", "must be G (granted) or D (denied)")
        user = event.get("userData")
        if not isinstance(user, dict):
            yield Violation(f"{where}.userData", "is required")
            return
        yield from check_hashed_strings(f"{where}.userData", user, MICROSOFT_HASHED, lists=False)
        yield from check_raw(f"{where}.userData", user, MICROSOFT_RAW, "clientIpAddress")
        if str(user.get("msclkid", "")).startswith("_uet"):
            yield Violation(f"{where}.userData.msclkid", "must be the click id, not the _uetmsclkid cookie's value")

    def answer(self, recorded: Recorded) -> Answer:
        if "BAD_TOKEN" in {v.code for v in recorded.violations}:
            return Answer(401, {"error": {"code": "Unauthorized", "message": "Invalid token"}})
        if recorded.violations:
            details = [
                {"index": int(re.match(r"data\[(\d+)\]", v.field)[1]) if v.field.startswith("data[") else None,
                 "propertyName": v.field, "errorMessage": v.message, "errorCode": v.code, "isWarning": False}
                for v in recorded.violations
            ]  # fmt: skip
            return Answer(400, {"error": {"code": "ValidationError", "message": "Invalid events", "details": details}})
        return Answer(200, {"eventsReceived": len(recorded.body["data"])})

    def injected_answer(self, injection: Injection) -> Answer:
        return Answer(injection.status or 500, {"error": {"code": "InternalError", "message": "Injected failure"}})


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
        "epik": "dj0yJnU9ZXBpay0x",
        "scclid": "6f1e2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
        "scid": "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d",
        "rdt_cid": "3184742045291813272",
        "rdt_uuid": "1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132",
        "msclkid": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
        "uetvid": "0d3c2b1a9f8e7d6c5b4a39281706f5e4",
        "consent": frozenset({"marketing", "analytics"}),
    }
    values.update(fields)
    return Event(**values)
