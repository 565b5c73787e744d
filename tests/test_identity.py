"""Unit tests for the first-party identifiers and cookies in L{tagd.tagging.identity}."""

from __future__ import annotations

import random
import re
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagd.daemon.config import TrackingConfig
from tagd.tagging.cookiedomain import CookieScope
from tagd.tagging.identity import (
    APPENDIX_MODIFIED_NEW,
    APPENDIX_NET_NEW,
    APPENDIX_NO_CHANGE,
    GA4,
    META,
    PLATFORMS,
    SESSION_COOKIE,
    TIKTOK,
    Identity,
    appendix,
    event_id_cookies,
    new_event_id,
    parse_cookie_header,
    resolve_identity,
    set_cookie,
)

# What an event id keeps unescaped in its cookie: the cookie-octets but "%".
EVENT_ID_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"
NOW = 1_706_540_400.25  # 2024-01-29T15:00:00.25Z
NOW_MS = 1_706_540_400_250
FBP = re.compile(r"fb\.1\.(\d{13})\.(\d{10})\.AQICAAEA")
NEW, MODIFIED, NO_CHANGE = (appendix(kind) for kind in (APPENDIX_NET_NEW, APPENDIX_MODIFIED_NEW, APPENDIX_NO_CHANGE))
# Host-only cookies of a host with one dot (example.com): Meta's sub-domain index 1.
SCOPE = CookieScope(None, 1)
FBCLID = "IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYXQvwjNwB_qa2ofrHyiLjcbCRxTDMgk"
TTCLID = "E.C.P.CscBAbCdEf-GhIj_KlMn+Op/Qr=="
COOKIE_OCTETS = re.compile(rb"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
ATTRIBUTE = re.compile(rb"Max-Age=\d+|Domain=[a-z0-9.-]+|Expires=[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT|Path=/|SameSite=Lax|Secure")


def resolve(
    cookies=None,
    query: bytes = b"",
    *,
    secure: bool = True,
    seed: int = 1,
    now: float = NOW,
    create_for=PLATFORMS,
    scope: CookieScope = SCOPE,
) -> Identity:
    """L{resolve_identity} with a seeded random source and a fixed clock; by default tagd
    may create the ids of every platform."""
    return resolve_identity(
        cookies=cookies or {},
        query=query,
        now=now,
        secure=secure,
        rand=random.Random(seed),
        create_for=create_for,
        scope=scope,
    )


def parse_set_cookie(header: bytes) -> tuple[bytes, bytes, dict[bytes, bytes | None]]:
    """Name, value and attributes of a C{Set-Cookie} value, checking its shape on the way."""
    first, *attributes = header.split(b"; ")
    name, _, value = first.partition(b"=")
    assert COOKIE_OCTETS.fullmatch(value), value
    for attribute in attributes:
        assert ATTRIBUTE.fullmatch(attribute), attribute
    attrs = {}
    for attribute in attributes:
        key, sep, val = attribute.partition(b"=")
        attrs[key] = val if sep else None
    return name, value, attrs


def cookies_set(identity: Identity) -> dict[bytes, tuple[bytes, dict]]:
    """The cookies an identity sets, by name."""
    parsed = [parse_set_cookie(h) for h in identity.set_cookies]
    result = {name: (value, attrs) for name, value, attrs in parsed}
    assert len(result) == len(parsed), "no cookie is set twice"
    return result


# --- a first visit --------------------------------------------------------------------------


def test_first_visit_sets_fbp_ga_and_session() -> None:
    """A visitor with no cookie gets a new C{_fbp}, C{_ga} and tagd session cookie, in the
    formats the browser pixels write, and no click cookie."""
    identity = resolve()
    assert FBP.fullmatch(identity.fbp)
    assert FBP.fullmatch(identity.fbp)[1] == str(NOW_MS)
    assert int(FBP.fullmatch(identity.fbp)[2]) < 2**31
    assert re.fullmatch(r"\d{1,10}\.1706540400", identity.ga_client_id)
    assert identity.ga_session_id == "1706540400"
    assert (identity.fbc, identity.ttclid, identity.ttp) == (None, None, None)
    set_ = cookies_set(identity)
    assert sorted(set_) == sorted([b"_fbp", b"_ga", SESSION_COOKIE.encode()])
    assert set_[b"_fbp"][0] == identity.fbp.encode()
    assert set_[b"_ga"][0] == b"GA1.1." + identity.ga_client_id.encode()
    assert set_[SESSION_COOKIE.encode()][0] == b"1706540400"


def test_lifetimes_are_the_platforms() -> None:
    """C{_fbp} 90 days, C{_fbc} 90 days, C{ttclid} 30 days, C{_ga} 400 days, the session
    30 minutes, each with a matching C{Expires}."""
    identity = resolve(query=b"fbclid=" + FBCLID.encode() + b"&ttclid=abc")
    expected = {b"_fbp": 90 * 86400, b"_fbc": 90 * 86400, b"ttclid": 30 * 86400, b"_ga": 400 * 86400, SESSION_COOKIE.encode(): 1800}
    set_ = cookies_set(identity)
    assert {name: int(attrs[b"Max-Age"]) for name, (_, attrs) in set_.items()} == expected
    for name, (_, attrs) in set_.items():
        expires = parsedate_to_datetime(attrs[b"Expires"].decode()).timestamp()
        assert expires == int(NOW + expected[name]), name


@pytest.mark.parametrize("secure", [True, False])
def test_cookie_attributes(secure: bool) -> None:
    """Every cookie: Path=/, SameSite=Lax, Secure exactly on https, never HttpOnly, and no
    Domain for a host-only scope."""
    identity = resolve(query=b"fbclid=abc&ttclid=def", secure=secure)
    assert len(identity.set_cookies) == 5
    for header in identity.set_cookies:
        _, _, attrs = parse_set_cookie(header)
        assert attrs[b"Path"] == b"/"
        assert attrs[b"SameSite"] == b"Lax"
        assert (b"Secure" in attrs) is secure
        assert b"httponly" not in header.lower()
        assert b"domain" not in header.lower()


def test_seeded_randomness_is_deterministic() -> None:
    """The same seed and clock give the same ids and cookies; another seed other ids."""
    assert resolve(seed=7) == resolve(seed=7)
    assert resolve(seed=7).fbp != resolve(seed=8).fbp
    assert resolve(seed=7).ga_client_id != resolve(seed=8).ga_client_id


# --- Meta -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fbp",
    [
        "fb.2.1706540000000.42.AQ",
        "fb.1.1706540000000.1234567890.Bg",
        "fb.1.1706540000000.1234567890.AQIBAAEA",
    ],
)
def test_valid_fbp_is_kept(fbp: str) -> None:
    """A well-formed C{_fbp} with Meta's fifth segment is used as it is."""
    identity = resolve({b"_fbp": fbp.encode()})
    assert identity.fbp == fbp
    assert b"_fbp" not in cookies_set(identity)


