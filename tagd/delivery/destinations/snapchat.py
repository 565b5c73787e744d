"""Snapchat Conversions API (v3): events as C{/v3/{pixel_id}/events} takes them.

Snapchat names its events in upper snake case from a closed list, with five numbered
custom events (C{CUSTOM_EVENT_1} to C{_5}) instead of free names: an event without a
Snapchat name (a custom one that C{event_names} does not map) is not sent, and neither is a
purchase without its currency and value, which Snapchat requires
(L{SnapchatDestination.refusal}).  User data takes Meta's keys and rules
(L{tagd.tagging.hashing.snapchat_user_data}); the IP address, user agent, the click id (C{ScCid},
kept in C{_scclid}) and the pixel's C{_scid} go raw.  The token travels in the query
string, so the logged URL leaves it out.  A C{test_event_code} shows the events in the
pixel's test view only.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Sequence
from urllib.parse import urlencode

import attrs

from tagd.delivery.destinations import KeySpec, Outcome
from tagd.delivery.destinations._common import RequestParts, status_outcome, without_empty
from tagd.delivery.destinations._platform import (
    BEARER_TOKEN,
    TEST_EVENT_CODE,
    SelectiveDestination,
    conversion_keys,
    mapped_name,
    names_among,
    platform_fields,
)
from tagd.delivery.destinations.meta import custom_data as meta_custom_data
from tagd.tagging.events import Event
from tagd.tagging.hashing import snapchat_user_data

TYPE = "snapchat"
# Snapchat documents no limit; 2000 is what RudderStack's integration sends at most.
MAX_EVENTS = 2000
KEYS: dict[str, KeySpec] = conversion_keys(
    "pixel_id", endpoint="https://tr.snapchat.com", max_batch=1000, own=TEST_EVENT_CODE
)
SECRETS = ("access_token",)
FORMATS = {
    "pixel_id": (re.compile(r"[A-Za-z0-9-]+"), "the pixel's id, letters, digits and dashes"),
    # The token travels in the query string: no space or control character, whose encoded
    # forms a redaction of the token's own could miss.
    "access_token": (BEARER_TOKEN[0], "printable ASCII without spaces (it goes in the URL)"),
}
DEFAULT_TIMEOUT = 3.0
# A request carries up to its platform's batch of events: two in flight drain any backlog.
DEFAULT_CONCURRENCY = 2

# Snapchat's web event names; custom events are numbered.
EVENT_NAMES = frozenset(
    {
        "PAGE_VIEW", "VIEW_CONTENT", "LIST_VIEW", "ADD_CART", "ADD_TO_WISHLIST",
        "START_CHECKOUT", "ADD_BILLING", "PURCHASE", "SIGN_UP", "LOGIN", "SEARCH",
        "SUBSCRIBE", "START_TRIAL", "SAVE", "SHARE", "INVITE", "RESERVE", "RATE",
        "AD_CLICK", "AD_VIEW", "COMPLETE_TUTORIAL", "LEVEL_COMPLETE",
        "ACHIEVEMENT_UNLOCKED", "SPENT_CREDITS",
        *(f"CUSTOM_EVENT_{n}" for n in range(1, 6)),
    }
)  # fmt: skip
# Meta's standard names in Snapchat's words (Snap's own server-side tag's mapping).
DEFAULT_EVENT_NAMES: Mapping[str, str] = {
    "PageView": "PAGE_VIEW",
    "ViewContent": "VIEW_CONTENT",
    "AddToCart": "ADD_CART",
    "AddToWishlist": "ADD_TO_WISHLIST",
    "InitiateCheckout": "START_CHECKOUT",
    "AddPaymentInfo": "ADD_BILLING",
    "Purchase": "PURCHASE",
    "Lead": "SIGN_UP",
    "CompleteRegistration": "SIGN_UP",
    "Search": "SEARCH",
    "StartTrial": "START_TRIAL",
    "Subscribe": "SUBSCRIBE",
    "Schedule": "RESERVE",
}
# Snapchat's custom_data keys that tagd can fill from Meta-style data.
CUSTOM_DATA_KEYS = frozenset(
    {"currency", "value", "content_ids", "contents", "num_items", "order_id", "search_string", "content_category"}
)


def snapchat_name(event: Event, event_names: Mapping[str, str] = {}) -> str | None:
    """Snapchat's name for C{event}, or C{None} when it has none."""
    name = mapped_name(event.event_name, event_names, DEFAULT_EVENT_NAMES)
    return name if name in EVENT_NAMES else None


