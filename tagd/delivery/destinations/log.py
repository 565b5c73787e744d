"""A dry run: what each ad platform would get, written to the log instead of sent.

A shop owner trying tagd, or checking what their origin's header turns into, wants to
see what Meta, GA4 and TikTok (and Pinterest, Snapchat, Reddit and Microsoft, when
C{platforms} names them) would receive without any of them receiving it.  This
destination therefore sends nothing: L{LogDestination.encode} returns no request, and
L{LogDestination.describe} renders each event as one line per platform of C{platforms}
(by default Meta, GA4 and TikTok), which the sender logs in place of sending (the
destination is L{tagd.delivery.destinations.Describing}).

Each line is made by the platform module's own functions, so it cannot drift from what
that platform's destination sends: Meta's and TikTok's event payload (the object in
their C{data} array; the request around it only adds the pixel and a test code), and
GA4's whole request body for the event (its C{client_id}, C{ip_override} and timestamp
belong to the request, not to the event), and the later four's event object, or "not
sent" and the reason for an event the platform cannot take.  The platforms' default event names apply,
without the Limited Data Use setting, and the event of a visitor who refused marketing
carries each platform's limited-use flag, as sent; user data is normalised and hashed
per platform, as sent.

The one deliberate difference from the exact payload is the visitor's IP address: the
platforms get it unhashed, and a log must not hold unhashed personal data, so it is
masked the way analytics tools anonymise it (the last IPv4 octet, the last 80 bits of
IPv6, zeroed).  The cookie and click ids stay as they are sent: they are pseudonymous
(only their platform can tie one to a person), and seeing them is much of what a dry run
is for.

Keeping this a pure function over events, not a sender of its own, means no second path
for I/O and nothing to mock: the lines are exactly what L{LogDestination.describe} returns.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable, ClassVar, Mapping, Sequence

import attrs

from tagd.delivery.destinations import (
    KeySpec,
    Outcome,
    OutgoingRequest,
    Selective,
    Verdict,
    ga4,
    meta,
    microsoft,
    pinterest,
    reddit,
    snapchat,
    tiktok,
)
from tagd.delivery.destinations._common import check_batch_size, filled, refused_marketing
from tagd.tagging.events import Event

TYPE = "log"
SECRETS: tuple[str, ...] = ()
# Nothing is ever sent; present so every destination type has them.
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONCURRENCY = 1

NOT_AN_IP = "(not an IP address)"
# GA4 sends no event without a client id (see tagd.delivery.destinations.ga4).
GA4_NOT_SENT = "not sent: the event has no GA4 client id"

# The GA4 encoder that renders request bodies.  Its ids only go into the request's URL,
# which a dry run never shows: placeholders do.
_GA4 = ga4.build("dry-run", {"measurement_id": "G-DRYRUN", "api_secret": "DRY-RUN"})


def _json(document: Any) -> str:
    """One line of JSON, non-ASCII text readable as it is."""
    return json.dumps(document, ensure_ascii=False, separators=(", ", ": "))


def _ga4_body(event: Event) -> str:
    """GA4's request body for C{event} alone: one event is one request at most, since GA4
    trims the items of an event too large for one."""
    requests = _GA4.encode([event])
    return _json(json.loads(requests[0].body)) if requests else GA4_NOT_SENT


# The platforms added after the first three, built with placeholder ids (which go only
# into their requests' URLs and headers): each renders the event as it sends it, or says
# why it would not send it.
_PLACEHOLDER = "0"
_LATER = {
    module.TYPE: module.build("dry-run", ids)
    for module, ids in (
        (pinterest, {"ad_account_id": _PLACEHOLDER, "access_token": "DRY-RUN"}),
        (snapchat, {"pixel_id": _PLACEHOLDER, "access_token": "DRY-RUN"}),
        (reddit, {"pixel_id": _PLACEHOLDER, "access_token": "DRY-RUN"}),
        (microsoft, {"tag_id": _PLACEHOLDER, "access_token": "DRY-RUN"}),
    )
}


def _rendered(destination: Any) -> Callable[[Event], str]:
    def render(event: Event) -> str:
        reason = destination.refusal(event) if isinstance(destination, Selective) else None
        return f"not sent: {reason}" if reason else _json(destination.payload(event))

    return render


# Each platform's part of a line, from one event.
_RENDERERS: Mapping[str, Callable[[Event], str]] = {
    "meta": lambda event: _json(meta.payload(event, {}, refused_marketing(event))),
    "ga4": _ga4_body,
    "tiktok": lambda event: _json(tiktok.payload(event, {}, refused_marketing(event))),
    **{kind: _rendered(destination) for kind, destination in _LATER.items()},
}
# The platforms a dry run shows unless told otherwise: the first three; the others on request.
PLATFORMS = ("meta", "ga4", "tiktok")
KNOWN_PLATFORMS = tuple(_RENDERERS)

KEYS: dict[str, KeySpec] = {
    "platforms": ((list,), False, PLATFORMS),
    "max_batch": ((int,), False, 100),
}


def mask_ip(address: str) -> str:
    """C{address} with its host part zeroed: IPv4 to its /24, IPv6 to its /48."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return NOT_AN_IP
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def _platforms(value: Sequence[Any]) -> tuple[str, ...]:
    """The C{platforms} setting: some of L{PLATFORMS}, each once; a dry run that shows
    nothing, or names a platform twice or one it does not know, is a mistake."""
    names = tuple(value)
    known = all(isinstance(name, str) and name in _RENDERERS for name in names)
    if not names or not known or len(set(names)) != len(names):
        raise ValueError(f"platforms: must list some of {', '.join(KNOWN_PLATFORMS)}, each once")
    return names


@attrs.frozen
class LogDestination:
    """The dry-run destination, a L{tagd.delivery.destinations.Describing}.  Build it with L{build}."""

    type: ClassVar[str] = TYPE

    name: str
    platforms: tuple[str, ...] = PLATFORMS
    max_batch: int = 100

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """Nothing to send: the events are described by L{describe} instead."""
        return []

    def describe(self, events: Sequence[Event]) -> list[str]:
        """For each event in order, one line per platform, in the order of C{platforms}:
        the platform's name and its JSON for the event, the visitor's IP masked."""
        lines = []
        for event in events:
            masked = attrs.evolve(event, client_ip=mask_ip(event.client_ip))
            lines.extend(f"{platform}: {_RENDERERS[platform](masked)}" for platform in self.platforms)
        return lines

    def classify(self, status: int, body: bytes) -> Verdict:
        """Never asked, since no request is made; an answer would mean success."""
        return Verdict(Outcome.SUCCESS, "dry run")


def build(name: str, settings: Mapping[str, Any]) -> LogDestination:
    """A L{LogDestination}; C{max_batch} only bounds how many events one call describes.

    Raises C{ValueError} naming the offending key.
    """
    values = filled(KEYS, settings)
    return LogDestination(
        name=name,
        platforms=_platforms(values["platforms"]),
        max_batch=check_batch_size(values["max_batch"]),
    )
