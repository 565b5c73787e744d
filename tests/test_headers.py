"""Unit tests for the pure header functions in L{tagd.proxy.headers}: the rewriting, and the
verdicts on the headers that decide how a request is read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from tagd.proxy.headers import asks_to_close, request_head, split_response_headers, transfer_coding_refusal

# Written out here rather than imported, so that a name dropped from tagd's list fails.
HOP_BY_HOP_NAMES = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Proxy-Authorization",
    b"Proxy-Authenticate",
]

PEER = "203.0.113.7"
CLIENT_IP = "198.51.100.23"
TRACKING = b"Worker-Tracking"
ORIGIN_HOST = b"127.0.0.1:8000"


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """Headers holding C{pairs} in order, with repeated names kept as separate values."""
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


def as_dict(h: Headers) -> dict[bytes, list[bytes]]:
    """C{h} as lower-cased name to values, for comparisons that ignore letter case."""
    return {name.lower(): list(values) for name, values in h.getAllRawHeaders()}


def parse_head(head: bytes) -> Headers:
    """The header lines of a request head, read back into L{Headers} for assertions."""
    lines = head.split(b"\r\n")
    assert lines[-2:] == [b"", b""], "the head ends with an empty line"
    return headers(*[tuple(line.split(b": ", 1)) for line in lines[1:-2]])


def forward(incoming: Headers, *, peer: str = PEER, host: bytes | None = b"shop.example") -> Headers:
    """The headers L{request_head} sends to the origin, for a visitor who sent Host C{host}."""
    if host is not None and not incoming.hasHeader(b"host"):
        incoming = incoming.copy()
        incoming.addRawHeader(b"Host", host)
    return parse_head(head_for(b"GET", b"/", incoming, peer=peer))


def head_for(
    method: bytes, target: bytes, incoming: Headers, body_length: int = 0, *, peer: str = PEER, **options
) -> bytes:
    """L{request_head} with the forwarding values most tests do not care about."""
    return request_head(
        method,
        target,
        incoming,
        peer=peer,
        client_ip=CLIENT_IP,
        proto=b"https",
        default_host=ORIGIN_HOST,
        body_length=body_length,
        **options,
    )


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES, ids=lambda n: n.decode())
@pytest.mark.parametrize("spelling", [bytes, bytes.lower, bytes.upper], ids=["as-is", "lower", "upper"])
def test_hop_by_hop_removed_from_request(name, spelling):
    """Each hop-by-hop header, in any letter case, is not forwarded to the origin."""
    out = forward(headers((spelling(name), b"value"), (b"Accept", b"text/html")))
    assert not out.hasHeader(name)
    assert out.getRawHeaders(b"accept") == [b"text/html"]


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES, ids=lambda n: n.decode())
@pytest.mark.parametrize("spelling", [bytes, bytes.lower, bytes.upper], ids=["as-is", "lower", "upper"])
def test_hop_by_hop_removed_from_response(name, spelling):
    """Each hop-by-hop header, in any letter case, does not reach the visitor."""
    out, _ = split_response_headers(
        [(spelling(name), b"value"), (b"Content-Type", b"text/html")], TRACKING
    )
    assert not out.hasHeader(name)
    assert out.getRawHeaders(b"content-type") == [b"text/html"]


CONNECTION_NAMED = [
    (b"Connection", b"keep-alive, X-Hop ,x-other"),
    (b"connection", b"X-Second"),
    (b"X-Hop", b"1"),
    (b"X-OTHER", b"2"),
    (b"x-second", b"3"),
    (b"X-Kept", b"4"),
]


def test_connection_named_headers_removed_from_request():
    """Headers named in any Connection header line, in any case, are not forwarded."""
    out = forward(headers(*CONNECTION_NAMED))
    for name in (b"connection", b"x-hop", b"x-other", b"x-second"):
        assert not out.hasHeader(name), name
    assert out.getRawHeaders(b"x-kept") == [b"4"]


def test_connection_named_headers_removed_from_response():
    """Headers named in any Connection header line, in any case, do not reach the visitor."""
    out, _ = split_response_headers(CONNECTION_NAMED, TRACKING)
    assert as_dict(out) == {b"x-kept": [b"4"]}


def test_repeated_response_headers_kept_in_order():
    """Several Set-Cookie headers all reach the visitor, in the origin's order."""
    cookies = [b"a=1; Path=/", b"b=2; HttpOnly", b"c=3; Secure", b"a=4"]
    out, _ = split_response_headers(
        [*[(b"Set-Cookie", c) for c in cookies], (b"Vary", b"Accept"), (b"Vary", b"Cookie")],
        TRACKING,
    )
    assert out.getRawHeaders(b"set-cookie") == cookies
    assert out.getRawHeaders(b"vary") == [b"Accept", b"Cookie"]


