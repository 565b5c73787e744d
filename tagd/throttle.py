"""A log line said at most once a minute, however often its cause comes back.

What a visitor or an origin can repeat at will (refused connections, requests cut at a
deadline) must not write a line each time: a flood would fill the journal, and the lines
would cost more than the refusals.  The line that does go out says how many occurrences
it stands for; the counters keep the exact figures.
"""

from __future__ import annotations

from typing import Callable

LOG_INTERVAL = 60.0


class Throttle:
    """Counts the occurrences of one kind of event and lets a line about them through at
    most once per C{interval} seconds of C{seconds()}."""

    def __init__(self, seconds: Callable[[], float], interval: float = LOG_INTERVAL) -> None:
        self._seconds = seconds
        self._interval = interval
        self._said_at = float("-inf")
        self._unsaid = 0

    def __call__(self) -> int:
        """Count one occurrence.  When a line is due, the occurrences it stands for (this
        one and those held back since the last line); else 0, and nothing is to be said."""
        self._unsaid += 1
        now = self._seconds()
        if now - self._said_at < self._interval:
            return 0
        count, self._unsaid, self._said_at = self._unsaid, 0, now
        return count
