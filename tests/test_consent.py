"""Consent per purpose (L{tagd.tagging.consent}, L{tagd.tagging.tcf}): GPC, the one consent cookie, IAB TCF
v2.2 strings, Cookiebot's and OneTrust's cookies, and the decision per destination.

TC strings come from the IAB's own TCF library (its tests' published strings) and are
checked against C{iab-tcf}, an independent decoder, as the oracle; random core segments
too, so that a bit read at the wrong offset shows.
"""

from __future__ import annotations

from base64 import urlsafe_b64encode
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from iab_tcf import decode_v2
from twisted.web.http_headers import Headers

from tagd.tagging.consent import (
    ALL,
    ANALYTICS,
    MARKETING,
    NONE,
    NOTHING,
    UNKNOWN,
    ConsentReader,
    allows,
    from_cookiebot,
    from_onetrust,
    from_tcf,
)
from tagd.tagging.identity import MAX_COOKIE
from tagd.tagging.tcf import consented_purposes

# From the IAB's TCF library (InteractiveAdvertisingBureau/iabtcf-es, its tests and README):
# the string, its policy version, and the purposes it consents to, as iab-tcf decodes them.
IAB_STRINGS = [
    # TCF v2.2 (policy version 5), purposes 1 to 11.
    (
        "CQd924AQd924AASACCENCNFsAP_gAEIAACiQL6QBAAGAAOANmAcAF9IAIADgAA.IL6AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.YIAAAAAAAAAA",
        5,
        set(range(1, 12)),
    ),
    ("COrVd1pOrVd1pACABCENAHCAAAAAAAAAAAiQAAAAAAAA", 2, set()),
    (
        "CLSYjTaOngnCIAOABBENAXCMAGOAABBAAA7IA5n-m7fP6_3fbqVv6E__PoA5Aqff3aJx8tv_1967rfnQEQoAIAAQCrwkAEABAcACABIMACAAuApEVABABUSABgBCAVSAtIoACACIArYQAHACgAFgAVwBJgDcAI7AWgMAAgBiKgAgBMgFfKQAQBRkQAQA4AFiBAAoA-AEVAJlAVgAtYcACAJcAr4eABAK8OgBgFzAOmAqwgABAWyA.IFukWSQh",
        2,
        {2, 3, 7, 8, 9},
    ),
]


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


def oracle(tc_string: str) -> set[int]:
    return {purpose for purpose, given_ in decode_v2(tc_string).purposes_consent.items() if given_}


# --- TCF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tc_string", "policy", "purposes"), IAB_STRINGS)
def test_iab_strings_decode_to_their_purposes(tc_string, policy, purposes) -> None:
    """Each published string gives the purposes the independent decoder reads in it."""
    assert decode_v2(tc_string).tcf_policy_version == policy
    assert oracle(tc_string) == purposes
    assert consented_purposes(tc_string) == purposes


def test_a_v2_2_string_granting_1_to_11_grants_both_purposes() -> None:
    """Purposes 1, 3, 4 make marketing, 1 and 8 analytics."""
    assert from_tcf({b"euconsent-v2": IAB_STRINGS[0][0].encode()}) == ALL


def test_purposes_without_1_grant_nothing() -> None:
    """Purposes 3 and 8 without 1 (storing on the device) are no consent to either."""
    assert from_tcf({b"euconsent-v2": IAB_STRINGS[2][0].encode()}) == NOTHING


def core_segment(purposes: set[int], rest: bytes, version: int = 2, policy: int = 4) -> str:
    """A core segment with C{purposes} consented, other fields from C{rest}'s bits."""
    bits = int.from_bytes(rest.ljust(32, b"\0")[:32], "big") & ((1 << 256) - 1)
    total = 256
    def put(value: int, offset: int, width: int) -> None:
        nonlocal bits
        shift = total - offset - width
        bits = bits & ~(((1 << width) - 1) << shift) | (value << shift)
    put(version, 0, 6)
    put(policy, 132, 6)
    put(sum(1 << (24 - p) for p in purposes), 152, 24)
    return urlsafe_b64encode(bits.to_bytes(32, "big")).rstrip(b"=").decode()


@given(st.sets(st.integers(1, 24)), st.binary(min_size=32, max_size=32))
def test_any_core_segment_reads_as_the_oracle_reads_it(purposes, rest) -> None:
    """Whatever the other fields hold, the purposes read are those the oracle reads."""
    tc_string = core_segment(purposes, rest)
    assert consented_purposes(tc_string) == oracle(tc_string) == purposes


