"""Destinations: one module per platform, each a pure translation of events.

A destination turns a batch of L{tagd.tagging.events.Event} into the HTTP requests its platform
expects (L{OutgoingRequest}) and judges the platform's answer (L{Verdict}).  It performs
no I/O: the sender owns the network, so every destination is tested without one.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import attrs
from twisted.web.http_headers import Headers

from tagd.tagging.events import Event


class Outcome(enum.Enum):
    """What to do after a platform answered."""

    SUCCESS = "success"  # delivered
    TRANSIENT = "transient"  # retry later (5xx, timeouts, resets, transient codes)
    THROTTLE = "throttle"  # slow the whole destination down, then retry
    PERMANENT = "permanent"  # never retry: dead letter with the platform's message
    # The platform refuses the destination's credentials (a bad, expired or revoked token,
    # no permission for the pixel): no event is at fault, so none is dead-lettered; the
    # destination pauses and its events wait until the owner fixes the token.
    AUTH = "auth"


@attrs.frozen
class Verdict:
    """A platform's answer, classified.  C{message} never contains a token."""

    outcome: Outcome
    message: str = ""
    retry_after: float | None = None
    # A success for some of the request's events only (Pinterest's partial answers): the
    # indexes, in the request's order, of the events the platform refused, each with its
    # message.  Those are dead letters; the others are delivered.
    refused: tuple[tuple[int, str], ...] = ()
    # How many events an answer that speaks event by event speaks for (None: it speaks for
    # the whole request).  The sender trusts it only when it is the request's count.
    answered: int | None = None


@attrs.frozen
class OutgoingRequest:
    """One HTTP request to a platform.

    C{url} and C{headers} may carry the access token: log C{log_url}, never C{url}.

    C{positions} are the indexes, in the events given to C{encode}, of the events the
    request carries, in its order.  The sender settles exactly those events by the
    platform's answer: their ids could not say which, since shops reuse an id across
    visitors (a product id as the event id) and GA4 sends each visitor's events apart.
    """

    url: str = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    log_url: str = ""
    positions: tuple[int, ...] = ()
    method: str = "POST"


class Destination(Protocol):
    """What the sender needs from every destination."""

    name: str
    type: str
    max_batch: int

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """The requests that deliver C{events}, split by the platform's limits; each
        event in one request at most (see L{OutgoingRequest.positions})."""

    def classify(self, status: int, body: bytes) -> Verdict:
        """Judge the platform's answer to one request."""


@runtime_checkable
class Describing(Protocol):
    """A destination that sends nothing and describes the events instead (the dry run).

    The sender logs these lines in place of sending, so a destination that only shows
    what tagd would send needs no I/O of its own; C{isinstance} tells the sender which.
    """

    def describe(self, events: Sequence[Event]) -> list[str]:
        """The lines for the log, in the order of C{events}: one or more per event."""


@runtime_checkable
class Selective(Protocol):
    """A destination whose platform cannot take every event (a name it has no word for, a
    required value missing): C{encode} leaves such events out, and the sender dead-letters
    them with the reason this gives, rather than sending them wrong."""

    def refusal(self, event: Event) -> str | None:
        """Why the platform cannot take C{event}, or C{None} when it can."""


@runtime_checkable
class Advising(Protocol):
    """A destination that reads more of an answer than its verdict: what the platform
    asks the operator to change (a retiring API version, say).  The sender logs each
    piece of advice once per destination."""

    def advice(self, status: int, headers: Headers, body: bytes) -> str | None:
        """What to change, with the fix, or None when the answer asks nothing."""


# One config key: (accepted types, required, default). Tables are checked by tagd.daemon.config.
KeySpec = tuple[tuple[type, ...], bool, Any]
