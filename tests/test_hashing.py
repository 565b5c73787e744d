"""Normalisation and hashing of user data, cross-checked against Meta's business SDK.

Where the SDK and PLATFORMS.md disagree, tagd follows PLATFORMS.md (Meta's documented
rules); each such case has its own test, or its own commented group of cases in a shared
one, that says how and why they differ.
"""

from __future__ import annotations

import hashlib

import pytest

from destination_helpers import ALREADY_HASHED, h
from tagd.tagging.hashing import (
    is_sha256_hex,
    meta_user_data,
    phone_digits,
    sha256_hex,
    tiktok_user_fields,
)


@pytest.fixture
def normalize():
    """Meta's SDK normaliser: C{normalize(field, value)} -> hash, or raises for bad input."""
    sdk = pytest.importorskip("facebook_business.adobjects.serverside.normalize")
    return sdk.Normalize.normalize_field


@pytest.fixture
def user_data_class():
    """Meta's SDK C{UserData}, which normalises, hashes and deduplicates lists of values."""
    sdk = pytest.importorskip("facebook_business.adobjects.serverside.user_data")
    return sdk.UserData


# Inputs on which tagd and the SDK must produce the very same hash.
AGREED = [
    ("em", "John.Doe@Example.COM"),
    ("em", "  jane@example.org  "),
    ("em", "\tMixed.Case+tag@Sub.Example.co.uk\n"),
    ("em", "ÉLODIE@exemple.fr"),
    ("em", ALREADY_HASHED.upper()),
    ("em", f"  {ALREADY_HASHED}  "),
    ("ph", "+1 (650) 555-1234"),
    ("ph", "16505551234"),
    ("ph", "+44 844 412 4653"),
    ("ph", "0044 20 7946 0958"),
    ("ph", "+49-30-1234567"),
    ("ph", "(650) 555-1234"),
    ("ph", "06 12 34 56 78"),
    ("ph", ALREADY_HASHED),
    ("fn", "John"),
    ("fn", "  MARY "),
    ("fn", "José"),
    ("fn", "Zoë"),
    ("fn", "Ñandú"),
    ("fn", "Σωκράτης"),
    ("ln", "MÜLLER"),
    ("ln", "Dvořák"),
    ("ct", "New York"),
    ("ct", "São Paulo"),
    ("ct", "St. Louis"),
    ("ct", "Zürich"),
    ("st", "CA"),
    ("st", " ny "),
    ("st", "Bavaria"),
    ("zp", "94025"),
    ("zp", "94025-1234"),
    ("zp", "SW1A 1AA"),
    ("zp", "1234 AB"),
    ("country", "US"),
    ("country", " de "),
    ("country", "U.S."),
    ("db", "19900131"),
    ("ge", "f"),
    ("ge", " M "),
    ("external_id", " abc "),
    ("external_id", "12345"),
    ("external_id", "User-42"),
]


@pytest.mark.parametrize(("field", "value"), AGREED)
def test_same_hash_as_meta_sdk(normalize, field, value):
    """For ordinary and tricky inputs alike, tagd's hash is the SDK's hash."""
    assert meta_user_data({field: (value,)}) == {field: [normalize(field, value)]}


def test_lists_hash_like_meta_sdk_user_data(user_data_class):
    """Several values per field hash and deduplicate as the SDK's C{UserData} does."""
    raw = {
        "em": ("A@Example.com", " a@example.com", "b@example.com", ALREADY_HASHED),
        "ph": ("+1 650 555 1234", "1-650-555-1234", "+44 844 412 4653"),
        "fn": ("José", "JOSÉ", "Ann"),
        "ct": ("Menlo Park", "menlo park"),
        "country": ("US", "fr"),
    }
    sdk = user_data_class(
        emails=list(raw["em"]),
        phones=list(raw["ph"]),
        first_names=list(raw["fn"]),
        cities=list(raw["ct"]),
        country_codes=list(raw["country"]),
    ).normalize()
    ours = meta_user_data(raw)
    assert set(ours) == set(sdk)
    for field, hashes in ours.items():
        assert sorted(hashes) == sorted(sdk[field]), field
        assert len(hashes) == len(set(hashes)), field