@pytest.mark.parametrize("fbp", ["fb.1.1706540000000.1234567890", "fb.2.1706540000000.42"])
def test_four_segment_fbp_is_upgraded(fbp: str) -> None:
    """The pixel's old four segments gain a "no change" appendix, time and index kept,
    and are set again, as Meta's Parameter Builder does."""
    identity = resolve({b"_fbp": fbp.encode()})
    assert identity.fbp == f"{fbp}.{NO_CHANGE}"
    assert cookies_set(identity)[b"_fbp"][0] == identity.fbp.encode()


def test_four_segment_fbp_is_used_unchanged_when_no_cookie_may_be_set() -> None:
    identity = resolve({b"_fbp": b"fb.1.1706540000000.42"}, create_for=frozenset())
    assert identity.fbp == "fb.1.1706540000000.42"
    assert identity.set_cookies == ()


def test_the_appendix_names_tagd_s_version() -> None:
    """Meta's second form: format 1, language 2 (Python), the kind of write, then tagd's
    version, not any release of Meta's library."""
    from base64 import urlsafe_b64decode

    from tagd import __version__

    raw = urlsafe_b64decode(appendix(APPENDIX_NET_NEW) + "==")
    assert list(raw) == [1, 2, 2, *(int(part) for part in __version__.split("."))]
    assert len({NEW, MODIFIED, NO_CHANGE}) == 3 and all(len(a) == 8 for a in (NEW, MODIFIED, NO_CHANGE))


