"""Small pieces every destination needs: batching, JSON, and verdicts that keep secrets.

They live here so that each destination module only says what is particular to its
platform, and so that every destination judges an HTTP status and hides a secret the same
way.  No I/O: the sender owns the network.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from tagd.delivery.destinations import OutgoingRequest, Outcome, Verdict
# Compact JSON, ASCII-only so that no transport can mangle a visitor's name.
from tagd.delivery.jsontext import json_ascii as json_bytes
from tagd.tagging.consent import MARKETING
from tagd.tagging.events import Event

# A platform's message goes into logs and the dead-letter table: keep it readable.
MAX_MESSAGE = 300
REDACTED = "[redacted]"
_MESSAGE_BODY = 200  # characters of an error answer quoted by status_verdict

T = TypeVar("T")

# What a destination says of one batch's request: (url, log_url, headers, JSON document).
RequestParts = tuple[str, str, Mapping[str, str], Any]


def refused_marketing(event: Event) -> bool:
    """Whether the visitor's consent record was read and grants no marketing: such an
    event reaches a destination only when it needs no marketing consent, and each
    platform is told, by its own limited-use flag, to process it in a limited way."""
    return event.consent is not None and MARKETING not in event.consent


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """C{items} (events, or their positions) in order, in slices of at most C{size}."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_batch_size(value: int, platform_limit: int | None = None) -> int:
    """C{value} if it is a usable batch size; a C{ValueError} naming the key otherwise.

    A batch over the platform's limit would be refused whole, every time: better to stop
    at start-up than to dead-letter every event.
    """
    if value < 1 or (platform_limit is not None and value > platform_limit):
        upper = f" and at most {platform_limit}" if platform_limit else ""
        raise ValueError(f"max_batch: must be at least 1{upper}, not {value}")
    return value


def check_url(url: str, key: str) -> str:
    """C{url} if tagd can send to it: http or https, a host, a port that is a number, no
    space or control character; else a C{ValueError("key: reason")}.

    A URL that cannot work would be accepted and then fail on every send, for as long as
    nobody reads the dead letters: better to stop at start-up.  The reason never quotes
    the URL, whose user info or query may hold a credential.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key}: must be an http:// or https:// URL with a host")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{key}: must not contain spaces or control characters")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{key}: has a port that is not a number from 0 to 65535") from None
    return url


def check_endpoint(url: str, key: str = "endpoint") -> str:
    """A platform's base URL, checked by L{check_url}, without its trailing slash.

    tagd appends the platform's path to it and logs the result: a query or fragment would
    swallow that path, and user info would put a password into every log line.
    """
    check_url(url, key)
    parts = urlsplit(url)
    if "@" in parts.netloc or "?" in url or "#" in url:
        raise ValueError(f"{key}: must be a base URL, without user info, query or fragment")
    return url.rstrip("/")


def public_url(url: str, hidden: str = "") -> str:
    """C{url} with its user info, query and fragment, which may carry a credential, each
    replaced by C{hidden}: left out of a log line, shown as masked by C{tagd check-config}."""
    parts = urlsplit(url)
    _, at, host = parts.netloc.rpartition("@")
    netloc = f"{hidden}@{host}" if at and hidden else host
    query = hidden if parts.query else ""
    fragment = hidden if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


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


def text_value(value: Any) -> str | None:
    """An id or a text a platform wants as a string, even when a shop wrote a number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return str(value)


