"""Pinterest API for Conversions (v5): events as C{/v5/ad_accounts/{id}/events} takes them.

Pinterest's event and its C{custom_data} are closed sets of keys (an extra key makes it
refuse the whole request), money values are decimal strings, every hashed user field is a
list (L{tagd.tagging.hashing.pinterest_user_data}), and the C{_epik} cookie's click id, the IP
address and the user agent go raw.  Pinterest names events in snake case and takes any
other as C{custom}; an event needs the visitor's e-mail, or the IP address and the user
agent together, so one without them is not sent (L{PinterestDestination.refusal}).

Pinterest judges each event of a request: its answer lists each one's status, and a 422
says that only some were processed.  Those it refused are dead letters, with its message;
the others are delivered (L{tagd.delivery.destinations.Verdict.refused}).  The event of a
visitor who refused marketing says C{opt_out: true}.  C{test = true} adds
C{?test=true}: Pinterest answers as usual and records nothing.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, ClassVar, Mapping, Sequence

import attrs

from tagd.delivery.destinations import KeySpec, Outcome, Verdict
from tagd.delivery.destinations._common import (
    RequestParts,
    finite_number,
    json_int,
    json_object,
    status_outcome,
    text_value,
    verdict,
    without_empty,
)
from tagd.delivery.destinations._platform import (
    BEARER_TOKEN,
    SelectiveDestination,
    conversion_keys,
    mapped_name,
    names_among,
    platform_fields,
)
from tagd.tagging.events import Event
from tagd.tagging.hashing import pinterest_user_data

TYPE = "pinterest"
MAX_EVENTS = 1000  # the OpenAPI description's maxItems
KEYS: dict[str, KeySpec] = conversion_keys(
    "ad_account_id",
    endpoint="https://api.pinterest.com",
    max_batch=MAX_EVENTS,
    own={"test": ((bool,), False, False)},
)
SECRETS = ("access_token",)
FORMATS = {
    "ad_account_id": (re.compile(r"[0-9]+"), "the ad account's id, digits only"),
    "access_token": BEARER_TOKEN,
}
# Pinterest gives no advice; its API is as far away as TikTok's.
DEFAULT_TIMEOUT = 3.0
# A request carries up to its platform's batch of events: two in flight drain any backlog.
DEFAULT_CONCURRENCY = 2

# Pinterest's event names (the OpenAPI description's list).
EVENT_NAMES = frozenset(
    {
        "add_payment_info", "add_to_cart", "add_to_wishlist", "app_install", "app_open",
        "checkout", "contact", "custom", "customize_product", "find_location",
        "initiate_checkout", "lead", "page_visit", "schedule", "search", "signup",
        "start_trial", "submit_application", "subscribe", "view_category", "view_content",
        "watch_video",
    }
)  # fmt: skip
# Meta's standard names in Pinterest's words (Pinterest's own mapping); any other is "custom".
DEFAULT_EVENT_NAMES: Mapping[str, str] = {
    "PageView": "page_visit",
    "ViewContent": "view_content",
    "AddToCart": "add_to_cart",
    "AddToWishlist": "add_to_wishlist",
    "InitiateCheckout": "initiate_checkout",
    "AddPaymentInfo": "add_payment_info",
    "Purchase": "checkout",
    "Lead": "lead",
    "Search": "search",
    "CompleteRegistration": "signup",
    "Contact": "contact",
    "CustomizeProduct": "customize_product",
    "FindLocation": "find_location",
    "Schedule": "schedule",
    "StartTrial": "start_trial",
    "SubmitApplication": "submit_application",
    "Subscribe": "subscribe",
}
CUSTOM = "custom"
COUNTED_EVENTS = frozenset({"add_to_cart", "checkout"})

# Pinterest's codes (the OpenAPI description's examples): 2 authentication failed, 29 no
# access to the ad account, 8 a rate limit, 4197 the endpoint ramped down.
AUTH_CODES = frozenset({2, 3, 29})
THROTTLE_CODES = frozenset({8})
TRANSIENT_CODES = frozenset({4197})
PARTIAL = 422


_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def decimal_text(value: Any) -> str | None:
    """A price or value as Pinterest takes it: a plain decimal string (a shop's decimal
    string as it is, C{1e16} written out); C{None} for anything that is no finite number."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return value.strip()
    number = finite_number(value)
    if number is None:
        return None
    return str(number) if isinstance(number, int) else format(Decimal(repr(number)), "f")


def _content(item: Mapping[str, Any]) -> dict[str, Any]:
    return without_empty(
        {
            "id": item["id"],
            "item_price": decimal_text(item.get("item_price")),
            "quantity": item.get("quantity"),
            "item_name": item.get("title"),
            "item_category": item.get("category"),
        }
    )


def _content_ids(event: Event) -> list[str]:
    """The products' ids: the event's contents', else Meta-style C{content_ids}."""
    if event.contents:
        return [item["id"] for item in event.contents]
    ids = event.custom_data.get("content_ids")
    return [text for i in ids if (text := text_value(i))] if isinstance(ids, list) else []


def custom_data(event: Event, pinterest_name: str) -> dict[str, Any]:
    """Pinterest's C{custom_data}, only of the keys it knows, from Meta-style custom data."""
    custom = event.custom_data
    currency = custom.get("currency")
    fields = {
        "currency": currency.upper() if isinstance(currency, str) else None,
        "value": decimal_text(custom.get("value")),
        "content_ids": _content_ids(event),
        "contents": [_content(item) for item in event.contents],
        "order_id": text_value(custom.get("order_id")),
        "search_string": text_value(custom.get("search_string")),
        "content_name": text_value(custom.get("content_name")),
        "content_category": text_value(custom.get("content_category")),
    }
    if pinterest_name in COUNTED_EVENTS and event.contents:
        fields["num_items"] = sum(item.get("quantity", 1) for item in event.contents)
    return without_empty(fields)


