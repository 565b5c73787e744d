"""Unit tests for L{tagd.proxy.paths}: dot segments resolved before the origin's prefix."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tagd.proxy.paths import remove_dot_segments, target_refusal


@pytest.mark.parametrize(
    "path, resolved",
    [
        # RFC 3986 section 5.2.4's own examples, and section 5.4.2's that climb too high.
        (b"/a/b/c/./../../g", b"/a/g"),
        (b"/b/c/../../../g", b"/g"),
        (b"/b/c/../../../../g", b"/g"),
        (b"/./g", b"/g"),
        (b"/../g", b"/g"),
        (b"/b/c/g.", b"/b/c/g."),
        (b"/b/c/.g", b"/b/c/.g"),
        (b"/b/c/g..", b"/b/c/g.."),
        (b"/b/c/..g", b"/b/c/..g"),
        (b"/b/c/./../g", b"/b/g"),
        (b"/b/c/g/./h", b"/b/c/g/h"),
        (b"/b/c/g/../h", b"/b/c/h"),
        # A dot segment last names a directory.
        (b"/a/..", b"/"),
        (b"/a/.", b"/a/"),
        (b"/a/b/..", b"/a/"),
        (b"/..", b"/"),
        (b"/", b"/"),
        (b"", b"/"),
        # %2e is a dot, in any case and any mix; other encodings stay as sent.
        (b"/a/%2e%2e/../x", b"/x"),
        (b"/a/%2E./b", b"/b"),
        (b"/a/.%2e/b", b"/b"),
        (b"/a/%2e/b", b"/a/b"),
        (b"/a/%2e%2e%2e/b", b"/a/%2e%2e%2e/b"),
        (b"/a/%252e%252e/b", b"/a/%252e%252e/b"),
        (b"/%7Euser/a%20b/./c", b"/%7Euser/a%20b/c"),
        # Empty segments are segments; a path without a leading slash gets one.
        (b"/a//../b", b"/a/b"),
        (b"//x/../y", b"//y"),
        (b"admin", b"/admin"),
        (b"../../admin", b"/admin"),
        (b"plain/path", b"/plain/path"),
    ],
)
def test_dot_segments_resolved(path, resolved):
    """Dot segments go as RFC 3986 section 5.2.4 says, %2e counting as a dot."""
    assert remove_dot_segments(path) == resolved


_segment = st.sampled_from([b"", b".", b"..", b"%2e", b"%2E%2e", b".%2e", b"a", b"b.", b"..c", b"%41"])


@given(st.lists(_segment, max_size=12), st.booleans())
def test_no_result_climbs_or_keeps_a_dot_segment(segments, leading_slash):
    """Whatever the segments, the result starts with a slash, holds no dot segment, and
    resolves (as a file system would) to a place at or below the root."""
    path = (b"/" if leading_slash else b"") + b"/".join(segments)
    resolved = remove_dot_segments(path)
    assert resolved.startswith(b"/")
    parts = resolved.split(b"/")
    assert not [p for p in parts if p.lower().replace(b"%2e", b".") in (b".", b"..")]
    assert posixpath.normpath(resolved.decode()).startswith("/")


@pytest.mark.parametrize(
    "target, under_prefix, refused",
    [
        (b"/a/b?q=..%2f", True, False),
        (b"/../admin", True, False),  # resolved to /admin under the prefix
        (b"*", False, False),
        (b"http://shop.example/a", False, False),
        (b"HTTPS://shop.example/a?b", True, False),
        (b"/..%2fadmin", True, True),
        (b"/%2e%2e%2Fadmin", True, True),
        (b"/..\\admin", True, True),
        (b"/..;/admin", True, True),
        (b"/a/..%252f..%252fadmin", True, True),
        (b"http://shop.example/..%2fadmin", True, True),
        (b"/..%2fadmin", False, False),  # no prefix: the origin's own namespace
        (b"\xa0", False, True),
        (b"/caf\xc3\xa9", False, True),
        (b"/a\x7fb", False, True),
        (b"admin", False, True),
        (b"shop.example:443", False, True),
    ],
)
def test_targets_tagd_refuses(target, under_prefix, refused):
    """Origin-form, absolute-form and * in printable ASCII are forwarded; anything else is
    refused, and so, under a prefix, is a path that would climb out of it once decoded."""
    assert (target_refusal(target, under_prefix) is not None) is refused
