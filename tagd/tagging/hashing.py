"""Per-platform normalisation and SHA-256 hashing of the visitor's user data.

Platforms match a hash, not a person: C{"John@Example.com "} and C{"john@example.com"}
only meet if both were normalised the same way before hashing, so each platform's
documented rules are followed exactly (see PLATFORMS.md).  Every function here is pure.

Shared rules, for every platform and field:
  - a value that already is 64 hexadecimal characters is a SHA-256 the origin computed
    itself: it is passed on lower-cased and never hashed a second time, to every
    platform alike (so a pre-hashed C{ph} can match only one platform's rule: Meta's,
    digits without "+", is the one docs/configuration.md asks for; TikTok's E.164 keeps the "+");
  - a value that is empty after normalisation says nothing and is dropped;
  - several values for one field stay several values, duplicates removed, order kept.

Input is C{Event.user_data}: Meta's key names (C{em}, C{ph}, ...) mapped to tuples of
strings, raw or already hashed.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import unicodedata
from typing import Callable, Iterable, Mapping

Normaliser = Callable[[str], "str | None"]

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# "+44 (0)20 ..." writes the national trunk zero that is never dialled after a country code.
_TRUNK_ZERO = re.compile(r"\(\s*0\s*\)")
_US_ZIP_PLUS_4 = re.compile(r"(\d{5})[\s-]?\d{4}")
_YEAR_FIRST = re.compile(r"(\d{4})([-/.]?)(\d{1,2})\2(\d{1,2})")
_YEAR_LAST = re.compile(r"(\d{1,2})([-/.])(\d{1,2})\2(\d{4})")

# Meta asks for the 2-letter ANSI code of US states; shops often store the full name.
_US_STATES = dict(
    pair.split(":")
    for pair in (
        "alabama:al alaska:ak arizona:az arkansas:ar california:ca colorado:co connecticut:ct "
        "delaware:de districtofcolumbia:dc florida:fl georgia:ga hawaii:hi idaho:id illinois:il "
        "indiana:in iowa:ia kansas:ks kentucky:ky louisiana:la maine:me maryland:md "
        "massachusetts:ma michigan:mi minnesota:mn mississippi:ms missouri:mo montana:mt "
        "nebraska:ne nevada:nv newhampshire:nh newjersey:nj newmexico:nm newyork:ny "
        "northcarolina:nc northdakota:nd ohio:oh oklahoma:ok oregon:or pennsylvania:pa "
        "rhodeisland:ri southcarolina:sc southdakota:sd tennessee:tn texas:tx utah:ut "
        "vermont:vt virginia:va washington:wa westvirginia:wv wisconsin:wi wyoming:wy"
    ).split()
)


def sha256_hex(text: str) -> str:
    """SHA-256 of the UTF-8 bytes of C{text}, as lower-case hex: what every platform expects."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_sha256_hex(value: str) -> bool:
    """Whether C{value} (surrounding spaces ignored) already is a SHA-256 in hex."""
    return _SHA256_HEX.fullmatch(value.strip()) is not None


def _text(value: str) -> str:
    """Trimmed, lower-cased and NFC-composed, so that "José" typed either way hashes alike."""
    return unicodedata.normalize("NFC", value).strip().lower()


def _letters(value: str) -> str:
    """Only letters (any script, with their accents): no spaces, digits or punctuation."""
    return "".join(c for c in _text(value) if unicodedata.category(c)[0] in "LM")


def _digits(value: str) -> str:
    """Decimal digits of any script as ASCII digits; everything else removed."""
    digits = (unicodedata.decimal(c, None) for c in value)
    return "".join(str(d) for d in digits if d is not None)


def phone_digits(value: str) -> str:
    """The number with its country code as given, digits only, no "+" and no leading zeros.

    A leading "00" is the international call prefix and goes with the other leading zeros;
    a "(0)" after the country code is a trunk zero that is never dialled, so it goes too.
    """
    return _digits(_TRUNK_ZERO.sub("", value)).lstrip("0")


def _email(value: str) -> str | None:
    # An address without "@" cannot match anybody; sending its hash only adds noise.
    text = _text(value)
    return text if "@" in text else None


