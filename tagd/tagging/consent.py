"""What the visitor consented to, read per purpose from where the shop's banner records it.

tagd knows two purposes: C{marketing} (ads: Meta, TikTok, Google's ad use of GA4 data)
and C{analytics} (measurement: GA4).  Each destination says which one it needs
(C{consent_purpose}, C{none} for a shop's own receivers), and tagd decides per destination:
a visitor who allows analytics but not marketing still reaches GA4, and never Meta.

Where the choice is read (C{[tracking] consent_source}):
  - C{""}: no banner of a known kind.  Global Privacy Control and the one C{consent_cookie}
    decide for every purpose at once, as they did before purposes existed; without a
    consent cookie nothing is known and everything is allowed (L{UNKNOWN}).
  - C{"tcf"}: the IAB TCF v2.2 string in C{euconsent-v2}; marketing needs purposes 1, 3
    and 4, analytics 1 and 8 (L{TCF_PURPOSES}).
  - C{"cookiebot"}: Cookiebot's C{CookieConsent}: its C{marketing} and C{statistics}.
  - C{"onetrust"}: OneTrust's C{OptanonConsent}: the groups C{C0004} (targeting) and
    C{C0002} (performance).
With a source set, no record at all means no consent.  C{Sec-GPC: 1} comes first, always
(when C{honor_gpc}): it refuses both purposes, whatever a cookie says.

Cookies are the visitor's to write: a value that is not the documented format grants
nothing.  Each reader is pure and cheap; it runs for every tracked response.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Mapping, Sequence
from urllib.parse import unquote

from twisted.web.http_headers import Headers

from tagd.tagging.identity import MAX_COOKIE, cookie_text
from tagd.tagging.tcf import consented_purposes

MARKETING, ANALYTICS, NONE = "marketing", "analytics", "none"
PURPOSES = (MARKETING, ANALYTICS)
CONSENT_PURPOSES = (*PURPOSES, NONE)
ALL = frozenset(PURPOSES)
NOTHING: frozenset[str] = frozenset()
# No consent record was consulted: every purpose is allowed, and nothing is claimed to the
# platforms (GA4 gets no consent object, Meta and TikTok no Limited Data Use flag for it).
UNKNOWN = None
Granted = frozenset[str] | None

# Each destination type's purpose unless its table says otherwise.
DEFAULT_PURPOSES: Mapping[str, str] = {
    "meta": MARKETING,
    "tiktok": MARKETING,
    "ga4": ANALYTICS,
    "pinterest": MARKETING,
    "snapchat": MARKETING,
    "reddit": MARKETING,
    "microsoft": MARKETING,
    "webhook": NONE,
    "log": NONE,
}

TCF_COOKIE = b"euconsent-v2"
TCF_PURPOSES: Mapping[str, frozenset[int]] = {
    MARKETING: frozenset({1, 3, 4}),  # store on a device, create and use an ads profile
    ANALYTICS: frozenset({1, 8}),  # store on a device, measure content performance
}
COOKIEBOT_COOKIE = b"CookieConsent"
COOKIEBOT_CATEGORIES: Mapping[str, str] = {MARKETING: "marketing", ANALYTICS: "statistics"}
# Cookiebot writes "-1" for a visitor in a region where it asks no consent.
COOKIEBOT_NOT_REQUIRED = "-1"
# Read on the cookie as sent, percent-encoded or not: decoding the whole value first (its
# stamp and other fields) would cost more than reading the two fields that matter.
_COOKIEBOT_START = re.compile(r"\{|%7B", re.IGNORECASE)
_COOKIEBOT_FIELD = re.compile(r"(?:\{|,|%7B|%2C)\s*(marketing|statistics)\s*(?::|%3A)\s*(true|false)\b", re.IGNORECASE)
ONETRUST_COOKIE = b"OptanonConsent"
ONETRUST_GROUPS: Mapping[str, str] = {MARKETING: "C0004", ANALYTICS: "C0002"}
_ONETRUST_GROUPS_FIELD = re.compile(r"(?:^|&)groups=([^&]*)")
_ONETRUST_GROUP = re.compile(r"(?:^|,)(C\d{4}):([01])(?=,|$)")

SOURCES = ("", "tcf", "cookiebot", "onetrust")
# Distinct consent records whose reading is remembered, per source: only values of at
# most MAX_COOKIE bytes are read and cached (a longer one, like any cookie tagd reads,
# grants nothing), so a few MB at most.
CACHED_RECORDS = 4096


def gpc(headers: Headers) -> bool:
    """Whether the browser sends Global Privacy Control's opt-out signal, C{Sec-GPC: 1}."""
    return any(v.strip() == b"1" for v in headers.getRawHeaders(b"sec-gpc", ()))


