"""parse_tracking_header: the documented formats are accepted as they are, and every other
value is refused as a whole with a TrackingHeaderError that names the problem."""

from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from header_numbers import numbered_values
from tagd.tagging.events import (
    MAX_HEADER_BYTES,
    STANDARD_EVENTS,
    EventSpec,
    TrackingHeaderError,
    parse_tracking_header,
)


def parse(value) -> list[EventSpec]:
    """Parse a JSON-able value, or bytes as they are."""
    return parse_tracking_header(value if isinstance(value, bytes) else json.dumps(value).encode())


# -- accepted -------------------------------------------------------------------------

GUIDE_EXAMPLE = b"""{"event_name": "Purchase",
 "event_id": "order-1001",
 "event_time": 1764230400,
 "custom_data": {"currency": "EUR", "value": 42.5, "order_id": "1001"},
 "contents": [{"id": "123", "quantity": 2, "item_price": 12.0, "title": "Cup"}],
 "user_data": {"em": "Jane@Example.com", "ph": "+49 170 1234567", "fn": "Jane",
               "external_id": "customer-77"}}"""


def test_the_documented_example_is_read_field_by_field():
    """docs/tracking-header.md's example becomes one event with every field as written; user data
    values become tuples and stay raw (each destination normalises and hashes)."""
    [spec] = parse_tracking_header(GUIDE_EXAMPLE)
    assert spec.event_name == "Purchase"
    assert spec.event_id == "order-1001"
    assert spec.event_time == 1764230400
    assert spec.custom_data == {"currency": "EUR", "value": 42.5, "order_id": "1001"}
    assert spec.contents == ({"id": "123", "quantity": 2, "item_price": 12.0, "title": "Cup"},)
    assert spec.user_data == {
        "em": ("Jane@Example.com",),
        "ph": ("+49 170 1234567",),
        "fn": ("Jane",),
        "external_id": ("customer-77",),
    }


def test_only_the_event_name_is_required():
    """A bare event name is an event; everything else takes its default."""
    assert parse({"event_name": "PageView"}) == [EventSpec(event_name="PageView")]


def test_an_array_is_several_events_in_order():
    """An array of objects is that many events, in the order given, up to ten."""
    names = ["ViewContent", "AddToCart", "InitiateCheckout", "AddPaymentInfo", "Purchase",
             "Search", "Lead", "CompleteRegistration", "PageView", "my_custom_1"]  # fmt: skip
    specs = parse([{"event_name": name} for name in names])
    assert [spec.event_name for spec in specs] == names


@pytest.mark.parametrize("name", sorted(STANDARD_EVENTS))
def test_every_standard_event_name(name):
    """Meta's standard event names are accepted as they are."""
    assert parse({"event_name": name})[0].event_name == name


@pytest.mark.parametrize("name", ["a", "Custom_Event_2", "x" * 40, "ViewContentLater"])
def test_custom_event_names(name):
    """A custom name: a letter, then letters, digits or underscores, 40 at most."""
    assert parse({"event_name": name})[0].event_name == name


def test_user_data_takes_a_string_or_a_list_and_already_hashed_values():
    """A user data field is one string or a list of up to ten; a SHA-256 hex value is
    taken as it is (the destinations pass it unhashed)."""
    hashed = "a" * 64
    [spec] = parse(
        {"event_name": "Lead", "user_data": {"em": ["a@example.com", "b@example.com"], "ln": hashed,
                                             "ph": ["1"] * 10}}  # fmt: skip
    )
    assert spec.user_data == {"em": ("a@example.com", "b@example.com"), "ln": (hashed,), "ph": ("1",) * 10}


def test_numeric_content_ids_become_strings():
    """Shops often write product ids as numbers: they become the same digits as text."""
    [spec] = parse({"event_name": "AddToCart", "contents": [{"id": 123, "quantity": 1}]})
    assert spec.contents == ({"id": "123", "quantity": 1},)


