"""Dispatcher.reroute, as a configuration reload calls it while the dispatcher runs: a
lane is never changed under a batch, a removed lane settles what it leased and leases
nothing more, an unchanged lane goes on as it was.

The in-memory spool and the fixtures are test_dispatcher's: a settlement of a row that
is not in flight fails the test there.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from conftest import eventually, sleep, within
from test_dispatcher import (  # noqa: F401 (fixtures)
    ObservedMeta,
    delivered,
    dispatch,
    dispatcher_log,
    events,
    meta_route,
    metrics,
    serving,
    spool,
)

SETTINGS = {
    "poll_interval": 0.05, "concurrency": 1, "backoff_base": 0.05, "backoff_cap": 1.0, "max_retry_after": 60.0,
    "outage_backoff_cap": 1.0, "outage_reminder": 300.0, "max_attempts": 10,
}  # fmt: skip


def ids(served) -> list[str]:
    return [event["event_id"] for event in served.fake.events]


@pytest_twisted.ensureDeferred
async def test_a_changed_route_takes_effect_from_the_next_batch(serving, dispatch, spool):
    """The batch in flight when Meta's endpoint changes is answered by the old endpoint and
    acknowledged; the rows after it go to the new one; reroute fires once the old lane's
    batch is settled."""
    old, new = serving(ObservedMeta()), serving(ObservedMeta())
    old.fake.inject(1, delay=0.5)
    spool.add("meta", events("e", 4))
    dispatcher = dispatch(meta_route(old, max_batch=2), **SETTINGS)
    await eventually(lambda: len(old.fake.requests) == 1)

    rerouted = dispatcher.reroute([meta_route(new, max_batch=2)], **SETTINGS)
    assert not rerouted.called  # the old lane's batch is still waiting for its answer
    await within(rerouted)
    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    assert ids(old) == ["e-0", "e-1"]
    assert ids(new) == ["e-2", "e-3"]


@pytest_twisted.ensureDeferred
async def test_a_removed_route_settles_its_batch_and_leases_nothing_more(serving, dispatch, spool, metrics):
    """Removed while a batch is in flight: that batch is acknowledged, the other rows stay
    pending (for the pipeline to dead-letter) and are never sent."""
    served = serving(ObservedMeta())
    served.fake.inject(1, delay=0.3)
    spool.add("meta", events("r", 3))
    dispatcher = dispatch(meta_route(served, max_batch=1), **SETTINGS)
    await eventually(lambda: len(served.fake.requests) == 1)

    await within(dispatcher.reroute([], **SETTINGS))
    await sleep(0.3)
    assert spool.states("meta") == {"r-0": "done", "r-1": "pending", "r-2": "pending"}
    assert len(served.fake.requests) == 1
    assert delivered(metrics, "meta", "success") == 1


@pytest.mark.parametrize(
    "changed",
    [{"poll_interval": 0.02}, {"concurrency": 2}],
    ids=["same-lane", "new-concurrency"],
)
@pytest_twisted.ensureDeferred
async def test_a_reroute_with_the_same_route_keeps_the_pause(serving, dispatch, spool, metrics, changed):
    """A reroute that leaves Meta's route as it was keeps the pause a 429 asked for: no
    request within the second, then delivery.  New settings apply all the same; a new
    concurrency gives Meta a new lane (it sizes the request slots), and the pause goes on
    in that lane."""
    served = serving(ObservedMeta(retry_after="1"))
    served.fake.inject(1, status=429, code=17)
    spool.add("meta", events("p", 2))
    route = meta_route(served)
    dispatcher = dispatch(route, **SETTINGS)
    await eventually(lambda: delivered(metrics, "meta", "throttle") == 2)
    throttled_at = served.fake.times[0]

    await within(dispatcher.reroute([route], **{**SETTINGS, **changed}))
    await eventually(lambda: delivered(metrics, "meta", "success") == 2, timeout=5)
    assert served.fake.times[1] - throttled_at >= 1.0
    assert len(served.fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_a_new_concurrency_keeps_a_refusal(serving, dispatch, spool, metrics, dispatcher_log):
    """Meta refuses the token, and a reload changes only the concurrency: the new lane
    keeps the refusal's pause (1 s, the backoff cap here) and
    C{tagd_destination_credentials_refused} stays 1.  The next refusal, after the pause,
    is a further one (an info line), not a first one (a second error line)."""
    served = serving(ObservedMeta())
    spool.add("meta", events("k", 3))
    route = meta_route(served, access_token="wrong-token-123")
    dispatcher = dispatch(route, **SETTINGS)
    refused = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "tagd_destination_credentials_refused", {"destination": "meta"}
    )
    await eventually(lambda: refused() == 1)
    refused_at = served.fake.times[0]

    await within(dispatcher.reroute([route], **{**SETTINGS, "concurrency": 2}))
    assert refused() == 1
    await eventually(lambda: len(served.fake.requests) == 2, timeout=5)
    assert served.fake.times[1] - refused_at >= 1.0
    assert refused() == 1
    assert len([line for line in dispatcher_log if "refuses this destination's credentials" in line]) == 1
    assert [line for line in dispatcher_log if "credentials still refused" in line] == [
        "meta: credentials still refused, trying again in 1 s"
    ]
    assert set(spool.states("meta").values()) == {"pending"}


@pytest_twisted.ensureDeferred
async def test_a_new_token_by_reload_ends_the_refusal(serving, dispatch, spool, metrics):
    """Meta refuses the token: the destination pauses and
    C{tagd_destination_credentials_refused} says 1.  A reroute with the right token (a
    reload) gives Meta a new lane, unpaused: everything waiting is delivered at once and
    the gauge goes back to 0.  A destination removed altogether loses its gauge."""
    served = serving(ObservedMeta())
    spool.add("meta", events("t", 3))
    dispatcher = dispatch(meta_route(served, access_token="wrong-token-123"), **SETTINGS)
    refused = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "tagd_destination_credentials_refused", {"destination": "meta"}
    )
    await eventually(lambda: refused() == 1)

    await within(dispatcher.reroute([meta_route(served)], **SETTINGS))
    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    assert refused() == 0

    await within(dispatcher.reroute([], **SETTINGS))
    assert refused() is None


@pytest_twisted.ensureDeferred
async def test_a_refusal_answering_a_retired_lane_does_not_touch_the_new_one(serving, dispatch, spool, metrics):
    """The token is fixed by a reload while a request with the old one is still out: its
    refusal, arriving after the reroute, neither pauses the new lane nor sets the gauge."""
    served = serving(ObservedMeta())
    served.fake.inject(1, delay=0.5)
    spool.add("meta", events("o", 2))
    dispatcher = dispatch(meta_route(served, access_token="wrong-token-123"), **SETTINGS)
    await eventually(lambda: len(served.fake.requests) == 1)

    await within(dispatcher.reroute([meta_route(served)], **SETTINGS))
    await eventually(lambda: set(spool.states("meta").values()) == {"done"})
    assert metrics.registry.get_sample_value("tagd_destination_credentials_refused", {"destination": "meta"}) == 0
