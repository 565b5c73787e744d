"""What the ad-platform destinations share: the keys of a pixel (or account) and its
token, the destination object, and its requests and verdicts.

Every platform takes a batch of events with tagd's (Meta-named) events renamed by the
destination's C{event_names}, each marked for limited use by the platform's own flag when
the visitor refused marketing (L{ConversionsDestination.limited}); Meta and TikTok also
share an optional test event code and a Limited Data Use setting (L{PlatformDestination}).  Platforms that cannot take every event
(L{SelectiveDestination}) leave those out of their requests.  A platform module says only
what differs: its payload, its URL and where the token travels, and how to read its answers.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

import attrs

from tagd.delivery.destinations import KeySpec, OutgoingRequest, Outcome, Verdict
from tagd.delivery.destinations._common import (
    RequestParts,
    check_batch_size,
    check_endpoint,
    encode_batches,
    filled,
    json_object,
    refused_marketing,
    verdict,
)
from tagd.tagging.events import Event

# A platform's rule for one of its own keys: the pattern the whole value must match, and
# what the reason says it must be.
Format = tuple[re.Pattern[str], str]

# A platform's judge of one answer: (HTTP status, body as a JSON object or None) ->
# (outcome, message); the message may quote the answer, secrets are removed afterwards.
Judge = Callable[[int, dict[str, Any] | None], tuple[Outcome, str]]


def conversion_keys(
    id_key: str,
    endpoint: str,
    max_batch: int,
    own: Mapping[str, KeySpec] = {},
    late: Mapping[str, KeySpec] = {},
) -> dict[str, KeySpec]:
    """A platform's C{KEYS}: its pixel's (or account's) id, the token, C{own} keys, those
    every L{ConversionsDestination} reads, C{late} keys before C{max_batch} (in this
    order, the order configuration errors and C{tagd check-config} list)."""
    return {
        id_key: ((str,), True, None),
        "access_token": ((str,), True, None),
        **own,
        "endpoint": ((str,), False, endpoint),
        "event_names": ((dict,), False, MappingProxyType({})),
        **late,
        "max_batch": ((int,), False, max_batch),
    }


TEST_EVENT_CODE: Mapping[str, KeySpec] = {"test_event_code": ((str,), False, None)}


def platform_keys(
    id_key: str, endpoint: str, max_batch: int, own: Mapping[str, KeySpec] = {}
) -> dict[str, KeySpec]:
    """The C{KEYS} of a L{PlatformDestination}: L{conversion_keys} with a test event code
    and the Limited Data Use flag."""
    ldu = {"limited_data_use": ((bool,), False, False)}
    return conversion_keys(id_key, endpoint, max_batch, {**own, **TEST_EVENT_CODE}, ldu)


# A token that travels in an C{Authorization} header: one word of printable ASCII.
BEARER_TOKEN: Format = (re.compile(r"[\x21-\x7e]+"), "printable ASCII without spaces (it goes in a header)")


def names_among(overrides: Mapping[str, str], vocabulary: Collection[str], platform: str) -> Mapping[str, str]:
    """C{overrides} if each maps to a name of the platform's closed C{vocabulary}: any other
    name would be refused with every event, or never reach a report."""
    for source, target in overrides.items():
        if target not in vocabulary:
            raise ValueError(f"event_names: {source!r} maps to {target!r}, which is not a {platform} event name")
    return overrides


def event_name_overrides(value: Mapping[str, Any]) -> dict[str, str]:
    """A copy of the C{event_names} table, refused unless it maps names to names: a number
    or an empty string would otherwise reach the platform as an event name."""
    for key, name in value.items():
        if not isinstance(key, str) or not isinstance(name, str) or not name:
            raise ValueError(f"event_names: {key!r} must map to a non-empty event name string")
    return dict(value)


def platform_fields(
    name: str,
    keys: Mapping[str, KeySpec],
    settings: Mapping[str, Any],
    batch_limit: int | None,
    formats: Mapping[str, Format] = {},
) -> dict[str, Any]:
    """The fields of a L{PlatformDestination} subclass from one checked C{[[destinations]]}
    table: one per key of C{keys} (a platform's own keys are its own fields), plus C{name}.

    The values of C{formats}' keys must match its patterns: ids and versions go into the
    request's URL or body as they are, so a pasted path or a typo would fail every send.
    Raises C{ValueError} as C{"key: reason"}, which tagd.daemon.config reports under that key;
    the reason never quotes the value (a token pasted into the wrong key stays hidden).
    """
    values = filled(keys, settings)
    for key, (pattern, described) in formats.items():
        if not pattern.fullmatch(values[key]):
            raise ValueError(f"{key}: must be {described}")
    return values | {
        "name": name,
        "endpoint": check_endpoint(values["endpoint"]),
        "event_names": event_name_overrides(values["event_names"]),
        "max_batch": check_batch_size(values["max_batch"], batch_limit),
    }


def mapped_name(name: str, overrides: Mapping[str, str], defaults: Mapping[str, str]) -> str:
    """The platform's name for a tagd (Meta-named) event: the destination's override, else
    the platform default, else the name unchanged (custom events pass as they are)."""
    return overrides.get(name) or defaults.get(name, name)


@attrs.frozen(eq=False)
class ConversionsDestination:
    """What every ad-platform destination holds and does; a platform adds its ids, its
    C{judge} of answers and its C{_request}.

    Compared and hashed by identity: two tables naming the same pixel are two destinations.
    """

    type: ClassVar[str]
    # The platform's functions, stored with staticmethod(): (event, event_names, limited)
    # -> the event's JSON object, and the platform's L{Judge}.
    event_payload: ClassVar[Callable[..., dict[str, Any]]]
    judge: ClassVar[Judge]

    name: str
    access_token: str = attrs.field(repr=False)
    endpoint: str
    event_names: Mapping[str, str]
    max_batch: int

    def limited(self, event: Event) -> bool:
        """Whether the platform is to process C{event} in a limited way: its visitor
        refused marketing, and the event reaches this destination only because its
        C{consent_purpose} needs none."""
        return refused_marketing(event)

    def payload(self, event: Event) -> dict[str, Any]:
        """The event as this destination sends it (names mapped, limited use flagged)."""
        return self.event_payload(event, self.event_names, self.limited(event))

    def bearer(self) -> dict[str, str]:
        """The token as an C{Authorization} header, where the platform takes it so."""
        return {"Authorization": f"Bearer {self.access_token}"}

    def _request(self, batch: Sequence[Event]) -> RequestParts:
        """The platform's request for one batch."""
        raise NotImplementedError

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """One request per C{max_batch} events."""
        return encode_batches(events, self.max_batch, self._request)

    def classify(self, status: int, body: bytes) -> Verdict:
        """Judge the platform's answer; the message never carries this destination's token."""
        outcome, message = self.judge(status, json_object(body))
        return verdict(outcome, message, (self.access_token,))


@attrs.frozen(eq=False)
class PlatformDestination(ConversionsDestination):
    """Meta's and TikTok's destinations: a test event code, Limited Data Use for every
    event when set, and the events in a C{data} array."""

    test_event_code: str | None
    limited_data_use: bool

    def limited(self, event: Event) -> bool:
        """Limited Data Use for every event when the destination sets it, else as for
        every platform."""
        return self.limited_data_use or super().limited(event)

    def document(self, batch: Sequence[Event], **head: Any) -> dict[str, Any]:
        """The request body: C{head}, the test code when set, then the events."""
        if self.test_event_code:
            head["test_event_code"] = self.test_event_code
        return head | {"data": [self.payload(event) for event in batch]}


@attrs.frozen(eq=False)
class SelectiveDestination(ConversionsDestination):
    """A platform that cannot take every event (a L{tagd.delivery.destinations.Selective}): the
    events its C{refusal} names a reason for are in no request, and the sender
    dead-letters them with that reason."""

    def refusal(self, event: Event) -> str | None:
        """Why the platform cannot take C{event}, or C{None}."""
        raise NotImplementedError

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """One request per C{max_batch} of the events the platform can take."""
        sendable = [position for position, event in enumerate(events) if self.refusal(event) is None]
        chosen = None if len(sendable) == len(events) else sendable
        return encode_batches(events, self.max_batch, self._request, chosen)
