"""The purposes a visitor consented to, from an IAB TCF v2 TC string (the C{euconsent-v2} cookie).

A TC string is base64url segments joined by dots; the first, the core segment, holds the
purpose consents as 24 bits at a fixed offset (the IAB's "Consent string and vendor list
formats v2", unchanged by TCF v2.2, whose strings say policy version 4 or later).  Only
that part is read: tagd needs the purposes, not the vendors (Meta is no TCF vendor).

The only maintained Python decoders decode the whole string, vendors and publisher
restrictions too, on every tracked response; the purposes need a dozen lines.  Anything
that is not a version-2 core segment long enough to hold the purposes is no consent.
"""

from __future__ import annotations

import re
from base64 import urlsafe_b64decode

CORE_VERSION = 2
# Bits before PurposesConsent: Version 6, Created 36, LastUpdated 36, CmpId 12,
# CmpVersion 12, ConsentScreen 6, ConsentLanguage 12, VendorListVersion 12,
# TcfPolicyVersion 6, IsServiceSpecific 1, UseNonStandardTexts 1, SpecialFeatureOptIns 12.
PURPOSES_OFFSET = 152
PURPOSES = 24
# A cookie longer than this is not a TC string tagd reads (real ones are a few hundred
# characters; tagd's cookie reader stops at 1024 anyway).
MAX_LENGTH = 4096
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# The bytes up to the end of the purposes, and the base64 characters that hold them.
_NEEDED = (PURPOSES_OFFSET + PURPOSES + 7) // 8
_PREFIX = (_NEEDED + 2) // 3 * 4


def consented_purposes(tc_string: str | None) -> frozenset[int]:
    """The purpose ids (1 to 24) the string gives consent to; empty when it is no TC v2
    string (malformed, another version, or cut short)."""
    if not tc_string or len(tc_string) > MAX_LENGTH:
        return frozenset()
    core = tc_string.split(".", 1)[0]
    if not _BASE64URL.fullmatch(core) or len(core) % 4 == 1:
        return frozenset()
    # Only the characters that hold the bits up to the purposes are decoded.
    data = urlsafe_b64decode(core[:_PREFIX] + "=" * (-len(core[:_PREFIX]) % 4))
    if len(data) < _NEEDED or data[0] >> 2 != CORE_VERSION:
        return frozenset()
    bits = int.from_bytes(data[:_NEEDED], "big") >> (_NEEDED * 8 - PURPOSES_OFFSET - PURPOSES)
    return frozenset(p for p in range(1, PURPOSES + 1) if bits >> (PURPOSES - p) & 1)