@pytest.mark.parametrize(
    "value",
    ["", "not base64!", "AAAA", core_segment({1, 3, 4}, b"", version=1), "C" * 5, "CQd9=="],
)
def test_what_is_no_tc_v2_string_consents_to_nothing(value) -> None:
    """Garbage, another version, a string cut before the purposes: nothing."""
    assert consented_purposes(value) == frozenset()


@given(st.text(max_size=300))
def test_any_text_never_breaks_the_decoder(value) -> None:
    assert consented_purposes(value) <= set(range(1, 25))


# --- Cookiebot ------------------------------------------------------------------------------


def cookiebot(marketing: str, statistics: str) -> bytes:
    """Cookiebot's cookie as it writes it: a JavaScript object, percent-encoded."""
    text = (
        "{stamp:'-8cbmCjKzlmdtTiSEAxXlpgLQ98FA5IDpbDHy1oVsSgpjBsVXR1L3g==',necessary:true,"
        f"preferences:true,statistics:{statistics},marketing:{marketing},method:'explicit',"
        "ver:1,utc:1740000000000,region:'de'}"
    )
    return quote(text, safe="").encode()


@pytest.mark.parametrize(
    ("marketing", "statistics", "granted"),
    [("true", "true", ALL), ("true", "false", {MARKETING}), ("false", "true", {ANALYTICS}), ("false", "false", NOTHING)],
)
def test_cookiebot_categories(marketing, statistics, granted) -> None:
    assert from_cookiebot({b"CookieConsent": cookiebot(marketing, statistics)}) == granted


def test_cookiebot_unquoted_and_not_required() -> None:
    """Read unencoded too; "-1" is Cookiebot's "no consent needed in this region"."""
    plain = b"{stamp:'x',necessary:true,preferences:false,statistics:true,marketing:true,ver:1}"
    assert from_cookiebot({b"CookieConsent": plain}) == ALL
    assert from_cookiebot({b"CookieConsent": b"-1"}) == ALL
    assert from_cookiebot({b"CookieConsent": b"marketing:true"}) == NOTHING
    assert from_cookiebot({b"CookieConsent": b"{marketingx:true}"}) == NOTHING
    assert from_cookiebot({b"CookieConsent": b"{marketing:true,marketing:false,statistics:true}"}) == {ANALYTICS}
    assert from_cookiebot({}) == NOTHING


# --- OneTrust -------------------------------------------------------------------------------


def onetrust(groups: str) -> bytes:
    """OneTrust's cookie as it writes it: query-string-like, percent-encoded values."""
    return (
        "isGpcEnabled=0&datestamp=Mon+Dec+07+2026+10%3A00%3A00+GMT%2B0100&version=202409.1.0"
        "&browserGpcFlag=0&isIABGlobal=false&hosts=&consentId=0a1b2c3d&interactionCount=1"
        f"&isAnonUser=1&landingPath=NotLandingPage&groups={quote(groups, safe='')}"
        "&geolocation=DE%3BBE&AwaitingReconsent=false"
    ).encode()


@pytest.mark.parametrize(
    ("groups", "granted"),
    [
        ("C0001:1,C0002:1,C0003:1,C0004:1", ALL),
        ("C0001:1,C0002:0,C0003:1,C0004:1", {MARKETING}),
        ("C0001:1,C0002:1,C0003:0,C0004:0", {ANALYTICS}),
        ("C0001:1,C0002:0,C0003:0,C0004:0", NOTHING),
        ("C0001:1", NOTHING),
    ],
)
def test_onetrust_groups(groups, granted) -> None:
    assert from_onetrust({b"OptanonConsent": onetrust(groups)}) == granted


def test_onetrust_without_groups_is_nothing() -> None:
    assert from_onetrust({b"OptanonConsent": b"isGpcEnabled=0&version=1"}) == NOTHING
    assert from_onetrust({b"OptanonConsent": b"%%%&&=="}) == NOTHING
    assert from_onetrust({}) == NOTHING


@given(st.binary(max_size=400))
def test_any_cmp_cookie_never_breaks_a_reader(value) -> None:
    """Whatever bytes a visitor puts in the cookies, each reader answers with purposes."""
    for reader, name in ((from_cookiebot, b"CookieConsent"), (from_onetrust, b"OptanonConsent"), (from_tcf, b"euconsent-v2")):
        assert reader({name: value}) <= ALL