def test_external_id_is_hashed_unlike_meta_sdk_user_data(user_data_class):
    """The SDK's C{UserData} sends C{external_id} raw; PLATFORMS.md (and Meta's advice)
    has it hashed.  tagd hashes it after the SDK's generic normalisation (trim, lower)."""
    sdk = user_data_class(external_ids=["User-42"]).normalize()
    assert sdk["external_id"] == ["User-42"]
    assert meta_user_data({"external_id": ("User-42",)}) == {"external_id": [h("user-42")]}


def test_md5_is_hashed_unlike_meta_sdk(normalize):
    """The SDK passes a 32-hex value on as an MD5 hash; Meta's Conversions API takes only
    SHA-256, so tagd treats 32 hex characters as an ordinary value and hashes it."""
    md5 = hashlib.md5(b"someone@example.com").hexdigest()
    assert normalize("external_id", md5) == md5
    assert meta_user_data({"external_id": (md5,)}) == {"external_id": [h(md5)]}


@pytest.mark.parametrize(
    ("value", "digits", "sdk_digits"),
    [
        # "(0)" is a trunk zero never dialled after +44: E.164 has none.
        ("+44 (0)20 7946 0958", "442079460958", "4402079460958"),
        # Dots separate digit groups in many countries; the SDK refuses them.
        ("+1.650.555.1234", "16505551234", None),
        # Letters are not digits: "digits only".
        ("+1 650 555 1234 ext", "16505551234", None),
    ],
)
def test_phone_digits_only_unlike_meta_sdk(normalize, value, digits, sdk_digits):
    """PLATFORMS.md: phone numbers are "digits only, with country code, no leading zeros".
    The SDK only removes spaces, dashes and parentheses and refuses anything else, and it
    keeps a "(0)" trunk zero; tagd keeps every digit but that trunk zero."""
    assert phone_digits(value) == digits
    if sdk_digits is None:
        with pytest.raises(ValueError):
            normalize("ph", value)
    else:
        assert normalize("ph", value) == h(sdk_digits)
    assert meta_user_data({"ph": (value,)}) == {"ph": [h(digits)]}


# Where PLATFORMS.md and the SDK differ: the field, the value, what tagd hashes, and what
# the SDK hashes.
UNLIKE_SDK = [
    # Names and cities are lowercase "with no punctuation" and, for cities, no spaces.  The
    # SDK only lower-cases names and strips a few characters from cities; tagd keeps letters
    # of any script (with accents, Unicode NFC) and nothing else.
    ("fn", "O'Brien", "obrien", "o'brien"),
    ("fn", "Mary-Ann", "maryann", "mary-ann"),
    ("ln", "Anne Marie", "annemarie", "anne marie"),
    ("ct", "Val-d'Or", "valdor", "vald'or"),
    # A decomposed "é" (e + combining accent) is composed first: same as a typed "é".
    ("fn", "Jose\u0301", "josé", "jose\u0301"),
    # C{db} is YYYYMMDD.  The SDK hashes whatever date format it gets; tagd rewrites the
    # common unambiguous formats to YYYYMMDD first.
    ("db", "1990-01-31", "19900131", "1990-01-31"),
    ("db", "1990/1/31", "19900131", "1990/1/31"),
    ("db", "31.01.1990", "19900131", "31.01.1990"),
    ("db", "01/31/1990", "19900131", "01/31/1990"),
    # C{ge} is f/m, C{st} the 2-letter code, C{zp} has no spaces and a US ZIP+4 keeps 5
    # digits.  The SDK hashes "female" and "california" as they are, keeps "940251234"
    # whole and cuts a Polish "00-950" at the dash; tagd follows the rules.
    ("ge", "Female", "f", "female"),
    ("ge", "male", "m", "male"),
    ("st", "California", "ca", "california"),
    ("st", "New York", "ny", "newyork"),
    ("zp", "94025 1234", "94025", "940251234"),
    ("zp", "00-950", "00950", "00"),
]


