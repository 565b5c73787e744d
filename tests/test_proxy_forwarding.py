"""The way in: methods, request bodies and request headers as the origin receives them."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted

from conftest import within
from origin import Echo

# Every byte value, and sequences that would confuse a proxy that parses bodies.
BINARY = bytes(range(256)) * 8 + b"\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
}


async def echo(http, tagd, method: str, body: bytes | None = None, **kw) -> Echo:
    """Send C{method} with C{body} through tagd to C{/echo}; return what the origin got."""
    response = await within(http.request(method, tagd.url("/echo"), data=body, timeout=10, **kw))
    assert response.code == 200
    return Echo.parse(await within(response.content()))


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
@pytest_twisted.ensureDeferred
async def test_every_method_reaches_the_origin_with_its_body(http, tagd, method):
    """Each method (an extension method too) arrives at the origin unchanged, with the
    request body byte for byte."""
    body = method.encode() + BINARY
    seen = await echo(http, tagd, method, body)
    assert seen.method == method
    assert seen.body_length == len(body)
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()


@pytest_twisted.ensureDeferred
async def test_head_reaches_the_origin_as_head(tagd, origin, connect):
    """A HEAD request is forwarded as HEAD, and no body is invented on either side."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"HEAD", b"/page"))
    assert response.status == 200
    assert [s.method for s in origin.seen] == [b"HEAD"]
    assert origin.seen[0].body == b""


