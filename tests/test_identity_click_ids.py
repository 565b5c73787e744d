"""The click ids of Pinterest, Snapchat, Reddit and Microsoft, and their pixels' browser ids:
read from the landing URL and the pixels' own cookies, kept in a first-party cookie by tagd
when absent, only for the configured platforms."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_identity import NOW, cookies_set, parse_set_cookie, resolve
from tagd.tagging.identity import CLICK_IDS, MICROSOFT, PINTEREST, REDDIT, SNAPCHAT, resolve_identity

DAY = 86400
# field, URL parameter, cookie, lifetime, the cookie's value for click id "Click-1"
CASES = [
    ("epik", "epik", b"_epik", 365 * DAY, b"Click-1"),
    ("scclid", "ScCid", b"_scclid", 365 * DAY, b"Click-1"),
    ("rdt_cid", "rdt_cid", b"_rdt_cid", 30 * DAY, b"Click-1"),
    ("msclkid", "msclkid", b"_uetmsclkid", 90 * DAY, b"_uetClick-1"),
]
PLATFORM = {"epik": PINTEREST, "scclid": SNAPCHAT, "rdt_cid": REDDIT, "msclkid": MICROSOFT}
FOUR = frozenset(PLATFORM.values())


@pytest.mark.parametrize(("field", "param", "cookie", "lifetime", "value"), CASES)
def test_a_click_from_the_url_is_kept_in_the_pixels_cookie(field, param, cookie, lifetime, value):
    """The landing URL's click id is the event's, and goes into the cookie the platform's
    pixel reads, in the pixel's own form (UET writes "_uet" before the id)."""
    identity = resolve(query=f"{param}=Click-1".encode(), create_for=frozenset({PLATFORM[field]}))
    assert getattr(identity, field) == "Click-1"
    written, attributes = cookies_set(identity)[cookie]
    assert written == value
    assert attributes[b"Max-Age"] == str(lifetime).encode()


@pytest.mark.parametrize(("field", "param", "cookie", "lifetime", "value"), CASES)
def test_the_cookie_is_read_and_not_written_again(field, param, cookie, lifetime, value):
    identity = resolve({cookie: value}, create_for=FOUR)
    assert getattr(identity, field) == "Click-1"
    assert identity.set_cookies == ()
    # The same click in the URL again: nothing new to keep.
    assert resolve({cookie: value}, f"{param}=Click-1".encode(), create_for=FOUR).set_cookies == ()


@pytest.mark.parametrize(("field", "param", "cookie", "lifetime", "value"), CASES)
def test_a_new_click_replaces_the_cookie(field, param, cookie, lifetime, value):
    identity = resolve({cookie: value}, f"{param}=Click-2".encode())
    assert getattr(identity, field) == "Click-2"
    assert cookie in cookies_set(identity)


@pytest.mark.parametrize(("field", "param", "cookie", "lifetime", "value"), CASES)
def test_no_cookie_for_a_platform_not_configured(field, param, cookie, lifetime, value):
    """The click is still the event's (it is the click itself), but no cookie is set for a
    platform no destination sends to, nor when tagd may set none (no consent, or
    C{first_party_cookies = false})."""
    others = FOUR - {PLATFORM[field]}
    for allowed in (others, frozenset()):
        identity = resolve(query=f"{param}=Click-1".encode(), create_for=allowed)
        assert getattr(identity, field) == "Click-1"
        assert cookie not in cookies_set(identity)


def test_snapchats_lower_case_parameter_is_read_too():
    """Snap documents "ScCid"; its own server-side tag reads the parameter lower-cased."""
    assert resolve(query=b"sccid=abc").scclid == "abc"
    assert resolve(query=b"ScCid=First&sccid=Second").scclid == "First"


def test_a_uet_cookie_without_its_prefix_is_not_a_click_id():
    assert resolve({b"_uetmsclkid": b"Click-1"}).msclkid is None


def test_browser_ids_are_read_never_created():
    """C{_scid}, C{_rdt_uuid} and C{_uetvid} belong to the pixels: read when well formed,
    never invented or written."""
    rdt_uuid = b"1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132"
    identity = resolve({b"_scid": b"9a8b7c6d-5e4f", b"_rdt_uuid": rdt_uuid, b"_uetvid": b"0d3c2b1a9f8e"}, create_for=FOUR)
    assert (identity.scid, identity.rdt_uuid, identity.uetvid) == ("9a8b7c6d-5e4f", rdt_uuid.decode(), "0d3c2b1a9f8e")
    assert identity.set_cookies == ()
    bare = resolve()
    assert (bare.scid, bare.rdt_uuid, bare.uetvid) == (None, None, None)
    assert resolve({b"_rdt_uuid": b"1700000000.abcd-uuid"}).rdt_uuid is None


@given(st.binary(max_size=60), st.sampled_from([c[1] for c in CASES]))
def test_hostile_click_ids_never_reach_a_cookie(raw, param):
    """Whatever the URL carries, a click id is used only when cookie-safe, and every
    cookie written is well formed."""
    from urllib.parse import quote_from_bytes

    identity = resolve_identity(
        cookies={},
        query=f"{param}={quote_from_bytes(raw)}".encode(),
        now=NOW,
        secure=True,
        rand=random.Random(1),
        create_for=FOUR,
    )
    for header in identity.set_cookies:
        parse_set_cookie(header)
    values = [getattr(identity, field) for field in CLICK_IDS]
    assert all(v is None or (v and all(c.isascii() and c.isprintable() and c not in ' ;,"\\' for c in v)) for v in values)


def test_each_click_id_belongs_to_a_destination_type_of_its_own():
    """A click id's cookie is set for the destination type of its platform's name."""
    from tagd.delivery.destinations.registry import DESTINATION_TYPES

    assert {click.platform for click in CLICK_IDS.values()} <= set(DESTINATION_TYPES)
