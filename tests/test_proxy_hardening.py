"""Requests built to confuse a proxy: ambiguous or spoofed headers, visitors that stall."""

from __future__ import annotations

import pytest_twisted

from conftest import eventually, within
from origin import Echo

MiB = 1 << 20


def _echoed(response) -> Echo:
    assert response.status == 200
    return Echo.parse(bytes(response.body))


def _header(echo: Echo, name: str) -> list[str]:
    return [v for n, v in echo.headers if n.lower() == name]


@pytest_twisted.ensureDeferred
async def test_two_host_headers_are_refused(tagd, origin, connect):
    """RFC 9112 section 3.2: a request with two Host lines gets 400 and never reaches the
    origin, which might otherwise believe a different host than tagging does."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"GET", b"/echo", headers=[(b"Host", b"evil.example")])
    )
    assert response.status == 400
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_connection_header_cannot_remove_host_or_forwarding(tagd, connect):
    """Naming Host or X-Forwarded-For in Connection does not strip them: the origin still
    gets the visitor's Host and tagd's own forwarding headers."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(
            b"GET", b"/echo", headers=[(b"Connection", b"Host, X-Forwarded-For, X-Real-IP")]
        )
    )
    echo = _echoed(response)
    assert _header(echo, "host") == ["shop.example"]
    assert _header(echo, "x-forwarded-for") == ["127.0.0.1"]
    assert _header(echo, "x-real-ip") == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_client_ip_header_from_untrusted_peer_is_not_forwarded(tagd, connect):
    """A CF-Connecting-IP from a peer that is not a trusted proxy is a claim anyone can
    make: the origin does not see it, so an app reading it cannot be fooled either."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"GET", b"/echo", headers=[(b"CF-Connecting-IP", b"203.0.113.9")])
    )
    echo = _echoed(response)
    assert _header(echo, "cf-connecting-ip") == []
    assert _header(echo, "x-real-ip") == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_client_ip_header_from_trusted_peer_is_forwarded(start_tagd, connect):
    """From a trusted proxy the header is the visitor's address and reaches the origin."""
    tagd = await start_tagd(trusted_proxies=["127.0.0.0/8"])
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"GET", b"/echo", headers=[(b"CF-Connecting-IP", b"2001:db8::7")])
    )
    echo = _echoed(response)
    assert _header(echo, "cf-connecting-ip") == ["2001:db8::7"]
    assert _header(echo, "x-real-ip") == ["2001:db8::7"]


@pytest_twisted.ensureDeferred
async def test_scoped_ipv6_from_trusted_peer_is_ignored(start_tagd, connect):
    """A link-local address with a zone ("fe80::1%eth0", or a zone that is not ASCII)
    names no visitor: tagd falls back to the peer and answers normally."""
    tagd = await start_tagd(trusted_proxies=["127.0.0.0/8"])
    for claimed in (b"fe80::1%eth0", "fe80::1%\u00e9".encode()):
        visitor = await connect(tagd.port)
        response = await within(
            visitor.request(b"GET", b"/echo", headers=[(b"CF-Connecting-IP", claimed)])
        )
        assert _header(_echoed(response), "x-real-ip") == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_date_added_when_origin_sends_none(raw_tagd, origin, connect):
    """An origin without a clock sends no Date; the visitor still gets one (RFC 9110)."""
    origin.answer_raw(b"/nodate", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    visitor = await connect(raw_tagd.port)
    response = await within(visitor.request(b"GET", b"/nodate"))
    assert response.status == 200
    assert len(response.header(b"date")) == 1


@pytest_twisted.ensureDeferred
async def test_stalled_visitor_releases_the_origin(start_tagd, origin, connect):
    """A visitor who reads nothing for response_timeout seconds is disconnected, and the
    origin connection it held is closed rather than kept for as long as it likes."""
    tagd = await start_tagd(response_timeout=1)
    visitor = await connect(tagd.port)
    visitor.pause()
    answer = visitor.request(b"GET", b"/big?size=%d" % (64 * MiB), sink=lambda data: None)
    await eventually(lambda: origin.producers and origin.producers[0].paused)
    await eventually(lambda: origin.producers[0].stopped, timeout=5)
    visitor.resume()
    response = await within(answer, 10)
    assert not response.complete


@pytest_twisted.ensureDeferred
async def test_other_client_ip_claims_from_an_untrusted_peer_are_not_forwarded(tagd, connect):
    """Forwarded, True-Client-IP, X-Client-IP and X-Cluster-Client-IP name the visitor's
    address too, and frameworks read them when told to: from a peer that is not a
    trusted proxy the origin does not see them."""
    claims = [(b"Forwarded", b"for=203.0.113.9"), (b"True-Client-IP", b"203.0.113.9"),
              (b"X-Client-IP", b"203.0.113.9"), (b"X-Cluster-Client-IP", b"203.0.113.9")]  # fmt: skip
    visitor = await connect(tagd.port)
    echo = _echoed(await within(visitor.request(b"GET", b"/echo", headers=claims)))
    assert not [v for n, v in echo.headers if "203.0.113.9" in v]
