"""The garbage-collector settings of the daemon (see tagd.daemon.collection)."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.testing import MemoryReactor, MemoryReactorClock

from tagd.daemon import tap
from tagd.daemon.collection import YOUNG_THRESHOLD, tune_collector


@pytest.fixture
def collector():
    """Put the test process's collector back as it was."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_young_threshold_at_once_and_freeze_once_running(collector):
    """The threshold changes when tagd is built; start-up's objects are frozen only once
    the reactor runs, so that what twistd allocates after building the service is too."""
    reactor = MemoryReactor()
    _, middle, oldest = gc.get_threshold()
    frozen = gc.get_freeze_count()
    tune_collector(reactor)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, oldest)
    assert gc.get_freeze_count() == frozen
    reactor.run()
    assert gc.get_freeze_count() > frozen


def test_the_twistd_entry_point_tunes_the_collector(collector, tmp_path, monkeypatch):
    """C{twistd tagd} (L{tap.makeService}) applies the settings; tests that build services
    themselves keep Python's."""
    monkeypatch.chdir(tmp_path)
    options = tap.Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--origin", "http://127.0.0.1:9"])
    gc.set_threshold(700, 10, 10)
    tap.build_service(tap.config_from_options(options), MemoryReactorClock())
    assert gc.get_threshold() == (700, 10, 10)
    tap.makeService(options, reactor=MemoryReactorClock())
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
