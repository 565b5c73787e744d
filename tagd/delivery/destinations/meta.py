"""Meta Conversions API: events as Meta's C{/{pixel_id}/events} endpoint takes them.

Meta's own event names are tagd's, so names pass unchanged unless a destination
overrides them.  User data is normalised and hashed by L{tagd.tagging.hashing}; the IP address,
user agent and the C{fbp}/C{fbc} cookies are identifiers Meta must see raw.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Sequence
from urllib.parse import urlencode

import attrs
from twisted.web.http_headers import Headers

from tagd.delivery.destinations import KeySpec, Outcome
from tagd.delivery.destinations._common import (
    RequestParts,
    json_int,
    json_object,
    redact,
    status_outcome,
    without_empty,
)
from tagd.delivery.destinations._platform import (
    PlatformDestination,
    mapped_name,
    platform_fields,
    platform_keys,
)
from tagd.tagging.events import Event
from tagd.tagging.hashing import meta_user_data

TYPE = "meta"
# The newest Graph API version tagd knows (Meta's versions page: v26.0, released 29 July
# 2026), and the default.  Meta retires each version about two years after the next one
# comes out; C{tagd check-config} warns about an older one.
NEWEST_API_VERSION = "v26.0"
# Meta refuses a request carrying more events than this, whole.
MAX_EVENTS = 1000
KEYS: dict[str, KeySpec] = platform_keys(
    "pixel_id",
    endpoint="https://graph.facebook.com",
    max_batch=MAX_EVENTS,
    own={"api_version": ((str,), False, NEWEST_API_VERSION)},
)
SECRETS = ("access_token",)
# The pixel (dataset) id and the API version are path segments of the request's URL.
FORMATS = {
    "pixel_id": (re.compile(r"[0-9]+"), "the pixel's (dataset's) id, digits only"),
    "api_version": (re.compile(r"v[0-9]+\.[0-9]+"), 'a Graph API version such as "v24.0"'),
}
# Meta's advice: most answers come within 600 ms, give up after 1500 ms.
DEFAULT_TIMEOUT = 1.5
# A request carries up to 1000 events: two in flight drain any backlog.
DEFAULT_CONCURRENCY = 2

# Meta's error codes (error.code) and what they ask of a sender.
THROTTLE_CODES = frozenset({4, 17, 613, 80003, 80004})
# 2635: "You are calling a deprecated version of the Ads API": no event is at fault, and
# every request meets it, so the destination is out (its events wait) until the
# configuration names a current version (see MetaDestination.advice).
DEPRECATED_VERSION = 2635
TRANSIENT_CODES = frozenset({1, 2, 341, 368, 5000, DEPRECATED_VERSION})
# The header Meta adds to the answer of a call it upgraded from a retired version.
VERSION_WARNING = b"x-ad-api-version-warning"
PERMANENT_CODES = frozenset({100})
# The token or its permissions, not the events: 190 a bad or expired token, 102 an
# expired session, 10 and 200-299 no permission for the pixel (the Graph API's codes).
AUTH_CODES = frozenset({10, 102, 190, *range(200, 300)})
# Events for which Meta's standard parameters include the number of items bought.
COUNTED_EVENTS = frozenset({"InitiateCheckout", "Purchase"})


def _contents_fields(event: Event) -> dict[str, Any]:
    """Meta's product parameters derived from the event's contents (none if it has none)."""
    if not event.contents:
        return {}
    fields: dict[str, Any] = {
        "contents": [dict(item) for item in event.contents],
        "content_ids": [item["id"] for item in event.contents],
        "content_type": "product",
    }
    if event.event_name in COUNTED_EVENTS:
        fields["num_items"] = sum(item.get("quantity", 1) for item in event.contents)
    return fields


def custom_data(event: Event) -> dict[str, Any]:
    """The origin's custom data, completed from the contents; what the origin said wins."""
    return _contents_fields(event) | dict(event.custom_data)


def user_data(event: Event) -> dict[str, Any]:
    """Raw identifiers as they are, and every personal value hashed, in lists."""
    raw = {
        "client_ip_address": event.client_ip,
        "client_user_agent": event.user_agent,
        "fbp": event.fbp,
        "fbc": event.fbc,
    }
    return without_empty(raw) | meta_user_data(event.user_data)


def processing_options(limited_data_use: bool) -> dict[str, Any]:
    """Limited Data Use: C{0}/C{0} asks Meta to geolocate the visitor itself; off is C{[]}."""
    if not limited_data_use:
        return {"data_processing_options": []}
    return {
        "data_processing_options": ["LDU"],
        "data_processing_options_country": 0,
        "data_processing_options_state": 0,
    }


def payload(
    event: Event, event_names: Mapping[str, str] = {}, limited_data_use: bool = False
) -> dict[str, Any]:
    """One event exactly as it goes into Meta's C{data} array."""
    document = {
        "event_name": mapped_name(event.event_name, event_names, {}),
        "event_time": event.event_time,
        "event_id": event.event_id,
        "action_source": "website",
        "event_source_url": event.source_url,
        "referrer_url": event.referrer,
        "user_data": user_data(event),
        "custom_data": custom_data(event),
    }
    return without_empty(document) | processing_options(limited_data_use)


