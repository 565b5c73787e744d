"""A dry run: events are described in the log instead of being sent anywhere.

A shop owner trying tagd, or checking what their origin's header turns into, wants to
see the events without any platform receiving them.  This destination therefore sends
nothing: L{LogDestination.encode} returns no request, and L{describe} renders each event
as one line of JSON, which the sender logs in place of sending (the destination is
L{tagd.destinations.Describing}).

Keeping this a pure function over events, not a sender of its own, means no second path
for I/O and nothing to mock: the line is exactly what L{describe} returns.  The line shows
the normalised event (the form the webhook destination sends), with the two things a
log file should not keep: the visitor's IP is masked the way analytics tools anonymise it
(the last IPv4 octet, the last 80 bits of IPv6, zeroed), and C{user_data} is hashed
exactly as it would leave tagd, so the raw e-mail or phone never reaches a log.
"""

from __future__ import annotations

import ipaddress
import json
from typing import ClassVar, Sequence

import attrs

from tagd.destinations import KeySpec, Outcome, OutgoingRequest, Verdict
from tagd.destinations._common import check_batch_size
from tagd.destinations.webhook import event_record
from tagd.events import Event

TYPE = "log"
SECRETS: tuple[str, ...] = ()
DEFAULT_TIMEOUT = 5.0  # nothing is ever sent; present so every destination type has one

KEYS: dict[str, KeySpec] = {
    "max_batch": ((int,), False, 100),
}

NOT_AN_IP = "(not an IP address)"


def mask_ip(address: str) -> str:
    """C{address} with its host part zeroed: IPv4 to its /24, IPv6 to its /48."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return NOT_AN_IP
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def describe_event(event: Event) -> str:
    """One log line: the normalised event as JSON, IP masked, user_data hashed."""
    record = event_record(event)
    record["client_ip"] = mask_ip(event.client_ip)
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def describe(events: Sequence[Event]) -> list[str]:
    """One log line per event, in order."""
    return [describe_event(event) for event in events]


@attrs.frozen
class LogDestination:
    """The dry-run destination, a L{tagd.destinations.Describing}.  Build it with L{build}."""

    type: ClassVar[str] = TYPE

    name: str
    max_batch: int = 100

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """Nothing to send: the events are described by L{describe} instead."""
        return []

    def describe(self, events: Sequence[Event]) -> list[str]:
        """The lines the sender logs for C{events}; see L{describe}."""
        return describe(events)

    def classify(self, status: int, body: bytes) -> Verdict:
        """Never asked, since no request is made; an answer would mean success."""
        return Verdict(Outcome.SUCCESS, "dry run")


def build(name: str, settings) -> LogDestination:
    """A L{LogDestination}; C{max_batch} only bounds how many events one call describes."""
    max_batch = check_batch_size(settings.get("max_batch", KEYS["max_batch"][2]))
    return LogDestination(name=name, max_batch=max_batch)