def custom_data(event: Event) -> dict[str, Any]:
    """Meta's custom data completed from the contents (Snapchat's keys are Meta's), kept to
    the keys Snapchat knows; each content as C{id}, C{quantity}, C{item_price}."""
    fields = {key: value for key, value in meta_custom_data(event).items() if key in CUSTOM_DATA_KEYS}
    if event.contents:
        fields["contents"] = [
            without_empty({"id": c["id"], "quantity": c.get("quantity"), "item_price": c.get("item_price")})
            for c in event.contents
        ]
    return fields


def user_data(event: Event) -> dict[str, Any]:
    """Raw identifiers as they are, and every personal value hashed, in lists."""
    raw = {
        "client_ip_address": event.client_ip,
        "client_user_agent": event.user_agent,
        "sc_click_id": event.scclid,
        "sc_cookie1": event.scid,
    }
    return without_empty(raw) | snapchat_user_data(event.user_data)


def payload(event: Event, event_names: Mapping[str, str] = {}, limited: bool = False) -> dict[str, Any]:
    """One event exactly as it goes into Snapchat's C{data} array (for an event that
    L{refusal} lets through); a C{limited} one carries Limited Data Use."""
    document = {
        "event_name": snapchat_name(event, event_names),
        "event_time": event.event_time,
        "event_id": event.event_id,
        "action_source": "WEB",
        "event_source_url": event.source_url,
        "user_data": user_data(event),
        "custom_data": custom_data(event),
        # Limited Data Use, named as Meta names it.
        "data_processing_options": ["LDU"] if limited else None,
    }
    return without_empty(document)


def refusal(event: Event, event_names: Mapping[str, str] = {}) -> str | None:
    """Why Snapchat cannot take C{event}: no Snapchat name, a purchase without currency
    and value, or no match key (e-mail, phone, or IP address with user agent)."""
    name = snapchat_name(event, event_names)
    if name is None:
        return f"snapchat has no name for {event.event_name!r}: map it in event_names (CUSTOM_EVENT_1 to 5)"
    custom = event.custom_data
    if name == "PURCHASE" and (custom.get("currency") is None or custom.get("value") is None):
        return "snapchat takes no PURCHASE without currency and value"
    if not (event.user_data.get("em") or event.user_data.get("ph") or (event.client_ip and event.user_agent)):
        return "snapchat needs the visitor's e-mail, phone, or both IP address and user agent"
    return None


def _judge(status: int, answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """The status decides first; then Snapchat's C{status}, C{VALID} or C{INVALID}."""
    answer = answer or {}
    state = answer.get("status")
    message = f"HTTP {status}" + (f", Snapchat {state}" if isinstance(state, str) else "")
    errors = answer.get("errors")
    texts = errors.get("error_msgs") if isinstance(errors, dict) else None
    reason = "; ".join(map(str, texts)) if isinstance(texts, list) and texts else answer.get("reason")
    if reason:
        message += f": {reason}"
    if by_status := status_outcome(status):
        return by_status, message
    if 200 <= status < 300:
        if state == "VALID":
            return Outcome.SUCCESS, message
        # INVALID is the events' fault; a 2xx that says neither proves nothing was taken.
        return (Outcome.PERMANENT if state == "INVALID" else Outcome.TRANSIENT), message
    return Outcome.PERMANENT, message


@attrs.frozen(eq=False)
class SnapchatDestination(SelectiveDestination):
    """One Snapchat pixel and the token allowed to send events to it."""

    type: ClassVar[str] = TYPE
    event_payload = staticmethod(payload)
    judge = staticmethod(_judge)

    pixel_id: str
    test_event_code: str | None

    def refusal(self, event: Event) -> str | None:
        return refusal(event, self.event_names)

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        # The token travels only in the query string of url, never in log_url.
        log_url = f"{self.endpoint}/v3/{self.pixel_id}/events"
        url = f"{log_url}?{urlencode({'access_token': self.access_token})}"
        document: dict[str, Any] = {"data": [self.payload(event) for event in batch]}
        if self.test_event_code:
            document["test_event_code"] = self.test_event_code
        return url, log_url, {}, document


def build(name: str, settings: Mapping[str, Any]) -> SnapchatDestination:
    """A L{SnapchatDestination} from the validated keys of one C{[[destinations]]} table."""
    fields = platform_fields(name, KEYS, settings, MAX_EVENTS, FORMATS)
    return SnapchatDestination(**fields | {"event_names": names_among(fields["event_names"], EVENT_NAMES, "Snapchat")})
