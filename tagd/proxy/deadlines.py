"""Deadlines for what a visitor sends: its request head, then its body.

Twisted's idle timer starts again with every byte, so a visitor that sends a request head
one byte at a time (slowloris), or a body one byte every few seconds, keeps its connection
for as long as it likes, and with a streamed upload an origin connection too.  Here, for
each visitor connection:

 - the request head (request line and headers) must be in within C{header_timeout} of
   the connection's start; on a kept-alive connection, of the end of the previous request
   or of the next request's first byte, whichever is later (before that byte the
   connection is idle, and C{keepalive_timeout} applies);
 - a body must keep coming: no byte of it for C{body_timeout} ends the request, and once
   the body is C{body_timeout} old it must have come at C{body_min_rate} bytes a second on
   average since its start, so that a trickle cannot hold a connection (or, streamed, an
   origin connection) for longer than its size at that rate; and however fast it comes,
   it must be complete within C{upload_timeout} of its start, so that no upload, of any
   size, holds an origin connection (and the app worker behind it) without bound.  Time
   during which tagd itself stops reading it (the origin reads slower) does not count:
   the origin's own C{response_timeout} covers that.

One timer per connection, moved only when it fires (or when a deadline comes earlier than
it): a request costs a few assignments and clock readings, not a timer of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tagd.daemon.config import ProxyConfig

if TYPE_CHECKING:
    from tagd.proxy.site import TagdChannel

# The phases of a connection.  Only the head and the body have deadlines; a connection
# timed out has the channel's abortTimeout to close cleanly before it is cut.
_IDLE = "idle"  # kept alive between requests: Twisted's idle timeout applies
_HEAD = "head"
_BODY = "body"
_BUSY = "busy"  # the whole request is in: the response is the proxy's business
_CLOSED = "closed"  # closing: nothing more is read
_TIMED_OUT = "timed out"  # closing after a deadline: nothing more is read

_NEVER = float("inf")


class RequestTimedOut(Exception):
    """The visitor's request head or body did not arrive in time."""


class RequestDeadline:
    """The deadlines of one visitor connection, from its start to its close."""

    _timer = None
    _timer_at = _NEVER
    _held_since: float | None = None  # tagd stopped reading the body then
    _last_read = 0.0
    _received = 0  # bytes read since the body began

    def __init__(self, reactor, config: ProxyConfig, visitor: TagdChannel) -> None:
        self._seconds = reactor.seconds
        self._call_later = reactor.callLater
        self._header_timeout = config.header_timeout
        self._body_timeout = config.body_timeout
        self._min_rate = config.body_min_rate
        self._upload_timeout = config.upload_timeout
        self._visitor = visitor
        self._head_starts(self._seconds())

    @property
    def reading(self) -> bool:
        """Whether a request's head or body is being read, with a deadline of its own."""
        return self._phase is _HEAD or self._phase is _BODY

    # From the channel.

    def read(self, size: int) -> bool:
        """C{size} bytes arrived; False when they are to be dropped (the connection is
        closing)."""
        phase = self._phase
        if phase is _BODY:
            self._last_read = self._seconds()
            self._received += size
        elif phase is _IDLE:
            self._head_starts(self._seconds())
        elif phase is _CLOSED or phase is _TIMED_OUT:
            return False
        return True

    def head_done(self) -> None:
        """The request head is in; its body (if any) begins."""
        if self._phase is _HEAD:
            now = self._seconds()
            self._phase, self._started, self._last_read, self._received = _BODY, now, now, 0
            self._held_since = None
            self._due(now + self._body_timeout)

    def body_done(self) -> None:
        """The whole request is in: no deadline until the next one begins."""
        if self._phase is _BODY:
            self._phase, self._held_since = _BUSY, None

    def request_done(self) -> None:
        """The response is out; what arrives next begins the next request."""
        if self._phase is _BUSY:
            self._phase = _IDLE

    def held(self) -> None:
        """tagd stopped reading the body (the origin reads slower): its clock stops."""
        if self._phase is _BODY and self._held_since is None:
            self._held_since = self._seconds()

    def released(self) -> None:
        """tagd reads the body again: its clock goes on from where it stopped."""
        held_since = self._held_since
        if held_since is not None:
            self._held_since = None
            now = self._seconds()
            self._started += now - held_since
            self._last_read = now
            self._due(self._body_deadline())

    def closing(self) -> None:
        """The connection is closing: no more deadlines, nothing more read."""
        if self._phase is not _TIMED_OUT:
            self._phase = _CLOSED

    def stop(self) -> None:
        """The connection is gone."""
        self._phase = _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, _NEVER

    # The timer.

    def _head_starts(self, now: float) -> None:
        self._phase, self._started = _HEAD, now
        self._due(now + self._header_timeout)

    def _body_deadline(self) -> float:
        """When the body's silence, or its average rate, passes what is allowed."""
        slow = self._started + max(self._body_timeout, self._received / self._min_rate)
        return min(self._last_read + self._body_timeout, slow, self._started + self._upload_timeout)

    def _due(self, at: float) -> None:
        """Have the timer fire by C{at}; one that fires earlier stays, and looks again."""
        if at < self._timer_at:
            delay = max(0.0, at - self._seconds())
            if self._timer is None:
                self._timer = self._call_later(delay, self._fired)
            else:
                self._timer.reset(delay)
            self._timer_at = at

    def _fired(self) -> None:
        self._timer, self._timer_at = None, _NEVER
        phase = self._phase
        if phase is _HEAD:
            deadline = self._started + self._header_timeout
        elif phase is _BODY and self._held_since is None:
            deadline = self._body_deadline()
        elif phase is _TIMED_OUT:
            # The close waits on a visitor that reads nothing (or on a TLS handshake).
            self._visitor.transport.abortConnection()
            return
        else:
            return
        now = self._seconds()
        if now < deadline:
            self._due(deadline)
            return
        if phase is _HEAD:
            reason = "request head not complete within header_timeout"
        elif now >= self._last_read + self._body_timeout:
            reason = "no byte of the request body for body_timeout"
        elif now >= self._started + self._upload_timeout:
            reason = "request body not complete within upload_timeout"
        else:
            reason = "request body slower than body_min_rate"
        self._phase = _TIMED_OUT
        abort_after = self._visitor.abortTimeout
        if abort_after is not None:
            self._due(now + abort_after)
        self._visitor.deadline_passed(reason)