def _date_of_birth(value: str) -> str | None:
    """YYYYMMDD from year-first dates (1990-01-31, 1990/1/31, 19900131) or, when the day
    cannot be mistaken for the month, year-last ones (31.01.1990, 01/31/1990)."""
    text = value.strip()
    if match := _YEAR_FIRST.fullmatch(text):
        if not match[2] and len(text) != 8:
            return None  # "199011" could be 1990-1-1 or 1990-11-?: guessing would mislead.
        year, month, day = int(match[1]), int(match[3]), int(match[4])
    elif match := _YEAR_LAST.fullmatch(text):
        first, second, year = int(match[1]), int(match[3]), int(match[4])
        if first > 12 or first == second:
            day, month = first, second
        elif second > 12:
            month, day = first, second
        else:
            return None  # 03/04/1990: March or April depends on the country; drop it.
    else:
        return None
    try:
        return datetime.date(year, month, day).strftime("%Y%m%d")
    except ValueError:
        return None


def _gender(value: str) -> str | None:
    # "f", "F", "female", "Male": the first letter says it; anything else is dropped.
    letters = _letters(value)
    return letters[0] if letters[:1] in ("f", "m") else None


def _state(value: str) -> str | None:
    letters = _letters(value)
    return _US_STATES.get(letters, letters)


def _zip(value: str) -> str:
    """Lower case, no spaces or dashes; a US ZIP+4 keeps its first five digits only."""
    text = value.strip()
    if match := _US_ZIP_PLUS_4.fullmatch(text):
        return match[1]
    return re.sub(r"[\s-]", "", text).lower()


def _country(value: str) -> str | None:
    # Only an ISO 3166-1 alpha-2 code is meaningful; "Germany" would never match.
    code = re.sub(r"[^a-z]", "", _text(value))
    return code if len(code) == 2 else None


_META: dict[str, Normaliser] = {
    "em": _email,
    "ph": phone_digits,
    "fn": _letters,
    "ln": _letters,
    "db": _date_of_birth,
    "ge": _gender,
    "ct": _letters,
    "st": _state,
    "zp": _zip,
    "country": _country,
    # Trimmed and lower-cased like every other field: the SDK's Normalize does the same,
    # and the id must hash alike whichever channel (pixel or server) sends it.
    "external_id": _text,
}


def _e164_phone(value: str) -> str | None:
    """E.164, as TikTok, Reddit and Microsoft document it: "+", country code and number,
    digits only."""
    digits = phone_digits(value)
    return "+" + digits if digits else None


def _dotless_email(value: str) -> str | None:
    """Reddit's and Microsoft's rule: the address lower-cased, and in its local part every
    dot and any "+tag" removed, whatever the domain (so "Al.ice+shop@example.com" and
    "alice@example.com" hash alike)."""
    text = _email(value)
    if text is None:
        return None
    local, _, domain = text.rpartition("@")
    local = local.partition("+")[0].replace(".", "")
    return f"{local}@{domain}" if local and domain else None


def _pinterest_gender(value: str) -> str | None:
    # Pinterest documents "n" (non-binary) besides "f" and "m".
    letters = _letters(value)
    return letters[0] if letters[:1] in ("f", "m", "n") else None


# Pinterest's and Snapchat's fields are Meta's, by the same names, with these differences.
_PINTEREST: dict[str, Normaliser] = {**_META, "ge": _pinterest_gender}
_SNAPCHAT: dict[str, Normaliser] = {key: rule for key, rule in _META.items() if key != "db"}

# A platform's name for a field, the Meta key it is read from, and its normalisation.
Renamed = Mapping[str, tuple[str, Normaliser]]
_TIKTOK: Renamed = {
    "email": ("em", _email),
    "phone": ("ph", _e164_phone),
    "external_id": ("external_id", _text),
}
_REDDIT: Renamed = {
    "email": ("em", _dotless_email),
    "phone_number": ("ph", _e164_phone),
    "external_id": ("external_id", _text),
}
_MICROSOFT: Renamed = {
    "em": ("em", _dotless_email),
    "ph": ("ph", _e164_phone),
    "externalId": ("external_id", _text),
}


def _hashed_values(values: Iterable[str], normalise: Normaliser) -> list[str]:
    """Each value normalised then hashed (or passed on if already hashed), empties dropped,
    duplicates removed with the first occurrence's order kept."""
    result: dict[str, None] = {}
    for value in values:
        if is_sha256_hex(value):
            result[value.strip().lower()] = None
        elif normalised := normalise(value):
            result[sha256_hex(normalised)] = None
    return list(result)


