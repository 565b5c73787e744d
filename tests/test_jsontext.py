"""Per-event JSON with orjson: the same JSON as the json module wrote, for every value.

Each encoder is compared with the json module called with the options tagd used before
orjson, on generated documents and events: the same bytes whenever no float is involved
(floats may be spelt differently, C{1e-05} as C{0.00001}), the same JSON always, and the
same refusals (NaN and the infinities in the spool).  Spool rows written the old way read
back the same.
"""

from __future__ import annotations

import json
import math
from types import MappingProxyType

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagd.daemon.config import parse_config
from tagd.delivery.jsontext import json_ascii, json_text, json_value
from tagd.delivery.spool import event_from_json, event_to_json
from tagd.tagging.events import Event

from fakes import make_event

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text of every kind: control characters, non-ASCII, astral; lone surrogates on their own.
TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(),  # beyond 64 bits too
    st.floats(allow_nan=False, allow_infinity=False),
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)


def documents(scalars=SCALARS, keys=TEXT, tuples=True):
    """JSON documents; with C{tuples}, tuples among the lists (written as lists)."""
    lists = (lambda inner: st.lists(inner, max_size=4).map(tuple)) if tuples else (lambda inner: st.nothing())
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), lists(inner), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=20,
    )


def old_stored(document, default=None) -> str:
    """What the spool wrote before orjson."""
    return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default)


def old_ascii(document) -> bytes:
    """What the destinations sent before orjson."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def has_float(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(has_float(k) or has_float(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_float(v) for v in value)
    return False


def typed(text: str | bytes) -> str:
    """JSON text in a form where 1 and 1.0 differ, and NaN equals NaN: the json module's
    own spelling of what it reads."""
    return json.dumps(json.loads(text), ensure_ascii=False)


def outcome(encode, document):
    try:
        return encode(document), None
    except Exception as e:  # the refusal's type is part of the behaviour
        return None, type(e)


def assert_same(new, old, document) -> None:
    (new_text, new_error), (old_text, old_error) = new, old
    assert new_error == old_error
    if old_error is None:
        assert typed(new_text) == typed(old_text)
        if not has_float(document):
            assert new_text == old_text


@SETTINGS
@given(documents(scalars=st.one_of(SCALARS, NON_FINITE)))
def test_json_text_is_the_json_module_s_json(document):
    """Spool JSON: the same bytes without floats, the same JSON with them, the same
    ValueError for a NaN or an infinity anywhere."""
    assert_same(outcome(json_text, document), outcome(old_stored, document), document)


@SETTINGS
@given(documents(scalars=st.one_of(SCALARS, NON_FINITE)))
def test_json_ascii_is_the_json_module_s_json(document):
    """Request bodies: ASCII with the json module's escapes, byte for byte without floats;
    NaN and the infinities written as it wrote them."""
    new, old = outcome(json_ascii, document), outcome(old_ascii, document)
    assert_same(new, old, document)
    if new[0] is not None:
        assert new[0].isascii()


@SETTINGS
@given(documents(keys=st.one_of(TEXT, st.integers(), st.booleans(), st.none())))
def test_keys_that_are_not_strings_are_written_as_before(document):
    """orjson refuses keys that are not strings; the json module writes them as strings."""
    assert_same(outcome(json_text, document), outcome(old_stored, document), document)
    assert_same(outcome(json_ascii, document), outcome(old_ascii, document), document)


@SETTINGS
@given(st.lists(st.one_of(TEXT, SURROGATE, st.text(st.one_of(st.characters(), SURROGATE), max_size=5)), max_size=4))
def test_lone_surrogates_are_written_as_before(document):
    """orjson refuses a lone surrogate; the json module escapes it in ASCII and writes it in
    a str (where the spool's UTF-8 refuses it later, see test_spool)."""
    assert outcome(json_text, document) == outcome(old_stored, document)
    assert outcome(json_ascii, document) == outcome(old_ascii, document)


@SETTINGS
@given(documents())
def test_json_value_reads_what_the_json_module_reads(document):
    """Reading: the same values of the same types, integers beyond 64 bits included."""
    text = old_stored(document)
    assert json.dumps(json_value(text)) == json.dumps(json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        '{"a":123456789012345678901234567890}',
        "[-9223372036854775809]",
        "18446744073709551616",
        '{"a":"\\ud800"}',
        '{"a":NaN,"b":Infinity}',
        '{"id":"1234567890123456789012","n":1}',
    ],
)
def test_json_value_edges(text):
    """What orjson reads otherwise (big integers as floats) or not at all (NaN, a lone
    surrogate's escape) is read by the json module."""
    assert json.dumps(json_value(text)) == json.dumps(json.loads(text))


def test_json_text_calls_default_for_what_json_cannot_write():
    """A mapping that is no dict goes to C{default}, as with the json module; a value neither
    can write raises the json module's TypeError."""
    document = {"m": MappingProxyType({"x": 1.5})}
    assert json_text(document, default=dict) == old_stored(document, default=dict)
    with pytest.raises(TypeError):
        json_text({"s": {1, 2}}, default=lambda value: (_ for _ in ()).throw(TypeError("no")))