def test_custom_data_passes_json_values_through():
    """Custom data is any JSON object of bounded depth: strings (even empty), numbers,
    booleans, nulls, lists and objects come through unchanged."""
    custom = {"currency": "EUR", "value": 1, "note": "", "flag": True, "none": None,
              "ids": ["1", "2"], "nested": {"deeper": {"leaf": 1.5}}}  # fmt: skip
    assert parse({"event_name": "Purchase", "custom_data": custom})[0].custom_data == custom


def test_well_known_custom_data_of_the_platforms_types_is_accepted():
    """The parameters Meta and TikTok define pass with the type they require: a number
    for C{value} (whole or not), a 3-letter currency in either case, an order id as text,
    a list of ids (even empty), a count from 0 and text parameters (even empty)."""
    custom = {"value": 0, "currency": "eur", "order_id": "A-1", "content_ids": [], "num_items": 0,
              "search_string": "", "content_name": "Blue mug", "content_category": "Kitchen",
              "content_type": "product_group"}  # fmt: skip
    assert parse({"event_name": "Purchase", "custom_data": custom})[0].custom_data == custom
    [spec] = parse({"event_name": "Purchase", "custom_data": {"value": 12.5, "content_ids": ["1", "2"]}})
    assert spec.custom_data == {"value": 12.5, "content_ids": ["1", "2"]}


def test_a_numeric_order_id_becomes_a_string():
    """An order id written as a number becomes the same digits as text, as the platforms
    define it (and as numeric product ids in contents do)."""
    [spec] = parse({"event_name": "Purchase", "custom_data": {"order_id": 1001}})
    assert spec.custom_data == {"order_id": "1001"}


def test_numbers_up_to_their_bounds_are_accepted_as_written():
    """The largest numbers each field takes pass unchanged: any number within a float's
    range (an integer of 308 digits included), whole numbers of 64 bits, and ids of as
    many digits as an id may have characters."""
    biggest = 10**308  # a float's range ends at about 1.8e308
    [spec] = parse(
        {
            **EVENT,
            "event_time": 2**63 - 1,
            "custom_data": {"value": -biggest, "num_items": 2**63 - 1, "order_id": 10**499, "n": [biggest, 1.5e308]},
            "contents": [{"id": 10**499, "item_price": biggest}],
        }
    )
    assert spec.event_time == 2**63 - 1
    assert spec.custom_data == {
        "value": -biggest, "num_items": 2**63 - 1, "order_id": str(10**499), "n": [biggest, 1.5e308]
    }  # fmt: skip
    assert spec.contents == ({"id": str(10**499), "item_price": biggest},)


def test_the_size_cap_is_inclusive_and_configurable():
    """A value of exactly C{max_bytes} is read; one byte more is refused, naming the cap."""
    value = b'{"event_name":"PageView"}'
    padded = value + b" " * (MAX_HEADER_BYTES - len(value))
    assert parse_tracking_header(padded)[0].event_name == "PageView"
    with pytest.raises(TrackingHeaderError, match=f"longer than the {MAX_HEADER_BYTES} bytes allowed"):
        parse_tracking_header(padded + b" ")
    assert parse_tracking_header(value, max_bytes=len(value))
    with pytest.raises(TrackingHeaderError, match="longer than the 10 bytes allowed"):
        parse_tracking_header(value, max_bytes=10)


# -- refused --------------------------------------------------------------------------

EVENT = {"event_name": "Purchase"}

