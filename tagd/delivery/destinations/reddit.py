"""Reddit Conversions API (v3): events as C{/api/v3/pixels/{pixel_id}/conversion_events}
takes them.

Reddit's body is C{{"data": {"events": [...]}}}, its times are Unix B{milliseconds}
(C{event_at}), and its event type is a standard C{tracking_type} or C{CUSTOM} with the name
(so Reddit takes every event).  tagd's event id is C{metadata.conversion_id}, on which
Reddit deduplicates against its pixel.  User data is hashed by Reddit's own rules
(L{tagd.tagging.hashing.reddit_user_fields}: no dots or "+tag" in an e-mail's local part, phone in
E.164); the click id (C{rdt_cid}, kept in C{_rdt_cid}), the pixel's C{_rdt_uuid}, IP and
user agent go raw.  Reddit throttles requests with a default user agent, so tagd names
itself.  A C{test_id} sends to Reddit's Event Testing view, which shows one event per
request: tagd then sends each event alone.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Sequence

import attrs

from tagd import __version__
from tagd.delivery.destinations import KeySpec, OutgoingRequest, Outcome
from tagd.delivery.destinations._common import RequestParts, encode_batches, finite_number, listed, status_judgement, without_empty
from tagd.delivery.destinations._platform import BEARER_TOKEN, ConversionsDestination, conversion_keys, mapped_name, platform_fields
from tagd.tagging.events import Event
from tagd.tagging.hashing import reddit_user_fields

TYPE = "reddit"
MAX_EVENTS = 1000
KEYS: dict[str, KeySpec] = conversion_keys(
    "pixel_id",
    endpoint="https://ads-api.reddit.com",
    max_batch=MAX_EVENTS,
    own={"test_id": ((str,), False, None)},
)
SECRETS = ("access_token",)
FORMATS = {
    "pixel_id": (re.compile(r"[A-Za-z0-9_]+"), 'the pixel\'s id, such as "t2_abc123"'),
    "access_token": BEARER_TOKEN,
}
DEFAULT_TIMEOUT = 3.0
# A request carries up to its platform's batch of events: two in flight drain any backlog.
DEFAULT_CONCURRENCY = 2
USER_AGENT = f"tagd/{__version__} (server-side conversions)"

TRACKING_TYPES = frozenset(
    {"PAGE_VISIT", "VIEW_CONTENT", "SEARCH", "ADD_TO_CART", "ADD_TO_WISHLIST", "PURCHASE", "LEAD", "SIGN_UP"}
)
CUSTOM = "CUSTOM"
MAX_CUSTOM_NAME = 64
# Meta's standard names as Reddit's tracking types; any other is CUSTOM with its name.
DEFAULT_EVENT_NAMES: Mapping[str, str] = {
    "PageView": "PAGE_VISIT",
    "ViewContent": "VIEW_CONTENT",
    "Search": "SEARCH",
    "AddToCart": "ADD_TO_CART",
    "AddToWishlist": "ADD_TO_WISHLIST",
    "Purchase": "PURCHASE",
    "Lead": "LEAD",
    "CompleteRegistration": "SIGN_UP",
}


def event_type(event: Event, event_names: Mapping[str, str] = {}) -> dict[str, str]:
    """Reddit's C{type}: a standard tracking type, else C{CUSTOM} named after the event."""
    name = mapped_name(event.event_name, event_names, DEFAULT_EVENT_NAMES)
    if name in TRACKING_TYPES:
        return {"tracking_type": name}
    return {"tracking_type": CUSTOM, "custom_event_name": name[:MAX_CUSTOM_NAME]}


def _product(item: Mapping[str, Any]) -> dict[str, Any]:
    return without_empty(
        {
            "id": item["id"],
            "name": item.get("title"),
            "category": item.get("category"),
            "quantity": item.get("quantity"),
            "item_price": item.get("item_price"),
        }
    )


def metadata(event: Event) -> dict[str, Any]:
    """Reddit's C{metadata}: the dedup key, money, and the products."""
    custom = event.custom_data
    currency = custom.get("currency")
    return without_empty(
        {
            "conversion_id": event.event_id,
            "currency": currency.upper() if isinstance(currency, str) else None,
            "value": finite_number(custom.get("value")),
            "item_count": sum(item.get("quantity", 1) for item in event.contents) or None,
            "products": [_product(item) for item in event.contents],
        }
    )


def user(event: Event, limited: bool = False) -> dict[str, Any]:
    """Raw identifiers as they are, the hashed e-mail, phone and external id, and Limited
    Data Use for a C{limited} event."""
    raw = {
        "ip_address": event.client_ip,
        "user_agent": event.user_agent,
        "uuid": event.rdt_uuid,
        # Limited Data Use, v3's successor of v2's user.opt_out.
        "data_processing_options": {"modes": ["LDU"]} if limited else None,
    }
    hashed = reddit_user_fields(event.user_data)
    # Reddit takes one value per field: the first the origin gave.
    return without_empty(raw) | {key: values[0] for key, values in hashed.items()}


def payload(event: Event, event_names: Mapping[str, str] = {}, limited: bool = False) -> dict[str, Any]:
    """One event exactly as it goes into Reddit's C{events} array."""
    document = {
        "event_at": event.event_time * 1000,
        "action_source": "WEBSITE",
        "type": event_type(event, event_names),
        "click_id": event.rdt_cid,
        "event_source_url": event.source_url,
        "user": user(event, limited),
        "metadata": metadata(event),
    }
    return without_empty(document)


def _judge(status: int, answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """By HTTP status, which Reddit's answers follow, with Reddit's message and the fields
    it names."""
    error = answer.get("error") if answer else None
    message = f"HTTP {status}"
    if isinstance(error, dict):
        message += f": {error.get('message', 'no message')}"
        message += listed(error.get("fields"), lambda f: f"{f.get('field')}: {f.get('message')}")
    elif answer and isinstance(answer.get("data"), dict) and answer["data"].get("message"):
        message += f": {answer['data']['message']}"
    return status_judgement(status), message


@attrs.frozen(eq=False)
class RedditDestination(ConversionsDestination):
    """One Reddit pixel and the conversion token allowed to send events to it."""

    type: ClassVar[str] = TYPE
    event_payload = staticmethod(payload)
    judge = staticmethod(_judge)

    pixel_id: str
    test_id: str | None

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        # The token travels only in a header, so the URL is safe to log as it is.
        url = f"{self.endpoint}/api/v3/pixels/{self.pixel_id}/conversion_events"
        data: dict[str, Any] = {"events": [self.payload(event) for event in batch]}
        if self.test_id:
            data["test_id"] = self.test_id
        headers = self.bearer() | {"User-Agent": USER_AGENT}
        return url, url, headers, {"data": data}

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """One request per C{max_batch} events; one per event with a C{test_id}, since
        Event Testing shows a request's first event only."""
        return encode_batches(events, 1 if self.test_id else self.max_batch, self._request)


def build(name: str, settings: Mapping[str, Any]) -> RedditDestination:
    """A L{RedditDestination} from the validated keys of one C{[[destinations]]} table."""
    fields = platform_fields(name, KEYS, settings, MAX_EVENTS, FORMATS)
    for source, target in fields["event_names"].items():
        if len(target) > MAX_CUSTOM_NAME:
            raise ValueError(f"event_names: {source!r} maps to a name longer than {MAX_CUSTOM_NAME} characters")
    return RedditDestination(**fields)