def test_repeated_request_headers_kept_in_order():
    """A request header sent several times reaches the origin with every value, in order."""
    out = forward(headers((b"Cookie", b"a=1"), (b"Cookie", b"b=2"), (b"Accept", b"x/y")))
    assert out.getRawHeaders(b"cookie") == [b"a=1", b"b=2"]
    assert out.getRawHeaders(b"accept") == [b"x/y"]


def test_host_kept_as_sent():
    """Host goes to the origin exactly as the visitor sent it, port and case included."""
    out = forward(headers((b"Host", b"Shop.Example:8443")), host=b"Shop.Example:8443")
    assert out.getRawHeaders(b"host") == [b"Shop.Example:8443"]


def test_x_forwarded_for_started_with_peer():
    """Without an incoming X-Forwarded-For, the header holds just the TCP peer."""
    out = forward(headers())
    assert out.getRawHeaders(b"x-forwarded-for") == [PEER.encode()]


def test_x_forwarded_for_chain_preserved_and_peer_appended():
    """An existing chain, even over several header lines, is kept and the peer appended."""
    out = forward(
        headers(
            (b"X-Forwarded-For", b"192.0.2.1, 192.0.2.2"),
            (b"x-forwarded-for", b"192.0.2.3"),
        )
    )
    assert out.getRawHeaders(b"x-forwarded-for") == [
        b"192.0.2.1, 192.0.2.2, 192.0.2.3, " + PEER.encode()
    ]


def test_x_forwarded_for_ipv6_peer():
    """An IPv6 peer is appended to X-Forwarded-For in its text form."""
    out = forward(headers((b"X-Forwarded-For", b"192.0.2.1")), peer="2001:db8::7")
    assert out.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.1, 2001:db8::7"]


def test_forwarding_headers_overwrite_spoofed_values():
    """X-Forwarded-Proto, X-Forwarded-Host and X-Real-IP are set by tagd, whatever was sent."""
    out = forward(
        headers(
            (b"x-forwarded-proto", b"gopher"),
            (b"X-Forwarded-Proto", b"http"),
            (b"X-FORWARDED-HOST", b"evil.example"),
            (b"x-real-ip", b"10.6.6.6"),
            (b"X-Real-IP", b"10.7.7.7"),
        )
    )
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert out.getRawHeaders(b"x-forwarded-host") == [b"shop.example"]
    assert out.getRawHeaders(b"x-real-ip") == [CLIENT_IP.encode()]


def test_spoofed_forwarded_host_removed_without_host():
    """Without a Host from the visitor, a spoofed X-Forwarded-Host is not passed on."""
    out = forward(headers((b"X-Forwarded-Host", b"evil.example")), host=None)
    assert not out.hasHeader(b"x-forwarded-host")
    assert out.getRawHeaders(b"x-real-ip") == [CLIENT_IP.encode()]


def test_content_length_dropped_from_request():
    """Content-Length is left to the HTTP client that frames the forwarded body."""
    out = forward(headers((b"Content-Length", b"12"), (b"Content-Type", b"text/plain")))
    assert not out.hasHeader(b"content-length")
    assert out.getRawHeaders(b"content-type") == [b"text/plain"]


def test_request_headers_not_modified():
    """Building the origin's headers leaves the visitor's request headers as they were."""
    incoming = headers(
        (b"Host", b"shop.example"),
        (b"Connection", b"X-Hop"),
        (b"X-Hop", b"1"),
        (b"X-Forwarded-For", b"192.0.2.1"),
        (b"Content-Length", b"3"),
    )
    before = as_dict(incoming)
    forward(incoming)
    assert as_dict(incoming) == before


