"""First-party identifiers that the ad platforms match events on, and the cookies that keep them.

Meta matches on C{_fbp} (a browser id) and C{_fbc} (the ad click, from C{fbclid}); TikTok on
C{ttclid} and C{_ttp}; GA4 needs the C{client_id} of the C{_ga} cookie and a session id.
Pinterest, Snapchat, Reddit and Microsoft match on the click id of their ads (L{CLICK_IDS}),
and the last three also on their pixel's browser id (C{_scid}, C{_rdt_uuid}, C{_uetvid}),
which tagd reads but never creates.
tagd reads what the browser already has and, where something is missing, sets the same
cookies the browser pixels would set, on the shop's registrable domain (L{tagd.tagging.cookiedomain}),
and Meta's in the form its server-side Parameter Builder writes them, so that the server
event and the browser pixel share ids and the platform deduplicates.  It creates an id only where
it may also keep it in a cookie: an id kept nowhere would be a new visitor on every page.

Everything here is pure: the current time and the source of randomness are arguments, so
tests are deterministic.  Request data is untrusted: a value is used only when it has the
documented format, and nothing from the request reaches a C{Set-Cookie} unless it is made
of cookie-safe characters.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from functools import lru_cache
from typing import Collection, Iterable, Mapping, Protocol
from base64 import urlsafe_b64encode
from urllib.parse import quote, unquote_to_bytes

import attrs

from tagd import __version__
from tagd.tagging.cookiedomain import HOST_ONLY_SCOPE, CookieScope

DAY = 24 * 3600
FBP_MAX_AGE = 90 * DAY  # Meta's first-party cookies live 90 days.
FBC_MAX_AGE = 90 * DAY
TTCLID_MAX_AGE = 30 * DAY  # TikTok keeps the click id 30 days.
EPIK_MAX_AGE = 365 * DAY  # The lifetimes the platforms' own server-side tags give these.
SCCLID_MAX_AGE = 365 * DAY
RDT_CID_MAX_AGE = 30 * DAY
MSCLKID_MAX_AGE = 90 * DAY
GA_MAX_AGE = 400 * DAY  # gtag's two years, capped by browsers at 400 days.
SESSION_MAX_AGE = 1800  # GA4's default session timeout: 30 minutes of inactivity.
EVENT_ID_MAX_AGE = 60  # Long enough for the page's pixel to read it, short enough not to linger.
SESSION_COOKIE = "_tagd_sid"

# The platforms whose ids tagd can create and keep in first-party cookies.
META, TIKTOK, GA4 = "meta", "tiktok", "ga4"
PINTEREST, SNAPCHAT, REDDIT, MICROSOFT = "pinterest", "snapchat", "reddit", "microsoft"
PLATFORMS = frozenset({META, TIKTOK, GA4, PINTEREST, SNAPCHAT, REDDIT, MICROSOFT})

# Meta: fb.{subdomain_index}.{creation_ms}.{random or fbclid}[.{appendix}].  The appendix
# names the library that wrote the value: 2 characters (a language token) in its first
# form, 8 base64url characters (format, language, kind of write, version) in its second;
# Meta's Parameter Builder takes nothing else for one.
_APPENDIX = r"(?:\.(?:AQ|Ag|Aw|BA|BQ|Bg|[A-Za-z0-9_-]{8}))?"
_FBCLID = re.compile(r"[A-Za-z0-9_-]{1,500}")
_FBP = re.compile(r"fb\.\d{1,2}\.\d{1,13}\.\d{1,20}(" + _APPENDIX + ")")
_FBC = re.compile(r"fb\.\d{1,2}\.\d{1,13}\.([A-Za-z0-9_-]{1,500})(" + _APPENDIX + ")")
# TikTok's ids, and the other platforms' click ids, are opaque tokens; these are the
# characters they use, all cookie-safe.
_TIKTOK_ID = re.compile(r"[A-Za-z0-9._~+/=-]{1,500}")
# The pixels' browser ids: Snapchat's and Microsoft's are UUIDs (Microsoft's without its
# dashes), Reddit's "{creation_ms}.{uuid}".
_BROWSER_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_RDT_UUID = re.compile(r"\d{1,13}\.[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# GA: GA1.{domain depth}.{random}.{first-visit seconds}; client_id is the last two fields.
_GA = re.compile(r"GA1\.\d{1,2}\.(\d{1,20}\.\d{1,20})")
_GS1 = re.compile(r"GS1\.\d{1,2}\.(\d{1,20})\..*")
_GS2 = re.compile(r"GS2\.\d{1,2}\.(.*)")
_DIGITS = re.compile(r"\d{1,20}")
# RFC 6265: a cookie name is an RFC 7230 token; a value is made of cookie-octets.
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_COOKIE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# What a Domain attribute may hold: tagd.tagging.cookiedomain hands out lower-case ASCII host names.
_DOMAIN = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)+")
# Characters kept as they are when an event id is put in a cookie: cookie-octets but "%".
_EVENT_ID_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"
# An id that quote() would give back unchanged (a generated one is hex): no need to call it.
_EVENT_ID_UNCHANGED = re.compile("[A-Za-z0-9" + re.escape(_EVENT_ID_SAFE) + "]*")
# A request cookie longer than this is nothing tagd reads.
MAX_COOKIE = 1024


class RandomSource(Protocol):
    """What tagd needs from a source of randomness: a C{random.Random} seeded from the OS in
    production (ids must be unique, not unpredictable)."""

    def randrange(self, start: int, stop: int = ..., /) -> int: ...

    def getrandbits(self, k: int, /) -> int: ...


@attrs.frozen(kw_only=True)
class VisitorIds:
    """The ids the platforms match a visitor on, declared once: L{Identity} resolves them
    for a response and every L{tagd.tagging.events.Event} carries them.

    Keyword-only, so that a class built on these can still list its own required fields
    first.  Ids are pseudonymous but personal: kept out of repr so that no log line shows them.
    """

    fbp: str | None = attrs.field(default=None, repr=False)
    fbc: str | None = attrs.field(default=None, repr=False)
    ttclid: str | None = attrs.field(default=None, repr=False)
    ttp: str | None = attrs.field(default=None, repr=False)
    ga_client_id: str | None = attrs.field(default=None, repr=False)
    ga_session_id: str | None = attrs.field(default=None, repr=False)
    epik: str | None = attrs.field(default=None, repr=False)
    scclid: str | None = attrs.field(default=None, repr=False)
    scid: str | None = attrs.field(default=None, repr=False)
    rdt_cid: str | None = attrs.field(default=None, repr=False)
    rdt_uuid: str | None = attrs.field(default=None, repr=False)
    msclkid: str | None = attrs.field(default=None, repr=False)
    uetvid: str | None = attrs.field(default=None, repr=False)


@attrs.frozen(kw_only=True)
class Identity(VisitorIds):
    """The visitor's ids for one tracked response, and the cookies to add to that response."""

    set_cookies: tuple[bytes, ...] = attrs.field(default=(), repr=False)