MALFORMED = {
    # id: (value, a fragment of the reason)
    "empty": (b"", "not valid JSON"),
    "truncated": (b'{"event_name": "Purchase"', "not valid JSON"),
    "not utf-8": (b'{"event_name": "Purch\xe4se"}', "not valid JSON"),
    "trailing garbage": (b'{"event_name": "Purchase"} x', "not valid JSON"),
    "single quotes": (b"{'event_name': 'Purchase'}", "not valid JSON"),
    "null": (b"null", "event 0 must be a JSON object"),
    "a number": (b"42", "event 0 must be a JSON object"),
    "a string": (b'"Purchase"', "event 0 must be a JSON object"),
    "empty array": (b"[]", "1 to 10 events"),
    "eleven events": ([EVENT] * 11, "1 to 10 events"),
    "array holding a string": ([EVENT, "PageView"], "event 1 must be a JSON object"),
    "nested array": ([[EVENT]], "event 0 must be a JSON object"),
    "unknown key": ({**EVENT, "event": "x"}, "event 0 has an unknown key"),
    "unknown key in the second event": ([EVENT, {**EVENT, "user": {}}], "event 1 has an unknown key"),
    "no event name": ({"event_id": "1"}, "event_name must be a string"),
    "event name a number": ({"event_name": 7}, "event_name must be a string"),
    "event name empty": ({"event_name": ""}, "event_name must be 1 to 40"),
    "event name too long": ({"event_name": "x" * 41}, "event_name must be 1 to 40"),
    "event name with a space": ({"event_name": "View Content"}, "neither a standard nor a valid custom"),
    "event name from a digit": ({"event_name": "1st_visit"}, "neither a standard nor a valid custom"),
    "event name with a dash": ({"event_name": "add-to-cart"}, "neither a standard nor a valid custom"),
    "event id a number": ({**EVENT, "event_id": 1001}, "event_id must be a string"),
    "event id empty": ({**EVENT, "event_id": ""}, "event_id must be 1 to 100"),
    "event id too long": ({**EVENT, "event_id": "x" * 101}, "event_id must be 1 to 100"),
    "event time a string": ({**EVENT, "event_time": "1764230400"}, "event_time must be Unix seconds"),
    "event time a float": ({**EVENT, "event_time": 1764230400.5}, "event_time must be Unix seconds"),
    "event time a boolean": ({**EVENT, "event_time": True}, "event_time must be Unix seconds"),
    "event time zero": ({**EVENT, "event_time": 0}, "event_time must be Unix seconds"),
    "event time negative": ({**EVENT, "event_time": -5}, "event_time must be Unix seconds"),
    "event time over 64 bits": ({**EVENT, "event_time": 2**63}, "event_time must be Unix seconds"),
    "event time NaN": (b'{"event_name": "Purchase", "event_time": NaN}', "event_time must be Unix seconds"),
    "custom data a list": ({**EVENT, "custom_data": ["EUR"]}, "custom_data must be an object"),
    "custom data a string": ({**EVENT, "custom_data": "EUR"}, "custom_data must be an object"),
    "custom data NaN": (b'{"event_name": "Purchase", "custom_data": {"value": NaN}}', "finite number"),
    "custom data Infinity": (b'{"event_name": "Purchase", "custom_data": {"value": -Infinity}}', "finite number"),
    "custom data string too long": ({**EVENT, "custom_data": {"note": "x" * 501}}, "custom_data must be 1 to 500"),
    "custom data too deep": ({**EVENT, "custom_data": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, "nested too deeply"),
    "value a numeric string": ({**EVENT, "custom_data": {"value": "42.50"}}, "custom_data.value must be a finite number"),
    "value the string NaN": ({**EVENT, "custom_data": {"value": "NaN"}}, "custom_data.value must be a finite number"),
    "value NaN": (b'{"event_name": "Purchase", "custom_data": {"value": NaN}}', "custom_data.value must be a finite number"),
    "value a boolean": ({**EVENT, "custom_data": {"value": True}}, "custom_data.value must be a finite number"),
    "value null": ({**EVENT, "custom_data": {"value": None}}, "custom_data.value must be a finite number"),
    "value 1e401": (b'{"event_name": "Purchase", "custom_data": {"value": 1e401}}', "custom_data.value must be a finite number"),
    "value of 401 digits": ({**EVENT, "custom_data": {"value": 10**400}}, "custom_data.value must be a finite number"),
    "value of 5000 digits": (b'{"event_name": "Purchase", "custom_data": {"value": ' + b"9" * 5000 + b"}}", "not valid JSON"),
    "other custom data of 401 digits": ({**EVENT, "custom_data": {"n": {"m": [-(10**400)]}}}, "custom_data[] must be a finite"),
    "other custom data Infinity": (b'{"event_name": "Purchase", "custom_data": {"n": Infinity}}', "custom_data must be a finite"),
    "currency a symbol": ({**EVENT, "custom_data": {"currency": "\u20ac"}}, "custom_data.currency must be a currency code of 3"),
    "currency a name": ({**EVENT, "custom_data": {"currency": "euro"}}, "custom_data.currency must be a currency code of 3"),
    "currency digits": ({**EVENT, "custom_data": {"currency": "978"}}, "custom_data.currency must be a currency code of 3"),
    "currency a number": ({**EVENT, "custom_data": {"currency": 978}}, "custom_data.currency must be a currency code of 3"),
    "order id a float": ({**EVENT, "custom_data": {"order_id": 10.5}}, "custom_data.order_id must be a string or a whole number"),
    "order id a boolean": ({**EVENT, "custom_data": {"order_id": True}}, "custom_data.order_id must be a string or a whole"),
    "order id a list": ({**EVENT, "custom_data": {"order_id": ["1"]}}, "custom_data.order_id must be a string or a whole"),
    "order id empty": ({**EVENT, "custom_data": {"order_id": ""}}, "custom_data.order_id must be 1 to 500"),
    "order id of 501 digits": ({**EVENT, "custom_data": {"order_id": 10**500}}, "custom_data.order_id must be 1 to 500"),
    "content ids a string": ({**EVENT, "custom_data": {"content_ids": "sku-1"}}, "custom_data.content_ids must be a list"),
    "content ids numbers": ({**EVENT, "custom_data": {"content_ids": [1, 2]}}, "custom_data.content_ids[] must be a string"),
    "content ids too many": ({**EVENT, "custom_data": {"content_ids": ["1"] * 101}}, "content_ids must be a list of at most 100"),
    "num items negative": ({**EVENT, "custom_data": {"num_items": -1}}, "custom_data.num_items must be a whole number"),
    "num items a float": ({**EVENT, "custom_data": {"num_items": 2.0}}, "custom_data.num_items must be a whole number"),
    "num items a string": ({**EVENT, "custom_data": {"num_items": "2"}}, "custom_data.num_items must be a whole number"),
    "num items over 64 bits": ({**EVENT, "custom_data": {"num_items": 2**63}}, "custom_data.num_items must be a whole number"),
    "search string a number": ({**EVENT, "custom_data": {"search_string": 42}}, "custom_data.search_string must be a string"),
    "content name a list": ({**EVENT, "custom_data": {"content_name": ["mug"]}}, "custom_data.content_name must be a string"),
    "content category null": ({**EVENT, "custom_data": {"content_category": None}}, "custom_data.content_category must be"),
    "content type an object": ({**EVENT, "custom_data": {"content_type": {}}}, "custom_data.content_type must be a string"),
    "content type too long": ({**EVENT, "custom_data": {"content_type": "x" * 501}}, "custom_data.content_type must be 1 to 500"),
    "contents an object": ({**EVENT, "contents": {"id": "1"}}, "contents must be a list"),
    "too many contents": ({**EVENT, "contents": [{"id": "1"}] * 101}, "contents must be a list of at most 100"),
    "content a string": ({**EVENT, "contents": ["sku-1"]}, "contents[0] must be an object"),
    "content without id": ({**EVENT, "contents": [{"quantity": 1}]}, "contents[0].id is missing"),
    "content unknown key": ({**EVENT, "contents": [{"id": "1", "price": 2}]}, "contents[0] has an unknown key"),
    "content id a float": ({**EVENT, "contents": [{"id": 1.5}]}, "contents[0].id must be a string"),
    "content id empty": ({**EVENT, "contents": [{"id": ""}]}, "contents[0].id must be 1 to 500"),
    "quantity zero": ({**EVENT, "contents": [{"id": "1", "quantity": 0}]}, "positive whole number"),
    "quantity a float": ({**EVENT, "contents": [{"id": "1", "quantity": 1.5}]}, "positive whole number"),
    "quantity a boolean": ({**EVENT, "contents": [{"id": "1", "quantity": True}]}, "positive whole number"),
    "quantity huge": ({**EVENT, "contents": [{"id": "1", "quantity": 1_000_001}]}, "positive whole number"),
    "price a string": ({**EVENT, "contents": [{"id": "1", "item_price": "12"}]}, "item_price must be a finite number"),
    "price NaN": (b'{"event_name":"Purchase","contents":[{"id":"1","item_price":NaN}]}', "finite number"),
    "price of 401 digits": ({**EVENT, "contents": [{"id": "1", "item_price": 10**400}]}, "item_price must be a finite"),
    "price -1e999": (b'{"event_name":"Purchase","contents":[{"id":"1","item_price":-1e999}]}', "item_price must be a finite"),
    "content id of 501 digits": ({**EVENT, "contents": [{"id": 10**500}]}, "contents[0].id must be 1 to 500"),
    "title a number": ({**EVENT, "contents": [{"id": "1", "title": 5}]}, "contents[0].title must be a string"),
    "user data a list": ({**EVENT, "user_data": ["a@example.com"]}, "user_data must be an object"),
    "user data unknown key": ({**EVENT, "user_data": {"email": "a@example.com"}}, "user_data has an unknown key"),
    "user data empty list": ({**EVENT, "user_data": {"em": []}}, "user_data.em must hold 1 to 10"),
    "user data eleven values": ({**EVENT, "user_data": {"em": ["a"] * 11}}, "user_data.em must hold 1 to 10"),
    "user data a number": ({**EVENT, "user_data": {"ph": 4930123456}}, "user_data.ph must be a string"),
    "user data empty string": ({**EVENT, "user_data": {"fn": ""}}, "user_data.fn must be 1 to 256"),
    "user data too long": ({**EVENT, "user_data": {"em": "a" * 257}}, "user_data.em must be 1 to 256"),
    "oversized": ({**EVENT, "custom_data": {f"k{i}": "v" * 100 for i in range(90)}}, "longer than the 8192 bytes allowed"),
    "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, "longer than the 8192 bytes allowed"),
    "nested JSON under the cap": (b"[" * 500 + b"]" * 500, "event 0 must be a JSON object"),
}  # fmt: skip


@pytest.mark.parametrize("value, reason", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_values_are_refused_with_a_reason(value, reason):
    """Each way of breaking the format raises TrackingHeaderError (never anything else),
    and its message names the problem."""
    with pytest.raises(TrackingHeaderError) as refused:
        parse(value)
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    "user_data",
    [
        {"em": "x" * 257 + "@secret.example"},
        {"ph": ["+49 30 1234567", 4930123456]},
        {"em": "a@secret.example", "email": "b@secret.example"},
    ],
)
def test_reasons_never_quote_personal_values(user_data):
    """A reason about user data names the field, never the value, so that logging it
    cannot leak an e-mail address or a phone number."""
    with pytest.raises(TrackingHeaderError) as refused:
        parse({**EVENT, "user_data": user_data})
    message = str(refused.value)
    assert "secret.example" not in message and "1234567" not in message and "xxxx" not in message


def test_reasons_about_custom_data_never_quote_its_values():
    """A reason about a well-known custom_data parameter names the parameter, never what
    the origin wrote in it (an order id or a search can be personal)."""
    for custom in ({"value": "NaN-secret"}, {"order_id": ["secret-order"]}, {"search_string": ["secret"]},
                   {"content_ids": ["ok", 7], "currency": "secret"}):  # fmt: skip
        with pytest.raises(TrackingHeaderError) as refused:
            parse({**EVENT, "custom_data": custom})
        assert "secret" not in str(refused.value)
        assert str(refused.value).startswith(f"custom_data.{next(iter(custom))}")


def test_one_bad_event_refuses_the_whole_header():
    """An array with one bad event makes no event at all: the origin meant the set."""
    with pytest.raises(TrackingHeaderError, match="event_time"):
        parse([EVENT, {**EVENT, "event_time": "now"}, EVENT])


@pytest.mark.parametrize(
    "value",
    [
        b'{"event_name": "Lead", "user_data": {"em": "joe\\ud800@example.com"}}',
        b'{"event_name": "Lead", "event_id": "order-\\udfff"}',
        b'{"event_name": "Lead", "custom_data": {"note": "\\ud83d"}}',
    ],
    ids=["user_data", "event_id", "custom_data"],
)
def test_lone_surrogate_escapes_are_refused(value):
    """A JSON escape of half a UTF-16 surrogate pair is no character at all: the value
    cannot be UTF-8 encoded, so it is malformed like invalid UTF-8 bytes are."""
    with pytest.raises(TrackingHeaderError):
        parse_tracking_header(value)


# -- fuzzing --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
keys = st.sampled_from(["event_name", "event_id", "event_time", "custom_data", "contents", "user_data", "x"])
near_events = st.dictionaries(keys, json_values, max_size=6) | st.fixed_dictionaries(
    {"event_name": st.sampled_from(["Purchase", "PageView", "my_event", ""]) | json_values},
    optional={
        "event_id": json_values,
        "event_time": st.integers() | json_values,
        "custom_data": st.dictionaries(st.text(max_size=10), json_values, max_size=4),
        "contents": st.lists(st.dictionaries(st.sampled_from(["id", "quantity", "item_price", "title", "x"]),
                                             json_values, max_size=4), max_size=3),  # fmt: skip
        "user_data": st.dictionaries(st.sampled_from(["em", "ph", "fn", "external_id", "zz"]), json_values, max_size=3),
    },
)


def _outcome(raw: bytes):
    """What parsing C{raw} does: a list of events, or the TrackingHeaderError's message."""
    try:
        specs = parse_tracking_header(raw)
    except TrackingHeaderError as e:
        assert str(e), "a refusal without a reason"
        return str(e)
    assert isinstance(specs, list) and 1 <= len(specs) <= 10
    assert all(isinstance(spec, EventSpec) for spec in specs)
    return specs


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_nothing_but_tracking_header_error(raw):
    """Any bytes at all: events, or a TrackingHeaderError with a reason; nothing else."""
    _outcome(raw)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, near_events, st.lists(near_events, max_size=12)), st.booleans())
