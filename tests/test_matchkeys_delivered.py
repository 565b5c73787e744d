"""Match-key coverage of the events a platform took, through the dispatcher and the
direct fallback against the fake platforms on loopback: dead letters, expired events and
the events Pinterest refused of a partial success carried no key to anyone."""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from conftest import eventually
from fakes import DAY, FakePinterest, FakeSnapchat, make_event
from tagd.delivery.direct import DirectDelivery
from tagd.delivery.outcomes import Outcomes
from test_dispatcher import delivered, dispatch, events, metrics, serving, spool  # noqa: F401 (fixtures)
from test_dispatcher_platforms import route


def key_events(metrics, destination: str) -> dict[str, int]:
    """The events counted for match-key coverage at C{destination}, by event name."""
    totals, _keys = metrics.match_keys.totals()
    return {event: count for (name, event), count in totals.items() if name == destination}


@pytest_twisted.ensureDeferred
async def test_match_keys_count_only_the_events_a_platform_took(serving, dispatch, spool, metrics):
    """Coverage is of delivered events: Snapchat's dead letter (no name for the event)
    and an expired event were never sent, so they carried no key; the one it took did."""
    served = serving(FakeSnapchat())
    sent = route("snapchat", served)
    outcomes = Outcomes(metrics)
    outcomes.configured([sent.destination])
    old = int(time.time()) - 40 * DAY
    spool.add(
        "snapchat",
        [make_event(event_id="buy"), make_event(event_id="odd", event_name="Newsletter_Signup"),
         make_event(event_id="old", event_time=old)],
    )  # fmt: skip
    dispatch(sent, outcomes=outcomes)
    await eventually(lambda: spool.states("snapchat") == {"buy": "done", "odd": "dead", "old": "expired"})
    assert key_events(metrics, "snapchat") == {"Purchase": 1}
    _totals, keys = metrics.match_keys.totals()
    assert keys["snapchat", "Purchase", "email"] == keys["snapchat", "Purchase", "external_id"] + 1 == 1


@pytest.mark.parametrize("direct", [False, True], ids=["spool", "direct"])
@pytest_twisted.ensureDeferred
async def test_match_keys_leave_out_the_events_pinterest_refused(serving, dispatch, spool, reactor, platforms, metrics, direct):
    """Of a partial success, only the events Pinterest processed count, through the
    dispatcher and the direct fallback alike."""
    fake = FakePinterest()
    fake.refuse_ids = {"ev-1", "ev-3"}
    served = serving(fake)
    sent = route("pinterest", served)
    outcomes = Outcomes(metrics)
    outcomes.configured([sent.destination])
    if direct:
        await DirectDelivery(reactor=reactor, routes=[sent], http=platforms, outcomes=outcomes).submit(events("ev", 5))
    else:
        spool.add("pinterest", events("ev", 5))
        dispatch(sent, outcomes=outcomes)
        await eventually(lambda: delivered(metrics, "pinterest", "dead") == 2)
    await eventually(lambda: delivered(metrics, "pinterest", "success") == 3)
    assert sum(key_events(metrics, "pinterest").values()) == 3