def _hashed_fields(user_data: Mapping[str, Iterable[str]], fields: Renamed) -> dict[str, list[str]]:
    """The platform's hashed fields of C{fields} from Meta-named user data: key to list of
    SHA-256 hex, empty fields left out."""
    if not user_data:
        return {}  # Most events carry none: no field to normalise.
    hashed = {name: _hashed_values(user_data.get(source, ()), rule) for name, (source, rule) in fields.items()}
    return {name: hashes for name, hashes in hashed.items() if hashes}


def _same_names(normalisers: Mapping[str, Normaliser]) -> Renamed:
    return {key: (key, rule) for key, rule in normalisers.items()}


_META_FIELDS, _PINTEREST_FIELDS, _SNAPCHAT_FIELDS = map(_same_names, (_META, _PINTEREST, _SNAPCHAT))


def meta_user_data(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Meta's hashed C{user_data} fields: key to list of SHA-256 hex, empty fields left out.

    Receivers with no rules of their own (the webhook) get these too: a shop's warehouse
    can then join its rows with what Meta matched, on the very same hashes.

    Keys Meta does not hash (IP, user agent, fbp, fbc) are not read from here at all;
    unknown keys are ignored rather than sent raw.
    """
    return _hashed_fields(user_data, _META_FIELDS)


def _google_email(value: str) -> str | None:
    """Google's rule: trimmed and lower-cased, and for gmail.com and googlemail.com
    addresses without the dots before the "@"."""
    text = _email(value)
    if text is None:
        return None
    local, _, domain = text.rpartition("@")
    return f"{local.replace('.', '')}@{domain}" if domain in ("gmail.com", "googlemail.com") else text


def _google_name(value: str) -> str:
    """Trimmed, lower-cased, runs of spaces inside made one."""
    return " ".join(_text(value).split())


def ga4_user_data(user_data: Mapping[str, Iterable[str]]) -> dict[str, object]:
    """GA4's hashed C{user_data}: C{sha256_email_address} and C{sha256_phone_number}
    lists, and one C{address} with C{sha256_first_name}/C{sha256_last_name}, as Google's
    Measurement Protocol normalises them (the phone in E.164, with its "+").

    A phone already hashed is left out: the hash the shop was asked for is Meta's, without
    the "+", which never matches Google's.  The address's plain fields (city, region,
    postal code, country) are not sent: GA4 takes them unhashed.
    """
    if not user_data:
        return {}
    fields: dict[str, object] = {}
    if emails := _hashed_values(user_data.get("em", ()), _google_email):
        fields["sha256_email_address"] = emails
    phones = [v for v in user_data.get("ph", ()) if not is_sha256_hex(v)]
    if phones := _hashed_values(phones, _e164_phone):
        fields["sha256_phone_number"] = phones
    address = {}
    for key, name in (("fn", "sha256_first_name"), ("ln", "sha256_last_name")):
        if hashes := _hashed_values(user_data.get(key, ()), _google_name):
            address[name] = hashes[0]
    if address:
        fields["address"] = [address]
    return fields


def tiktok_user_fields(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """TikTok's hashed C{user} fields (C{email}, C{phone}, C{external_id}) from Meta-named
    user data: key to list of SHA-256 hex, empty fields left out."""
    return _hashed_fields(user_data, _TIKTOK)


def pinterest_user_data(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Pinterest's hashed C{user_data} fields, Meta's keys and rules but for the gender
    (C{n} too), each a list as Pinterest requires."""
    return _hashed_fields(user_data, _PINTEREST_FIELDS)


def snapchat_user_data(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Snapchat's hashed C{user_data} fields: Meta's keys and rules, without the date of
    birth, which Snapchat does not take."""
    return _hashed_fields(user_data, _SNAPCHAT_FIELDS)


def reddit_user_fields(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Reddit's hashed C{user} fields (C{email} without dots or "+tag" in its local part,
    C{phone_number} in E.164, C{external_id})."""
    return _hashed_fields(user_data, _REDDIT)


def microsoft_user_fields(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Microsoft's hashed C{userData} fields (C{em} as for Reddit, C{ph} in E.164,
    C{externalId}); Microsoft takes one value of each, the caller picks it."""
    return _hashed_fields(user_data, _MICROSOFT)
