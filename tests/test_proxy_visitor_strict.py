"""Visitor requests that tagd must refuse, or reshape, before they reach the origin, and
those it must leave to the origin: each test's visitor is a raw socket, every byte its own."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.logger import formatEvent

from conftest import WireResponse, raw_request, within
from origin import Echo
from tagd.admin.metrics import Metrics

# A second request hidden where the first one's body would be: forwarded, it would be a
# request the front proxy never saw.
SMUGGLED = b"GET /echo?smuggled HTTP/1.1\r\nHost: shop.example\r\n\r\n"
CHUNKED_SMUGGLE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)


async def refused(connect, tagd, request: bytes, method: bytes = b"POST") -> WireResponse:
    """Send C{request} on a new connection; its response, once tagd has closed the connection."""
    visitor = await connect(tagd.port)
    answer = visitor.expect(method)
    visitor.send(request)
    response = await within(answer)
    await within(visitor.closed, 5)
    return response


def _echoed(response) -> Echo:
    assert response.status == 200
    return Echo.parse(bytes(response.body))


def _names(echo: Echo) -> set[str]:
    return {name.lower() for name, _ in echo.headers}


def _refusal_lines(log_events) -> list[str]:
    return [formatEvent(e) for e in log_events if "refused" in formatEvent(e)]


# -- Transfer-Encoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    "codings, status",
    [
        ([b"identity"], 501),
        ([b"gzip, chunked"], 501),
        ([b"x"], 501),
        ([b"GZIP;level=9 , Chunked"], 501),
        ([b"identity"] + [b"chunked"], 501),
        ([b"chunked, identity"], 400),
        ([b"chunked"] + [b"identity"], 400),
        ([b"chunked, chunked"], 400),
        ([b"chunked,"], 400),
        ([b'"chunked"'], 400),
        ([b"chunked;"], 400),
        ([b""], 400),
    ],
    ids=[
        "identity", "gzip-chunked", "x", "params-and-case", "identity-line-then-chunked-line",
        "chunked-identity", "chunked-line-then-identity-line", "chunked-twice", "trailing-comma",
        "quoted", "empty-parameter", "empty",
    ],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_transfer_codings_other_than_chunked_are_refused(tagd, origin, connect, codings, status):
    """RFC 9112 section 6.1: a coding tagd does not implement gets 501, a Transfer-Encoding
    that cannot frame a body (chunked not last, twice, or not a list of codings) 400; either
    way neither the request nor what its body hides reaches the origin, and the connection
    closes."""
    headers = [(b"Transfer-Encoding", coding) for coding in codings]
    request = raw_request(b"POST", b"/echo", headers=headers, body=CHUNKED_SMUGGLE)
    response = await refused(connect, tagd, request)
    assert response.status == status
    assert response.header(b"connection") == [b"close"]
    assert origin.seen == []


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"%d" % len(CHUNKED_SMUGGLE)), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"%d" % len(CHUNKED_SMUGGLE))],
        [(b"Transfer-Encoding", b"identity"), (b"Content-Length", b"%d" % len(CHUNKED_SMUGGLE))],
        [(b"Content-Length", b"%d" % len(CHUNKED_SMUGGLE)), (b"Transfer-Encoding", b"identity")],
    ],
    ids=["length-then-chunked", "chunked-then-length", "identity-then-length", "length-then-identity"],
)
@pytest_twisted.ensureDeferred
async def test_transfer_encoding_with_content_length_is_refused(tagd, origin, connect, headers):
    """RFC 9112 section 6.3: a request framed both ways is an error (tagd does not pick a
    framing the front proxy may not have picked): it is refused, the origin sees nothing
    and the connection closes."""
    request = raw_request(b"POST", b"/echo", headers=headers, body=CHUNKED_SMUGGLE)
    response = await refused(connect, tagd, request)
    assert response.status in (400, 501)
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_refusals_are_logged_once_a_minute_without_header_values(tagd, origin, connect, log_events):
    """A refused request is logged with its status and reason, but a peer sending them by
    the thousand writes one line a minute, and the line carries no header value."""
    for _ in range(3):
        request = raw_request(b"POST", b"/echo", headers=[(b"Transfer-Encoding", b"x-private-4242")])
        assert (await refused(connect, tagd, request)).status == 501
    (line,) = _refusal_lines(log_events)
    assert "501" in line and "Transfer-Encoding" in line
    assert not [e for e in log_events if "4242" in repr(e)]
    assert origin.seen == []


# -- Connection: close ------------------------------------------------------------------


@pytest.mark.parametrize(
    "connection",
    [
        [b"close, X-Foo"],
        [b"X-Foo,close"],
        [b" CLOSE ,x-foo "],
        [b"X-Foo", b"Close"],
    ],
    ids=["close-first", "close-last-no-space", "any-case-spaces", "second-line"],
)
@pytest_twisted.ensureDeferred
async def test_close_among_other_connection_tokens_closes(tagd, origin, connect, connection):
    """A close token anywhere in the Connection header (any case, any spacing, any of its
    lines) is a close: the response says so and the connection ends after it; the other
    tokens still name hop-by-hop headers that the origin does not get."""
    visitor = await connect(tagd.port)
    headers = [(b"Connection", value) for value in connection] + [(b"X-Foo", b"hop")]
    response = await within(visitor.request(b"GET", b"/echo", headers=headers))
    assert response.header(b"connection") == [b"close"]
    assert "x-foo" not in _names(_echoed(response))
    await within(visitor.closed, 5)


# -- header names with underscores -------------------------------------------------------

UNDERSCORED = [
    (b"CF_Connecting_IP", b"203.0.113.9"),
    (b"X_Real_IP", b"203.0.113.9"),
    (b"X_Forwarded_For", b"203.0.113.9"),
    (b"x_forwarded_HOST", b"evil.example"),
    (b"X-Forwarded_Proto", b"https"),
    (b"X_Shop_Flag", b"kept-when-allowed"),
]


@pytest_twisted.ensureDeferred
async def test_header_names_with_underscores_are_dropped(tagd, connect):
    """CGI-style frameworks read C{X_Real_IP} as C{X-Real-IP}: by default no header whose
    name has an underscore reaches the origin, and the forwarding headers it gets are
    tagd's own."""
    visitor = await connect(tagd.port)
    echo = _echoed(await within(visitor.request(b"GET", b"/echo", headers=UNDERSCORED)))
    assert not [name for name in _names(echo) if "_" in name]
    assert [v for n, v in echo.headers if n.lower() == "x-real-ip"] == ["127.0.0.1"]
    assert [v for n, v in echo.headers if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "client_ip_header, kept",
    [("CF-Connecting-IP", {"x_shop_flag"}), ("X-Client-IP", {"x_shop_flag", "cf_connecting_ip"})],
)
@pytest_twisted.ensureDeferred
async def test_allowed_underscores_still_cannot_impersonate_protected_headers(
    start_tagd, connect, client_ip_header, kept
):
    """With C{allow_underscores_in_headers} a shop's own underscored headers reach the
    origin, but none that reads, C{_} as C{-}, as a forwarding header tagd sets, as the
    configured client IP header or as another header naming the visitor's address
    (X-Client-IP and the like); another proxy's own header (CF-Connecting-IP, when it is
    not the one configured) is just a header then."""
    tagd = await start_tagd(allow_underscores_in_headers=True, client_ip_header=client_ip_header)
    visitor = await connect(tagd.port)
    headers = [*UNDERSCORED, (b"X_Client_IP", b"203.0.113.9")]
    echo = _echoed(await within(visitor.request(b"GET", b"/echo", headers=headers)))
    assert {name for name in _names(echo) if "_" in name} == kept