# --- reading the request --------------------------------------------------------------------


def parse_cookie_header(values: Iterable[bytes]) -> dict[bytes, bytes]:
    """The cookies of C{Cookie} header values, the first one winning when a name repeats.

    Browsers list the cookie with the most specific path first, and for equal paths the
    oldest first: the first is the one the site's own scripts most likely meant.
    """
    cookies: dict[bytes, bytes] = {}
    for value in values:
        for pair in value.split(b";"):
            name, sep, content = pair.partition(b"=")
            name = name.strip()
            if sep and name and name not in cookies:
                cookies[name] = content.strip()
    return cookies


def cookie_text(cookies: Mapping[bytes, bytes], name: bytes) -> str | None:
    """A request cookie as ASCII text without optional surrounding quotes, or C{None}.

    C{None} too for a value longer than any cookie tagd reads, or not ASCII: no id, click
    id or consent value tagd compares against holds anything else.
    """
    raw = cookies.get(name)
    if raw is None or len(raw) > MAX_COOKIE:
        return None
    if len(raw) >= 2 and raw[:1] == raw[-1:] == b'"':
        raw = raw[1:-1]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _valid(value: str | None, pattern: re.Pattern) -> str | None:
    return value if value is not None and pattern.fullmatch(value) else None


def _query_params(query: bytes, wanted: frozenset[str]) -> dict[str, str]:
    """The first value of each C{wanted} query parameter, decoded as a browser's URL API does.

    Percent-escapes are decoded and C{+} is a space, as in C{URLSearchParams}; a value that
    is not UTF-8 is skipped.  Case is kept: click ids are case-sensitive.
    """
    found: dict[str, str] = {}
    for pair in query.removeprefix(b"?").split(b"&"):
        raw_name, _, raw_value = pair.partition(b"=")
        try:
            name = _form_decode(raw_name)
            if name in wanted and name not in found:
                found[name] = _form_decode(raw_value)
        except UnicodeDecodeError:
            continue
    return found


