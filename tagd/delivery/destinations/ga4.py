"""Google Analytics 4 through the Measurement Protocol.

GA4 is not an ad platform with a conversion API: it is an analytics tool that accepts
server-side events only when they belong to a browser it already knows.  So every event
needs the visitor's GA client id (from the C{_ga} cookie, or the one tagd set), and one
request carries the events of one client only.  Events without a client id are skipped
by L{Ga4Destination.encode}: sending them under an invented id would create a new,
one-event "user" in the reports, which is worse than no event.

GA4 answers 2xx to nearly anything, malformed or not; the only way to learn what it
thinks of a payload is its validation server, used when C{debug = true}.  So this module
keeps GA4's documented limits itself rather than relying on an error answer:

  - 25 events per request, 25 parameters per event, a body under 130 kB;
  - event and parameter names of letters, digits and underscores, starting with a
    letter, at most 40 characters, and none of the reserved names or prefixes;
  - parameter values of at most 100 characters, except C{page_location} (1000),
    C{page_referrer} (420) and C{page_title} (300), which GA4 allows to be longer;
  - C{session_id} and C{engagement_time_msec} in every event, without which GA4 keeps the
    event out of its session-based reports.

The request's documented top-level fields carry the visitor: C{ip_override} the address,
so that GA4 derives the location from the visitor rather than from tagd's server;
C{user_agent} the browser's user agent, from which GA4 derives the device; C{consent}
(Consent Mode v2's C{ad_user_data} and C{ad_personalization}, C{GRANTED} only with the
visitor's marketing consent, and left out when no consent record was read), so that GA4
models what it may not use; and C{user_data}, the hashed e-mail, phone and name
(L{tagd.tagging.hashing.ga4_user_data}), only when C{ad_user_data} is not denied.  Since each is
one value per request, a request carries the events of one client sharing all four.
"""

from __future__ import annotations

import functools
import re
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlencode

import attrs

from tagd.delivery.destinations import KeySpec, Outcome, OutgoingRequest, Verdict
from tagd.delivery.destinations._common import (
    batches,
    check_batch_size,
    check_endpoint,
    filled,
    finite_number,
    json_bytes,
    json_object,
    refused_marketing,
    status_verdict,
    text_value,
    verdict,
)
from tagd.tagging.events import Event
from tagd.tagging.hashing import ga4_user_data

TYPE = "ga4"
SECRETS = ("api_secret",)
DEFAULT_TIMEOUT = 5.0
# GA4 takes the events of one client id per request, so a backlog is one request per
# visitor: many in flight drain it.  Against a platform answering in 50 ms, 64 send 1000
# visitors' events in about a second, and still about 30 a second when one request in
# ten asks for a pause of a second (a 429 with Retry-After: 1).
DEFAULT_CONCURRENCY = 64
DEFAULT_ENDPOINT = "https://www.google-analytics.com"

# Meta's standard names, as tagd's events use them, to GA4's recommended events.
DEFAULT_EVENT_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "ViewContent": "view_item",
        "AddToCart": "add_to_cart",
        "InitiateCheckout": "begin_checkout",
        "AddPaymentInfo": "add_payment_info",
        "Purchase": "purchase",
        "Search": "search",
        "Lead": "generate_lead",
        "CompleteRegistration": "sign_up",
        "PageView": "page_view",
    }
)

KEYS: dict[str, KeySpec] = {
    "measurement_id": ((str,), True, None),
    "api_secret": ((str,), True, None),
    "endpoint": ((str,), False, DEFAULT_ENDPOINT),
    "event_names": ((dict,), False, DEFAULT_EVENT_NAMES),
    "debug": ((bool,), False, False),
    "max_batch": ((int,), False, 25),
}

MAX_EVENTS = 25
MAX_PARAMS = 25
MAX_NAME = 40
MAX_VALUE = 100
# GA4 keeps longer values for these page parameters than for any other.
LONG_VALUES = MappingProxyType({"page_location": 1000, "page_referrer": 420, "page_title": 300})
MAX_BODY = 130_000  # "smaller than 130kB": the decimal reading is the safe one
# Reported engagement is unknown server-side; the smallest positive value satisfies
# GA4's need for one without inventing engagement the visitor did not have.
ENGAGEMENT_TIME_MSEC = 1
# Without GA's own session cookie, events of one client within the same half hour (GA4's
# default session timeout) share a session instead of each starting a new one.
SESSION_WINDOW = 1800

