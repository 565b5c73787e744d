"""Dot segments in a request path, resolved before the path is put under the origin's prefix."""

from __future__ import annotations


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