def test_new_ids_carry_the_sub_domain_index_and_domain() -> None:
    """The index is the cookie domain's number of dots; every cookie names the domain."""
    scope = CookieScope("example.co.uk", 2)
    identity = resolve(query=b"fbclid=Click&ttclid=T1", scope=scope)
    assert identity.fbp.startswith("fb.2.") and identity.fbc == f"fb.2.{NOW_MS}.Click.{NEW}"
    for header in identity.set_cookies:
        assert parse_set_cookie(header)[2][b"Domain"] == b"example.co.uk"


@pytest.mark.parametrize(
    "fbp",
    [b"", b"fb.1.abc.123", b"fb.1.1706540000000", b"fb.1.1706540000000.12.Bg.x", b"fb.1.1706540000000.12.Zz", b"fb.1.1706540000000.12.AQIBAAE", b"xx.1.1706540000000.1", b"fb.1.17.1;x=y", b"\xff"],
)
def test_malformed_fbp_is_replaced(fbp: bytes) -> None:
    """A malformed C{_fbp} is ignored and replaced by a new one."""
    identity = resolve({b"_fbp": fbp})
    assert FBP.fullmatch(identity.fbp)
    assert cookies_set(identity)[b"_fbp"][0] == identity.fbp.encode()


def test_fbclid_builds_fbc_case_kept() -> None:
    """A URL C{fbclid} makes C{_fbc} = fb.1.{creation ms}.{fbclid}.{appendix}, the click
    id unchanged in case and content, the appendix saying "new"."""
    identity = resolve(query=b"utm_source=fb&fbclid=" + FBCLID.encode())
    assert identity.fbc == f"fb.1.{NOW_MS}.{FBCLID}.{NEW}"
    assert cookies_set(identity)[b"_fbc"][0] == identity.fbc.encode()


def test_fbclid_is_percent_decoded_as_a_browser_does() -> None:
    """Escapes in the query are decoded before the click id is used; the first C{fbclid}
    parameter counts; an escaped parameter name counts too."""
    assert resolve(query=b"fbclid=Iw%41R_x-Y").fbc == f"fb.1.{NOW_MS}.IwAR_x-Y.{NEW}"
    assert resolve(query=b"fbclid=First&fbclid=Second").fbc == f"fb.1.{NOW_MS}.First.{NEW}"
    assert resolve(query=b"fb%63lid=Named").fbc == f"fb.1.{NOW_MS}.Named.{NEW}"
    assert resolve(query=b"?fbclid=Lead").fbc == f"fb.1.{NOW_MS}.Lead.{NEW}"


def test_existing_fbc_is_kept_for_the_same_click() -> None:
    """An C{_fbc} for the same click is kept with its creation time and fifth segment."""
    fbc = f"fb.1.1706000000000.{FBCLID}.Bg"
    for query in (b"", b"fbclid=" + FBCLID.encode()):
        identity = resolve({b"_fbc": fbc.encode()}, query)
        assert identity.fbc == fbc
        assert b"_fbc" not in cookies_set(identity)