# A web data stream's id, as GA4's admin shows it: every request's measurement_id, so a
# mistyped one fails them all, and GA4 answers 2xx regardless.
MEASUREMENT_ID = re.compile(r"G-[A-Za-z0-9]+")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
RESERVED_EVENT_NAMES = frozenset(
    {
        "ad_activeview", "ad_click", "ad_exposure", "ad_impression", "ad_query",
        "ad_reward", "adunit_exposure", "app_background", "app_clear_data",
        "app_exception", "app_install", "app_remove", "app_store_refund",
        "app_store_subscription_cancel", "app_store_subscription_convert",
        "app_store_subscription_renew", "app_update", "app_upgrade",
        "dynamic_link_app_open", "dynamic_link_app_update", "dynamic_link_first_open",
        "error", "firebase_campaign", "firebase_in_app_message_action",
        "firebase_in_app_message_dismiss", "firebase_in_app_message_impression",
        "first_open", "first_visit", "in_app_purchase", "notification_dismiss",
        "notification_foreground", "notification_open", "notification_receive",
        "os_update", "session_start", "session_start_with_rollout", "user_engagement",
    }
)  # fmt: skip
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
# custom_data keys that become GA4's own parameters (or items), never passed through.
_MAPPED_CUSTOM_DATA = frozenset(
    {"currency", "value", "order_id", "search_string", "content_ids", "contents"}
)


def is_valid_name(name: str) -> bool:
    """Whether GA4 accepts C{name} for an event or a parameter."""
    return bool(_NAME.fullmatch(name)) and not name.lower().startswith(RESERVED_PREFIXES)


def ga4_event_name(name: str) -> str:
    """A valid GA4 name for an event name that has no mapping.

    Meta's names are CamelCase and GA4's are snake_case, so C{AddToWishlist} becomes
    C{add_to_wishlist}, which is also GA4's own recommended name for it.  Anything GA4
    refuses is replaced, and a reserved result is prefixed so that it is not dropped.
    """
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    snake = re.sub(r"[^a-z0-9]+", "_", snake)
    snake = re.sub(r"^[^a-z]+", "", snake)[:MAX_NAME].rstrip("_") or "event"
    if snake in RESERVED_EVENT_NAMES or not is_valid_name(snake):
        snake = ("custom_" + snake)[:MAX_NAME].rstrip("_")
    return snake


def _text(name: str, value: Any) -> str:
    """A string parameter value, cut to the length GA4 keeps for C{name}."""
    return str(value)[: LONG_VALUES.get(name, MAX_VALUE)]


def _param_value(name: str, value: Any) -> str | int | float | None:
    """A scalar GA4 accepts as a parameter value: a number, or a string cut to size."""
    if isinstance(value, str):
        return _text(name, value) if value else None
    return finite_number(value)


