"""Microsoft Advertising (UET) Conversions API: events as C{/v1/{tag_id}/events} takes them.

Microsoft's events are UET's: a page view is C{eventType "pageLoad"}, anything else a
C{custom} event whose C{eventName} is free text, which UET reads as Google's recommended
names (so Meta's names map to GA4's, L{tagd.delivery.destinations.ga4.DEFAULT_EVENT_NAMES}).  Keys
are camel case, times Unix seconds; C{em} and C{ph} are single hashed strings
(L{tagd.tagging.hashing.microsoft_user_fields}), the click id (C{msclkid}, kept by UET in
C{_uetmsclkid} after a C{_uet} prefix), the UET visitor id C{_uetvid} (as C{anonymousId}),
the IP address and the user agent go raw.  C{adStorageConsent} says the visitor's
marketing choice whenever a consent record was read.  Microsoft documents no test mode.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Sequence

import attrs

from tagd.delivery.destinations import KeySpec, Outcome
from tagd.delivery.destinations._common import RequestParts, finite_number, listed, status_judgement, without_empty
from tagd.delivery.destinations._platform import BEARER_TOKEN, ConversionsDestination, conversion_keys, mapped_name, platform_fields
from tagd.delivery.destinations.ga4 import DEFAULT_EVENT_NAMES as GA4_EVENT_NAMES
from tagd.tagging.events import Event
from tagd.tagging.hashing import microsoft_user_fields

TYPE = "microsoft"
# Unconfirmed: the figure third-party notes on Microsoft's documentation give.
MAX_EVENTS = 1000
KEYS: dict[str, KeySpec] = conversion_keys(
    "tag_id", endpoint="https://capi.uet.microsoft.com", max_batch=MAX_EVENTS
)
SECRETS = ("access_token",)
FORMATS = {
    "tag_id": (re.compile(r"[0-9]+"), "the UET tag's id, digits only"),
    "access_token": BEARER_TOKEN,
}
DEFAULT_TIMEOUT = 3.0
# A request carries up to its platform's batch of events: two in flight drain any backlog.
DEFAULT_CONCURRENCY = 2

PAGE_LOAD = "pageLoad"
# UET's page types for the events that have one.
PAGE_TYPES: Mapping[str, str] = {
    "view_item": "product",
    "search": "searchresults",
    "add_to_cart": "cart",
    "purchase": "purchase",
}


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    return without_empty(
        {"id": item["id"], "name": item.get("title"), "price": item.get("item_price"), "quantity": item.get("quantity")}
    )


def custom_data(event: Event, name: str | None) -> dict[str, Any]:
    """Microsoft's C{customData} from the Meta-style custom data and the contents."""
    custom = event.custom_data
    currency = custom.get("currency")
    order = custom.get("order_id")
    search = custom.get("search_string")
    return without_empty(
        {
            "value": finite_number(custom.get("value")),
            "currency": currency.upper() if isinstance(currency, str) else None,
            "transactionId": str(order) if isinstance(order, (str, int)) and not isinstance(order, bool) else None,
            "searchTerm": search if isinstance(search, str) else None,
            "items": [_item(item) for item in event.contents],
            "itemIds": [item["id"] for item in event.contents],
            "pageType": PAGE_TYPES.get(name or ""),
        }
    )


def user_data(event: Event) -> dict[str, Any]:
    """Raw identifiers as they are, and the hashed e-mail, phone and external id."""
    raw = {
        "clientIpAddress": event.client_ip,
        "clientUserAgent": event.user_agent,
        "msclkid": event.msclkid,
        "anonymousId": event.uetvid,
    }
    hashed = microsoft_user_fields(event.user_data)
    # Microsoft takes one value per field: the first the origin gave.
    return without_empty(raw) | {key: values[0] for key, values in hashed.items()}


def event_name(event: Event, event_names: Mapping[str, str] = {}) -> str | None:
    """The C{eventName} of a custom event; C{None} for a page view, which is a pageLoad."""
    if event.event_name == "PageView" and "PageView" not in event_names:
        return None
    return mapped_name(event.event_name, event_names, GA4_EVENT_NAMES)


def ad_storage_consent(event: Event, limited: bool) -> str | None:
    """UET's C{adStorageConsent}: C{D} (denied) for a C{limited} event, else C{G}
    (granted); C{None} when no consent record was read, which says nothing."""
    if event.consent is None:
        return None
    return "D" if limited else "G"


def payload(event: Event, event_names: Mapping[str, str] = {}, limited: bool = False) -> dict[str, Any]:
    """One event exactly as it goes into Microsoft's C{data} array."""
    name = event_name(event, event_names)
    document = {
        "eventType": PAGE_LOAD if name is None else "custom",
        "eventName": name,
        "eventId": event.event_id,
        "eventTime": event.event_time,
        "eventSourceUrl": event.source_url,
        "referrerUrl": event.referrer,
        "adStorageConsent": ad_storage_consent(event, limited),
        "userData": user_data(event),
        "customData": custom_data(event, name),
    }
    return without_empty(document)


def _judge(status: int, answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """By HTTP status, with Microsoft's error code, message and the first details."""
    error = answer.get("error") if answer else None
    message = f"HTTP {status}"
    if isinstance(error, dict):
        message += f", Microsoft {error.get('code', 'error')}: {error.get('message', 'no message')}"
        message += listed(error.get("details"), lambda d: f"{d.get('index')}.{d.get('propertyName')}: {d.get('errorMessage')}")
    elif answer is not None and "eventsReceived" in answer:
        message += f", eventsReceived={answer['eventsReceived']}"
    return status_judgement(status), message


@attrs.frozen(eq=False)
class MicrosoftDestination(ConversionsDestination):
    """One UET tag and the Conversions API token allowed to send events to it."""

    type: ClassVar[str] = TYPE
    event_payload = staticmethod(payload)
    judge = staticmethod(_judge)

    tag_id: str

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        # The token travels only in a header, so the URL is safe to log as it is.
        url = f"{self.endpoint}/v1/{self.tag_id}/events"
        headers = self.bearer()
        return url, url, headers, {"data": [self.payload(event) for event in batch]}


def build(name: str, settings: Mapping[str, Any]) -> MicrosoftDestination:
    """A L{MicrosoftDestination} from the validated keys of one C{[[destinations]]} table."""
    return MicrosoftDestination(**platform_fields(name, KEYS, settings, MAX_EVENTS, FORMATS))