# --- the reader -----------------------------------------------------------------------------


def granted(pairs=(), cookies=None, **settings):
    """L{ConsentReader.granted} with GPC honoured and no consent cookie unless C{settings} say so."""
    return ConsentReader(**settings).granted(headers(*pairs), cookies or {})


def test_no_rule_means_unknown() -> None:
    """Without a source, GPC or consent cookie, nothing is known: everything is allowed."""
    assert granted() is UNKNOWN


def test_gpc_refuses_everything_when_honoured() -> None:
    assert granted([(b"Sec-GPC", b"1")]) == NOTHING
    assert granted([(b"Sec-GPC", b" 1 ")]) == NOTHING
    assert granted([(b"Sec-GPC", b"1")], honor_gpc=False) is UNKNOWN
    assert granted([(b"Sec-GPC", b"0")]) is UNKNOWN


def test_consent_cookie_rule() -> None:
    """With a consent cookie configured, only a listed value of it is consent, to both."""
    rule = {"consent_cookie": "cookie_consent", "consent_values": ["all", "marketing"]}
    assert granted(**rule) == NOTHING
    assert granted(cookies={b"cookie_consent": b"all"}, **rule) == ALL
    assert granted(cookies={b"cookie_consent": b'"marketing"'}, **rule) == ALL
    assert granted(cookies={b"cookie_consent": b"necessary"}, **rule) == NOTHING
    assert granted(cookies={b"cookie_consent": b"ALL"}, **rule) == NOTHING
    assert granted(cookies={b"cookie_consent": b"all,marketing"}, **rule) == NOTHING
    assert granted(cookies={b"other": b"all"}, **rule) == NOTHING


def test_consent_cookie_that_is_not_ascii_or_too_long_is_refusal() -> None:
    rule = {"consent_cookie": "c", "consent_values": ["all", "ä", "x" * 2000]}
    assert granted(cookies={b"c": "ä".encode("utf-8")}, **rule) == NOTHING
    assert granted(cookies={b"c": b"x" * 2000}, **rule) == NOTHING
    assert granted(cookies={b"c": b"all"}, **rule) == ALL


def test_empty_consent_values_never_consent() -> None:
    assert granted(cookies={b"c": b""}, consent_cookie="c", consent_values=()) == NOTHING


@pytest.mark.parametrize("source", ["tcf", "cookiebot", "onetrust"])
def test_a_source_without_its_record_is_no_consent(source) -> None:
    """With a source set, a visitor who never answered the banner granted nothing."""
    assert granted(source=source) == NOTHING


@pytest.mark.parametrize("source", ["tcf", "cookiebot", "onetrust"])
def test_gpc_wins_over_every_source(source) -> None:
    cookies = {
        b"euconsent-v2": IAB_STRINGS[0][0].encode(),
        b"CookieConsent": cookiebot("true", "true"),
        b"OptanonConsent": onetrust("C0001:1,C0002:1,C0004:1"),
    }
    assert granted(source=source, cookies=cookies) == ALL
    assert granted([(b"Sec-GPC", b"1")], source=source, cookies=cookies) == NOTHING


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError):
        ConsentReader(source="didomi")


def test_allows_per_purpose() -> None:
    """A destination needing no consent always gets the events; unknown allows all."""
    assert allows(NOTHING, NONE) and allows(UNKNOWN, MARKETING) and allows(UNKNOWN, ANALYTICS)
    assert allows(frozenset({ANALYTICS}), ANALYTICS) and not allows(frozenset({ANALYTICS}), MARKETING)
    assert not allows(NOTHING, ANALYTICS)


@pytest.mark.parametrize(
    ("reader", "name"),
    [(from_tcf, b"euconsent-v2"), (from_cookiebot, b"CookieConsent"), (from_onetrust, b"OptanonConsent")],
)
def test_a_record_too_long_grants_nothing_and_is_not_kept(reader, name):
    """Anyone can send records of any length, each one new: one longer than any banner
    writes grants nothing and is never cached, so such a flood cannot pin memory."""
    reader.cache_clear()
    for n in range(50):
        assert reader({name: b"%d" % n + b"x" * MAX_COOKIE}) == NOTHING
    assert reader.cache_info().currsize == 0