def _item(content: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of C{items} from one of the event's C{contents}."""
    item = {"item_id": _text("item_id", content["id"])}
    if "title" in content:
        item["item_name"] = _text("item_name", content["title"])
    if "category" in content:
        item["item_category"] = _text("item_category", content["category"])
    if "item_price" in content:
        item["price"] = content["item_price"]
    if "quantity" in content:
        item["quantity"] = content["quantity"]
    return item


def _items(event: Event) -> list[dict[str, Any]]:
    """The e-commerce items: the event's contents, else Meta-style C{content_ids}."""
    if event.contents:
        return [_item(content) for content in event.contents]
    ids = event.custom_data.get("content_ids")
    if isinstance(ids, list):
        ids = [i for i in ids if isinstance(i, (str, int)) and not isinstance(i, bool) and i != ""]
        return [{"item_id": _text("item_id", i)} for i in ids]
    return []


def session_id(event: Event) -> str:
    """GA's own session id when the visitor has one, else one per client and half hour."""
    if event.ga_session_id:
        return _text("session_id", event.ga_session_id)
    return str(event.event_time - event.event_time % SESSION_WINDOW)


def _standard_params(event: Event) -> Iterator[tuple[str, Any]]:
    """The parameters GA4's own tags send, in order of importance."""
    data = event.custom_data
    yield "session_id", session_id(event)
    yield "engagement_time_msec", ENGAGEMENT_TIME_MSEC
    yield "page_location", event.source_url
    yield "page_referrer", event.referrer
    currency = data.get("currency")
    if isinstance(currency, str) and _CURRENCY.fullmatch(currency):
        yield "currency", currency.upper()
    yield "value", finite_number(data.get("value"))
    yield "transaction_id", text_value(data.get("order_id"))
    yield "search_term", text_value(data.get("search_string"))


def _custom_params(event: Event) -> Iterator[tuple[str, Any]]:
    """The shop's other custom_data scalars, under names GA4 accepts."""
    for name, value in event.custom_data.items():
        if name not in _MAPPED_CUSTOM_DATA and is_valid_name(name):
            yield name, value


def event_params(event: Event) -> dict[str, Any]:
    """At most 25 parameters: the standard ones first, then items, then custom data."""
    params: dict[str, Any] = {}
    for name, raw in _standard_params(event):
        value = _param_value(name, raw)
        if value is not None:
            params[name] = value
    items = _items(event)
    if items:
        params["items"] = items
    for name, raw in _custom_params(event):
        value = _param_value(name, raw)
        if value is not None and len(params) < MAX_PARAMS:
            params.setdefault(name, value)
    return params


def consent_mode(event: Event) -> dict[str, str] | None:
    """The Measurement Protocol's C{consent} for the event's visitor: both ad signals
    C{GRANTED} with marketing consent, else C{DENIED}; C{None} when no record was read."""
    if event.consent is None:
        return None
    state = "DENIED" if refused_marketing(event) else "GRANTED"
    return {"ad_user_data": state, "ad_personalization": state}


def visitor_fields(event: Event) -> dict[str, Any]:
    """The request's top-level fields that describe the visitor (see the module docstring)."""
    consent = consent_mode(event)
    fields: dict[str, Any] = {"ip_override": event.client_ip}
    if event.user_agent:
        fields["user_agent"] = event.user_agent
    if consent is not None:
        fields["consent"] = consent
    if consent is None or consent["ad_user_data"] == "GRANTED":
        if user_data := ga4_user_data(event.user_data):
            fields["user_data"] = user_data
    return fields


def _grouped(events: Iterable[Event]) -> dict[tuple[str, str], tuple[dict[str, Any], list[int]]]:
    """The events' positions by client id and visitor fields, in order, with those fields;
    events with no client id are left out.

    The visitor fields are part of the key because each is one value per request.
    """
    groups: dict[tuple[str, str], tuple[dict[str, Any], list[int]]] = {}
    for position, event in enumerate(events):
        if event.ga_client_id:
            fields = visitor_fields(event)
            key = (event.ga_client_id, json_bytes(fields).decode("ascii"))
            groups.setdefault(key, (fields, []))[1].append(position)
    return groups


def _validated_names(overrides: Mapping[str, Any]) -> Mapping[str, str]:
    for source, target in overrides.items():
        valid = isinstance(target, str) and is_valid_name(target)
        if not valid or target in RESERVED_EVENT_NAMES:
            raise ValueError(
                f"event_names: {source!r} maps to {target!r}, which is not a GA4 event name "
                "(letters, digits and _, starting with a letter, at most 40, not reserved)"
            )
    return MappingProxyType({**DEFAULT_EVENT_NAMES, **overrides})


@attrs.frozen
class Ga4Destination:
    """One GA4 web data stream.  Build it with L{build}."""

    type: ClassVar[str] = TYPE

    name: str
    measurement_id: str
    api_secret: str = attrs.field(repr=False)
    endpoint: str = DEFAULT_ENDPOINT
    event_names: Mapping[str, str] = DEFAULT_EVENT_NAMES
    debug: bool = False
    max_batch: int = MAX_EVENTS

    def ga4_name(self, event: Event) -> str:
        """The GA4 name for C{event}: the configured mapping, else a converted name."""
        return self.event_names.get(event.event_name) or ga4_event_name(event.event_name)

    def _event(self, event: Event, max_items: int | None) -> dict[str, Any]:
        params = event_params(event)
        if max_items is not None and "items" in params:
            params["items"] = params["items"][:max_items]
            if not params["items"]:
                del params["items"]
        return {
            "name": self.ga4_name(event),
            "params": params,
            "timestamp_micros": event.event_time * 1_000_000,
        }

    def _body(
        self, client_id: str, visitor: Mapping[str, Any], events: Sequence[Event], max_items: int | None
    ) -> bytes:
        payload = {
            "client_id": client_id,
            "timestamp_micros": events[0].event_time * 1_000_000,
            **visitor,
            "events": [self._event(e, max_items) for e in events],
        }
        return json_bytes(payload)

    def _path(self) -> str:
        return "/debug/mp/collect" if self.debug else "/mp/collect"

    @functools.cached_property
    def urls(self) -> tuple[str, str]:
        """The request URL, and the same without the API secret for logs: the same for
        every request, which GA4 makes one per visitor."""
        log_url = f"{self.endpoint}{self._path()}?" + urlencode({"measurement_id": self.measurement_id})
        return f"{log_url}&" + urlencode({"api_secret": self.api_secret}), log_url

    def _requests(
        self,
        client_id: str,
        visitor: Mapping[str, Any],
        events: Sequence[Event],
        positions: Sequence[int],
        max_items: int | None = None,
    ) -> list[OutgoingRequest]:
        """One request for the events at C{positions}, or more when the body would reach
        GA4's size limit.

        Events are split in halves; one event still too large (only possible with a very
        long list of contents) keeps its first items, as many as fit.
        """
        carried = [events[position] for position in positions]
        body = self._body(client_id, visitor, carried, max_items)
        if len(body) >= MAX_BODY and len(positions) > 1:
            half = len(positions) // 2
            return [
                *self._requests(client_id, visitor, events, positions[:half]),
                *self._requests(client_id, visitor, events, positions[half:]),
            ]
        if len(body) >= MAX_BODY and max_items != 0:
            fewer = (len(_items(carried[0])) if max_items is None else max_items) // 2
            return self._requests(client_id, visitor, events, positions, fewer)
        url, log_url = self.urls
        return [
            OutgoingRequest(
                url=url,
                body=body,
                headers={"Content-Type": "application/json"},
                log_url=log_url,
                positions=tuple(positions),
            )
        ]

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """Requests of at most C{max_batch} events, each for one client id.

        Events without C{ga_client_id} are skipped (see the module docstring): their
        positions appear in no request.
        """
        requests = []
        for (client_id, _), (visitor, positions) in _grouped(events).items():
            for chunk in batches(positions, self.max_batch):
                requests.extend(self._requests(client_id, visitor, events, chunk))
        return requests

    def classify(self, status: int, body: bytes) -> Verdict:
        """2xx is success; in debug mode a validation message makes it permanent."""
        verdict = status_verdict(status, body, (self.api_secret,))
        if verdict.outcome is Outcome.SUCCESS and self.debug:
            return self._validation_verdict(body)
        return verdict

    def _validation_verdict(self, body: bytes) -> Verdict:
        messages = (json_object(body) or {}).get("validationMessages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return Verdict(Outcome.PERMANENT, "GA4 validation answer is not readable")
        if not messages:
            return Verdict(Outcome.SUCCESS, "GA4 validation passed")
        text = "; ".join(f"{m.get('fieldPath', '')}: {m.get('description', '')}" for m in messages)
        return verdict(Outcome.PERMANENT, text, (self.api_secret,))


def build(name: str, settings: Mapping[str, Any]) -> Ga4Destination:
    """A L{Ga4Destination} from a checked C{[[destinations]]} table.

    Raises C{ValueError} naming the offending key, never quoting the secret.
    """
    values = filled(KEYS, settings)
    if not MEASUREMENT_ID.fullmatch(values["measurement_id"]):
        universal = values["measurement_id"].startswith("UA-")
        raise ValueError(
            'measurement_id: must be a GA4 measurement id, "G-" then letters and digits'
            + (" (a UA- id is Universal Analytics, which takes no Measurement Protocol events)" if universal else "")
        )
    if not values["api_secret"]:
        raise ValueError("api_secret: is required and must not be empty")
    return Ga4Destination(
        name=name,
        measurement_id=values["measurement_id"],
        api_secret=values["api_secret"],
        endpoint=check_endpoint(values["endpoint"]),
        event_names=_validated_names(values["event_names"]),
        debug=values["debug"],
        max_batch=check_batch_size(values["max_batch"], MAX_EVENTS),
    )