@pytest_twisted.ensureDeferred
async def test_five_megabyte_upload_arrives_intact(http, tagd):
    """A 5 MB request body reaches the origin byte-identical."""
    body = os.urandom(5 * 1024 * 1024)
    seen = await echo(http, tagd, "POST", body)
    assert (seen.body_length, seen.body_sha256) == (len(body), hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b"application/x-www-form-urlencoded", b"a=1&a=2&b=%ZZ&=&c"),
        (b"multipart/form-data; boundary=xyz", b"--xyz\r\nnot a valid part\r\n--xy"),
        # Twisted Web, parsing small form bodies, answered these 400.
        (b"multipart/form-data", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"),
        (b"multipart/form-data; boundary=xyz", b"no boundary anywhere \xff\x00"),
    ],
    ids=["urlencoded", "broken-multipart", "multipart-without-boundary", "multipart-without-parts"],
)
@pytest_twisted.ensureDeferred
async def test_form_bodies_are_forwarded_untouched(tagd, origin, connect, content_type, body):
    """Form bodies, even malformed ones, are the origin's business: tagd neither parses
    nor rejects them, and they arrive byte for byte."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(b"POST", b"/echo", headers=[(b"Content-Type", content_type)], body=body)
    )
    assert response.status == 200
    assert origin.seen[0].body == body
    assert origin.seen[0].header(b"content-type") == [content_type]


@pytest_twisted.ensureDeferred
async def test_chunked_upload_is_forwarded_with_its_exact_bytes(tagd, origin, connect):
    """A body the visitor sends chunked reaches the origin whole, framed by the proxy
    itself: the visitor's Transfer-Encoding does not travel on."""
    pieces = [BINARY[:300], BINARY[300:301], BINARY[301:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(
            b"PUT", b"/echo", headers=[(b"Transfer-Encoding", b"chunked")], body=chunked
        )
    )
    assert response.status == 200
    (seen,) = origin.seen
    assert seen.body == BINARY
    assert seen.header(b"transfer-encoding") == []
    assert seen.header(b"content-length") == [b"%d" % len(BINARY)]


@pytest_twisted.ensureDeferred
async def test_expect_continue_upload(tagd, origin, connect):
    """A visitor that sends C{Expect: 100-continue} (as curl does for large bodies) gets
    one 100 Continue and then the origin's answer; the body reaches the origin."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(
            b"POST", b"/echo", headers=[(b"Expect", b"100-continue")], body=BINARY
        )
    )
    assert [r.status for r in response.interim] == [100]
    assert response.status == 200
    assert origin.seen[0].body == BINARY


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_request_headers_are_removed(tagd, origin, connect):
    """Connection, the headers it names, and every other hop-by-hop header stay with
    tagd; end-to-end headers, repeated ones in order, reach the origin."""
    visitor = await connect(tagd.port)
    response = await within(
        visitor.request(
            b"POST",
            b"/echo",
            headers=[
                (b"Connection", b"keep-alive, X-Secret-Hop, x-other-hop"),
                (b"X-Secret-Hop", b"1"),
                (b"X-Other-Hop", b"2"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"TE", b"trailers"),
                (b"Trailer", b"X-Checksum"),
                (b"Upgrade", b"websocket"),
                (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
                (b"X-End-To-End", b"kept"),
                (b"X-Multi", b"one"),
                (b"X-Multi", b"two"),
            ],
            body=b"hello",
        )
    )
    assert response.status == 200
    (seen,) = origin.seen
    names = {name.lower() for name, _ in seen.headers}
    assert not names & (HOP_BY_HOP | {b"x-secret-hop", b"x-other-hop"})
    assert seen.header(b"x-end-to-end") == [b"kept"]
    assert seen.header(b"x-multi") == [b"one", b"two"]
    assert seen.body == b"hello"


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_response_headers_are_removed(raw_tagd, origin, connect):
    """The origin's Connection, the headers it names and the other hop-by-hop headers
    do not reach the visitor; the end-to-end headers and the body do."""
    origin.answer_raw(
        b"/hops",
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Hop-Secret, x-other\r\n"
        b"X-Hop-Secret: 1\r\n"
        b"X-Other: 2\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b'Proxy-Authenticate: Basic realm="shop"\r\n'
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-End-To-End: kept\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello",
    )
    visitor = await connect(raw_tagd.port)
    response = await within(visitor.request(b"GET", b"/hops"))
    assert response.status == 200
    assert not response.names() & (HOP_BY_HOP | {b"x-hop-secret", b"x-other"})
    assert response.header(b"x-end-to-end") == [b"kept"]
    assert bytes(response.body) == b"hello"


@pytest_twisted.ensureDeferred
async def test_host_is_kept_and_forwarded_headers_are_set(tagd, origin, connect):
    """Host reaches the origin as the visitor wrote it; X-Forwarded-For gets the peer
    appended to the chain the visitor sent; X-Forwarded-Proto and X-Forwarded-Host are
    set by tagd, whatever an untrusted visitor claimed."""
    visitor = await connect(tagd.port)
    await within(
        visitor.request(
            b"GET",
            b"/echo?q=1",
            host=b"Shop.Example:8443",
            headers=[
                (b"X-Forwarded-For", b"198.51.100.7"),
                (b"X-Forwarded-For", b"192.0.2.1, 192.0.2.2"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"evil.example"),
            ],
        )
    )
    (seen,) = origin.seen
    assert seen.uri == b"/echo?q=1"
    assert seen.header(b"host") == [b"Shop.Example:8443"]
    assert seen.header(b"x-forwarded-for") == [b"198.51.100.7, 192.0.2.1, 192.0.2.2, 127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"http"]
    assert seen.header(b"x-forwarded-host") == [b"Shop.Example:8443"]


@pytest_twisted.ensureDeferred
async def test_absolute_form_target_is_sent_in_origin_form(tagd, origin, connect):
    """A request-target in absolute form reaches the origin as path and query, with the
    visitor's Host."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"http://shop.example/page?x=1"))
    assert response.status == 200
    assert origin.seen[0].uri == b"/page?x=1"
    assert origin.seen[0].header(b"host") == [b"shop.example"]


@pytest_twisted.ensureDeferred
async def test_http10_request_without_host(tagd, origin, connect):
    """An HTTP/1.0 request without Host still reaches the origin with a Host header
    (the origin's own) and gets its answer, the connection closed after it."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/page", version=b"HTTP/1.0", host=None))
    assert response.status == 200
    assert response.complete
    (seen,) = origin.seen
    assert seen.header(b"host") == [b"127.0.0.1:%d" % origin.port]
    assert seen.header(b"x-forwarded-host") == []
    await within(visitor.closed)


@pytest.mark.parametrize(
    "trusted, real_ip, proto",
    [
        (["127.0.0.0/8"], b"203.0.113.9", b"https"),
        ([], b"127.0.0.1", b"http"),
        (["cloudflare"], b"127.0.0.1", b"http"),
    ],
    ids=["trusted-peer", "nobody-trusted", "cloudflare-only"],
)
@pytest_twisted.ensureDeferred
async def test_client_ip_header_believed_only_from_trusted_peers(
    start_tagd, origin, connect, hook, trusted, real_ip, proto
):
    """X-Real-IP (and the IP handed to tagging) is CF-Connecting-IP when the TCP peer is
    a trusted proxy, and the peer's own address when it is not: a spoofed header from
    an untrusted peer is never believed."""
    tagd = await start_tagd(trusted_proxies=trusted)
    visitor = await connect(tagd.port)
    await within(
        visitor.request(
            b"GET",
            b"/echo",
            headers=[
                (b"CF-Connecting-IP", b"203.0.113.9"),
                (b"X-Real-IP", b"6.6.6.6"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Track", b"{}"),
            ],
        )
    )
    (seen,) = origin.seen
    assert seen.header(b"x-real-ip") == [real_ip]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [proto]
    [(_, visit)] = await within(hook.called())
    assert (visit.client_ip, visit.scheme) == (real_ip.decode(), proto.decode())


@pytest_twisted.ensureDeferred
async def test_nginx_in_front_on_the_droplet(start_tagd, origin, connect, hook):
    """The deployment guide's nginx variant: nginx on the same host sets X-Real-IP to the visitor's
    address, tagd trusts only 127.0.0.1 and reads that header.  A CF-Connecting-IP the
    visitor sent through nginx is not believed."""
    tagd = await start_tagd(trusted_proxies=["127.0.0.1/32"], client_ip_header="X-Real-IP")
    visitor = await connect(tagd.port)
    await within(
        visitor.request(
            b"GET",
            b"/echo",
            headers=[(b"X-Real-IP", b"203.0.113.9"), (b"CF-Connecting-IP", b"6.6.6.6"), (b"X-Track", b"{}")],
        )
    )
    (seen,) = origin.seen
    assert seen.header(b"x-real-ip") == [b"203.0.113.9"]
    [(_, visit)] = await within(hook.called())
    assert visit.client_ip == "203.0.113.9"


@pytest_twisted.ensureDeferred
async def test_garbage_client_ip_header_from_trusted_peer_is_ignored(start_tagd, origin, connect):
    """A trusted peer's client IP header that is not an IP address falls back to the peer."""
    tagd = await start_tagd(trusted_proxies=["127.0.0.0/8"])
    visitor = await connect(tagd.port)
    await within(
        visitor.request(b"GET", b"/echo", headers=[(b"CF-Connecting-IP", b"1.2.3.4<script>")])
    )
    assert origin.seen[0].header(b"x-real-ip") == [b"127.0.0.1"]
