"""Garbage-collector settings for a long-running proxy: short pauses for visitors.

With Python's defaults the cyclic collector runs a young collection every 700 net
allocations of container objects, and under tracked load a full collection every second
or so.  A full collection walks every object tagd holds and serves no visitor meanwhile:
44–75 ms each in C{bench/delivery.py}, which made the tracked run's p99 latency 51 ms
against 4 ms untracked.  Two standard settings for servers bring it to 14–18 ms:

  - once the reactor runs, everything start-up allocated (modules, the bot list's
    compiled patterns, the configuration) is frozen: moved to a permanent generation
    that collections no longer walk;
  - young collections wait for L{YOUNG_THRESHOLD} allocations instead of 700, so full
    collections come about fifteen times less often, and each young one stays at a few
    milliseconds.

Garbage cycles are still collected, only in fewer, larger batches.
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
