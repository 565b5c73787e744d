"""Garbage-collector settings for a long-running proxy: shorter pauses for visitors.

With Python's defaults the cyclic collector runs a young collection every 700 net
allocations of container objects, and under tracked load a full collection every second
or so.  A full collection walks every object tagd holds and serves no visitor meanwhile:
44–75 ms each in C{bench/delivery.py}, which made the tracked run's p99 latency about
50 ms against 4 ms untracked.  Two standard settings for servers bring it to 10–20 ms in
most runs:

  - once the reactor runs, everything start-up allocated (modules, the bot list's
    compiled patterns, the configuration) is frozen: moved to a permanent generation
    that collections no longer walk;
  - young collections wait for L{YOUNG_THRESHOLD} allocations instead of 700, so full
    collections become rare (none in an 8-second benchmark run); a young or middle
    collection then takes up to about 19 ms.

The price of freezing: the collector never frees a frozen object, only reference counting
does.  The start-up objects that a reload replaces (the tracker, with its caches and bot
detector) therefore must not refer to themselves; a test checks that they are freed.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def tune_collector(reactor) -> None:
    """Raise the young generation's threshold now, and freeze start-up's objects once
    C{reactor} runs (after twistd's own start-up, which allocates too)."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    reactor.callWhenRunning(gc.freeze)
