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


class TrackingNotConfigured:
    """The hook used while no destination is configured.

    It says once, at debug level, that tracking headers arrive and go nowhere; a line per
    request would cost more than the proxying itself.
    """

    seen = 0

    def __call__(self, values: list[bytes], visit: Visit) -> None:
        if not self.seen:
            log.debug(
                "tracking header seen on {method} {path}; no destination is configured yet",
                method=visit.method.decode("latin-1"),
                path=visit.uri.split(b"?", 1)[0].decode("latin-1"),
            )
        self.seen += len(values)