def finite_number(value: Any) -> float | int | None:
    """A finite number, or a numeric string as shops often write prices; else None
    (C{"NaN"} parses as a float but is not JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def json_int(document: Mapping[str, Any], key: str) -> int | None:
    """The whole number at C{key} of a platform's answer, else C{None}: JSON's C{true} is
    an C{int} to Python, but never an error code or a count."""
    value = document.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def encode_batches(
    events: Sequence[Event],
    size: int,
    build: Callable[[Sequence[Event]], RequestParts],
    positions: Sequence[int] | None = None,
) -> list[OutgoingRequest]:
    """One JSON L{OutgoingRequest} per batch, from the L{RequestParts} C{build} gives; its
    headers are those the destination adds to the JSON content type.

    C{positions} are those of the events to send, when not all of them (a platform that
    cannot take some, see L{tagd.delivery.destinations.Selective}).
    """
    chosen = range(len(events)) if positions is None else positions
    requests = []
    for chunk in batches(chosen, size):
        batch = events[chunk[0] : chunk[-1] + 1] if positions is None else [events[p] for p in chunk]
        url, log_url, headers, document = build(batch)
        requests.append(
            OutgoingRequest(
                url=url,
                body=json_bytes(document),
                headers={"Content-Type": "application/json", **headers},
                log_url=log_url,
                positions=tuple(chunk),
            )
        )
    return requests


# The most items of a platform's list of problems quoted in one log line.
LISTED_PROBLEMS = 5


def listed(problems: Any, describe: Callable[[Mapping[str, Any]], str]) -> str:
    """The first few of a platform's list of problems (fields it refused, and why), each as
    C{" [...]"}: what an answer names goes in the log line, within a few items."""
    if not isinstance(problems, list):
        return ""
    return "".join(f" [{describe(p)}]" for p in problems[:LISTED_PROBLEMS] if isinstance(p, dict))


def redact(text: str, secrets: Iterable[str]) -> str:
    """C{text} with every non-empty secret replaced, also percent-encoded as an echoed URL
    would carry it.  Longest first, so that a secret containing another goes whole."""
    spellings = {s for secret in secrets if secret for s in (secret, quote(secret, safe=""))}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, REDACTED)
    return text


def bounded(message: str, secrets: Iterable[str] = ()) -> str:
    """C{message} without any of C{secrets}, cut to L{MAX_MESSAGE} characters."""
    message = redact(message, secrets)
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def verdict(
    outcome: Outcome,
    message: str,
    secrets: Iterable[str] = (),
    refused: Iterable[tuple[int, str]] = (),
    answered: int | None = None,
) -> Verdict:
    """A L{Verdict} whose messages (its own, and those of the C{refused} events) are bounded
    and can never carry one of C{secrets}."""
    secrets = tuple(secrets)
    refused = tuple((index, bounded(reason, secrets)) for index, reason in refused)
    return Verdict(outcome=outcome, message=bounded(message, secrets), refused=refused, answered=answered)


def status_outcome(status: int) -> Outcome | None:
    """What the HTTP status alone says when the body gives no better answer.

    408 is the receiver (or a proxy before it) timing out on the request: as transient
    as the 5xx a gateway answers for the same reason.  401 and 403 refuse the sender's
    credentials, whatever the request carries.
    """
    if status in (401, 403):
        return Outcome.AUTH
    if status == 429:
        return Outcome.THROTTLE
    if status == 408 or status >= 500:
        return Outcome.TRANSIENT
    return None


def status_judgement(status: int) -> Outcome:
    """The outcome of an answer by its status alone: 2xx delivered, else L{status_outcome},
    else permanent (the request itself is wrong)."""
    if 200 <= status < 300:
        return Outcome.SUCCESS
    return status_outcome(status) or Outcome.PERMANENT


def status_verdict(status: int, body: bytes, secrets: Iterable[str] = ()) -> Verdict:
    """Judge an answer by its HTTP status alone, for receivers with no codes of their own.

    2xx delivered; 429 asks the sender to slow down; 408 and 5xx are the receiver's
    trouble and worth a retry; 401 and 403 refuse the credentials; any other status says
    the request itself is wrong, so it never will be accepted.  The message quotes the start of an error answer, secrets
    removed before it is cut (a cut could leave half a secret that redaction misses).
    """
    if 200 <= status < 300:
        return Verdict(Outcome.SUCCESS, f"HTTP {status}")
    snippet = " ".join(body[: _MESSAGE_BODY * 4].decode("utf-8", "replace").split())
    message = f"HTTP {status}: {redact(snippet, secrets)[:_MESSAGE_BODY]}".rstrip(": ")
    return verdict(status_judgement(status), message)


# The values without_empty leaves out, built once: written inside the comprehension, the
# tuple (with a new list and dict) would be built again for every key of every event.
_EMPTY = (None, "", [], {})


def without_empty(document: Mapping[str, Any]) -> dict[str, Any]:
    """C{document} without the keys whose value is C{None}, an empty string or empty container
    (a mapping that compares equal to C{{}} included).

    This runs for several parts of every event sent: a true value, most of them, is kept
    at once, and only the others are compared with the empty ones (C{0} and C{False} stay).
    """
    return {key: value for key, value in document.items() if value or value not in _EMPTY}


def filled(keys: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """C{settings} restricted to C{keys}, each missing key given its declared default."""
    return {key: settings.get(key, spec[2]) for key, spec in keys.items()}