def test_json_values_raise_nothing_but_tracking_header_error(value, ensure_ascii):
    """Any JSON document, and objects that look nearly like events: events, or a
    TrackingHeaderError with a reason."""
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8")
    outcome = _outcome(raw)
    if isinstance(outcome, list):
        # Whatever was accepted is exactly what the format allows.
        for spec in outcome:
            assert spec.event_name and len(spec.event_name) <= 40
            assert spec.event_time is None or (isinstance(spec.event_time, int) and spec.event_time > 0)
            assert all(isinstance(content["id"], str) and content["id"] for content in spec.contents)
            assert all(1 <= len(values) <= 10 for values in spec.user_data.values())


_finite = st.floats(allow_nan=False, allow_infinity=False)
# custom_data keys that must be of the platforms' types; other keys take any scalar.
WELL_KNOWN = {"value", "currency", "order_id", "content_ids", "num_items", "search_string", "content_name",
              "content_category", "content_type"}  # fmt: skip
well_known_custom_data = st.fixed_dictionaries(
    {},
    optional={
        "value": st.integers(-(10**9), 10**9) | _finite,
        "currency": st.from_regex(r"[A-Za-z]{3}", fullmatch=True),
        "order_id": st.text(min_size=1, max_size=20),
        "content_ids": st.lists(st.text(min_size=1, max_size=10), max_size=5),
        "num_items": st.integers(0, 10**6),
        "search_string": st.text(max_size=50),
        "content_type": st.text(max_size=20),
    },
)
other_custom_data = st.dictionaries(
    st.text(max_size=10).filter(lambda key: key not in WELL_KNOWN),
    st.none() | st.booleans() | st.integers() | _finite | st.text(max_size=50),
    max_size=5,
)
valid_events = st.fixed_dictionaries(
    {"event_name": st.sampled_from(sorted(STANDARD_EVENTS)) | st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,39}", fullmatch=True)},
    optional={
        "event_id": st.text(min_size=1, max_size=100),
        "event_time": st.integers(1, 2**62),
        "custom_data": st.builds(lambda known, other: known | other, well_known_custom_data, other_custom_data),
        "contents": st.lists(
            st.fixed_dictionaries(
                {"id": st.text(min_size=1, max_size=20)},
                optional={"quantity": st.integers(1, 1_000_000), "item_price": _finite,
                          "title": st.text(min_size=1, max_size=20), "category": st.text(min_size=1, max_size=20)},
            ),
            max_size=5,
        ),
        "user_data": st.dictionaries(
            st.sampled_from(["em", "ph", "fn", "ln", "db", "ge", "ct", "st", "zp", "country", "external_id"]),
            st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=10),
            max_size=5,
        ),
    },
)  # fmt: skip


