"""A scripted origin for the tests of a hostile or broken origin: every byte it sends,
and when, is chosen by the test.

Each accepted connection runs a script, a list of steps: wait for the next request,
send bytes (fixed, or built from that request), pause, close, reset, or hold the
connection open and answer nothing more.  A connection whose script has run out (or
that has none) answers each further request with the steps L{ScriptedOrigin.respond}
returns for it; by default an honest answer, L{ok}, whose body names the request's path.
Every request is recorded, in order, with the connection it came on.

Requests are read up to the end of their head only: these tests send GET and HEAD.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

# A complete response that no request asked for: tagd must never let a visitor see it.
SMUGGLED = b"HTTP/1.1 200 OK\r\nSet-Cookie: stolen=1\r\nContent-Length: 8\r\n\r\nSMUGGLED"


def marker(path: bytes) -> bytes:
    """The body of the honest answer to C{path}: it names the request it answers."""
    return b"path=" + path + b";"


@attrs.frozen
class Received:
    """One request as the origin read it."""

    connection: int  # which accepted connection carried it, counted from 0
    raw: bytes  # the request line and headers, as they arrived
    method: bytes
    path: bytes


def ok(request: Received, status: bytes = b"200 OK", version: bytes = b"HTTP/1.1") -> bytes:
    """An honest answer to C{request}, framed by Content-Length (for HEAD, the head alone)."""
    body = marker(request.path)
    head = b"%s %s\r\nContent-Length: %d\r\n\r\n" % (version, status, len(body))
    return head if request.method == b"HEAD" else head + body


# The steps of a script.


@attrs.frozen
class Await:
    """Wait until the next request has arrived on this connection."""


@attrs.frozen
class Send:
    """Write C{data}, or C{data(request)} for the request last received on this
    connection.  Sends with no pause between them leave in one write."""

    data: bytes | Callable[[Received], bytes]


@attrs.frozen
class Wait:
    """Pause for C{seconds}."""

    seconds: float


@attrs.frozen
class Close:
    """Close the connection cleanly (a FIN once what was written has gone out)."""


@attrs.frozen
class Reset:
    """Reset the connection (SO_LINGER 0).  Twisted drops what is still queued when it
    aborts, so this waits a moment first: what was written is on the wire by then."""

    settle = 0.02


@attrs.frozen
class Hold:
    """Keep the connection open and answer nothing more on it."""


Step = Await | Send | Wait | Close | Reset | Hold


def honest(request: Received) -> list[Step]:
    """The default answer to a request that no script covers."""
    return [Send(ok)]


class ScriptedConnection(Protocol):
    """One accepted connection, running its script and then answering honestly."""

    def __init__(self, origin: ScriptedOrigin, index: int, script: list[Step]) -> None:
        self._origin = origin
        self.index = index
        self._script = script
        self._buffer = b""
        self._requests: list[Received] = []  # received, not yet awaited
        self._arrival: Deferred | None = None
        self._request: Received | None = None  # the one the steps answer
        self.lost: Deferred = Deferred()  # fires with the reason once the connection ends
        self.done: Deferred = Deferred()  # fires when the script has run (or the connection ended)

    def connectionMade(self) -> None:
        Deferred.fromCoroutine(self._run()).addErrback(self._stopped)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            method, path = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
            request = Received(self.index, head + b"\r\n\r\n", method, path)
            self._origin.received.append(request)
            self._requests.append(request)
        if self._requests and self._arrival is not None:
            arrival, self._arrival = self._arrival, None
            arrival.callback(None)

    def connectionLost(self, reason) -> None:
        if self._arrival is not None:
            arrival, self._arrival = self._arrival, None
            arrival.cancel()
        self.lost.callback(reason.value)

    async def _run(self) -> None:
        ended = await self._steps(self._script)
        self.done.callback(None)
        while not ended:
            await self._next_request()
            self._origin.busy += 1
            try:
                ended = await self._steps(self._origin.respond(self._request))
            finally:
                self._origin.busy -= 1

    async def _steps(self, steps: list[Step]) -> bool:
        """Run C{steps}; whether the connection is over for the script (closed or held)."""
        for step in steps:
            if self.lost.called:
                return True
            if isinstance(step, Await):
                await self._next_request()
            elif isinstance(step, Send):
                data = step.data
                self.transport.write(data if isinstance(data, bytes) else data(self._request))
            elif isinstance(step, Wait):
                await deferLater(self._origin.reactor, step.seconds, lambda: None)
            elif isinstance(step, Close):
                self.transport.loseConnection()
                return True
            elif isinstance(step, Reset):
                await deferLater(self._origin.reactor, step.settle, lambda: None)
                self.transport.abortConnection()
                return True
            else:
                return True  # Hold
        return self.lost.called

    async def _next_request(self) -> None:
        if self.lost.called:
            raise CancelledError()
        if not self._requests:
            self._arrival = Deferred()
            await self._arrival
        self._request = self._requests.pop(0)

    def _stopped(self, failure) -> None:
        """The connection ended while its script waited for a request."""
        failure.trap(CancelledError)
        if not self.done.called:
            self.done.callback(None)


class _Factory(Factory):
    noisy = False

    def __init__(self, origin: ScriptedOrigin) -> None:
        self._origin = origin

    def buildProtocol(self, addr) -> ScriptedConnection:
        origin = self._origin
        index = len(origin.connections)
        script = origin.scripts[index] if index < len(origin.scripts) else []
        connection = ScriptedConnection(origin, index, script)
        origin.connections.append(connection)
        return connection


class ScriptedOrigin:
    """A TCP server on 127.0.0.1 that answers as the test scripted it.

    C{scripts[n]} is the script of the n-th accepted connection; C{respond(request)}
    gives the steps for any request after (or without) a script.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.scripts: list[list[Step]] = []
        self.respond: Callable[[Received], list[Step]] = honest
        self.received: list[Received] = []
        self.connections: list[ScriptedConnection] = []
        self.busy = 0  # answers from respond() still being sent
        self._port = None

    def script(self, *scripts: list[Step]) -> None:
        """The scripts of the first, second, ... connection to be accepted."""
        self.scripts = list(scripts)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def start(self) -> None:
        self._port = self.reactor.listenTCP(0, _Factory(self), interface="127.0.0.1")

    def stop(self) -> Deferred:
        """Stop listening and cut every connection still open."""
        for connection in self.connections:
            if not connection.lost.called:
                connection.transport.abortConnection()
        lost = [c.lost for c in self.connections]
        return gatherResults([self._port.stopListening(), *lost])
