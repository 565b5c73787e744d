"""The dispatcher with the destinations added after the first three, over loopback: a
partial success settles each event by the platform's word, an event a platform cannot
take is dead-lettered with the reason, a refused token pauses the destination, and
events past each platform's window expire unsent."""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from conftest import eventually
from fakes import DAY, Answer, FakeMeta, FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat, make_event
from tagd.delivery.direct import MAX_ANSWER, DirectDelivery, Route
from tagd.delivery.destinations import meta
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
async def test_the_direct_fallback_counts_a_partial_success_event_by_event(serving, reactor, platforms, metrics):
    fake = FakePinterest()
    fake.refuse_ids = {"ev-0"}
    served = serving(fake)
    delivery = DirectDelivery(reactor=reactor, routes=[route("pinterest", served)], http=platforms, outcomes=Outcomes(metrics))
    await delivery.submit(events("ev", 3))
    assert delivered(metrics, "pinterest", "success") == 2
    assert delivered(metrics, "pinterest", "permanent") == 1


class CannedPinterest(FakePinterest):
    """Pinterest answering every request with one answer, whatever it carried."""

    def __init__(self, canned: Answer) -> None:
        super().__init__()
        self.canned = canned

    def answer(self, recorded) -> Answer:
        return self.canned


@pytest.mark.parametrize(
    "canned",
    [
        Answer(200, {"events": []}),
        Answer(200, {"events": [{"status": "processed", "error_message": None}] * 2}),
        Answer(422, {"code": 4196, "message": "Invalid", "details": {"events": []}}),
    ],
    ids=["empty-list", "wrong-length-list", "422-empty-list"],
)
@pytest_twisted.ensureDeferred
async def test_a_pinterest_answer_that_speaks_for_fewer_events_delivers_none(serving, dispatch, spool, metrics, canned):
    """An answer whose list of each event's status is empty, or not as long as the request
    (two statuses for the three events, and for the one-event probes of the outage that
    follows), is no answer for them: nothing counts as delivered, the rows wait for
    another try."""
    served = serving(CannedPinterest(canned))
    spool.add("pinterest", events("ev", 3))
    dispatch(route("pinterest", served))
    await eventually(lambda: delivered(metrics, "pinterest", "transient") >= 3)
    assert delivered(metrics, "pinterest", "success") == 0
    assert "done" not in spool.states("pinterest").values()


@pytest_twisted.ensureDeferred
async def test_a_pinterest_answer_refusing_the_token_is_a_refusal_whatever_list_it_carries(serving, dispatch, spool, metrics):
    """Pinterest's code 2 (authentication failed) with an empty per-event list: the
    credentials are refused (the destination pauses, the metric says so), nothing acked."""
    answer = Answer(422, {"code": 2, "message": "Authentication failed", "details": {"events": []}})
    served = serving(CannedPinterest(answer))
    spool.add("pinterest", events("ev", 2))
    dispatch(route("pinterest", served))
    await eventually(lambda: refused(metrics, "pinterest") == 1)
    assert delivered(metrics, "pinterest", "success") == 0
    assert "done" not in spool.states("pinterest").values()


class EndlessMeta(FakeMeta):
    """A Meta endpoint answering 200 with a body past what tagd reads of an answer."""

    def answer(self, recorded) -> Answer:
        return Answer(200, "x" * (MAX_ANSWER + 1))


@pytest_twisted.ensureDeferred
async def test_an_answer_past_the_limit_is_no_answer(serving, dispatch, spool, metrics):
    """A platform (broken, or not the platform) answering without end: tagd reads at most
    MAX_ANSWER bytes, closes the connection, and takes it as no answer, so the events
    wait for another try and tagd's memory stays bounded."""
    served = serving(EndlessMeta())
    spool.add("meta", events("ev", 2))
    dispatch(Route(meta.build("meta", {"pixel_id": "1234", "access_token": "meta-token", "endpoint": served.base}), 5.0))
    await eventually(lambda: delivered(metrics, "meta", "transient") >= 2)
    assert delivered(metrics, "meta", "success") == 0
    assert "done" not in spool.states("meta").values()
