"""The event model, and the parsing of the tracking header that an origin sets.

An origin's header is untrusted input: anything that is not exactly the documented format
is refused as a whole with a L{TrackingHeaderError} whose reason names the problem, and
never reaches a platform.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable, Mapping

import attrs

from tagd.tagging.identity import VisitorIds

MAX_HEADER_BYTES = 8192
MAX_EVENTS_PER_HEADER = 10
MAX_CONTENTS = 100
MAX_STRING = 500
# Every number must lie within a float's range: no platform takes one beyond it (a
# 401-digit integer; 1e401, which json reads as inf) or NaN, and turning such an integer
# into a float raises OverflowError.
MAX_NUMBER = sys.float_info.max
# Whole numbers (event_time, num_items) the platforms store in 64 bits at most.
MAX_WHOLE_NUMBER = 2**63 - 1

# Meta's standard events; any other name must look like a custom event name.
STANDARD_EVENTS = frozenset(
    {
        "AddPaymentInfo",
        "AddToCart",
        "AddToWishlist",
        "CompleteRegistration",
        "Contact",
        "CustomizeProduct",
        "Donate",
        "FindLocation",
        "InitiateCheckout",
        "Lead",
        "PageView",
        "Purchase",
        "Schedule",
        "Search",
        "StartTrial",
        "SubmitApplication",
        "Subscribe",
        "ViewContent",
    }
)
CUSTOM_EVENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
USER_DATA_KEYS = frozenset(
    {"em", "ph", "fn", "ln", "db", "ge", "ct", "st", "zp", "country", "external_id"}
)
_HEADER_KEYS = frozenset({"event_name", "event_id", "event_time", "custom_data", "contents", "user_data"})
_CONTENT_KEYS = {"id": str, "quantity": int, "item_price": float, "title": str, "category": str}
_CURRENCY = re.compile(r"[A-Za-z]{3}")


class TrackingHeaderError(ValueError):
    """The tracking header cannot be turned into events; the message says why."""


@attrs.frozen
class EventSpec:
    """One event as the origin described it in the tracking header."""

    event_name: str
    event_id: str | None = None
    event_time: int | None = None
    custom_data: Mapping[str, Any] = attrs.field(factory=dict)
    contents: tuple[Mapping[str, Any], ...] = ()
    # Personal data: kept out of repr so that it can never reach a log line by accident.
    user_data: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, repr=False)


@attrs.frozen
class Event(VisitorIds):
    """One event, enriched from the visitor's request, ready for every destination.

    C{user_data} values are as the origin gave them (raw or already SHA-256 hex);
    each destination normalises and hashes them its own way.  The visitor's ids are the
    fields of L{VisitorIds}, given by keyword.  An event reaches only the destinations
    whose consent purpose C{consent} grants (see L{tagd.tagging.consent}).
    """

    event_name: str
    event_id: str
    event_time: int
    source_url: str
    client_ip: str = attrs.field(repr=False)
    user_agent: str = attrs.field(repr=False)
    referrer: str | None = attrs.field(default=None, repr=False)
    custom_data: Mapping[str, Any] = attrs.field(factory=dict)
    contents: tuple[Mapping[str, Any], ...] = ()
    user_data: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, repr=False)
    # The purposes the visitor granted (tagd.tagging.consent), or None when no consent record was
    # read: destinations tell the platforms what they may do with the event from it.
    consent: frozenset[str] | None = None


def _string(value: Any, where: str, limit: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise TrackingHeaderError(f"{where} must be a string")
    if not value or len(value) > limit:
        raise TrackingHeaderError(f"{where} must be 1 to {limit} characters")
    return value


def _number(value: Any, where: str) -> float | int:
    """A number within a float's range; the comparison is exact for an integer of any
    size and false for NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_NUMBER:
        raise TrackingHeaderError(f"{where} must be a finite number")
    return value


def _whole_number(value: Any) -> bool:
    """Whether C{value} is a whole number of 64 bits at most (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_WHOLE_NUMBER


def _identifier(value: Any, where: str) -> str:
    """An id as the text the platforms define it to be: shops often write numeric ids,
    which become the same digits, held to the same length as any other id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _string(str(value), where)
    if not isinstance(value, str):
        raise TrackingHeaderError(f"{where} must be a string or a whole number")
    return _string(value, where)


def _currency(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise TrackingHeaderError(f"{where} must be a currency code of 3 letters")
    return value


def _count(value: Any, where: str) -> int:
    if not _whole_number(value) or value < 0:
        raise TrackingHeaderError(f"{where} must be a whole number from 0 to {MAX_WHOLE_NUMBER}")
    return value


def _text(value: Any, where: str) -> str:
    """A text parameter, which may be empty (a search for nothing is still a search)."""
    return value if value == "" else _string(value, where)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_CONTENTS:
        raise TrackingHeaderError(f"{where} must be a list of at most {MAX_CONTENTS} strings")
    return [_string(item, f"{where}[]") for item in value]


# The custom_data parameters that Meta and TikTok define, with the type each requires.
# Meta refuses a request over one wrongly typed parameter (error 100), which would
# dead-letter the event long after the page was served; refused here, it is counted and
# logged as the malformed header it is, where the shop looks for such mistakes.
_CUSTOM_DATA_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "value": _number,
    "currency": _currency,
    "order_id": _identifier,
    "content_ids": _strings,
    "num_items": _count,
    "search_string": _text,
    "content_name": _text,
    "content_category": _text,
    "content_type": _text,
}


