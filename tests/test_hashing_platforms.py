"""The user data hashing of Pinterest, Snapchat, Reddit and Microsoft: each platform's own
normalisation before SHA-256, and what every platform shares (digests passed on as they
are, empties dropped)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from destination_helpers import ALREADY_HASHED, h
from tagd.tagging.hashing import microsoft_user_fields, pinterest_user_data, reddit_user_fields, snapchat_user_data

HEX64 = re.compile(r"[0-9a-f]{64}")
ALL = (pinterest_user_data, snapchat_user_data, reddit_user_fields, microsoft_user_fields)


def test_microsoft_drops_dots_and_tags_from_every_local_part():
    """Microsoft's rule (like Reddit's) for every domain, not only Gmail's; the phone keeps
    its "+" (E.164)."""
    fields = microsoft_user_fields({"em": ("J.Doe+news@Example.org",), "ph": ("+44 (0)20 7946 0958",)})
    assert fields == {"em": [h("jdoe@example.org")], "ph": [h("+442079460958")]}


def test_pinterest_and_snapchat_keep_metas_rules_with_their_differences():
    data = {"em": (" A.B@X.io",), "ph": ("+1 650-555-1234",), "ge": ("N",), "db": ("1990-01-31",)}
    assert pinterest_user_data(data) == {
        "em": [h("a.b@x.io")], "ph": [h("16505551234")], "ge": [h("n")], "db": [h("19900131")],
    }  # fmt: skip
    # Snapchat: no date of birth, and no gender but f and m.
    assert snapchat_user_data(data) == {"em": [h("a.b@x.io")], "ph": [h("16505551234")]}


def test_an_address_without_a_local_part_left_is_dropped():
    assert reddit_user_fields({"em": ("+tag@example.com", "...@example.com", "nobody")}) == {}


@given(st.dictionaries(st.sampled_from(["em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id"]),
                       st.lists(st.text(max_size=30), max_size=3).map(tuple)))  # fmt: skip
def test_every_value_sent_is_a_digest(user_data):
    for hashed in ALL:
        for values in hashed(user_data).values():
            assert values and all(HEX64.fullmatch(v) for v in values)


def test_an_origins_own_digest_is_never_hashed_again():
    for hashed in ALL:
        fields = hashed({"em": (ALREADY_HASHED.upper(),), "ph": (ALREADY_HASHED,)})
        assert all(values == [ALREADY_HASHED] for values in fields.values()) and fields