def user_data(event: Event) -> dict[str, Any]:
    """Raw identifiers as they are, and every personal value hashed, in lists."""
    raw = {
        "client_ip_address": event.client_ip,
        "client_user_agent": event.user_agent,
        "click_id": event.epik,
    }
    return without_empty(raw) | pinterest_user_data(event.user_data)


def pinterest_name(event: Event, event_names: Mapping[str, str] = {}) -> str:
    """The Pinterest name for C{event}: the destination's override, else Pinterest's word
    for a Meta name, else C{custom}."""
    name = mapped_name(event.event_name, event_names, DEFAULT_EVENT_NAMES)
    return name if name in EVENT_NAMES else CUSTOM


def payload(event: Event, event_names: Mapping[str, str] = {}, limited: bool = False) -> dict[str, Any]:
    """One event exactly as it goes into Pinterest's C{data} array; a C{limited} one says
    C{opt_out: true}, Pinterest's flag for a visitor who opted out of tracking."""
    name = pinterest_name(event, event_names)
    document = {
        "event_name": name,
        "action_source": "web",
        "event_time": event.event_time,
        "event_id": event.event_id,
        "event_source_url": event.source_url,
        "user_data": user_data(event),
        "custom_data": custom_data(event, name),
        "opt_out": limited or None,
    }
    return without_empty(document)


def refusal(event: Event) -> str | None:
    """Pinterest needs the e-mail, or the IP address and the user agent, to take an event."""
    if event.user_data.get("em") or (event.client_ip and event.user_agent):
        return None
    return "pinterest needs the visitor's e-mail, or both IP address and user agent"


def _per_event(answer: Mapping[str, Any]) -> list[Any] | None:
    """The list of each event's status, at the top of the answer or in a 422's details."""
    details = answer.get("details")
    for holder in (answer, details if isinstance(details, dict) else {}):
        events = holder.get("events")
        if isinstance(events, list) and all(isinstance(e, dict) for e in events):
            return events
    return None


def _partial(status: int, answer: Mapping[str, Any]) -> tuple[Outcome, str, list[tuple[int, str]], int] | None:
    """A success with the events Pinterest refused, and how many events the answer speaks
    for, when it says each one's status.  An answer whose code refuses the credentials,
    throttles or fails for the moment is that, whatever list it carries."""
    if json_int(answer, "code") in AUTH_CODES | THROTTLE_CODES | TRANSIENT_CODES:
        return None
    events = _per_event(answer)
    if events is None:
        return None
    refused = [
        (index, f"Pinterest refused the event: {e.get('error_message') or 'no message'}")
        for index, e in enumerate(events)
        if e.get("status") != "processed"
    ]
    processed = len(events) - len(refused)
    return Outcome.SUCCESS, f"HTTP {status}, {processed} of {len(events)} event(s) processed", refused, len(events)


def _judge(status: int, answer: Mapping[str, Any] | None) -> tuple[Outcome, str]:
    """Pinterest's code, then the status: used for every answer but the per-event ones."""
    code = json_int(answer, "code") if answer else None
    message = f"HTTP {status}" + (f", Pinterest code {code}" if code is not None else "")
    if answer and answer.get("message"):
        message += f": {answer['message']}"
    if code in AUTH_CODES:
        return Outcome.AUTH, message
    if code in THROTTLE_CODES:
        return Outcome.THROTTLE, message
    if code in TRANSIENT_CODES:
        return Outcome.TRANSIENT, message
    if by_status := status_outcome(status):
        return by_status, message
    if 200 <= status < 300:
        # A 2xx without a per-event list: Pinterest's answer always has one.
        return Outcome.TRANSIENT, message + " without the events' statuses"
    return Outcome.PERMANENT, message


@attrs.frozen(eq=False)
class PinterestDestination(SelectiveDestination):
    """One Pinterest ad account and the conversion token allowed to send events to it."""

    type: ClassVar[str] = TYPE
    event_payload = staticmethod(payload)
    judge = staticmethod(_judge)

    ad_account_id: str
    test: bool

    def refusal(self, event: Event) -> str | None:
        return refusal(event)

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        # The token travels only in a header, so the URL is safe to log as it is.
        url = f"{self.endpoint}/v5/ad_accounts/{self.ad_account_id}/events" + ("?test=true" if self.test else "")
        headers = self.bearer()
        return url, url, headers, {"data": [self.payload(event) for event in batch]}

    def classify(self, status: int, body: bytes) -> Verdict:
        """A 2xx or 422 that lists each event's status settles each event by it; any other
        answer by Pinterest's code and the HTTP status."""
        answer = json_object(body)
        partial = _partial(status, answer) if answer and (200 <= status < 300 or status == PARTIAL) else None
        if partial is not None:
            outcome, message, refused, answered = partial
            return verdict(outcome, message, (self.access_token,), refused, answered)
        return super().classify(status, body)


def build(name: str, settings: Mapping[str, Any]) -> PinterestDestination:
    """A L{PinterestDestination} from the validated keys of one C{[[destinations]]} table."""
    fields = platform_fields(name, KEYS, settings, MAX_EVENTS, FORMATS)
    return PinterestDestination(**fields | {"event_names": names_among(fields["event_names"], EVENT_NAMES, "Pinterest")})