def _json_value(value: Any, where: str, depth: int = 0) -> Any:
    """Custom data: JSON values of bounded depth, strings of bounded length."""
    if depth > 3:
        raise TrackingHeaderError(f"{where} is nested too deeply")
    if isinstance(value, str):
        return _string(value, where) if value else value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return _number(value, where)
    if isinstance(value, list):
        return [_json_value(v, f"{where}[]", depth + 1) for v in value]
    if isinstance(value, dict):
        # Key names come from the origin: an error names the position, never the key.
        return {k: _json_value(v, where, depth + 1) for k, v in value.items()}
    raise TrackingHeaderError(f"{where} has an unsupported type")


def _content(value: Any, index: int) -> dict[str, Any]:
    where = f"contents[{index}]"
    if not isinstance(value, dict):
        raise TrackingHeaderError(f"{where} must be an object")
    item: dict[str, Any] = {}
    for key, raw in value.items():
        kind = _CONTENT_KEYS.get(key)
        if kind is None:
            raise TrackingHeaderError(f"{where} has an unknown key")
        if key == "id":
            item[key] = _identifier(raw, f"{where}.{key}")
        elif kind is str:
            item[key] = _string(raw, f"{where}.{key}")
        elif kind is int:
            if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw <= 1_000_000:
                raise TrackingHeaderError(f"{where}.{key} must be a positive whole number")
            item[key] = raw
        else:
            item[key] = _number(raw, f"{where}.{key}")
    if "id" not in item:
        raise TrackingHeaderError(f"{where}.id is missing")
    return item


def _custom_data(value: Any) -> dict[str, Any]:
    """The custom data: its well-known parameters of their platform type, any other key a
    bounded JSON value (see L{_json_value}).  Only the well-known names, which are tagd's
    own, appear in a reason."""
    if not isinstance(value, dict):
        raise TrackingHeaderError("custom_data must be an object")
    result = {}
    for key, raw in value.items():
        check = _CUSTOM_DATA_FIELDS.get(key)
        result[key] = check(raw, f"custom_data.{key}") if check else _json_value(raw, "custom_data", 1)
    return result


def _user_data(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise TrackingHeaderError("user_data must be an object")
    result = {}
    for key, raw in value.items():
        if key not in USER_DATA_KEYS:
            raise TrackingHeaderError("user_data has an unknown key")
        values = raw if isinstance(raw, list) else [raw]
        if not 1 <= len(values) <= 10:
            raise TrackingHeaderError(f"user_data.{key} must hold 1 to 10 values")
        result[key] = tuple(_string(v, f"user_data.{key}", 256) for v in values)
    return result


def _event_spec(value: Any, index: int) -> EventSpec:
    if not isinstance(value, dict):
        raise TrackingHeaderError(f"event {index} must be a JSON object")
    unknown = set(value) - _HEADER_KEYS
    if unknown:
        raise TrackingHeaderError(f"event {index} has an unknown key")
    name = _string(value.get("event_name"), "event_name", 40)
    if name not in STANDARD_EVENTS and not CUSTOM_EVENT_NAME.fullmatch(name):
        raise TrackingHeaderError("event_name is neither a standard nor a valid custom name")
    event_id = value.get("event_id")
    if event_id is not None:
        event_id = _string(event_id, "event_id", 100)
    event_time = value.get("event_time")
    if event_time is not None and (not _whole_number(event_time) or event_time <= 0):
        raise TrackingHeaderError("event_time must be Unix seconds, a positive whole number of 64 bits")
    contents = value.get("contents", [])
    if not isinstance(contents, list) or len(contents) > MAX_CONTENTS:
        raise TrackingHeaderError(f"contents must be a list of at most {MAX_CONTENTS} objects")
    return EventSpec(
        event_name=name,
        event_id=event_id,
        event_time=event_time,
        custom_data=_custom_data(value.get("custom_data", {})),
        contents=tuple(_content(c, i) for i, c in enumerate(contents)),
        user_data=_user_data(value.get("user_data", {})),
    )


def parse_tracking_header(raw: bytes, max_bytes: int = MAX_HEADER_BYTES) -> list[EventSpec]:
    """The events described by one tracking header value: a JSON object or an array of them."""
    if len(raw) > max_bytes:
        raise TrackingHeaderError(f"header is longer than the {max_bytes} bytes allowed")
    try:
        # A ValueError too for an integer of more than 4300 digits, which Python will not
        # convert (sys.int_info.default_max_str_digits).
        decoded = json.loads(raw.decode("utf-8"))
        # JSON may escape lone surrogates ("\\ud800") that no UTF-8 text can hold; they
        # would fail later, in a cookie or in hashing, instead of here.
        json.dumps(decoded, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as e:
        raise TrackingHeaderError(f"not valid JSON ({type(e).__name__})") from None
    items = decoded if isinstance(decoded, list) else [decoded]
    if not 1 <= len(items) <= MAX_EVENTS_PER_HEADER:
        raise TrackingHeaderError(f"must describe 1 to {MAX_EVENTS_PER_HEADER} events")
    return [_event_spec(item, i) for i, item in enumerate(items)]