# -- events -------------------------------------------------------------------------------

# As the tracking header gives them: lists, never tuples, inside.
CUSTOM = st.dictionaries(TEXT, documents(tuples=False), max_size=4)
CONTENTS = st.lists(st.dictionaries(TEXT, documents(tuples=False), max_size=3), max_size=3).map(tuple)
USER_DATA = st.dictionaries(TEXT, st.lists(TEXT, min_size=1, max_size=3).map(tuple), max_size=3)
OPTIONAL = st.one_of(st.none(), TEXT)


@st.composite
def events(draw) -> Event:
    return make_event(
        event_name=draw(TEXT),
        event_id=draw(TEXT),
        event_time=draw(st.integers()),
        source_url=draw(TEXT),
        user_agent=draw(TEXT),
        referrer=draw(OPTIONAL),
        custom_data=draw(CUSTOM),
        contents=draw(CONTENTS),
        user_data=draw(USER_DATA),
        fbp=draw(OPTIONAL),
        rdt_cid=draw(st.one_of(OPTIONAL, st.integers(min_value=0).map(str))),
        consent=draw(st.one_of(st.none(), st.frozensets(TEXT, max_size=3))),
    )


# The order the spool has always written an event's fields in.
ROW_ORDER = (
    "event_name event_id event_time source_url client_ip user_agent referrer custom_data contents user_data"
    " fbp fbc ttclid ttp ga_client_id ga_session_id epik scclid scid rdt_cid rdt_uuid msclkid uetvid consent"
).split()


def old_event_json(event: Event) -> str:
    """The spool row as the json module wrote it."""
    fields = {name: getattr(event, name) for name in ROW_ORDER}
    fields["consent"] = None if event.consent is None else sorted(event.consent)
    return old_stored(fields, default=dict)


@SETTINGS
@given(events())
def test_event_rows_are_the_json_module_s_and_read_back(event):
    """A row is the JSON the json module wrote; old rows and new ones give the event back."""
    text = event_to_json(event)
    old = old_event_json(event)
    assert typed(text) == typed(old)
    if not has_float(attrs.asdict(event)):
        assert text == old
    assert event_from_json(text) == event
    assert event_from_json(old) == event


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "where",
    [
        lambda n: {"custom_data": {"value": n}},
        lambda n: {"custom_data": {"deep": [{"x": n}]}},
        lambda n: {"contents": ({"id": "a", "item_price": n},)},
    ],
)
def test_event_rows_refuse_non_finite_numbers(number, where):
    """NaN and the infinities are refused wherever an event may hold a float, as before."""
    with pytest.raises(ValueError):
        event_to_json(make_event(**where(number)))


def test_event_rows_keep_big_integers_and_null():
    """An integer beyond 64 bits (the header takes any within a float's range) is stored and
    read back exactly; a null in the custom data is no NaN."""
    event = make_event(custom_data={"value": 10**30, "neg": -(2**70), "none": None})
    text = event_to_json(event)
    assert text == old_event_json(event)
    assert event_from_json(text).custom_data == {"value": 10**30, "neg": -(2**70), "none": None}
    assert type(event_from_json(text).custom_data["value"]) is int


# -- request bodies ---------------------------------------------------------------------

PLATFORMS = """
[[destinations]]
type = "meta"
pixel_id = "1234"
access_token = "token"

[[destinations]]
type = "tiktok"
pixel_code = "CODE"
access_token = "token"

[[destinations]]
type = "ga4"
measurement_id = "G-TEST"
api_secret = "secret"
"""


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=3), st.text(max_size=10))
def test_platform_bodies_are_the_json_module_s(batch, title):
    """Meta's and TikTok's bodies are the bytes the json module wrote for the same document
    (floats aside); GA4's are ASCII JSON too."""
    batch = [attrs.evolve(e, contents=({"id": "sku", "title": title, "item_price": 1.5},)) for e in batch]
    for configured in parse_config(PLATFORMS, "test.toml").destinations:
        destination = configured.destination
        for request in destination.encode(batch):
            assert request.body.isascii()
            json.loads(request.body)
        if configured.type in ("meta", "tiktok"):
            (request,) = destination.encode(batch)
            *_, document = destination._request(batch)
            assert typed(request.body) == typed(old_ascii(document))


def test_the_fields_a_float_can_reach_are_the_ones_checked_for_non_finite_numbers():
    """event_to_json asks orjson to write an event and checks for NaN and the infinities
    only in the fields given as C{numbers} (orjson writes them as null): a field added to
    Event that can hold a float must be added there too, or a NaN would be stored as null."""
    can_hold_a_float = {
        field.name for field in attrs.fields(Event) if "Any" in str(field.type) or "float" in str(field.type)
    }
    assert can_hold_a_float == {"custom_data", "contents"}
    for field in can_hold_a_float:
        value = {"value": math.nan} if field == "custom_data" else ({"id": "1", "item_price": math.inf},)
        with pytest.raises(ValueError):
            event_to_json(attrs.evolve(make_event(), **{field: value}))
