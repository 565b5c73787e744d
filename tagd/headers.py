"""Pure functions that rewrite headers on their way through the proxy.

They take and return Twisted L{Headers} and touch no network, so every rule here is
tested without a socket.
"""

from __future__ import annotations

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


def _connection_tokens(headers: Headers) -> set[bytes]:
    """The header names listed in C{Connection}, which are hop-by-hop for this message."""
    tokens = set()
    for value in headers.getRawHeaders(b"connection", ()):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def end_to_end(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy of C{headers} without hop-by-hop headers and without the names in C{drop}.

    Repeated headers keep their values and their order.
    """
    skip = HOP_BY_HOP | drop
    if headers.hasHeader(b"connection"):
        skip = skip | _connection_tokens(headers)
    kept = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            kept.setRawHeaders(name, values)
    return kept


def forwarded_request_headers(
    incoming: Headers,
    *,
    peer: str,
    client_ip: str,
    proto: bytes,
    host: bytes | None,
) -> Headers:
    """The headers to send to the origin for a visitor's request.

    C{X-Forwarded-For} gets the TCP peer appended; C{X-Forwarded-Proto},
    C{X-Forwarded-Host} and C{X-Real-IP} are set, whatever the visitor sent.
    C{Host} is kept as the visitor sent it.  C{Content-Length} is left to the HTTP
    client, which frames the body it sends.
    """
    outgoing = end_to_end(incoming, drop=frozenset({b"content-length"}))
    chain = incoming.getRawHeaders(b"x-forwarded-for", [])
    outgoing.setRawHeaders(b"X-Forwarded-For", [b", ".join([*chain, peer.encode("ascii")])])
    outgoing.setRawHeaders(b"X-Forwarded-Proto", [proto])
    if host is not None:
        outgoing.setRawHeaders(b"X-Forwarded-Host", [host])
    else:
        outgoing.removeHeader(b"X-Forwarded-Host")
    outgoing.setRawHeaders(b"X-Real-IP", [client_ip.encode("ascii")])
    return outgoing


def split_response_headers(
    incoming: Headers, tracking_header: bytes
) -> tuple[Headers, list[bytes]]:
    """Split an origin response's headers into what the visitor gets and the tracking values.

    The tracking header is taken out in any letter case and however often it appears;
    its values are returned in order.
    """
    tracking = incoming.getRawHeaders(tracking_header, [])
    return end_to_end(incoming, drop=frozenset({tracking_header.lower()})), tracking


def request_head(
    method: bytes, target: bytes, headers: Headers, body_length: int, default_host: bytes
) -> bytes:
    """The request line and header block sent to the origin, ready for the wire.

    A visitor's request without C{Host} (HTTP/1.0) gets the origin's.
    """
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines.append(name + b": " + value)
    if not headers.hasHeader(b"host"):
        lines.append(b"Host: " + default_host)
    if body_length or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d" % body_length)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
