"""A destination's outage: when the failures its requests meet are the platform's, not
their events', and what the journal says about it.

The dispatcher tells L{Outage} of every answer.  A transient failure (refused, reset,
timeout, 5xx, the platform's transient codes) of a request is the destination's when no
request to it succeeded since that request was sent, and the answer before it was a
failure too (or there was none yet): every request is meeting it.  Then the destination
is out.  It backs off as a whole (full jitter, doubling from C{base} up to C{cap}), one
probe request at a time, and the failed rows gain no attempt.  The first success ends
the outage.  A transient failure while other requests succeed, or right after one did,
is the rows' own, which the dispatcher counts against them: a row the platform keeps
failing ends as a dead letter, even on a destination that sends one request at a time.

The lines come from L{Outage.report}, which the dispatcher calls every few seconds with
the destination's backlog: one warning once an outage is seen (why, how many events
wait), a reminder every C{reminder} seconds while it lasts (backlog, age of the oldest),
one line once it has ended (how long it lasted, how many events were sent since).  An
outage that starts and ends between two reports (a flaky platform's) is counted and
said in one line a reminder interval at most: a retry storm never floods the journal.
"""

from __future__ import annotations

import random

import attrs
from twisted.logger import Logger

from tagd.delivery.spool import Backlog

log = Logger()

# 2 ** 64 backoff bases are far beyond any cap; a larger exponent would overflow a float.
MAX_EXPONENT = 64


def doubled(base: float, times: int, cap: float) -> float:
    """C{base} doubled C{times} times, at most C{cap}."""
    return min(cap, base * 2 ** min(times, MAX_EXPONENT))


def duration(seconds: float) -> str:
    """C{seconds} as people read a duration in a log line: 42 s, 5 min 3 s, 2 h 10 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _waiting(backlog: Backlog | None, now: float) -> str:
    if backlog is None:
        return "no event waits"
    return f"{backlog.owed} event(s) wait, the oldest accepted {duration(now - backlog.oldest)} ago"


@attrs.define
class Outage:
    """One destination's outage state: whether it is out, since when and why, its backoff,
    and what the journal has been told."""

    name: str
    base: float  # seconds: the first failure backs off up to twice this
    cap: float  # seconds: no backoff longer
    reminder: float  # seconds between reminders while out
    rand: random.Random
    since: float | None = None  # when the outage began; None while up
    reason: str = ""
    failures: int = 0  # the destination's failures since the outage began
    decided_at: float = float("-inf")  # when the current backoff began
    succeeded_at: float = float("-inf")  # when the last request succeeded
    last_ok: bool = False  # whether the latest answer was a success
    said_at: float | None = None  # when the warning or the last reminder went out
    ended: tuple[float, float] | None = None  # (began, ended) of a said outage, its line to come
    sent_since: int = 0  # events delivered since the said outage ended
    brief: int = 0  # outages begun and ended unsaid, since the last line about them
    brief_said_at: float = float("-inf")

    @property
    def out(self) -> bool:
        return self.since is not None

    def failed(self, now: float, sent_at: float, reason: str) -> tuple[bool, float | None]:
        """A request sent at C{sent_at} met a transient failure at C{now}.

        Returns whether the failure is the destination's (see the module's docstring),
        and, for the destination's, the pause before the next probe: None when the
        request left before the current pause began (it answers for the same outage, and
        doubles nothing).
        """
        ok_before, self.last_ok = self.last_ok, False
        if self.succeeded_at >= sent_at or (ok_before and self.since is None):
            return False, None
        self.reason = reason
        if self.since is None:
            self.since, self.failures = now, 0
        elif sent_at < self.decided_at:
            return True, None
        delay = self.rand.uniform(0, doubled(self.base, self.failures, self.cap))
        self.failures += 1
        self.decided_at = now
        return True, delay

    def succeeded(self, now: float, count: int) -> bool:
        """A request delivered C{count} events; returns whether that ended an outage."""
        self.succeeded_at, self.last_ok = now, True
        ending = self.since is not None
        if ending:
            if self.said_at is not None:
                self.ended, self.sent_since = (self.since, now), 0
            else:
                self.brief += 1
            self.since, self.failures, self.said_at = None, 0, None
        if self.ended is not None:
            self.sent_since += count
        return ending

    def report(self, now: float, backlog: Backlog | None) -> None:
        """Say what changed since the last report (see the module's docstring)."""
        if self.ended is not None:
            began, ended = self.ended
            self.ended = None
            log.info(
                "{destination}: delivering again after {lasted} out (since {ago} ago); {sent} event(s)"
                " sent since, {waiting}",
                destination=self.name,
                lasted=duration(ended - began),
                ago=duration(now - ended),
                sent=self.sent_since,
                waiting=_waiting(backlog, now),
            )
        if self.brief and now - self.brief_said_at >= self.reminder:
            log.info(
                "{destination}: {count} brief outage(s) since the last such line, each ended by the"
                " next request; last failure: {reason}",
                destination=self.name,
                count=self.brief,
                reason=self.reason,
            )
            self.brief, self.brief_said_at = 0, now
        if self.since is None:
            return
        if self.said_at is None:
            self.said_at = now
            log.warn(
                "{destination}: the platform stopped accepting events {ago} ago: {reason}. Nothing is"
                " lost: {waiting}; tagd tries one request at a time and sends them all once it"
                " answers again",
                destination=self.name,
                ago=duration(now - self.since),
                reason=self.reason,
                waiting=_waiting(backlog, now),
            )
        elif now - self.said_at >= self.reminder:
            self.said_at = now
            log.warn(
                "{destination}: still not accepting events, for {lasted}: {reason}; {waiting}",
                destination=self.name,
                lasted=duration(now - self.since),
                reason=self.reason,
                waiting=_waiting(backlog, now),
            )