def test_different_fbclid_rebuilds_fbc() -> None:
    """A new click, an C{fbclid} other than the cookie's, makes a new C{_fbc}, its
    appendix saying "modified"."""
    identity = resolve({b"_fbc": f"fb.1.1706000000000.{FBCLID}".encode()}, b"fbclid=" + FBCLID.lower().encode())
    assert identity.fbc == f"fb.1.{NOW_MS}.{FBCLID.lower()}.{MODIFIED}"
    assert cookies_set(identity)[b"_fbc"][0] == identity.fbc.encode()


def test_four_segment_fbc_is_upgraded_for_the_same_click() -> None:
    """An old four-segment C{_fbc} of the same click gains a "no change" appendix."""
    fbc = f"fb.1.1706000000000.{FBCLID}"
    for query in (b"", b"fbclid=" + FBCLID.encode()):
        identity = resolve({b"_fbc": fbc.encode()}, query)
        assert identity.fbc == f"{fbc}.{NO_CHANGE}"
        assert cookies_set(identity)[b"_fbc"][0] == identity.fbc.encode()


def test_malformed_fbc_is_ignored_or_replaced() -> None:
    """A malformed C{_fbc} is not used; a URL click id replaces it."""
    assert resolve({b"_fbc": b"fb.1.x.abc"}).fbc is None
    assert b"_fbc" not in cookies_set(resolve({b"_fbc": b"fb.1.x.abc"}))
    assert resolve({b"_fbc": b"fb.1.x.abc"}, b"fbclid=New").fbc == f"fb.1.{NOW_MS}.New.{NEW}"


@pytest.mark.parametrize("query", [b"fbclid=", b"fbclid=a%3Bb", b"fbclid=a+b", b"fbclid=a.b", b"fbclid=%FF", b"fbclid=" + b"a" * 501])
def test_unsafe_fbclid_is_never_used(query: bytes) -> None:
    """A click id with characters Meta's never holds, or absurdly long, makes no C{_fbc}."""
    identity = resolve(query=query)
    assert identity.fbc is None
    assert b"_fbc" not in cookies_set(identity)


# --- TikTok ---------------------------------------------------------------------------------


