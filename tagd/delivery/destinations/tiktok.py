"""TikTok Events API 2.0: events as C{/open_api/v1.3/event/track/} takes them.

TikTok names some events differently from Meta (a purchase is C{CompletePayment}),
answers HTTP 200 even when it refuses a request, and hashes its own few user fields
(L{tagd.tagging.hashing.tiktok_user_fields}).  IP, user agent, C{ttclid} and C{ttp} go raw.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Sequence

import attrs

from tagd.delivery.destinations import KeySpec, Outcome
from tagd.delivery.destinations._common import RequestParts, json_int, status_outcome, without_empty
from tagd.delivery.destinations._platform import (
    PlatformDestination,
    mapped_name,
    platform_fields,
    platform_keys,
)
from tagd.tagging.events import Event
from tagd.tagging.hashing import tiktok_user_fields

TYPE = "tiktok"
# TikTok does not document a batch limit; 1000 is the figure commonly quoted.
KEYS: dict[str, KeySpec] = platform_keys(
    "pixel_code", endpoint="https://business-api.tiktok.com", max_batch=1000
)
SECRETS = ("access_token",)
# The pixel code is every request's event_source_id: one mistyped fails them all.
FORMATS = {"pixel_code": (re.compile(r"[A-Za-z0-9]+"), "the pixel code, letters and digits only")}
# TikTok gives no advice; its API is often further away than Meta's, hence more than 1.5 s.
DEFAULT_TIMEOUT = 3.0
# A request carries up to 1000 events: two in flight drain any backlog.
DEFAULT_CONCURRENCY = 2
PATH = "/open_api/v1.3/event/track/"

# Meta's standard names that TikTok spells otherwise; any other name passes unchanged.
DEFAULT_EVENT_NAMES = {
    "Purchase": "CompletePayment",
    "InitiateCheckout": "InitiateCheckout",
    "ViewContent": "ViewContent",
    "AddToCart": "AddToCart",
    "Search": "Search",
    "Lead": "SubmitForm",
    "CompleteRegistration": "CompleteRegistration",
    "AddPaymentInfo": "AddPaymentInfo",
    # TikTok's own server-side tag template sends page views as "Pageview".
    "PageView": "Pageview",
}

# TikTok's answer codes and what they ask of a sender.
THROTTLE_CODES = frozenset({40100})
TRANSIENT_CODES = frozenset({40700})
PERMANENT_CODES = frozenset({40002})  # invalid parameters
# The token, not the events: 40001 no permission for the pixel, 40105 a token that is
# wrong or revoked.
AUTH_CODES = frozenset({40001, 40105})
# 5xxxx: TikTok's own system errors, worth another try.
SYSTEM_ERRORS = range(50000, 60000)


def _content(item: Mapping[str, Any]) -> dict[str, Any]:
    """One tagd content as a TikTok content."""
    return without_empty(
        {
            "content_id": item["id"],
            "content_type": "product",
            "content_name": item.get("title"),
            "content_category": item.get("category"),
            "price": item.get("item_price"),
            "quantity": item.get("quantity"),
        }
    )


def properties(event: Event) -> dict[str, Any]:
    """TikTok's C{properties}, read from the Meta-style custom data and the contents."""
    custom = event.custom_data
    contents = [_content(item) for item in event.contents]
    return without_empty(
        {
            "contents": contents,
            "content_type": custom.get("content_type", "product" if contents else None),
            "value": custom.get("value"),
            "currency": custom.get("currency"),
            "order_id": custom.get("order_id"),
            # Meta calls the search query search_string.
            "query": custom.get("query", custom.get("search_string")),
        }
    )


def _one_or_many(values: list[str]) -> str | list[str]:
    """A single value as a string, several as a list: TikTok takes both, and a string is
    what its own clients send."""
    return values[0] if len(values) == 1 else values


def user(event: Event) -> dict[str, Any]:
    """Raw identifiers as they are, and the hashed email, phone and external id."""
    raw = {
        "ip": event.client_ip,
        "user_agent": event.user_agent,
        "ttclid": event.ttclid,
        "ttp": event.ttp,
    }
    hashed = tiktok_user_fields(event.user_data)
    return without_empty(raw) | {key: _one_or_many(values) for key, values in hashed.items()}


def payload(
    event: Event, event_names: Mapping[str, str] = {}, limited_data_use: bool = False
) -> dict[str, Any]:
    """One event exactly as it goes into TikTok's C{data} array."""
    document = {
        "event": mapped_name(event.event_name, event_names, DEFAULT_EVENT_NAMES),
        "event_time": event.event_time,
        "event_id": event.event_id,
        "user": user(event),
        "page": without_empty({"url": event.source_url, "referrer": event.referrer}),
        "properties": properties(event),
    }
    return without_empty(document) | {"limited_data_use": limited_data_use}


def _code_outcome(code: int) -> Outcome:
    if code in THROTTLE_CODES:
        return Outcome.THROTTLE
    if code in TRANSIENT_CODES or code in SYSTEM_ERRORS:
        return Outcome.TRANSIENT
    if code in AUTH_CODES:
        return Outcome.AUTH
    return Outcome.PERMANENT  # 40002 (invalid parameters) and every code we do not know.


def _message(status: int, answer: Mapping[str, Any] | None, code: int | None) -> str:
    if code is None:
        return f"HTTP {status} without a TikTok answer code"
    message = f"HTTP {status}, TikTok code {code}: {answer.get('message', 'no message')}"
    if answer.get("request_id"):
        message += f" request_id={answer['request_id']}"
    return message


def _judge(status: int, answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """HTTP 408, 429 and 5xx decide first; then TikTok's code, which only a 2xx can carry."""
    code = json_int(answer, "code") if answer else None
    message = _message(status, answer, code)
    ok = 200 <= status < 300
    if by_status := status_outcome(status):
        return by_status, message
    if code is None:
        # A 200 that cannot be read proves nothing was accepted: try again later.
        return (Outcome.TRANSIENT if ok else Outcome.PERMANENT), message
    if not ok:
        return Outcome.PERMANENT, message
    return (Outcome.SUCCESS if code == 0 else _code_outcome(code)), message


@attrs.frozen(eq=False)
class TikTokDestination(PlatformDestination):
    """One TikTok pixel and the token allowed to send events to it."""

    type: ClassVar[str] = TYPE
    event_payload = staticmethod(payload)
    judge = staticmethod(_judge)

    pixel_code: str

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        # The token travels only in a header, so the URL is safe to log as it is.
        url = self.endpoint + PATH
        document = self.document(batch, event_source="web", event_source_id=self.pixel_code)
        return url, url, {"Access-Token": self.access_token}, document


def build(name: str, settings: Mapping[str, Any]) -> TikTokDestination:
    """A L{TikTokDestination} from the validated keys of one C{[[destinations]]} table."""
    return TikTokDestination(**platform_fields(name, KEYS, settings, None, FORMATS))
