"""The tracking header: taken out of every response, its values handed to the hook, the
hook's cookies added to the head and its delivery work run once the head is out."""

from __future__ import annotations

import socket
import time
from email.utils import parsedate_to_datetime

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from tagd.proxy.resource import _Deliveries
from tagd.tagging.hook import Tracked

from conftest import eventually, raw_request, within
from origin import PAGE, TRACKING_HEADER

TRACKED_BODY = bytes(range(256)) * 80

# Other headers around four tracking headers in four letter cases.
TRACKED_HEAD = (
    b"HTTP/1.1 201 Made Here\r\n"
    b"Content-Type: text/html\r\n"
    b'WORKER-TRACKING: {"event_name":"A"}\r\n'
    b"X-Shop: 1\r\n"
    b'worker-tracking: {"event_name":"B"}\r\n'
    b"Set-Cookie: a=1\r\n"
    b"Worker-Tracking: third\r\n"
    b"Set-Cookie: b=2\r\n"
    b"Cache-Control: private\r\n"
    b"wOrKeR-tRaCkInG: fourth\r\n"
)
TRACKING_VALUES = [b'{"event_name":"A"}', b'{"event_name":"B"}', b"third", b"fourth"]


def _chunked(body: bytes, sizes=(1, 1000, 7, 4096)) -> bytes:
    out, at = [], 0
    for size in sizes * (len(body) // sum(sizes) + 1):
        piece = body[at : at + size]
        if not piece:
            break
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        at += size
    return b"".join(out) + b"0\r\n\r\n"


FRAMINGS = {
    "content-length": (b"Content-Length: %d\r\n\r\n" % len(TRACKED_BODY) + TRACKED_BODY),
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(TRACKED_BODY),
}


def _by_name(headers) -> dict[bytes, list[bytes]]:
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        grouped.setdefault(name.lower(), []).append(value)
    return grouped


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
@pytest_twisted.ensureDeferred
async def test_tracking_header_removed_and_everything_else_unchanged(
    raw_tagd, origin, connect, hook, framing
):
    """The tracking header goes, in any letter case and however often it appears; the
    status, the reason phrase, every other header (repeated ones in order) and the body
    bytes reach the visitor as the origin sent them, and nothing is added but framing
    and the Date the origin left out."""
    origin.answer_raw(b"/tracked", TRACKED_HEAD + FRAMINGS[framing])
    visitor = await connect(raw_tagd.port)
    response = await within(visitor.request(b"GET", b"/tracked"))
    assert (response.status, response.phrase) == (201, b"Made Here")
    assert bytes(response.body) == TRACKED_BODY
    expected = {
        b"content-type": [b"text/html"],
        b"x-shop": [b"1"],
        b"set-cookie": [b"a=1", b"b=2"],
        b"cache-control": [b"private"],
    }
    if framing == "chunked":
        expected[b"transfer-encoding"] = [b"chunked"]
    else:
        expected[b"content-length"] = [b"%d" % len(TRACKED_BODY)]
    received = _by_name(response.headers)
    # The origin sent no Date: tagd adds one (RFC 9110 section 6.6.1), and nothing else.
    [date] = received.pop(b"date")
    assert parsedate_to_datetime(date.decode()) is not None
    assert received == expected
    [(values, visit)] = await within(hook.called())
    assert values == TRACKING_VALUES
    assert visit.status == 201



@pytest_twisted.ensureDeferred
async def test_hook_receives_the_values_and_the_visit(tagd, connect, hook):
    """The hook is called once per response that carries the tracking header, with its
    values and the facts of the visit; a response without the header calls nothing."""
    visitor = await connect(tagd.port)
    await within(visitor.request(b"GET", b"/page?untracked=1"))
    response = await within(
        visitor.request(b"GET", b"/page?x=1", headers=[(b"X-Track", b'{"event_name":"ViewContent"}')])
    )
    assert TRACKING_HEADER.lower() not in response.names()
    [(values, visit)] = await within(hook.called())
    assert values == [b'{"event_name":"ViewContent"}']
    assert (visit.method, visit.uri, visit.host, visit.status) == (
        b"GET",
        b"/page?x=1",
        b"shop.example",
        200,
    )
    assert (visit.client_ip, visit.scheme) == ("127.0.0.1", "http")
    assert visit.request_headers.getRawHeaders(b"x-track") == [b'{"event_name":"ViewContent"}']


@pytest_twisted.ensureDeferred
async def test_hook_is_called_when_the_head_arrives(tagd, connect, hook):
    """The hook gets the values as soon as the origin's head is in, not once the body
    has ended; the body then streams on to the visitor as usual."""
    visitor = await connect(tagd.port)
    answer = visitor.request(b"GET", b"/slow?parts=10&delay=0.05", headers=[(b"X-Track", b"v")])
    await within(hook.called())
    assert not answer.called, "the hook was only called once the response had ended"
    response = await within(answer)
    assert response.complete
    assert bytes(response.body) == b"slow " * 10


@pytest_twisted.ensureDeferred
async def test_hook_cookies_join_the_response_head(tagd, connect, hook):
    """Cookies the hook asks for are added after the origin's own Set-Cookie headers,
    which stay as they were."""
    hook.behaviour = lambda values, visit: Tracked(set_cookies=(b"_fbp=fb.1.2.3; Path=/", b"_ttp=t"))
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/cookies", headers=[(b"X-Track", b"v")]))
    assert response.header(b"set-cookie") == [
        b"a=1; Path=/",
        b"b=2; Path=/; HttpOnly",
        b"c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
        b"_fbp=fb.1.2.3; Path=/",
        b"_ttp=t",
    ]
    assert TRACKING_HEADER.lower() not in response.names()


def _first_byte_at(port: int, request: bytes) -> float:
    """In a thread: send C{request} on a plain socket; when did the first byte come back?"""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        assert connection.recv(1)
        return time.monotonic()


@pytest_twisted.ensureDeferred
async def test_delivery_runs_after_the_response_is_on_the_wire(tagd, hook):
    """The hook's delivery work runs once the response has been written to the visitor's
    socket: delivery that blocks for 0.3 s does not delay the visitor's first byte (the
    visitor is a plain socket in a thread, so the blocked reactor cannot hide it)."""
    started = []

    def slow_delivery():
        started.append(time.monotonic())
        time.sleep(0.3)

    hook.behaviour = lambda values, visit: Tracked(deliver=slow_delivery)
    request = raw_request(b"GET", b"/page", headers=[(b"X-Track", b"v")])
    arrived = await within(deferToThread(_first_byte_at, tagd.port, request))
    await eventually(lambda: started)
    assert arrived < started[0] + 0.1, f"first byte {arrived - started[0]:.3f} s after delivery began"


def _raise(*args):
    raise RuntimeError("tagging is broken")


@pytest.mark.parametrize(
    "behaviour",
    [_raise, lambda values, visit: Tracked(deliver=_raise), lambda values, visit: Tracked(hand_over=_raise)],
    ids=["hook-raises", "delivery-raises", "hand-over-raises"],
)
@pytest_twisted.ensureDeferred
async def test_failing_tagging_does_not_affect_the_response(
    tagd, connect, hook, logged_failures, behaviour
):
    """A hook or a delivery that raises is logged; the visitor gets the full response,
    without the tracking header, and the connection keeps serving."""
    hook.behaviour = behaviour
    visitor = await connect(tagd.port)
    for count in (1, 2):
        response = await within(visitor.request(b"GET", b"/page", headers=[(b"X-Track", b"v")]))
        await within(hook.called(count))
        assert (response.status, bytes(response.body)) == (200, PAGE)
        assert TRACKING_HEADER.lower() not in response.names()
    await eventually(lambda: len(logged_failures) == 2)
    assert [e["log_failure"].type for e in logged_failures] == [RuntimeError, RuntimeError]


@pytest_twisted.ensureDeferred
async def test_hook_returning_the_wrong_thing_does_not_affect_the_response(tagd, connect, hook):
    """A hook that returns something other than a Tracked or None (a Deferred, as
    Twisted code easily does) is a tagging bug, and is treated like one that raises:
    the response still reaches the visitor whole."""
    hook.behaviour = lambda values, visit: Deferred()
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/page", headers=[(b"X-Track", b"v")]))
    assert (response.status, bytes(response.body)) == (200, PAGE)


def _turn(clock: Clock) -> None:
    """One reactor turn: the calls already scheduled run, not those they schedule
    (C{Clock.advance} would run those too)."""
    due, clock.calls = clock.calls, []
    for call in due:
        call.func(*call.args, **call.kw)


def test_deliveries_run_two_turns_later_one_batch_per_turn(logged_failures):
    """Deliveries added in one reactor turn run together two turns later; those added in
    the next turn run a turn after them; one that raises is logged and stops no other."""
    clock, ran = Clock(), []
    deliveries = _Deliveries(clock)
    deliveries.add(Tracked(deliver=lambda: ran.append("a")))
    deliveries.add(Tracked(deliver=_raise))
    deliveries.add(Tracked(deliver=lambda: ran.append("b")))
    assert len(clock.getDelayedCalls()) == 1
    _turn(clock)
    assert ran == []
    deliveries.add(Tracked(deliver=lambda: ran.append("c")))
    _turn(clock)
    assert ran == ["a", "b"]
    _turn(clock)
    assert ran == ["a", "b", "c"]
    assert clock.getDelayedCalls() == []
    assert [e["log_failure"].type for e in logged_failures] == [RuntimeError]


class _Gatherer:
    """A hook's delivery side that gathers in deliver and records each hand-over."""

    def __init__(self, ran: list) -> None:
        self.ran, self.gathered = ran, []

    def tracked(self, name: str) -> Tracked:
        return Tracked(deliver=lambda: self.gathered.append(name), hand_over=self.hand_over)

    def hand_over(self) -> None:
        self.gathered, handed = [], self.gathered
        self.ran.append(tuple(handed))


def test_each_hook_hands_over_once_after_a_turn_s_deliveries(logged_failures):
    """After a turn's deliveries, each distinct hand-over runs once with what they gathered:
    two hooks (a reload between two responses) each their own; a hand-over that raises is
    logged and stops no other; a response without one is delivered as before."""
    clock, ran = Clock(), []
    old, new = _Gatherer(ran), _Gatherer(ran)
    deliveries = _Deliveries(clock)
    for tracked in (old.tracked("a"), old.tracked("b"), Tracked(hand_over=_raise), new.tracked("c")):
        deliveries.add(tracked)
    deliveries.add(Tracked(deliver=lambda: ran.append("plain")))
    _turn(clock)
    _turn(clock)
    assert ran == ["plain", ("a", "b"), ("c",)]
    assert [e["log_failure"].type for e in logged_failures] == [RuntimeError]
    deliveries.add(new.tracked("d"))
    _turn(clock)
    _turn(clock)
    assert ran[-1] == ("d",)


@pytest_twisted.ensureDeferred
async def test_a_cookie_with_a_line_break_or_nul_never_reaches_the_wire(tagd, connect, hook, log_events):
    """The last check before the visitor: a header value holding a NUL (here a cookie,
    whatever built it) is left out of the head, and one holding CR LF stays one line
    (Twisted's headers fold it to a space) instead of forging a header of its own; the
    response and its other headers go out, and a warning says so once."""
    hook.behaviour = lambda values, visit: Tracked(
        set_cookies=(b"_fbp=fb.1.2.3\x00; Path=/", b"_ok=1", b"x=1\r\nSet-Cookie: forged=1")
    )
    visitor = await connect(tagd.port)
    response = await within(visitor.request(b"GET", b"/cookies", headers=[(b"X-Track", b"v")]))
    assert response.status == 200 and response.complete
    cookies = response.header(b"set-cookie")
    assert b"_ok=1" in cookies and b"a=1; Path=/" in cookies
    assert not any(b"\x00" in c or b"_fbp" in c or c.startswith(b"forged") for c in cookies), cookies
    warnings = [e for e in log_events if "CR, LF or NUL" in e.get("log_format", "")]
    assert len(warnings) == 1