# -- dot segments under the origin's path prefix -----------------------------------------


@pytest.mark.parametrize(
    "target, forwarded",
    [
        (b"/../admin", b"/shop/admin"),
        (b"/a/%2e%2e/../x", b"/shop/x"),
        (b"/a/.%2E/%2E./b/./c?q=/../d", b"/shop/b/c?q=/../d"),
        (b"/a/b/..", b"/shop/a/"),
        (b"/%2e", b"/shop/"),
        (b"http://shop.example/a/../../admin?x", b"/shop/admin?x"),
        (b"/a..b/.a/a./..%2e/c", b"/shop/a..b/.a/a./..%2e/c"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_dot_segments_cannot_climb_out_of_the_prefix(start_tagd, origin, connect, target, forwarded):
    """Under an origin path prefix, dot segments (and their %2e spellings, any case) are
    resolved before the prefix is put in front, so the origin never sees a path that
    leaves it; the query and segments that merely contain dots go as sent."""
    tagd = await start_tagd(origin=f"http://127.0.0.1:{origin.port}/shop")
    visitor = await connect(tagd.port)
    await within(visitor.request(b"GET", target))
    assert [seen.uri for seen in origin.seen] == [forwarded]


@pytest.mark.parametrize(
    "target", [b"/..%2fadmin", b"/%2E%2E%2Fadmin", b"/..\\admin", b"/..;/admin", b"/a/..%252f..%252fadmin", b"admin"]
)
@pytest_twisted.ensureDeferred
async def test_paths_that_would_climb_out_once_decoded_are_refused(start_tagd, origin, connect, log_events, target):
    """Under a prefix, a path that an origin decoding %2f, a backslash, C{..;} or a double
    encoding would read as climbing out of it gets 400, as does a target in no form
    (no leading slash); the origin sees nothing, and the refusal is counted."""
    metrics = Metrics()
    tagd = await start_tagd(origin=f"http://127.0.0.1:{origin.port}/shop", metrics=metrics)
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", target))
    assert response.status == 400
    assert origin.seen == []
    assert metrics.registry.get_sample_value("tagd_requests_total", {"status": "400"}) == 1


@pytest.mark.parametrize("target", [b"\xa0", b"/caf\xc3\xa9", b"/a\x7fb"])
@pytest_twisted.ensureDeferred
async def test_targets_outside_printable_ascii_are_refused_without_a_traceback(
    tagd, origin, connect, logged_failures, target
):
    """A target with a byte outside printable ASCII is no URI: 400, no traceback (it
    used to reach the URL parser and fail there, a CRITICAL line per request)."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", target))
    assert response.status == 400
    assert origin.seen == [] and logged_failures == []


@pytest_twisted.ensureDeferred
async def test_without_a_prefix_the_path_goes_as_sent(tagd, origin, connect):
    """Without a prefix the origin has its whole namespace: tagd forwards the path as the
    visitor sent it, dot segments and all."""
    visitor = await connect(tagd.port)
    await within(visitor.request(b"GET", b"/a/%2e%2e/../echo"))
    assert [seen.uri for seen in origin.seen] == [b"/a/%2e%2e/../echo"]


# -- CONNECT ----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [[], [(b"Content-Length", b"1000000")]], ids=["bare", "large-body"])
@pytest.mark.parametrize(
    "method, target", [(b"CONNECT", b"shop.example:443"), (b"TRACE", b"/"), (b"trace", b"/"), (b"Connect", b"a:1")]
)
@pytest_twisted.ensureDeferred
async def test_connect_and_trace_are_not_allowed(tagd, origin, connect, headers, method, target):
    """CONNECT would ask the origin for a tunnel, TRACE would echo the visitor's cookies
    where a script could read them: tagd answers 405 with the methods it forwards in
    C{Allow}, and the origin is not even connected to, a large announced body
    notwithstanding."""
    request = raw_request(method, target, headers=headers)
    response = await refused(connect, tagd, request, method=method)
    assert response.status == 405
    (allow,) = response.header(b"allow")
    methods = [m.strip() for m in allow.split(b",")]
    assert {b"GET", b"HEAD", b"POST"} <= set(methods) and not {b"CONNECT", b"TRACE"} & set(methods)
    assert origin.seen == [] and origin.web.accepted == 0




@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\x0bb", b"\x1b[31m"])
@pytest_twisted.ensureDeferred
async def test_a_header_with_a_control_character_is_refused(tagd, origin, connect, value):
    """RFC 9110 section 5.5: a field value holds no control character but HTAB; such a
    request gets 400 and never reaches the origin, where a framework might read one as
    the end of a line."""
    request = raw_request(b"GET", b"/echo", headers=[(b"X-Note", value)])
    response = await refused(connect, tagd, request, method=b"GET")
    assert response.status == 400
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_a_tab_in_a_header_value_is_forwarded(tagd, origin, connect):
    """HTAB is the one control character a field value may hold."""
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/echo", headers=[(b"X-Note", b"a\tb")]))
    assert response.status == 200
    assert origin.seen[0].header(b"x-note") == [b"a\tb"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        raw_request(b"GET", b"/echo", host=None),
        raw_request(b"GET", b"/echo", host=b"a b/c@d"),
        raw_request(b"GET", b"/echo", host=b"shop.example/evil"),
        raw_request(b"GET", b"/echo", host=b"user@shop.example"),
    ],
    ids=["missing", "spaces-and-slash", "path", "userinfo"],
)
@pytest_twisted.ensureDeferred
async def test_a_missing_or_malformed_host_is_refused(tagd, origin, connect, request_bytes):
    """RFC 9112 section 3.2: an HTTP/1.1 request without Host, or with one that is no
    host name or address, gets 400; the origin (and the page URL that tagging reports to
    the platforms) never sees it."""
    response = await refused(connect, tagd, request_bytes, method=b"GET")
    assert response.status == 400
    assert origin.seen == []
