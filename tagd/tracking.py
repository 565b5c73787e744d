"""The boundary between the proxy and tagging: what the proxy knows about one visit.

The proxy calls a L{TrackingHook} with the tracking header's values and a L{Visit}
after the response headers have gone to the visitor, from a fresh reactor turn, so a
hook can never delay or break a response.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers

log = Logger()


@attrs.frozen
class Visit:
    """The facts about one proxied request that tagging enriches events with."""

    client_ip: str
    scheme: str
    method: bytes
    uri: bytes
    host: bytes | None
    request_headers: Headers
    status: int


TrackingHook = Callable[[list[bytes], Visit], None]


def log_tracking_values(values: list[bytes], visit: Visit) -> None:
    """The hook used until destinations are configured: a debug line, no PII beyond the path."""
    log.debug(
        "tracking header on {method} {uri} ({status}): {count} value(s)",
        method=visit.method.decode("latin-1"),
        uri=visit.uri.split(b"?", 1)[0].decode("latin-1"),
        status=visit.status,
        count=len(values),
    )