def test_tracking_header_removed_in_any_case_values_in_order():
    """The tracking header goes, however spelled and repeated; its values come back in order."""
    incoming = [
        (b"Worker-Tracking", b"first"),
        (b"Content-Type", b"text/html"),
        (b"worker-tracking", b"second"),
        (b"WORKER-TRACKING", b"third"),
        (b"wOrKeR-tRaCkInG", b"fourth"),
    ]
    out, values = split_response_headers(incoming, b"worker-TRACKING")
    assert values == [b"first", b"second", b"third", b"fourth"]
    assert as_dict(out) == {b"content-type": [b"text/html"]}


def test_tracking_header_absent():
    """Without the tracking header, no values are returned and the headers are unchanged."""
    incoming = [(b"Content-Type", b"text/html"), (b"Set-Cookie", b"a=1")]
    out, values = split_response_headers(incoming, TRACKING)
    assert values == []
    assert as_dict(out) == as_dict(headers(*incoming))


def test_response_headers_not_modified():
    """Splitting the origin's header pairs leaves the list as it was."""
    incoming = [(b"Worker-Tracking", b"x"), (b"Connection", b"close"), (b"ETag", b'"1"')]
    before = list(incoming)
    split_response_headers(incoming, TRACKING)
    assert incoming == before


def test_request_head_wire_format():
    """The request head is the request line, each header value on its own line, a blank line."""
    head = head_for(
        b"GET",
        b"/shop/p?q=1",
        headers((b"Host", b"shop.example"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")),
    )
    assert head == (
        b"GET /shop/p?q=1 HTTP/1.1\r\n"
        b"Host: shop.example\r\n"
        b"Cookie: a=1\r\n"
        b"Cookie: b=2\r\n"
        b"X-Forwarded-Host: shop.example\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Real-IP: 198.51.100.23\r\n"
        b"\r\n"
    )


def test_request_head_default_host():
    """A request without Host (HTTP/1.0) gets the origin's host, once."""
    head = head_for(b"GET", b"/", headers((b"Accept", b"*/*")))
    assert head.split(b"\r\n")[1:3] == [b"Accept: */*", b"Host: 127.0.0.1:8000"]
    assert parse_head(head).getRawHeaders(b"host") == [b"127.0.0.1:8000"]


@pytest.mark.parametrize(
    "method, length, framing",
    [
        (b"POST", 5, b"Content-Length: 5"),
        (b"GET", 3, b"Content-Length: 3"),
        (b"POST", 0, b"Content-Length: 0"),
        (b"PUT", 0, b"Content-Length: 0"),
        (b"PATCH", 0, b"Content-Length: 0"),
        (b"GET", 0, None),
        (b"HEAD", 0, None),
        (b"DELETE", 0, None),
    ],
)
def test_request_head_framing(method, length, framing):
    """A body is framed by one Content-Length; body-carrying methods say 0 when empty."""
    head = head_for(method, b"/", headers((b"Host", b"h")), length)
    lines = head.split(b"\r\n")
    assert [l for l in lines if l.lower().startswith(b"content-length")] == (
        [framing] if framing else []
    )
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1


def test_request_head_no_header_injection():
    """A header value carrying CR LF cannot add a header line to the origin request."""
    incoming = headers((b"Host", b"h"), (b"X-Note", b"a\r\nX-Injected: 1"))
    head = head_for(b"GET", b"/", incoming)
    lines = head.split(b"\r\n")
    assert not any(l.lower().startswith(b"x-injected") for l in lines)
    assert head.count(b"\r\n\r\n") == 1


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_end_to_end_name = _token.map(lambda s: ("x-" + s).encode()).filter(
    lambda n: n
    not in {h.lower() for h in HOP_BY_HOP_NAMES}
    | {TRACKING.lower(), b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)
_value = st.binary(min_size=0, max_size=20).map(
    lambda b: bytes(c for c in b if 0x20 <= c < 0x7F)
)


@given(st.dictionaries(_end_to_end_name, st.lists(_value, min_size=1, max_size=4), max_size=8))
def test_end_to_end_headers_pass_unchanged(fields):
    """Any set of end-to-end headers reaches the visitor with the same values in the same order."""
    incoming = [(n, v) for n, values in fields.items() for v in values]
    out, values = split_response_headers(incoming, TRACKING)
    assert values == []
    assert as_dict(out) == fields
    assert as_dict(forward(headers(*incoming))) == {
        **fields,
        **as_dict(forward(headers())),
    }


# -- header names with underscores ------------------------------------------------------

IMPERSONATING = [
    b"X_Real_IP",
    b"x_forwarded_for",
    b"X-Forwarded_Host",
    b"X_FORWARDED_PROTO",
    b"X_Forwarded_Anything",
    b"Content_Length",
    b"CF_Connecting_IP",
]


@pytest.mark.parametrize("allow", [False, True], ids=["default", "allowed"])
def test_underscored_names_reading_as_protected_headers_are_dropped(allow):
    """A name that reads, C{_} as C{-}, as a forwarding header tagd sets or as the client
    IP header (guarded) never reaches the origin, even when underscores are allowed."""
    incoming = headers(*[(name, b"203.0.113.9") for name in IMPERSONATING], (b"Host", b"shop.example"))
    head = head_for(b"GET", b"/", incoming, allow_underscores=allow, guarded=frozenset({b"cf-connecting-ip"}))
    assert not [line for line in head.split(b"\r\n")[1:] if b"_" in line.partition(b":")[0]]
    assert parse_head(head).getRawHeaders(b"x-real-ip") == [CLIENT_IP.encode()]


def test_other_underscored_names_only_when_allowed():
    """A shop's own underscored header is dropped by default and forwarded when allowed,
    value and spelling as sent."""
    incoming = headers((b"Host", b"shop.example"), (b"X_Shop_Flag", b"on"), (b"Accept", b"*/*"))
    assert not parse_head(head_for(b"GET", b"/", incoming)).hasHeader(b"x_shop_flag")
    allowed = head_for(b"GET", b"/", incoming, allow_underscores=True)
    assert b"\r\nX_shop_flag: on\r\n" in allowed or b"\r\nX_Shop_Flag: on\r\n" in allowed
    assert parse_head(allowed).getRawHeaders(b"accept") == [b"*/*"]


# -- Connection: close ------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, closing",
    [
        ([b"close"], True),
        ([b"close, X-Foo"], True),
        ([b"X-Foo,CLOSE "], True),
        ([b"keep-alive", b" Close"], True),
        ([b"keep-alive, X-Close"], False),
        ([b"closed"], False),
        ([], False),
    ],
)
def test_asks_to_close(values, closing):
    """The close token counts in any case, with any spacing, in any Connection line; a
    token that merely contains it does not."""
    assert asks_to_close(values) is closing


# -- Transfer-Encoding ------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b" CHUNKED\t"])
def test_chunked_alone_is_read(value):
    """Plain chunked, in any case and with surrounding whitespace, is the one coding read."""
    assert transfer_coding_refusal(value) is None


@pytest.mark.parametrize(
    "value, status",
    [
        (b"identity", 501),
        (b"gzip", 501),
        (b"gzip, chunked", 501),
        (b"x;q=1 , chunked", 501),
        (b'gzip;level="9, fast", chunked', 501),
        (b"chunked, identity", 400),
        (b"chunked, chunked", 400),
        (b"chunked,", 400),
        (b",chunked", 400),
        (b"", 400),
        (b"chunked;", 400),
        (b"chunked;a=1", 400),
        (b'"chunked"', 400),
        (b"chunked gzip", 400),
        (b"g\xffzip, chunked", 400),
    ],
)
def test_other_transfer_encodings_are_refused(value, status):
    """A coding other than chunked is 501 (RFC 9112 section 6.1); a value that cannot frame
    a body (no list of codings, chunked not last or twice, chunked with parameters) 400
    (section 6.3)."""
    refusal = transfer_coding_refusal(value)
    assert refusal is not None and refusal[0] == status