def _form_decode(raw: bytes) -> str:
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")


# --- writing cookies ------------------------------------------------------------------------


def set_cookie(
    name: str,
    value: str,
    max_age: int,
    *,
    secure: bool,
    now: float | None = None,
    domain: str | None = None,
) -> bytes:
    """A C{Set-Cookie} value for a first-party cookie that the page's scripts can read.

    C{Domain} when given (see L{tagd.tagging.cookiedomain}; a host-only cookie without it),
    C{Path=/} so that every page sees it, C{SameSite=Lax} so that it is sent on the click
    from an ad, C{Secure} on https, never C{HttpOnly}: the browser pixels read these
    cookies.  C{Expires} (from C{now}) as well as C{Max-Age}, for old browsers.  A name or
    value that is not cookie-safe is a programming error, never written.
    """
    return _cookie(name, value, _attributes_of(name, max_age, now, domain, secure))


def _cookie(name: str, value: str, attributes: str) -> bytes:
    """The C{Set-Cookie} value of C{name} and C{value}, refused unless both are cookie-safe."""
    if not _cookie_name_safe(name) or not _COOKIE_VALUE.fullmatch(value):
        raise ValueError(f"refusing to write an unsafe cookie {name!r}")
    return (name + "=" + value + attributes).encode("ascii")


def _attributes_of(name: str, max_age: int, now: float | None, domain: str | None, secure: bool) -> str:
    """L{_attributes} for cookie C{name}, whose name a refusal of the domain gives."""
    try:
        return _attributes(max_age, None if now is None else int(now + max_age), domain, secure)
    except ValueError:
        raise ValueError(f"refusing to write cookie {name!r} for an unsafe domain") from None


@lru_cache(maxsize=64)
def _cookie_name_safe(name: str) -> bool:
    """Whether C{name} is a cookie token: tagd's own names, and the event-id cookies' few."""
    return _COOKIE_NAME.fullmatch(name) is not None