@pytest.mark.parametrize(("field", "value", "ours", "sdk"), UNLIKE_SDK)
def test_normalised_by_platforms_md_unlike_meta_sdk(normalize, field, value, ours, sdk):
    """tagd hashes what PLATFORMS.md asks for where the SDK hashes something else (the
    comment above each group of cases says how and why)."""
    assert normalize(field, value) == h(sdk)
    assert meta_user_data({field: (value,)}) == {field: [h(ours)]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("em", "not-an-email"),
        ("country", "Germany"),
        ("country", "usa"),
    ],
)
def test_invalid_values_dropped_where_meta_sdk_raises(normalize, field, value):
    """The SDK raises on an address without "@" or a country that is not an ISO code;
    tagd drops the value (it could never match) and keeps the rest of the event."""
    with pytest.raises(TypeError):
        normalize(field, value)
    assert meta_user_data({field: (value,)}) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("db", "03/04/1990"),  # March 4th or April 3rd: depends on the country.
        ("db", "1990-02-30"),
        ("db", "199011"),
        ("db", "next tuesday"),
        ("ge", "x"),
        ("ph", "n/a"),
        ("fn", "  "),
        ("fn", "---"),
        ("zp", " "),
        ("em", ""),
    ],
)
def test_empty_after_normalisation_dropped(field, value):
    """A value with nothing usable left after normalisation is not sent at all."""
    assert meta_user_data({field: (value,)}) == {}


def test_already_hashed_passed_unchanged_lowercased():
    """A 64-hex value is the origin's own SHA-256: passed on lower-cased, not re-hashed,
    whatever the field (even a phone, whose normalisation would destroy it)."""
    for field in ("em", "ph", "fn", "db", "zp", "country", "external_id"):
        assert meta_user_data({field: (f" {ALREADY_HASHED.upper()} ",)}) == {
            field: [ALREADY_HASHED]
        }


def test_not_quite_hashed_is_hashed():
    """63 or 65 hex characters, or a non-hex character, is ordinary data and is hashed."""
    for value in (ALREADY_HASHED[:-1], ALREADY_HASHED + "0", ALREADY_HASHED[:-1] + "g"):
        assert not is_sha256_hex(value)
        assert meta_user_data({"external_id": (value,)}) == {"external_id": [h(value)]}


def test_list_order_kept_duplicates_removed():
    """Values keep the origin's order; two spellings of one value are sent once."""
    result = meta_user_data({"em": ("b@x.com", "A@x.com", " a@x.com ", ALREADY_HASHED)})
    assert result == {"em": [h("b@x.com"), h("a@x.com"), ALREADY_HASHED]}


def test_unknown_and_raw_keys_ignored():
    """Only Meta's hashed keys are read: anything else is never sent, hashed or raw."""
    assert meta_user_data({"client_ip_address": ("1.2.3.4",), "password": ("x",)}) == {}


def test_sha256_hex_is_lowercase_utf8():
    """Hashes are of the UTF-8 bytes, written as 64 lower-case hex characters."""
    assert sha256_hex("josé") == h("josé")
    assert sha256_hex("josé") == sha256_hex("josé").lower()
    assert len(sha256_hex("")) == 64


def test_tiktok_email_and_external_id_trimmed_lowercased():
    """TikTok: email and external id are trimmed and lower-cased before hashing."""
    fields = tiktok_user_fields({"em": (" Jane@Example.COM ",), "external_id": (" User-42 ",)})
    assert fields == {"email": [h("jane@example.com")], "external_id": [h("user-42")]}


@pytest.mark.parametrize(
    ("value", "e164"),
    [
        ("+1 (650) 555-1234", "+16505551234"),
        ("0044 20 7946 0958", "+442079460958"),
        ("+44 (0)20 7946 0958", "+442079460958"),
        ("+49.30.1234567", "+49301234567"),
        ("16505551234", "+16505551234"),
    ],
)
def test_tiktok_phone_is_e164(value, e164):
    """TikTok wants E.164 before hashing: "+", country code and number, digits only
    (unlike Meta, which wants the same digits without the "+")."""
    assert tiktok_user_fields({"ph": (value,)}) == {"phone": [h(e164)]}
    assert meta_user_data({"ph": (value,)}) == {"ph": [h(e164[1:])]}


def test_tiktok_reads_only_its_fields():
    """TikTok gets email, phone and external id; names, city or birth date are not sent."""
    fields = tiktok_user_fields({"fn": ("Ann",), "ct": ("Paris",), "db": ("19900131",)})
    assert fields == {}


def test_tiktok_already_hashed_and_empty():
    """TikTok follows the shared rules: hashes pass unchanged, empty values are dropped."""
    fields = tiktok_user_fields({"em": (ALREADY_HASHED.upper(), " "), "ph": ("none",)})
    assert fields == {"email": [ALREADY_HASHED]}

