"""Small pieces every ad-platform destination needs, so each platform module only says
what is particular to its platform.  No I/O: the sender owns the network.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence
from urllib.parse import quote

import attrs

from tagd.destinations import OutgoingRequest, Outcome, Verdict
from tagd.events import Event

# A platform's message goes into logs and the dead-letter table: keep it readable.
MAX_MESSAGE = 300
REDACTED = "[redacted]"


def batches(events: Sequence[Event], size: int) -> Iterator[Sequence[Event]]:
    """C{events} in order, in slices of at most C{size}."""
    for start in range(0, len(events), size):
        yield events[start : start + size]


def check_batch_size(value: int, platform_limit: int | None = None) -> int:
    """C{value} if it is a usable batch size; a C{ValueError} naming the key otherwise.

    A batch over the platform's limit would be refused whole, every time: better to stop
    at start-up than to dead-letter every event.
    """
    if value < 1 or (platform_limit is not None and value > platform_limit):
        upper = f" and at most {platform_limit}" if platform_limit else ""
        raise ValueError(f"max_batch must be at least 1{upper}, not {value}")
    return value


def json_bytes(document: Any) -> bytes:
    """Compact JSON, ASCII-only so that no transport can mangle a visitor's name."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def json_object(body: bytes) -> dict[str, Any] | None:
    """The answer's body as a JSON object, or C{None} when it is anything else.

    Platforms' proxies and load balancers answer with HTML or nothing at all; that must
    be judged, never crash the sender.
    """
    try:
        decoded = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return decoded if isinstance(decoded, dict) else None


def encode_batches(
    events: Sequence[Event],
    size: int,
    build: Callable[[Sequence[Event]], tuple[str, str, Mapping[str, str], Any]],
) -> list[OutgoingRequest]:
    """One L{OutgoingRequest} per batch; C{build} gives (url, log_url, headers, document)."""
    requests = []
    for batch in batches(events, size):
        url, log_url, headers, document = build(batch)
        requests.append(
            OutgoingRequest(
                url=url,
                body=json_bytes(document),
                headers=headers,
                log_url=log_url,
                event_ids=tuple(event.event_id for event in batch),
            )
        )
    return requests


def mapped_name(name: str, overrides: Mapping[str, str], defaults: Mapping[str, str]) -> str:
    """The platform's name for a tagd (Meta-named) event: the destination's override, else
    the platform default, else the name unchanged (custom events pass as they are)."""
    return overrides.get(name) or defaults.get(name, name)


def status_outcome(status: int) -> Outcome | None:
    """What the HTTP status alone says when the body gives no better answer."""
    if status == 429:
        return Outcome.THROTTLE
    if status >= 500:
        return Outcome.TRANSIENT
    return None


def classify_answer(
    judge: Callable[[int, dict[str, Any] | None], tuple[Outcome, str]],
    status: int,
    body: bytes,
    secret: str,
) -> Verdict:
    """C{judge}'s verdict on an answer whose body is read as a JSON object (or C{None})."""
    outcome, message = judge(status, json_object(body))
    return verdict(outcome, message, secret)


def verdict(outcome: Outcome, message: str, secret: str = "") -> Verdict:
    """A L{Verdict} whose message is bounded and can never carry C{secret}."""
    if secret:
        # An echoed URL would carry the token percent-encoded: scrub both spellings.
        for spelling in (secret, quote(secret, safe="")):
            message = message.replace(spelling, REDACTED)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return Verdict(outcome=outcome, message=message)


def without_empty(document: Mapping[str, Any]) -> dict[str, Any]:
    """C{document} without the keys whose value is C{None}, an empty string or empty container."""
    return {key: value for key, value in document.items() if value not in (None, "", [], {})}


def filled(keys: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """C{settings} restricted to C{keys}, each missing key given its declared default."""
    return {key: settings.get(key, spec[2]) for key, spec in keys.items()}


def event_name_overrides(value: Mapping[str, Any]) -> dict[str, str]:
    """A copy of the C{event_names} table, refused unless it maps names to names: a number
    or an empty string would otherwise reach the platform as an event name."""
    for key, name in value.items():
        if not isinstance(key, str) or not isinstance(name, str) or not name:
            raise ValueError(f"event_names.{key} must be a non-empty event name string")
    return dict(value)


def common_settings(
    name: str, keys: Mapping[str, Any], settings: Mapping[str, Any], batch_limit: int | None
) -> dict[str, Any]:
    """The L{PlatformDestination} fields from one C{[[destinations]]} table, checked."""
    values = filled(keys, settings)
    return {
        "name": name,
        "access_token": values["access_token"],
        "endpoint": values["endpoint"].rstrip("/"),
        "test_event_code": values["test_event_code"],
        "event_names": event_name_overrides(values["event_names"]),
        "limited_data_use": values["limited_data_use"],
        "max_batch": check_batch_size(values["max_batch"], batch_limit),
    }


@attrs.frozen(eq=False)
class PlatformDestination:
    """What every ad-platform destination holds and does; a platform adds its ids, its
    per-event C{event_payload}, its C{judge} of answers and its C{_request}.

    Compared and hashed by identity: two tables naming the same pixel are two destinations.
    """

    type: ClassVar[str]
    # Platform functions, stored with staticmethod(): (event, event_names, limited_data_use)
    # -> the event's JSON object, and (status, body, secret) -> Verdict.
    event_payload: ClassVar[Callable[[Event, Mapping[str, str], bool], dict[str, Any]]]
    judge: ClassVar[Callable[[int, bytes, str], Verdict]]

    name: str
    access_token: str = attrs.field(repr=False)
    endpoint: str
    test_event_code: str | None
    event_names: Mapping[str, str]
    limited_data_use: bool
    max_batch: int

    def payload(self, event: Event) -> dict[str, Any]:
        """The event as this destination sends it (names mapped, LDU applied); the log
        destination shows exactly this."""
        return self.event_payload(event, self.event_names, self.limited_data_use)

    def document(self, batch: Sequence[Event], **head: Any) -> dict[str, Any]:
        """The request body: C{head}, the test code when set, then the events."""
        if self.test_event_code:
            head["test_event_code"] = self.test_event_code
        return head | {"data": [self.payload(event) for event in batch]}

    def _request(self, batch: Sequence[Event]) -> tuple[str, str, Mapping[str, str], Any]:
        raise NotImplementedError

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """One request per C{max_batch} events."""
        return encode_batches(events, self.max_batch, self._request)

    def classify(self, status: int, body: bytes) -> Verdict:
        """Judge the platform's answer; the message never carries this destination's token."""
        return self.judge(status, body, self.access_token)