@settings(max_examples=250, deadline=None)
@given(st.lists(valid_events, min_size=1, max_size=10), st.booleans(), st.booleans())
def test_every_documented_value_is_accepted_as_written(events, as_array, ensure_ascii):
    """Any value within the documented format parses, and each event keeps exactly what
    the origin wrote."""
    value = events if as_array or len(events) > 1 else events[0]
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        return  # the cap has its own test
    specs = parse_tracking_header(raw)
    assert len(specs) == len(events)
    for spec, event in zip(specs, events):
        assert spec.event_name == event["event_name"]
        assert spec.event_id == event.get("event_id")
        assert spec.event_time == event.get("event_time")
        assert spec.custom_data == event.get("custom_data", {})
        assert spec.contents == tuple(event.get("contents", []))
        assert spec.user_data == {key: tuple(values) for key, values in event.get("user_data", {}).items()}
        assert all(math.isfinite(v) for v in spec.custom_data.values() if isinstance(v, float))



@settings(max_examples=400, deadline=None)
@given(st.lists(valid_events | numbered_values(), min_size=1, max_size=8), st.booleans())
def test_no_number_makes_the_parser_raise_and_well_formed_events_still_come_out(values, ensure_ascii):
    """A response's tracking header values, some of them well-formed events and some with
    any number at all wherever a number is read (or not expected): each value with such a
    number is events or a TrackingHeaderError, never another exception, and every
    well-formed value still gives exactly its event, in order."""
    expected, came_out = [], []
    for index, value in enumerate(values):
        if isinstance(value, dict):
            value = {**value, "event_id": f"well-formed-{index}"}
            raw = json.dumps(value, ensure_ascii=ensure_ascii).encode()
            if len(raw) > MAX_HEADER_BYTES:
                continue  # the cap has its own test
            expected.append(value["event_id"])
        else:
            raw = value
        outcome = _outcome(raw)
        if isinstance(outcome, list):
            came_out += outcome
            for spec in outcome:
                numbers = [*spec.custom_data.values(), *(c.get("item_price") for c in spec.contents)]
                assert all(abs(n) <= sys.float_info.max for n in numbers if isinstance(n, (int, float)))
        else:
            assert isinstance(value, bytes), outcome
    assert [spec.event_id for spec in came_out if spec.event_id in expected] == expected