def allows(granted: Granted, purpose: str) -> bool:
    """Whether a destination needing C{purpose} may have this visitor's events."""
    return purpose == NONE or granted is UNKNOWN or purpose in granted


def _by_value(name: bytes):
    """A reader of cookie C{name}'s purposes from one that reads the value's text, cached
    by the value: a returning visitor sends the same record with every page view."""

    def decorate(read: Callable[[str], frozenset[str]]) -> Callable[[Mapping[bytes, bytes]], frozenset[str]]:
        @functools.lru_cache(maxsize=CACHED_RECORDS)
        def cached(raw: bytes) -> frozenset[str]:
            value = cookie_text({name: raw}, name)
            return NOTHING if value is None else read(value)

        def granted(cookies: Mapping[bytes, bytes]) -> frozenset[str]:
            raw = cookies.get(name)
            return NOTHING if raw is None or len(raw) > MAX_COOKIE else cached(raw)

        granted.__doc__ = read.__doc__
        granted.cache_clear = cached.cache_clear  # for the benchmark of a first reading
        granted.cache_info = cached.cache_info  # for the test of what is kept
        return granted

    return decorate


@_by_value(TCF_COOKIE)
def from_tcf(value: str) -> frozenset[str]:
    """The purposes an C{euconsent-v2} TC string grants."""
    consented = consented_purposes(value)
    return frozenset(p for p, needed in TCF_PURPOSES.items() if needed <= consented)


@_by_value(COOKIEBOT_COOKIE)
def from_cookiebot(value: str) -> frozenset[str]:
    """The purposes Cookiebot's C{CookieConsent} grants: C{{stamp:'...',necessary:true,
    preferences:false,statistics:true,marketing:false,...}}, percent-encoded."""
    if value == COOKIEBOT_NOT_REQUIRED:
        return ALL
    if not _COOKIEBOT_START.match(value):
        return NOTHING
    # Cookiebot writes each field once; one written twice grants only if both say true.
    fields: dict[str, bool] = {}
    for name, state in _COOKIEBOT_FIELD.findall(value):
        fields[name.lower()] = fields.get(name.lower(), True) and state.lower() == "true"
    return frozenset(p for p, name in COOKIEBOT_CATEGORIES.items() if fields.get(name, False))


@_by_value(ONETRUST_COOKIE)
def from_onetrust(value: str) -> frozenset[str]:
    """The purposes OneTrust's C{OptanonConsent} grants: its C{groups} field, as
    C{C0001:1,C0002:0,...} in a query-string-like value."""
    field = _ONETRUST_GROUPS_FIELD.search(value)
    if field is None:
        return NOTHING
    groups = dict(_ONETRUST_GROUP.findall(unquote(field[1].replace("+", " "))))
    return frozenset(p for p, group in ONETRUST_GROUPS.items() if groups.get(group) == "1")


_READERS: Mapping[str, Callable[[Mapping[bytes, bytes]], frozenset[str]]] = {
    "tcf": from_tcf,
    "cookiebot": from_cookiebot,
    "onetrust": from_onetrust,
}


class ConsentReader:
    """The visitor's granted purposes for one response, as C{[tracking]} says to read them."""

    def __init__(
        self,
        *,
        honor_gpc: bool = True,
        source: str = "",
        consent_cookie: str = "",
        consent_values: Sequence[str] = (),
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown consent source {source!r}")
        self._honor_gpc = honor_gpc
        self._read = _READERS.get(source)
        self._cookie = consent_cookie.encode("utf-8") if consent_cookie else None
        self._values = frozenset(consent_values)

    def granted(self, headers: Headers, cookies: Mapping[bytes, bytes]) -> Granted:
        """The purposes granted, or L{UNKNOWN} when no record was consulted."""
        if self._honor_gpc and gpc(headers):
            return NOTHING
        if self._read is not None:
            return self._read(cookies)
        if self._cookie is None:
            return UNKNOWN
        return ALL if cookie_text(cookies, self._cookie) in self._values else NOTHING
