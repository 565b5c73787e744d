"""Request targets: which forms tagd forwards, and dot segments resolved before the path
is put under the origin's prefix."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

# What a request target may hold (RFC 9112 section 3.2, RFC 3986's characters): printable
# ASCII; no space, control character or byte above 0x7e.
_BAD_TARGET_BYTE = re.compile(rb"[^\x21-\x7e]")


def _dots(segment: bytes) -> int:
    """1 for a C{.} segment, 2 for C{..}, in any mix of C{.} and C{%2e} (any case); else 0."""
    if len(segment) > 6 or not segment:
        return 0
    plain = segment.lower().replace(b"%2e", b".")
    return len(plain) if plain in (b".", b"..") else 0


def remove_dot_segments(path: bytes) -> bytes:
    """C{path} with its dot segments resolved as RFC 3986 section 5.2.4 resolves them,
    C{%2e} counting as C{.} (section 6.2.2.2 makes them equivalent, and origins decode it).

    The result always begins with C{/}, whatever C{path} begins with, and a C{..} at the
    top stays there: no result climbs above C{/}.  Every other segment is kept byte for
    byte, percent-encodings and all.
    """
    if b"." not in path and b"%" not in path:
        return path if path.startswith(b"/") else b"/" + path
    segments = path.split(b"/")
    if not path.startswith(b"/"):
        segments.insert(0, b"")
    kept: list[bytes] = []
    for segment in segments[1:]:
        dots = _dots(segment)
        if dots == 2 and kept:
            kept.pop()
        elif not dots:
            kept.append(segment)
    if _dots(segments[-1]):
        # "/a/.." is "/", "/a/." is "/a/": a path ending in a dot segment names a directory.
        kept.append(b"")
    return b"/" + b"/".join(kept)


def target_refusal(target: bytes, under_prefix: bool) -> str | None:
    """Why tagd does not forward a request target, fit for a log line; None when it does.

    A target is origin-form (C{/path}), absolute-form (C{http://...}) or C{*}, in printable
    ASCII.  Under an origin path prefix, one whose path, its dot segments resolved, would
    still climb out of the prefix once an origin decodes it (C{%2f} or a backslash for a
    slash, C{..;} for C{..}, double encoding, as some frameworks read them) is refused
    too: no resolving suits every origin's reading, and no honest link holds such a path.
    """
    if _BAD_TARGET_BYTE.search(target):
        return "a request target with bytes outside printable ASCII"
    if target.startswith(b"/"):
        path = target.partition(b"?")[0]
    elif target[:8].lower().startswith((b"http://", b"https://")):
        path = b"/" + target.partition(b"//")[2].partition(b"/")[2].partition(b"?")[0]
    elif target == b"*":
        return None
    else:
        return "a request target in no form tagd forwards"
    if under_prefix and _climbs_once_decoded(remove_dot_segments(path)):
        return "a path that would climb out of the origin's prefix once decoded"
    return None


def _climbs_once_decoded(path: bytes) -> bool:
    """Whether C{path}, percent-decoded (twice, for double encoding), its backslashes
    read as slashes and C{;} parameters cut from its segments, has a C{..} segment.
    Without a dot or a C{%} it has none, whatever it is read as: most paths end here."""
    if b"." not in path and b"%" not in path:
        return False
    decoded = unquote_to_bytes(unquote_to_bytes(path)).replace(b"\\", b"/")
    return any(segment.partition(b";")[0] == b".." for segment in decoded.split(b"/"))