def test_ttclid_from_url_becomes_a_cookie() -> None:
    """A URL C{ttclid} is used and kept 30 days in a first-party C{ttclid} cookie."""
    identity = resolve(query=b"ttclid=" + TTCLID.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D").encode())
    assert identity.ttclid == TTCLID
    assert cookies_set(identity)[b"ttclid"][0] == TTCLID.encode()


def test_ttclid_cookie_is_used_without_url() -> None:
    """Without a URL C{ttclid}, the cookie's is used and not set again."""
    identity = resolve({b"ttclid": b"E.C.P.abc"})
    assert identity.ttclid == "E.C.P.abc"
    assert b"ttclid" not in cookies_set(identity)


def test_new_ttclid_replaces_the_cookie() -> None:
    """A URL C{ttclid} other than the cookie's wins and is set; the same one is not set again."""
    changed = resolve({b"ttclid": b"old"}, b"ttclid=new")
    assert changed.ttclid == "new"
    assert cookies_set(changed)[b"ttclid"][0] == b"new"
    same = resolve({b"ttclid": b"same"}, b"ttclid=same")
    assert same.ttclid == "same"
    assert b"ttclid" not in cookies_set(same)


def test_ttp_is_read_only() -> None:
    """C{_ttp} is TikTok's pixel's cookie: read when well-formed, never set by tagd."""
    assert resolve({b"_ttp": b"2rn6vP1V1NoGrFW62vHkLGnC5He"}).ttp == "2rn6vP1V1NoGrFW62vHkLGnC5He"
    assert resolve({b"_ttp": b"bad value;"}).ttp is None
    assert b"_ttp" not in cookies_set(resolve())


# --- GA4 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [b"GA1.1.", b"GA1.2.", b"GA1.3."])
def test_ga_client_id_from_any_depth(prefix: bytes) -> None:
    """C{_ga} gives the client id after its version and domain-depth fields."""
    identity = resolve({b"_ga": prefix + b"1234567890.1706540400"})
    assert identity.ga_client_id == "1234567890.1706540400"
    assert b"_ga" not in cookies_set(identity)


@pytest.mark.parametrize("ga", [b"GA1.1.abc.123", b"GA2.1.1.2", b"1234567890.1706540400", b"GA1.1.1234567890"])
def test_invalid_ga_gets_a_new_client_id(ga: bytes) -> None:
    """Without a valid C{_ga} tagd sets one: GA1.1.{31-bit random}.{unix seconds}."""
    identity = resolve({b"_ga": ga})
    value = cookies_set(identity)[b"_ga"][0]
    match = re.fullmatch(rb"GA1\.1\.(\d+)\.1706540400", value)
    assert match and 0 < int(match[1]) < 2**31
    assert identity.ga_client_id == value[len(b"GA1.1."):].decode()


@pytest.mark.parametrize(
    "value",
    [
        b"GS1.1.1706540400.3.1.1706540500.0.0.0",
        b"GS2.1.s1706540400$o3$g1$t1706540500$j60$l0$h0",
        b"GS2.1.o3$s1706540400$g1",
    ],
)
def test_ga_session_from_stream_cookie(value: bytes) -> None:
    """The session id is the session start of a C{_ga_<stream>} cookie, old or new format,
    and tagd then keeps no session cookie of its own."""
    identity = resolve({b"_ga": b"GA1.1.1.2", b"_ga_ABC123XYZ": value})
    assert identity.ga_session_id == "1706540400"
    assert SESSION_COOKIE.encode() not in cookies_set(identity)


def test_latest_ga_session_wins() -> None:
    """Of several streams' cookies, the latest session start is the visit going on."""
    identity = resolve({b"_ga_A": b"GS1.1.1706000000.1.1.1706000001.0.0.0", b"_ga_B": b"GS2.1.s1706540000$o1"})
    assert identity.ga_session_id == "1706540000"


def test_own_session_cookie_is_kept_and_refreshed() -> None:
    """Without a GA session, tagd's own cookie holds the session start; each tracked
    response sets it again so that it lasts 30 minutes past the last page."""
    first = resolve(now=NOW)
    assert first.ga_session_id == "1706540400"
    later = resolve({SESSION_COOKIE.encode(): b"1706540400", b"_ga_X": b"garbage"}, now=NOW + 600)
    assert later.ga_session_id == "1706540400"
    value, attrs = cookies_set(later)[SESSION_COOKIE.encode()]
    assert (value, attrs[b"Max-Age"]) == (b"1706540400", b"1800")


@pytest.mark.parametrize("value", [b"abc", b"0", b"9999999999", b"-5", b""])
def test_bad_own_session_starts_a_new_one(value: bytes) -> None:
    """A session cookie that is not a past timestamp starts a new session now."""
    identity = resolve({SESSION_COOKIE.encode(): value})
    assert identity.ga_session_id == "1706540400"


# --- platforms tagd may not create ids for --------------------------------------------------


def test_nothing_is_invented_when_no_cookie_may_be_set() -> None:
    """With no platform to create ids for, a visitor without cookies gets no C{_fbp}, no GA
    client id and no session, and no cookie: an id kept nowhere would be new on every page."""
    identity = resolve(create_for=frozenset())
    assert (identity.fbp, identity.fbc, identity.ttclid, identity.ttp) == (None, None, None, None)
    assert (identity.ga_client_id, identity.ga_session_id) == (None, None)
    assert identity.set_cookies == ()


def test_existing_ids_are_used_when_no_cookie_may_be_set() -> None:
    """The ids the visitor already has, in cookies or in the URL, are still used, and no
    cookie is written for them; the GA session comes from GA's own cookie only."""
    fbp, fbc = "fb.1.1706540000000.1234567890", "fb.1.1706540000000.OldClick.Bg"
    cookies = {
        b"_fbp": fbp.encode(),
        b"_fbc": fbc.encode(),
        b"_ga": b"GA1.1.1234567890.1706540000",
        b"_ga_ABC": b"GS2.1.s1706540100$o1",
        b"_ttp": b"2rn6vP1V1NoGrFW62vHkLGnC5He",
    }
    identity = resolve(cookies, b"ttclid=E.C.P.abc", create_for=frozenset())
    assert (identity.fbp, identity.fbc) == (fbp, fbc)
    assert (identity.ttclid, identity.ttp) == ("E.C.P.abc", "2rn6vP1V1NoGrFW62vHkLGnC5He")
    assert (identity.ga_client_id, identity.ga_session_id) == ("1234567890.1706540000", "1706540100")
    assert identity.set_cookies == ()


def test_own_session_cookie_is_not_read_when_it_may_not_be_renewed() -> None:
    """Without GA4 to create ids for, tagd's own session cookie is not a session: tagd
    would not renew it, so only GA's C{_ga_*} cookies give one."""
    identity = resolve({SESSION_COOKIE.encode(): b"1706540000"}, create_for=frozenset({META}))
    assert identity.ga_session_id is None
    assert SESSION_COOKIE.encode() not in cookies_set(identity)


def test_a_new_click_is_used_but_not_kept_when_no_cookie_may_be_set() -> None:
    """A URL C{fbclid} still makes the event's C{fbc} (it is the click itself, not an
    invented id) and a URL C{ttclid} is used, but neither is written to a cookie."""
    identity = resolve(query=b"fbclid=Click1&ttclid=E.C.P.xyz", create_for=frozenset())
    assert identity.fbc == f"fb.1.{NOW_MS}.Click1.{NEW}"
    assert identity.ttclid == "E.C.P.xyz"
    assert identity.set_cookies == ()


@pytest.mark.parametrize(
    "platforms, expected",
    [
        ({META}, {b"_fbp", b"_fbc"}),
        ({TIKTOK}, {b"ttclid"}),
        ({GA4}, {b"_ga", SESSION_COOKIE.encode()}),
        ({META, GA4}, {b"_fbp", b"_fbc", b"_ga", SESSION_COOKIE.encode()}),
    ],
)
def test_cookies_only_for_the_platforms_named(platforms, expected) -> None:
    """A first visit from a click on both networks gets the cookies of the named
    platforms only, and ids are created for those platforms only."""
    identity = resolve(query=b"fbclid=Click1&ttclid=E.C.P.xyz", create_for=frozenset(platforms))
    assert set(cookies_set(identity)) == expected
    assert (identity.fbp is not None) is (META in platforms)
    assert (identity.ga_client_id is not None) is (GA4 in platforms)
    assert (identity.ga_session_id is not None) is (GA4 in platforms)


# --- event ids ------------------------------------------------------------------------------


def test_event_ids_are_32_hex_and_deterministic() -> None:
    """An event id is 32 lower-case hex digits from the random source."""
    rand = random.Random(3)
    ids = [new_event_id(rand) for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 1000
    assert new_event_id(random.Random(3)) == ids[0]


def test_event_id_cookie() -> None:
    """The event id cookie is short-lived, script-readable, Lax, Secure on https."""
    (header,) = event_id_cookies({"_eid": "0123456789abcdef0123456789abcdef"}, True)
    name, value, attrs = parse_set_cookie(header)
    assert (name, value) == (b"_eid", b"0123456789abcdef0123456789abcdef")
    assert attrs == {b"Max-Age": b"60", b"Path": b"/", b"SameSite": b"Lax", b"Secure": None}
    (plain,) = event_id_cookies({TrackingConfig().event_id_cookie: "abc"}, False)
    assert plain == b"tagd_event_id=abc; Max-Age=60; Path=/; SameSite=Lax"


def test_event_id_cookie_escapes_unsafe_ids() -> None:
    """An origin's id with unsafe characters is percent-encoded, never written raw."""
    (header,) = event_id_cookies({"_eid": 'order 42; "x"\r\nSet-Cookie: evil=1'}, False)
    name, value, _ = parse_set_cookie(header)
    assert value == b"order%2042%3B%20%22x%22%0D%0ASet-Cookie:%20evil=1"
    assert b"\r" not in header and b"\n" not in header


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True), st.text(min_size=1, max_size=40), min_size=1, max_size=4),
    st.booleans(),
    st.one_of(st.none(), st.just("example.co.uk")),
)
def test_event_id_cookies_are_each_the_cookie_of_its_id(ids, secure, domain) -> None:
    """Written together, each event-id cookie is the one C{set_cookie} writes for its id,
    percent-encoded as C{quote} does (an id it would leave as it is is not passed to it)."""
    now = 1_700_000_000.5
    cookies = event_id_cookies(ids, secure, now=now, domain=domain)
    assert cookies == [
        set_cookie(name, quote(value, safe=EVENT_ID_SAFE), 60, secure=secure, now=now, domain=domain)
        for name, value in ids.items()
    ]