@lru_cache(maxsize=32)
def _attributes(max_age: int, expires: int | None, domain: str | None, secure: bool) -> str:
    """What follows a cookie's value, from C{; Max-Age} to C{Secure}: written once per
    second and kind of cookie, not for every cookie of every tracked response."""
    if domain is not None and not _DOMAIN.fullmatch(domain):
        raise ValueError("unsafe domain")
    parts = ["", f"Max-Age={max_age}"]
    if expires is not None:
        parts.append("Expires=" + formatdate(expires, usegmt=True))
    if domain is not None:
        parts.append(f"Domain={domain}")
    parts += ["Path=/", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


# --- Meta -----------------------------------------------------------------------------------

# Meta's kinds of write, the third byte of the appendix.
APPENDIX_NO_CHANGE, APPENDIX_NET_NEW, APPENDIX_MODIFIED_NEW = 0x00, 0x02, 0x03
# The appendix's format, and its language: Python, which tagd is written in.
_APPENDIX_FORMAT, _APPENDIX_LANGUAGE = 0x01, 0x02


def appendix(kind: int, version: str = __version__) -> str:
    """The appendix tagd adds to an C{_fbp} or C{_fbc} it writes: Meta's second form, with
    tagd's own version (see docs/tracking-header.md on why not Meta's library's)."""
    major, minor, patch = (int(part) for part in version.split(".")[:3])
    raw = bytes([_APPENDIX_FORMAT, _APPENDIX_LANGUAGE, kind, major, minor, patch])
    return urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_NO_CHANGE, _NET_NEW, _MODIFIED_NEW = (
    appendix(kind) for kind in (APPENDIX_NO_CHANGE, APPENDIX_NET_NEW, APPENDIX_MODIFIED_NEW)
)


def _fbp(
    cookies: Mapping[bytes, bytes], now: float, rand: RandomSource, create: bool, index: int
) -> tuple[str | None, bool]:
    """The visitor's C{_fbp}, and whether tagd must set it, as Meta's Parameter Builder does.

    A well-formed cookie with an appendix is kept as it is; one without (the pixel's old
    four segments) gains a "no change" appendix, its time and index kept; an absent or
    malformed one is replaced, only when tagd may C{create} it, by a new one: the sub-domain
    C{index} of the cookie's domain, the time in ms, the pixel's 10-digit random number
    below 2**31 and a "new" appendix.
    """
    existing = cookie_text(cookies, b"_fbp")
    match = _FBP.fullmatch(existing) if existing is not None else None
    if match is not None:
        if match[1] or not create:
            return existing, False
        return f"{existing}.{_NO_CHANGE}", True
    if not create:
        return None, False
    return f"fb.{index}.{int(now * 1000)}.{rand.randrange(10**9, 2**31)}.{_NET_NEW}", True


def _fbc(
    cookies: Mapping[bytes, bytes], fbclid: str | None, now: float, create: bool, index: int
) -> tuple[str | None, bool]:
    """The visitor's C{_fbc}, and whether tagd must set it, as Meta's Parameter Builder does.

    A new click (a URL C{fbclid} that the cookie does not hold) makes a new C{_fbc} with
    the C{fbclid} exactly as sent, at the current time, with a "new" appendix, or a
    "modified" one when it replaces a well-formed cookie.  Otherwise a well-formed cookie
    is used, a four-segment one upgraded as for L{_fbp} when tagd may C{create} cookies.
    """
    existing = cookie_text(cookies, b"_fbc")
    match = _FBC.fullmatch(existing) if existing is not None else None
    if fbclid is not None and _FBCLID.fullmatch(fbclid):
        if match is None or match[1] != fbclid:
            kind = _NET_NEW if match is None else _MODIFIED_NEW
            return f"fb.{index}.{int(now * 1000)}.{fbclid}.{kind}", True
    if match is None:
        return None, False
    if match[2] or not create:
        return existing, False
    return f"{existing}.{_NO_CHANGE}", True


# --- click ids ------------------------------------------------------------------------------


@attrs.frozen
class ClickId:
    """Where one platform's ad click id comes from: the URL parameters an ad click carries
    it in (the first one present wins), and the first-party cookie its pixel keeps it in,
    the value written after C{prefix}."""

    platform: str
    params: tuple[str, ...]
    cookie: str
    max_age: int
    prefix: str = ""


# The platforms' ad click ids, by their field of L{VisitorIds} (Meta's C{fbclid} is the
# C{_fbc} cookie's, see L{_fbc}).  Snap's documented parameter is "ScCid"; its own
# server-side tag reads it lower-cased.  Microsoft's UET tag keeps the msclkid as "_uet"
# followed by the id.
CLICK_IDS: Mapping[str, ClickId] = {
    "ttclid": ClickId(TIKTOK, ("ttclid",), "ttclid", TTCLID_MAX_AGE),
    "epik": ClickId(PINTEREST, ("epik",), "_epik", EPIK_MAX_AGE),
    "scclid": ClickId(SNAPCHAT, ("ScCid", "sccid"), "_scclid", SCCLID_MAX_AGE),
    "rdt_cid": ClickId(REDDIT, ("rdt_cid",), "_rdt_cid", RDT_CID_MAX_AGE),
    "msclkid": ClickId(MICROSOFT, ("msclkid",), "_uetmsclkid", MSCLKID_MAX_AGE, prefix="_uet"),
}


# Each click id's field, its source, and its cookie's name as a request spells it.
_CLICKS = tuple((field, click, click.cookie.encode("ascii")) for field, click in CLICK_IDS.items())


def _click_id(
    cookies: Mapping[bytes, bytes], click: ClickId, cookie_name: bytes, params: Mapping[str, str]
) -> tuple[str | None, bool]:
    """A platform's click id, from the URL first, else from its cookie C{cookie_name}; and
    whether the cookie must be set (the URL carries a click the cookie does not hold)."""
    stored = cookie_text(cookies, cookie_name)
    if stored is not None and click.prefix:
        stored = stored[len(click.prefix) :] if stored.startswith(click.prefix) else None
    cookie = _valid(stored, _TIKTOK_ID)
    url = next((_valid(params[name], _TIKTOK_ID) for name in click.params if name in params), None)
    if url is not None:
        return url, url != cookie
    return cookie, False


# --- GA4 ------------------------------------------------------------------------------------


def _ga_client_id(
    cookies: Mapping[bytes, bytes], now: float, rand: RandomSource, create: bool
) -> tuple[str | None, bool]:
    """GA4's client id from C{_ga}, whatever its domain-depth field; a new one when absent
    and tagd may C{create} it."""
    existing = cookie_text(cookies, b"_ga")
    match = _GA.fullmatch(existing) if existing is not None else None
    if match is not None:
        return match[1], False
    if not create:
        return None, False
    return f"{rand.randrange(1, 2**31)}.{int(now)}", True


def _ga_session_start(value: str) -> int | None:
    """The session start (Unix seconds) in a C{_ga_<stream>} cookie, old or new format.

    C{GS1.1.1706540400.3.1....}: the third field.  C{GS2.1.s1706540400$o3$g1$...}: the
    C{s} field of the C{$}-separated list.
    """
    if match := _GS1.fullmatch(value):
        return int(match[1])
    if match := _GS2.fullmatch(value):
        for field in match[1].split("$"):
            if field[:1] == "s" and _DIGITS.fullmatch(field[1:]):
                return int(field[1:])
    return None


def _ga_session(cookies: Mapping[bytes, bytes]) -> int | None:
    """The latest session start among the C{_ga_*} cookies: the visit going on now."""
    starts = []
    for name in cookies:
        if name.startswith(b"_ga_") and (value := cookie_text(cookies, name)) is not None:
            if (start := _ga_session_start(value)) is not None:
                starts.append(start)
    return max(starts, default=None)


def _own_session(cookies: Mapping[bytes, bytes], now: float) -> int:
    """tagd's own session start, for sites without gtag: kept while the cookie lives.

    The cookie's 30-minute lifetime is renewed on each tracked response, so it expires
    after 30 minutes without one, as a GA4 session does.  A value from the future is not
    believed.
    """
    value = _valid(cookie_text(cookies, SESSION_COOKIE.encode("ascii")), _DIGITS)
    if value is not None and 0 < int(value) <= now + 60:
        return int(value)
    return int(now)


# --- all together ---------------------------------------------------------------------------

_WANTED_PARAMS = frozenset({"fbclid", *(name for click in CLICK_IDS.values() for name in click.params)})
_NO_CLICK = (None, False)


def resolve_identity(
    *,
    cookies: Mapping[bytes, bytes],
    query: bytes,
    now: float,
    secure: bool,
    rand: RandomSource,
    create_for: Collection[str],
    scope: CookieScope = HOST_ONLY_SCOPE,
    session_cookie: str = SESSION_COOKIE,
) -> Identity:
    """The visitor's ids for one tracked response, and the C{Set-Cookie} values to add.

    C{query} is the request's query string; C{secure} whether the visitor's scheme is
    https.  C{create_for} names the platforms (of L{PLATFORMS}) whose missing ids tagd
    creates and keeps in first-party cookies.  For any other platform only the ids the
    visitor already has, in a cookie or in the URL, are used, and nothing is invented: an
    id that no cookie keeps would be new on every page view, a new "user" or browser to
    the platform each time.  (An C{_fbc} built from a URL C{fbclid} is no invention: it is
    the click itself, in the form Meta documents for servers.)  Call it only for a response
    that will be tracked: a refused consent sets no cookie.  Every cookie is set for
    C{scope}'s domain, and Meta's new ids carry its sub-domain index.
    """
    params = _query_params(query, _WANTED_PARAMS) if query else {}
    meta = META in create_for
    fbp, new_fbp = _fbp(cookies, now, rand, meta, scope.dots)
    fbc, new_fbc = _fbc(cookies, params.get("fbclid"), now, meta, scope.dots)
    client_id, new_ga = _ga_client_id(cookies, now, rand, GA4 in create_for)
    session = _ga_session(cookies)
    domain = scope.domain
    to_set = []
    if new_fbp:
        to_set.append(set_cookie("_fbp", fbp, FBP_MAX_AGE, secure=secure, now=now, domain=domain))
    if new_fbc and meta:
        to_set.append(set_cookie("_fbc", fbc, FBC_MAX_AGE, secure=secure, now=now, domain=domain))
    if new_ga:
        to_set.append(set_cookie("_ga", "GA1.1." + client_id, GA_MAX_AGE, secure=secure, now=now, domain=domain))
    if session is None and GA4 in create_for:
        session = _own_session(cookies, now)
        to_set.append(set_cookie(session_cookie, str(session), SESSION_MAX_AGE, secure=secure, now=now, domain=domain))
    clicks = {}
    # A visitor with neither cookies nor URL parameters has no click id: nothing to read.
    if cookies or params:
        for field, click, cookie_name in _CLICKS:
            value, new = clicks[field] = _click_id(cookies, click, cookie_name, params)
            if new and value is not None and click.platform in create_for:
                cookie = set_cookie(click.cookie, click.prefix + value, click.max_age, secure=secure, now=now, domain=domain)
                to_set.append(cookie)
    return Identity(
        fbp=fbp,
        fbc=fbc,
        ttp=_valid(cookie_text(cookies, b"_ttp"), _TIKTOK_ID),
        ga_client_id=client_id,
        ga_session_id=None if session is None else str(session),
        ttclid=clicks.get("ttclid", _NO_CLICK)[0],
        epik=clicks.get("epik", _NO_CLICK)[0],
        scclid=clicks.get("scclid", _NO_CLICK)[0],
        rdt_cid=clicks.get("rdt_cid", _NO_CLICK)[0],
        msclkid=clicks.get("msclkid", _NO_CLICK)[0],
        scid=_valid(cookie_text(cookies, b"_scid"), _BROWSER_ID),
        rdt_uuid=_valid(cookie_text(cookies, b"_rdt_uuid"), _RDT_UUID),
        uetvid=_valid(cookie_text(cookies, b"_uetvid"), _BROWSER_ID),
        set_cookies=tuple(to_set),
    )


# --- event ids ------------------------------------------------------------------------------


def new_event_id(rand: RandomSource) -> str:
    """A fresh event id: 128 random bits as 32 hex digits, unique well beyond Meta's 48 h dedup window."""
    return f"{rand.getrandbits(128):032x}"


def event_id_cookies(
    event_ids: Mapping[str, str],
    secure: bool = False,
    *,
    max_age: int = EVENT_ID_MAX_AGE,
    now: float | None = None,
    domain: str | None = None,
) -> list[bytes]:
    """Short-lived cookies, each holding an event id under its name in C{event_ids}, for the
    page's pixel to send the same ids.

    An id from the origin's header may hold any character: those that are not cookie-safe
    are percent-encoded, so a page reads it back with C{decodeURIComponent}.  A generated
    id (hex) is written unchanged.  The cookies share their attributes, written once.
    """
    attributes = _attributes_of(next(iter(event_ids), ""), max_age, now, domain, secure)
    values: dict[str, str] = {}  # by id: a response's first id goes in two cookies
    cookies = []
    for name, event_id in event_ids.items():
        value = values.get(event_id)
        if value is None:
            unchanged = _EVENT_ID_UNCHANGED.fullmatch(event_id)
            value = values[event_id] = event_id if unchanged else quote(event_id, safe=_EVENT_ID_SAFE)
        cookies.append(_cookie(name, value, attributes))
    return cookies
