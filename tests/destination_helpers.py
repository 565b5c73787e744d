"""Helpers shared by the destination and hashing tests: what every platform's tests check
the same way (hashes, request bodies, batching, hidden secrets), written once."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qs, quote, urlsplit

from fakes import make_event
from tagd.delivery.destinations import OutgoingRequest
from tagd.tagging.events import Event


def h(text: str) -> str:
    """The SHA-256 hex of C{text}, computed independently of tagd."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# A SHA-256 an origin computed itself: tagd must pass it on, never hash it again.
ALREADY_HASHED = h("someone@example.com")


def body(request: OutgoingRequest) -> dict:
    """The JSON document of an outgoing request."""
    return json.loads(request.body)


def numbered_events(**defaults: Any) -> Callable[..., Event]:
    """A test module's C{event(number=1, **fields)}: L{make_event} with C{defaults}, then
    C{fields}; event C{n} has the id C{ev-n} and comes C{n} seconds after a fixed time,
    so that payloads can be compared whole."""

    def event(number: int = 1, **fields: Any) -> Event:
        values = {"event_id": f"ev-{number}", "event_time": 1_700_000_000 + number}
        return make_event(**(values | defaults | fields))

    return event


def assert_batches(
    requests: Sequence[OutgoingRequest], events: Sequence[Event], sizes: list[int], key: str = "data"
) -> None:
    """C{requests} carry C{events} in batches of C{sizes}, in order, both in their
    C{positions} and in their bodies' C{key} array."""
    assert [len(body(r)[key]) for r in requests] == sizes
    assert [p for r in requests for p in r.positions] == list(range(len(events)))
    ids = [e.event_id for e in events]
    assert [record["event_id"] for r in requests for record in body(r)[key]] == ids


def assert_secret_hidden(
    secret: str, destination: Any, request: OutgoingRequest, answers: Iterable[tuple[int, bytes]]
) -> None:
    """C{secret}, raw or percent-encoded, is in nothing a log line, a failing assertion or
    the dead-letter table shows: the repr of C{destination} and C{request}, the log URL,
    the body, and the verdict message on each (status, body) of C{answers}."""
    for spelling in {secret, quote(secret, safe="")}:
        assert spelling not in repr(destination)
        assert spelling not in repr(request)
        assert spelling not in request.log_url
        assert spelling not in request.body.decode()
        for status, answer in answers:
            assert spelling not in destination.classify(status, answer).message


def fake_violations(fake: Any, request: OutgoingRequest) -> list[str]:
    """What the fake platform C{fake} (of L{fakes}) finds wrong with C{request}, checked
    as if it had come over the network."""
    from fakes import Recorded

    parts = urlsplit(request.url)
    recorded = Recorded(
        method=request.method,
        path=parts.path,
        query=parse_qs(parts.query),
        headers={name.lower(): value for name, value in request.headers.items()},
        raw=request.body,
        body=json.loads(request.body),
    )
    return [str(violation) for violation in fake.check(recorded)]