def test_unsafe_cookie_names_are_refused() -> None:
    """A configured cookie name that is not a token is a programming error, never written."""
    with pytest.raises(ValueError):
        event_id_cookies({"bad name": "abc"}, False)
    with pytest.raises(ValueError):
        set_cookie("ok", "bad;value", 60, secure=False)


# --- the Cookie header ----------------------------------------------------------------------


def test_parse_cookie_header() -> None:
    """Cookie headers are split into names and values, the first of a repeated name wins."""
    cookies = parse_cookie_header([b"_fbp=fb.1.1.2; _ga=GA1.1.1.2;broken; =x", b"_fbp=second; empty="])
    assert cookies == {b"_fbp": b"fb.1.1.2", b"_ga": b"GA1.1.1.2", b"empty": b""}


# --- anything at all ------------------------------------------------------------------------

NAMES = st.sampled_from([b"_fbp", b"_fbc", b"_ga", b"_ga_X1", b"_ttp", b"ttclid", SESSION_COOKIE.encode()])
VALUES = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"fb.1.1706540000000.1234567890", b"GA1.1.1.2", b"GS2.1.s1$o1", b"fb.1.1.a;b"]).flatmap(
        lambda v: st.binary(max_size=4).map(lambda extra: v + extra)
    ),
)
QUERIES = st.one_of(
    st.binary(max_size=80),
    st.lists(
        st.tuples(st.sampled_from([b"fbclid", b"ttclid", b"x"]), st.binary(max_size=30)), max_size=4
    ).map(lambda pairs: b"&".join(k + b"=" + v for k, v in pairs)),
    st.text(max_size=30).map(lambda t: b"fbclid=" + t.encode("utf-8") + b"&ttclid=%0D%0A%3B" + t.encode("utf-8")),
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.one_of(NAMES, st.binary(max_size=10)), VALUES, max_size=8),
    QUERIES,
    st.booleans(),
    st.frozensets(st.sampled_from(sorted(PLATFORMS))),
)
def test_arbitrary_request_data_never_breaks_a_cookie(cookies, query, secure, create_for) -> None:
    """Whatever the cookies and query hold, and whichever platforms tagd may create ids
    for, resolving never raises and every Set-Cookie is one cookie-safe name=value pair
    followed by tagd's own attributes."""
    identity = resolve(cookies, query, secure=secure, create_for=create_for)
    for header in identity.set_cookies:
        assert b"\r" not in header and b"\n" not in header
        name, value, attrs = parse_set_cookie(header)
        assert re.fullmatch(rb"[A-Za-z0-9_]+", name)
        assert b";" not in value and b" " not in value
        assert (b"Secure" in attrs) is secure
    for field in (identity.fbp, identity.fbc, identity.ttclid, identity.ttp, identity.ga_client_id, identity.ga_session_id):
        assert field is None or COOKIE_OCTETS.fullmatch(field.encode("ascii"))
