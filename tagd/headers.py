"""Pure functions that rewrite headers on their way through the proxy.

They touch no network, so every rule here is tested without a socket.  Both run once per
proxied request, so each makes a single pass over the headers and builds nothing twice.
"""

from __future__ import annotations

from typing import Iterable

from twisted.web.http_headers import Headers

# RFC 9110 section 7.6.1, plus the proxy headers that never travel end to end.
HOP_BY_HOP = frozenset(
    {
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
)
# What tagd sets itself on the way to the origin, whatever the visitor sent; Content-Length
# is written from the body actually sent.
_SET_BY_PROXY = frozenset(
    {b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)


_REQUEST_SKIP = HOP_BY_HOP | _SET_BY_PROXY
_PROTECTED = _SET_BY_PROXY | {b"host"}


def _connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The header names listed in C{Connection} values: hop-by-hop for this message."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def request_head(
    method: bytes,
    target: bytes,
    incoming: Headers,
    *,
    peer: str,
    client_ip: str,
    proto: bytes,
    default_host: bytes,
    body_length: int | None,
    drop: frozenset[bytes] = frozenset(),
) -> bytes:
    """The request line and header block sent to the origin, ready for the wire.

    Hop-by-hop headers are dropped; repeated headers keep their order; C{Host} stays as
    the visitor sent it (the origin's when the visitor sent none).  C{X-Forwarded-For}
    gets the TCP peer appended; C{X-Forwarded-Proto}, C{X-Forwarded-Host} and C{X-Real-IP}
    are set, whatever the visitor sent.  A C{body_length} of None announces a chunked body.
    Headers named (lower-case) in C{drop} are not forwarded: a client IP header from a
    peer that is not a trusted proxy, say.
    """
    skip = _REQUEST_SKIP | drop
    if incoming.hasHeader(b"connection"):
        # A visitor's Connection header cannot take Host, or what tagd sets, away.
        skip = skip | (_connection_tokens(incoming.getRawHeaders(b"connection")) - _PROTECTED)
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    host = None
    chain: list[bytes] = []
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in skip:
            if lower == b"x-forwarded-for":
                chain = values
            continue
        if lower == b"host":
            host = values[0]
        for value in values:
            lines.append(name + b": " + value)
    if host is None:
        lines.append(b"Host: " + default_host)
    else:
        lines.append(b"X-Forwarded-Host: " + host)
    lines.append(b"X-Forwarded-For: " + b", ".join([*chain, peer.encode("ascii")]))
    lines.append(b"X-Forwarded-Proto: " + proto)
    lines.append(b"X-Real-IP: " + client_ip.encode("ascii"))
    if body_length is None:
        lines.append(b"Transfer-Encoding: chunked")
    elif body_length or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d" % body_length)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def split_response_headers(
    pairs: list[tuple[bytes, bytes]], tracking_header: bytes
) -> tuple[Headers, list[bytes]]:
    """Split an origin response's header pairs into what the visitor gets and the tracking values.

    Hop-by-hop headers are dropped.  The tracking header is taken out in any letter case
    and however often it appears; its values are returned in order.
    """
    tracking_name = tracking_header.lower()
    connection = [value for name, value in pairs if name.lower() == b"connection"]
    skip = HOP_BY_HOP | _connection_tokens(connection) if connection else HOP_BY_HOP
    kept = Headers()
    tracking = []
    for name, value in pairs:
        lower = name.lower()
        if lower == tracking_name:
            tracking.append(value)
        elif lower not in skip:
            kept.addRawHeader(name, value)
    return kept, tracking
