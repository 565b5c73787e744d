"""Saying a recurring cause once a minute, not once per occurrence.

A hostile origin or visitor can repeat the same fault thousands of times a second; the
journal should show it in a line or two, and the metrics count every occurrence.
"""

from __future__ import annotations

from typing import Callable

LOG_INTERVAL = 60.0


class Once:
    """Tells whether a line about one cause is due: at most once per C{interval} seconds."""

    def __init__(self, clock: Callable[[], float], interval: float = LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last = float("-inf")

    def due(self) -> bool:
        """True (and the interval starts again) when the line may be said now."""
        now = self._clock()
        if now - self._last < self._interval:
            return False
        self._last = now
        return True
