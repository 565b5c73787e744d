"""Log lines that anyone on the internet can cause at will, at most one a minute of each kind."""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

LOG_INTERVAL = 60.0


class RateLimitedLog:
    """Writes a warning of each kind at most once per C{interval} seconds, and says in the
    next one how many were held back meanwhile.

    A peer repeating a bad request by the thousand must neither fill the journal nor push
    the first line of its kind out of sight.
    """

    def __init__(self, log: Logger, clock: Callable[[], float], interval: float = LOG_INTERVAL) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._written: dict[str, float] = {}  # by kind: when its last line was written
        self._held: dict[str, int] = {}  # by kind: lines held back since

    def warn(self, kind: str, format: str, *, times: int = 1, **fields) -> None:
        """Log C{format} with C{fields} as a warning, unless a line of C{kind} went out
        less than the interval ago; C{times} is how many occurrences the call stands for.
        C{kind} is one of a few fixed strings, never something a peer sent."""
        self._say(self._log.warn, kind, format, times, fields)

    def info(self, kind: str, format: str, *, times: int = 1, **fields) -> None:
        """The same, for what is routine enough to be information (a slow visitor cut off)."""
        self._say(self._log.info, kind, format, times, fields)

    def _say(self, emit, kind: str, format: str, times: int, fields: dict) -> None:
        now = self._clock()
        written = self._written.get(kind)
        if written is not None and now - written < self._interval:
            self._held[kind] = self._held.get(kind, 0) + times
            return
        self._written[kind] = now
        emit(format + " ({held} more since the last such line)", held=self._held.pop(kind, 0), **fields)