def version_tuple(version: str) -> tuple[int, ...]:
    """C{"v24.0"} as C{(24, 0)}, for comparing versions."""
    return tuple(int(part) for part in version.removeprefix("v").split("."))


def outdated(api_version: str) -> str | None:
    """Why C{api_version} should be changed, with the fix; None for the newest tagd knows."""
    if version_tuple(api_version) >= version_tuple(NEWEST_API_VERSION):
        return None
    return (
        f"api_version {api_version} is older than {NEWEST_API_VERSION}, the newest this tagd knows:"
        f' Meta retires old versions on a schedule; set api_version = "{NEWEST_API_VERSION}"'
        " (or leave it out for the default) in this [[destinations]] table"
    )


def _error_outcome(status: int, error: Mapping[str, Any]) -> Outcome:
    """Meta's code says more than the HTTP status; the status decides for unknown codes."""
    code = json_int(error, "code")
    if code in THROTTLE_CODES:
        return Outcome.THROTTLE
    if code in TRANSIENT_CODES or error.get("is_transient") is True:
        return Outcome.TRANSIENT
    if code in AUTH_CODES:
        return Outcome.AUTH
    if code in PERMANENT_CODES:
        return Outcome.PERMANENT
    return status_outcome(status) or Outcome.PERMANENT


def _error_message(status: int, error: Mapping[str, Any]) -> str:
    code, subcode = json_int(error, "code"), json_int(error, "error_subcode")
    parts = [f"HTTP {status}, Meta error {code}" + (f"/{subcode}" if subcode else "")]
    parts.append(f": {error.get('message', 'no message')}")
    if error.get("error_user_msg"):
        parts.append(f" ({error['error_user_msg']})")
    if error.get("fbtrace_id"):
        parts.append(f" fbtrace_id={error['fbtrace_id']}")
    return "".join(str(part) for part in parts)


def _success(answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """A 2xx is success unless Meta says it received none of the events sent."""
    answer = answer or {}
    received = json_int(answer, "events_received")
    trace = f" fbtrace_id={answer['fbtrace_id']}" if answer.get("fbtrace_id") else ""
    if received == 0:
        return Outcome.PERMANENT, f"Meta received 0 events: {answer.get('messages', [])}{trace}"
    count = "unknown" if received is None else received
    return Outcome.SUCCESS, f"events_received={count}{trace}"


def _judge(status: int, answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """Meta's error object decides when there is one; else a 2xx is read for the count of
    events received, and any other status judged by itself."""
    error = answer.get("error") if answer else None
    if isinstance(error, dict):
        return _error_outcome(status, error), _error_message(status, error)
    if 200 <= status < 300:
        return _success(answer)
    what = "no Meta error object" if answer is not None else "a body that is not a JSON object"
    return status_outcome(status) or Outcome.PERMANENT, f"HTTP {status} with {what}"


@attrs.frozen(eq=False)
class MetaDestination(PlatformDestination):
    """One Meta pixel (dataset) and the token allowed to send events to it."""

    type: ClassVar[str] = TYPE
    event_payload = staticmethod(payload)
    judge = staticmethod(_judge)

    pixel_id: str
    api_version: str

    def advice(self, status: int, headers: Headers, body: bytes) -> str | None:
        """The fix, when Meta says that C{api_version} is retired: error 2635, or the
        warning header of a call it upgraded."""
        warning = headers.getRawHeaders(VERSION_WARNING)
        error = (json_object(body) or {}).get("error") if status >= 400 else None
        retired = isinstance(error, dict) and json_int(error, "code") == DEPRECATED_VERSION
        if not (warning or retired):
            return None
        # Meta's own words, which could echo the request: never with its token.
        said = redact(warning[0].decode("latin-1"), (self.access_token,))[:200] if warning else "error 2635"
        fix = (
            f'set api_version = "{NEWEST_API_VERSION}" in this [[destinations]] table, then reload'
            if version_tuple(self.api_version) < version_tuple(NEWEST_API_VERSION)
            else "a newer tagd knows a newer version; meanwhile set api_version to the one Meta's versions page lists"
        )
        return f"Meta says API version {self.api_version} is retired or retiring ({said}): {fix}"

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        # The token travels only in the query string of url, never in log_url.
        log_url = f"{self.endpoint}/{self.api_version}/{self.pixel_id}/events"
        url = f"{log_url}?{urlencode({'access_token': self.access_token})}"
        return url, log_url, {}, self.document(batch)


def build(name: str, settings: Mapping[str, Any]) -> MetaDestination:
    """A L{MetaDestination} from the validated keys of one C{[[destinations]]} table."""
    return MetaDestination(**platform_fields(name, KEYS, settings, MAX_EVENTS, FORMATS))
