"""The dispatcher with the destinations added after the first three, over loopback: a
partial success settles each event by the platform's word, an event a platform cannot
take is dead-lettered with the reason, a refused token pauses the destination, and
events past each platform's window expire unsent."""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from conftest import eventually
from fakes import DAY, FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat, make_event
from tagd.delivery.direct import DirectDelivery, Route
from tagd.delivery.destinations import microsoft, pinterest, reddit, snapchat
from tagd.delivery.outcomes import Outcomes
from test_dispatcher import delivered, dispatch, dispatcher_log, events, metrics, refused, serving, spool  # noqa: F401 (fixtures)

PLATFORMS = {
    "pinterest": (pinterest, FakePinterest, {"ad_account_id": "549755885175", "access_token": "pin-token"}),
    "snapchat": (snapchat, FakeSnapchat, {"pixel_id": "snap-pixel-1", "access_token": "snap-token"}),
    "reddit": (reddit, FakeReddit, {"pixel_id": "t2_abc123", "access_token": "rdt-token"}),
    "microsoft": (microsoft, FakeMicrosoft, {"tag_id": "343000123", "access_token": "ms-token"}),
}


def route(kind: str, served, **settings) -> Route:
    module, _, required = PLATFORMS[kind]
    return Route(module.build(kind, {**required, "endpoint": served.base, **settings}), 2.0)


@pytest.mark.parametrize("kind", PLATFORMS)
@pytest_twisted.ensureDeferred
async def test_delivered_in_one_batch_as_the_platform_documents(serving, dispatch, spool, metrics, kind):
    served = serving(PLATFORMS[kind][1]())
    spool.add(kind, events("ev", 5))
    dispatch(route(kind, served))
    await eventually(lambda: set(spool.states(kind).values()) == {"done"})
    assert served.fake.violations == []
    assert len(served.fake.requests) == 1 and len(served.fake.events) == 5
    assert delivered(metrics, kind, "success") == 5


@pytest.mark.parametrize("status", [200, 422])
@pytest_twisted.ensureDeferred
async def test_pinterest_partial_success_dead_letters_only_the_refused(
    serving, dispatch, spool, metrics, dispatcher_log, status
):
    """Pinterest processed some events of a request and refused others: the refused are
    dead letters with its message at once (not sent again), the rest are delivered, and
    one line says so."""
    fake = FakePinterest()
    fake.refuse_ids, fake.partial_status = {"ev-1", "ev-3"}, status
    served = serving(fake)
    spool.add("pinterest", events("ev", 5))
    dispatch(route("pinterest", served))
    await eventually(lambda: "pending" not in spool.states("pinterest").values() and "inflight" not in spool.states("pinterest").values())
    assert spool.states("pinterest") == {"ev-0": "done", "ev-1": "dead", "ev-2": "done", "ev-3": "dead", "ev-4": "done"}
    assert spool.row("pinterest", "ev-1").error == "Pinterest refused the event: Event refused by the fake"
    assert len(fake.requests) == 1
    assert (delivered(metrics, "pinterest", "success"), delivered(metrics, "pinterest", "dead")) == (3, 2)
    [line] = [line for line in dispatcher_log if "refused 2" in line]
    assert "took 3 event(s)" in line


@pytest_twisted.ensureDeferred
async def test_an_event_snapchat_cannot_take_is_dead_with_its_reason(serving, dispatch, spool, metrics):
    served = serving(FakeSnapchat())
    spool.add("snapchat", [make_event(event_id="buy"), make_event(event_id="odd", event_name="Newsletter_Signup")])
    dispatch(route("snapchat", served))
    await eventually(lambda: spool.states("snapchat") == {"buy": "done", "odd": "dead"})
    assert "snapchat has no name for 'Newsletter_Signup'" in spool.row("snapchat", "odd").error
    assert [e["event_id"] for e in served.fake.events] == ["buy"]
    assert served.fake.violations == []


@pytest.mark.parametrize("kind", PLATFORMS)
@pytest_twisted.ensureDeferred
async def test_a_refused_token_pauses_the_destination_and_loses_nothing(serving, dispatch, spool, metrics, kind):
    served = serving(PLATFORMS[kind][1]())
    spool.add(kind, events("ev", 3))
    dispatch(route(kind, served, access_token="wrong-token"))
    await eventually(lambda: refused(metrics, kind) == 1)
    assert set(spool.states(kind).values()) <= {"pending", "inflight"}
    assert delivered(metrics, kind, "dead") == 0


@pytest.mark.parametrize(("kind", "window"), [("pinterest", 7), ("snapchat", 37), ("reddit", 7), ("microsoft", 7)])
@pytest_twisted.ensureDeferred
async def test_events_past_the_platforms_window_expire_unsent(serving, dispatch, spool, metrics, kind, window):
    served = serving(PLATFORMS[kind][1]())
    now = int(time.time())
    spool.add(kind, [make_event(event_id="old", event_time=now - window * DAY + 30), make_event(event_id="new")])
    dispatch(route(kind, served))
    await eventually(lambda: spool.states(kind) == {"old": "expired", "new": "done"})
    assert served.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_the_direct_fallback_counts_a_partial_success_event_by_event(serving, reactor, http, metrics):
    fake = FakePinterest()
    fake.refuse_ids = {"ev-0"}
    served = serving(fake)
    delivery = DirectDelivery(reactor=reactor, routes=[route("pinterest", served)], http=http, outcomes=Outcomes(metrics))
    await delivery.submit(events("ev", 3))
    assert delivered(metrics, "pinterest", "success") == 2
    assert delivered(metrics, "pinterest", "permanent") == 1
