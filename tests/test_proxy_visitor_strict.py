"""Visitor requests that tagd must refuse, or reshape, before they reach the origin, and
those it must leave to the origin: each test's visitor is a raw socket, every byte its own."""

from __future__ import annotations

import pytest
import pytest_twisted

from conftest import within


# -- form bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b"multipart/form-data", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"),
        (b"multipart/form-data; boundary=xyz", b"no boundary anywhere \xff\x00"),
    ],
    ids=["no-boundary", "broken-body"],
)
@pytest_twisted.ensureDeferred
async def test_multipart_bodies_tagd_cannot_parse_reach_the_origin(tagd, origin, connect, content_type, body):
    """Twisted Web would parse a small multipart body and answer 400 to one it cannot
    parse; tagd parses no form, so both reach the origin byte for byte."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"POST", b"/echo", headers=[(b"Content-Type", content_type)], body=body)
    )
    assert response.status == 200
    assert origin.seen[0].body == body
    assert origin.seen[0].header(b"content-type") == [content_type]
