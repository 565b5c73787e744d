"""The boundary between the proxy and tagging: what the proxy knows about one visit.

For a response carrying the tracking header, the proxy calls a L{TrackingHook} with the
header's values and a L{Visit} just before the response head is written.  The hook
answers quickly with a L{Tracked}: the cookies to add to that head, and the work to do
once the head is on its way (the proxy runs it after the reactor has written to the
visitor, so nothing a hook does later can delay a response), together with that of the
other responses whose heads went out meanwhile.  A hook that raises is logged and ignored.
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs
from twisted.web.http_headers import Headers


@attrs.frozen
class Visit:
    """The facts about one proxied request that tagging enriches events with."""

    client_ip: str = attrs.field(repr=False)
    scheme: str
    method: bytes
    uri: bytes
    host: bytes | None
    request_headers: Headers = attrs.field(repr=False)
    status: int

    def url(self) -> str:
        """The URL the visitor asked for: scheme, host, path and query."""
        host = (self.host or b"").decode("latin-1")
        return f"{self.scheme}://{host}{self.uri.decode('latin-1')}"


@attrs.frozen
class Tracked:
    """A hook's answer for a tracked response.

    C{deliver} runs once the head is on its way; C{hand_over}, when given, runs once after
    the C{deliver} of every response whose delivery work the same reactor turn runs (each
    distinct C{hand_over} once), so that a hook may gather in C{deliver} what C{hand_over}
    passes on in one call for all those responses.
    """

    set_cookies: tuple[bytes, ...] = ()
    deliver: Callable[[], None] = lambda: None
    hand_over: Callable[[], None] | None = None


class TrackingHook(Protocol):
    def __call__(self, values: list[bytes], visit: Visit) -> Tracked | None:
        """Decide about a tracked response; quick, since the response head waits for it."""
