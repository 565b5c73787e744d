"""A generic webhook: tagd's normalised events, as JSON, POSTed to any URL.

This is for a shop's own warehouse or pipeline, which wants tagd's view of each event
rather than any ad platform's.  The body is C{{"events": [event, ...]}}, one object per
event with every field of L{tagd.tagging.events.Event} (absent values as C{null}, so that the
shape never changes).  Personal data is treated as an ad platform would receive it:
C{user_data} is normalised and hashed field by field exactly as for Meta
(L{tagd.tagging.hashing.meta_user_data}; a value that already is 64 hex characters is taken as
hashed and only lower-cased, never hashed twice), so that a warehouse can join its rows
with Meta's matches on the very same hashes; the IP, user agent and click ids are the
shop's own first-party data and are sent as they are.

C{headers} typically carries an C{Authorization} value, so the whole table is a secret:
it is kept out of C{repr}, C{log_url} and every verdict message, and so is the URL's
query, in case a token was put there instead.

A webhook has no platform codes, so only the HTTP status is judged
(L{tagd.delivery.destinations._common.status_verdict}).
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Sequence
from urllib.parse import urlsplit

import attrs

from tagd.delivery.destinations import KeySpec, OutgoingRequest, Verdict
from tagd.delivery.destinations._common import (
    RequestParts,
    check_batch_size,
    check_url,
    encode_batches,
    filled,
    public_url,
    status_verdict,
)
from tagd.tagging.events import Event
from tagd.tagging.hashing import meta_user_data
from tagd.tagging.identity import VisitorIds

TYPE = "webhook"
SECRETS = ("headers",)
DEFAULT_TIMEOUT = 5.0
# Requests in flight at once by default: a receiver of unknown capacity.
DEFAULT_CONCURRENCY = 2

KEYS: dict[str, KeySpec] = {
    "url": ((str,), True, None),
    "headers": ((dict,), False, MappingProxyType({})),
    "max_batch": ((int,), False, 100),
}

MAX_BATCH = 1000  # a bound on memory per request, not a limit of any receiver
# Headers tagd itself must control: the body's type and the message framing.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "transfer-encoding", "host", "connection"}
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Shorter header values (C{X-Version: 1}) are no secret, and redacting them would garble
# every message that happens to contain the same characters.
MIN_SECRET = 4
_ID_FIELDS = tuple(field.name for field in attrs.fields(VisitorIds))


def event_record(event: Event) -> dict[str, Any]:
    """The normalised event as a JSON-ready object, with C{user_data} hashed: the event's
    own fields first, then the visitor's ids (which attrs would list first, as they come
    from L{VisitorIds}), so that a person reading the body sees the event name first."""
    record = attrs.asdict(event, recurse=False)
    for name in _ID_FIELDS:
        record[name] = record.pop(name)
    record["custom_data"] = dict(event.custom_data)
    record["contents"] = [dict(content) for content in event.contents]
    record["user_data"] = meta_user_data(event.user_data)
    record["consent"] = None if event.consent is None else sorted(event.consent)
    return record


def _validated_headers(headers: Mapping[str, Any]) -> Mapping[str, str]:
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ValueError(f"headers: {name!r} is not an HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"headers: {name} is set by tagd and cannot be configured")
        # Never quote the value: it is a secret.
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"headers: the value of {name} must be a string on one line")
    return MappingProxyType(dict(headers))


@attrs.frozen
class WebhookDestination:
    """POSTs batches of normalised events to one URL.  Build it with L{build}."""

    type: ClassVar[str] = TYPE

    name: str
    url: str = attrs.field(repr=False)
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    max_batch: int = 100

    @property
    def log_url(self) -> str:
        """The URL without user info, query or fragment, which may carry credentials."""
        return public_url(self.url)

    def secrets(self) -> tuple[str, ...]:
        """Everything that must never appear in a message: header values and their
        words (an echoed C{Bearer} token), and the URL's query and user info, each of at
        least C{MIN_SECRET} characters."""
        parts = urlsplit(self.url)
        words = [w for v in self.headers.values() for w in v.split() if len(w) >= 8]
        user_info = (parts.netloc.rpartition("@")[0], parts.password or "")
        candidates = (*self.headers.values(), *words, parts.query, *user_info)
        return tuple(secret for secret in candidates if len(secret) >= MIN_SECRET)

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """One request per C{max_batch} events."""

        def request(batch: Sequence[Event]) -> RequestParts:
            return self.url, self.log_url, self.headers, {"events": [event_record(e) for e in batch]}

        return encode_batches(events, self.max_batch, request)

    def classify(self, status: int, body: bytes) -> Verdict:
        """By status alone, every secret of L{secrets} removed; see L{status_verdict}."""
        return status_verdict(status, body, self.secrets())


def build(name: str, settings: Mapping[str, Any]) -> WebhookDestination:
    """A L{WebhookDestination} from a checked C{[[destinations]]} table.

    Raises C{ValueError} naming the offending key, never quoting a secret.
    """
    values = filled(KEYS, settings)
    if values["url"] is None:
        raise ValueError("url: is required")
    return WebhookDestination(
        name=name,
        url=check_url(values["url"], "url"),
        headers=_validated_headers(values["headers"]),
        max_batch=check_batch_size(values["max_batch"], MAX_BATCH),
    )
