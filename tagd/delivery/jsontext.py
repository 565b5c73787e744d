"""JSON for what tagd writes and reads once per event: orjson's speed, the json module's output.

The spool stores every accepted event as JSON and every destination sends its batches as
JSON, on the reactor thread; orjson does that several times faster than the standard
library.  At the edges it behaves otherwise, though: it writes NaN and the infinities as
C{null} (the json module refuses them, or writes tokens no JSON parser takes), refuses
integers beyond 64 bits, keys that are not strings and lone surrogates (the json module
writes them all), never escapes non-ASCII text, and reads an integer beyond 64 bits as
a float.  So each function here answers as the json module does with the options tagd
has always used: from orjson where its answer is the same JSON (floats may be spelt
differently, C{1e-05} as C{0.00001}), from the json module for the rare value where it
might not be, which then costs what it always did.  (A UUID or an enum member, which
orjson writes and the json module does not, is nothing an event holds.)
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, Callable

import orjson

# A number of 19 digits or more may be an integer beyond 64 bits, which orjson reads as a
# float; a number starts the text or follows "[", ":" or "," (digits in a string rarely do).
_LONG_NUMBER = re.compile(r"(?:^|[\[:,])\s*-?\d{19}")
# Dates and dataclasses, which orjson would write itself, go to C{default} as in the json module.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _json_escapes(error: UnicodeError) -> tuple[str, int]:
    """The json module's C{ensure_ascii} escapes for the characters ASCII cannot hold:
    C{\\uXXXX} in lower-case hex, a surrogate pair above the Basic Multilingual Plane."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    escaped = []
    for character in error.object[error.start : error.end]:
        code = ord(character)
        if code > 0xFFFF:
            code -= 0x10000
            escaped.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
        else:
            escaped.append(f"\\u{code:04x}")
    return "".join(escaped), error.end


_ESCAPES = "tagd-json-escapes"
codecs.register_error(_ESCAPES, _json_escapes)


def json_text(document: Any, *, default: Callable[[Any], Any] | None = None, numbers: Any = None) -> str:
    """C{json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
    default=default)}: raises C{ValueError} for a non-finite number as that does.

    C{numbers} is the part of C{document} that may hold floats, when not all of it: a
    document whose other parts are often C{None} is checked for a NaN written as
    C{null} there only.
    """
    try:
        text = orjson.dumps(document, default=default, option=_OPTIONS)
        probe = text if numbers is None else orjson.dumps(numbers, default=default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        probe = b"null"  # A big integer, a key that is no string, a lone surrogate.
    if b"null" in probe:
        # Perhaps a NaN that orjson wrote as null: the json module decides.
        return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default)
    return text.decode("utf-8")


def json_value(text: str) -> Any:
    """C{json.loads(text)}: integers of any size stay integers."""
    if _LONG_NUMBER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # The json module reads what orjson refuses (NaN, a lone surrogate), or says why not.
    return json.loads(text)


def json_ascii(document: Any) -> bytes:
    """C{json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")}, the
    platforms' request bodies (ASCII, so that no transport can mangle a visitor's name):
    non-ASCII text as C{\\uXXXX} escapes, NaN and infinities as the tokens that writes."""
    try:
        data = orjson.dumps(document, option=_OPTIONS)
    except orjson.JSONEncodeError:
        data = b"null"  # A big integer, a key that is no string, a lone surrogate.
    if b"null" in data:
        # Perhaps a NaN that orjson wrote as null: the json module writes what it always did.
        return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if not data.isascii():
        # orjson escapes what JSON requires and leaves any other character as UTF-8:
        # escaping those gives the json module's bytes.
        data = data.decode("utf-8").encode("ascii", _ESCAPES)
    # DEL too, as the json module escapes it; it can only be inside a string.
    return data.replace(b"\x7f", b"\\u007f") if b"\x7f" in data else data
