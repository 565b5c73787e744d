"""Pure functions that rewrite headers on their way through the proxy, and judge the few
that decide how the visitor's request is read.

They touch no network, so every rule here is tested without a socket.  The rewriting runs
once per proxied request, so each function makes a single pass over the headers and builds
nothing twice.
"""

from __future__ import annotations

import re
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


# Expect is answered by Twisted Web itself (its 100 Continue to the visitor), and tagd
# sends the body on at once: an origin told to expect might answer without reading it.
_REQUEST_SKIP = HOP_BY_HOP | _SET_BY_PROXY | {b"expect"}
_PROTECTED = _SET_BY_PROXY | {b"host"}
# RFC 9112 section 7: a transfer-coding is a token (RFC 9110 section 5.6.2) with optional
# parameters, each a token or a quoted string; this matches one of a comma-separated list,
# with the comma after it unless it ends the value.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_LISTED_CODING = re.compile(
    rb'[ \t]*(%s)(?:[ \t]*;[ \t]*%s=(?:%s|"(?:[^"\\]|\\.)*"))*[ \t]*(?:,(?=.)|\Z)'
    % (_TOKEN, _TOKEN, _TOKEN),
    re.DOTALL,
)


def _connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The header names listed in C{Connection} values: hop-by-hop for this message."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def asks_to_close(connection: Iterable[bytes]) -> bool:
    """Whether C{Connection} values carry the C{close} token, in any case and any place."""
    return b"close" in _connection_tokens(connection)


def transfer_coding_refusal(value: bytes) -> tuple[int, str] | None:
    """Why a request's C{Transfer-Encoding} (all its values joined by commas) cannot be
    read, as a status and a reason fit for a log line; None for plain C{chunked}, the one
    coding tagd decodes.

    RFC 9112 section 6.1: a coding tagd does not implement gets 501, whether or not chunked
    follows it.  Section 6.3: a value that is no list of codings, or whose chunked is not
    last or comes twice, leaves the body's length unknown: 400.  Anything but exactly one
    C{chunked} is refused either way: no framing is guessed.
    """
    if value.strip(b" \t").lower() == b"chunked":
        return None
    codings = []
    position = 0
    while True:
        match = _LISTED_CODING.match(value, position)
        if match is None:
            return 400, "a Transfer-Encoding that is not a list of transfer codings"
        codings.append(match.group(1).lower())
        position = match.end()
        if position == len(value):
            break
    if b"chunked" in codings[:-1]:
        return 400, "a Transfer-Encoding whose chunked is not the last coding, or not the only one"
    if any(coding != b"chunked" for coding in codings):
        return 501, "a transfer coding other than chunked in Transfer-Encoding"
    return 400, "a Transfer-Encoding that names chunked with parameters"


def _impersonates(lower: bytes, guarded: frozenset[bytes]) -> bool:
    """Whether a header name with underscores reads, C{_} as C{-} (as CGI-style frameworks
    read names), as a forwarding header or one in C{guarded}."""
    dashed = lower.replace(b"_", b"-")
    return dashed in _PROTECTED or dashed in guarded or dashed.startswith(b"x-forwarded-")


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
    allow_underscores: bool = False,
    guarded: frozenset[bytes] = frozenset(),
) -> bytes:
    """The request line and header block sent to the origin, ready for the wire.

    Hop-by-hop headers are dropped; repeated headers keep their order; C{Host} stays as
    the visitor sent it (the origin's when the visitor sent none).  C{X-Forwarded-For}
    gets the TCP peer appended; C{X-Forwarded-Proto}, C{X-Forwarded-Host} and C{X-Real-IP}
    are set, whatever the visitor sent.  A C{body_length} of None announces a chunked body.
    Headers named (lower-case) in C{drop} are not forwarded: a client IP header from a
    peer that is not a trusted proxy, say.

    A header whose name has an underscore is dropped, as nginx drops it: the origin's
    framework may read C{X_Real_IP} as C{X-Real-IP}.  With C{allow_underscores} it is
    forwarded unless it reads so as C{Host}, C{X-Forwarded-*}, C{X-Real-IP} or a name in
    C{guarded} (lower-case: the client IP header).
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
        if b"_" in lower and (not allow_underscores or _impersonates(lower, guarded)):
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
