"""A generic webhook: tagd's normalised events, as JSON, POSTed to any URL.

This is for a shop's own warehouse or pipeline, which wants tagd's view of each event
rather than any ad platform's.  The body is C{{"events": [event, ...]}}, one object per
event with every field of L{tagd.events.Event} (absent values as C{null}, so that the
shape never changes).  Personal data is treated as an ad platform would receive it:
C{user_data} values are SHA-256 hashed (of the trimmed, lower-cased value; a value that
already is 64 hex characters is taken as hashed and only lower-cased, never hashed twice),
while the IP, user agent and click ids are the shop's own first-party data and are sent
as they are.

C{headers} typically carries an C{Authorization} value, so the whole table is a secret:
it is kept out of C{repr}, C{log_url} and every verdict message, and so is the URL's
query, in case a token was put there instead.

A webhook has no platform codes, so only the HTTP status is judged (L{status_verdict},
which GA4 shares because it also answers with nothing but a status).
"""

from __future__ import annotations

import re
import unicodedata
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping, Sequence
from urllib.parse import quote, urlsplit

import attrs

from tagd.destinations import KeySpec, Outcome, OutgoingRequest, Verdict
from tagd.destinations._common import (
    REDACTED,
    check_batch_size,
    encode_batches,
    filled,
    status_outcome,
    verdict,
)
from tagd.events import Event
from tagd.hashing import hashed_values

TYPE = "webhook"
SECRETS = ("headers",)
DEFAULT_TIMEOUT = 5.0

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
_MESSAGE_BODY = 200  # characters of an error answer kept in a verdict message


def _trimmed_lower(value: str) -> str | None:
    """The generic normalisation: NFC, trimmed, lower-cased; nothing left means no value."""
    return unicodedata.normalize("NFC", value).strip().lower() or None


def hashed_user_data(user_data: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Every C{user_data} value hashed; the origin's raw values never leave tagd.

    Already-hashed values are recognised, and empty ones dropped, by the same rule every
    platform uses (L{tagd.hashing.hashed_values}); a key left with no value is left out.
    """
    hashed = {key: hashed_values(values, _trimmed_lower) for key, values in user_data.items()}
    return {key: values for key, values in hashed.items() if values}


def event_record(event: Event) -> dict[str, Any]:
    """The normalised event as a JSON-ready object, with C{user_data} hashed."""
    record = attrs.asdict(event, recurse=False)
    record["custom_data"] = dict(event.custom_data)
    record["contents"] = [dict(content) for content in event.contents]
    record["user_data"] = hashed_user_data(event.user_data)
    return record


def redact(text: str, secrets: Iterable[str]) -> str:
    """C{text} with every secret replaced, longest first, also percent-encoded as an
    echoed URL would carry it.  Values shorter than 4 characters (a header such as
    C{X-Version: 1}) are no secret, and replacing them would garble every message."""
    secrets = [secret for secret in secrets if len(secret) >= 4]
    spellings = {s for secret in secrets for s in (secret, quote(secret, safe=""))}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, REDACTED)
    return text


def status_verdict(status: int, body: bytes, secrets: Iterable[str] = ()) -> Verdict:
    """Judge an answer by its HTTP status alone.

    2xx delivered; 429 asks the sender to slow down; 5xx is the receiver's trouble and
    worth a retry; any other status says the request itself is wrong, so it never will
    be accepted.  The message quotes the start of an error answer, secrets removed.
    """
    if 200 <= status < 300:
        return Verdict(Outcome.SUCCESS, f"HTTP {status}")
    snippet = " ".join(body[: _MESSAGE_BODY * 4].decode("utf-8", "replace").split())
    message = f"HTTP {status}: {redact(snippet, secrets)[:_MESSAGE_BODY]}".rstrip(": ")
    return verdict(status_outcome(status) or Outcome.PERMANENT, message)


def _validated_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The URL may hold a token: say what is wrong without repeating it.
        raise ValueError("url: must be an http:// or https:// URL with a host")
    return url


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
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def secrets(self) -> tuple[str, ...]:
        """Everything that must never appear in a message: header values and their
        words (an echoed C{Bearer} token), and the URL's query and user info."""
        parts = urlsplit(self.url)
        words = [w for v in self.headers.values() for w in v.split() if len(w) >= 8]
        user_info = (parts.netloc.rpartition("@")[0], parts.password or "")
        return (*self.headers.values(), *words, parts.query, *user_info)

    def encode(self, events: Sequence[Event]) -> list[OutgoingRequest]:
        """One request per C{max_batch} events."""
        headers = {"Content-Type": "application/json", **self.headers}

        def request(batch: Sequence[Event]):
            return self.url, self.log_url, headers, {"events": [event_record(e) for e in batch]}

        return encode_batches(events, self.max_batch, request)

    def classify(self, status: int, body: bytes) -> Verdict:
        """By status alone; see L{status_verdict}."""
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
        url=_validated_url(values["url"]),
        headers=_validated_headers(values["headers"]),
        max_batch=check_batch_size(values["max_batch"], MAX_BATCH),
    )
