"""CPU per platform request of tagd's agent, against treq on Twisted's Agent.

A GA4 delivery is one POST per visitor, so the client's per-request CPU is much of what a
tracked page view costs (issue: one GA4 delivery at most the CPU of one proxied request,
about 150 us on the page-view benchmark).  This measures, in this process, the CPU time
(C{time.process_time}) per request of a GA4-sized POST (a 1 KB JSON body, answered 204
with GA4's dozen headers) over keep-alive loopback connections, C{--inflight} requests at
a time, against a small asyncio server in a process of its own:

  - C{treq+Agent}: treq's C{HTTPClient} on Agent and a persistent pool, the body read with
    C{treq.content}: what tagd used before;
  - C{treq layers alone}: the same treq calls over an agent that answers at once in memory,
    with no connection at all: the least any lean agent beneath treq could cost
    (C{HTTPClient(agent)}), and C{agent.request + treq.collect}, the least of a lean agent
    called directly with treq reading its body;
  - C{PlatformAgent + treq.collect}: what the dispatcher sends and reads
    (L{tagd.delivery.direct.exchange}: tagd's agent, L{tagd.delivery.client}, the body read
    by C{treq.collect});
  - C{Dispatcher + PlatformAgent}: the whole of a GA4 delivery in the dispatcher, per
    event, one visitor each: lease (from a spool in memory, answering at once), the age
    check, GA4's encoding, the POST, the verdict and the acknowledgement.

Each figure is the best of C{--rounds} rounds of C{--requests} requests, every request
with the dispatcher's C{addTimeout}.  Run with the Python of the virtual environment tagd
is installed in: C{.venv/bin/python bench/platform_client_cpu.py}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from tagd.admin.metrics import Metrics
from tagd.delivery.client import PlatformAgent
from tagd.delivery.destinations import OutgoingRequest, ga4
from tagd.delivery.direct import Route, exchange
from tagd.delivery.dispatcher import Dispatcher
from tagd.tagging.events import Event

BODY = b'{"client_id":"1234567890.1700000000","events":[{"name":"page_view","params":{' + b'"x":"' + b"y" * 900 + b'"}}]}'
HEADERS = {"Content-Type": "application/json", "User-Agent": "tagd/1.0"}
# What GA4's Measurement Protocol answers, near enough: 204 and a dozen headers.
ANSWER = (
    b"HTTP/1.1 204 No Content\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Access-Control-Allow-Origin: *\r\n"
    b"Date: Tue, 08 Dec 2026 04:00:00 GMT\r\n"
    b"Pragma: no-cache\r\n"
    b"Expires: Fri, 01 Jan 1990 00:00:00 GMT\r\n"
    b"Cache-Control: no-cache, no-store, must-revalidate\r\n"
    b"Cross-Origin-Resource-Policy: cross-origin\r\n"
    b"Server: Golfe2\r\n"
    b"Content-Length: 0\r\n"
    b"X-XSS-Protection: 0\r\n"
    b"X-Frame-Options: SAMEORIGIN\r\n"
    b'Alt-Svc: h3=":443"; ma=2592000\r\n\r\n'
)

SERVER = r"""
import asyncio, sys
ANSWER = %r

async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
""" % (ANSWER,)


@implementer(IResponse)
class _InstantResponse:
    """A 204 with no body, there at once."""

    version = (b"HTTP", 1, 1)
    code = 204
    phrase = b"No Content"
    length = 0
    request = None
    previousResponse = None

    def __init__(self) -> None:
        self.headers = Headers()

    def deliverBody(self, protocol) -> None:
        protocol.makeConnection(None)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response) -> None:
        pass


@implementer(IAgent)
class _InstantAgent:
    """An agent that answers every request at once, without a connection."""

    def request(self, method, uri, headers=None, bodyProducer=None) -> Deferred:
        return succeed(_InstantResponse())


async def _treq_agent(reactor, client: HTTPClient, url: str) -> None:
    response = await client.request("POST", url, data=BODY, headers=HEADERS).addTimeout(5, reactor)
    await treq.content(response)


async def _agent_collect(reactor, agent, url: str) -> None:
    response = await agent.request(b"POST", url.encode(), Headers(), None).addTimeout(5, reactor)
    await treq.collect(response, lambda data: None)


async def _platform_agent(reactor, agent: PlatformAgent, request: OutgoingRequest) -> None:
    await exchange(agent, request).addTimeout(5, reactor)


@attrs.frozen
class _Row:
    key: int
    event: Event
    attempts: int = 0


class _MemorySpool:
    """The dispatcher's spool, in memory, answering at once: C{done} fires once every
    row is acknowledged."""

    def __init__(self, events: list[Event]) -> None:
        self._pending = [_Row(key, event) for key, event in enumerate(events)]
        self._owed = len(events)
        self.done = Deferred()

    def lease(self, destination, limit, now):
        rows, self._pending = self._pending[:limit], self._pending[limit:]
        return succeed(rows)

    def ack(self, destination, keys):
        self._owed -= len(keys)
        if not self._owed:
            self.done.callback(None)
        return succeed(None)

    def backlog(self):
        return succeed({})

    def _unexpected(self, destination, keys, *args):
        raise AssertionError("every GA4 request should succeed")

    retry = postpone = release = dead = expire = _unexpected


async def _dispatched(reactor, url: str, count: int, inflight: int) -> float:
    """CPU seconds per GA4 event delivered by a dispatcher, one visitor each."""
    base = url.split("/mp/")[0]
    destination = ga4.build("ga4", {"measurement_id": "G-BENCH1", "api_secret": "s", "endpoint": base})
    now = int(reactor.seconds())
    events = [
        Event(event_name="PageView", event_id=f"e{n}", event_time=now, source_url="https://shop.example/p",
              client_ip="203.0.113.7", user_agent="Mozilla/5.0", ga_client_id=f"{n}.1700000000")
        for n in range(count)
    ]  # fmt: skip
    spool = _MemorySpool(events)
    client = PlatformAgent(reactor, inflight)
    dispatcher = Dispatcher(
        reactor=reactor, spool=spool, routes=[Route(destination, 5.0, inflight)], http=client, metrics=Metrics()
    )
    started = time.process_time()
    dispatcher.startService()
    await spool.done
    used = time.process_time() - started
    await dispatcher.stopService()
    await client.close()
    return used / count


async def _round(reactor, send, requests: int, inflight: int) -> float:
    """CPU seconds per request over C{requests} requests, C{inflight} at a time."""
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send()

    started = time.process_time()
    await defer.gatherResults([Deferred.fromCoroutine(worker()) for _ in range(inflight)])
    return (time.process_time() - started) / requests


async def main(reactor, args) -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/mp/collect?measurement_id=G-X&api_secret=s"
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = args.inflight
        stock = HTTPClient(Agent(reactor, pool=pool))
        instant = _InstantAgent()
        layered = HTTPClient(instant)
        lean = PlatformAgent(reactor, args.inflight)
        request = OutgoingRequest(url, BODY, HEADERS)  # as a destination's encode makes it
        candidates = {
            "treq+Agent": lambda: _treq_agent(reactor, stock, url),
            "treq layers alone: HTTPClient(agent)": lambda: _treq_agent(reactor, layered, url),
            "treq layers alone: agent.request + treq.collect": lambda: _agent_collect(reactor, instant, url),
            "PlatformAgent + treq.collect": lambda: _platform_agent(reactor, lean, request),
        }
        best = {name: float("inf") for name in candidates}
        for _ in range(args.rounds):
            for name, send in candidates.items():
                await _round(reactor, send, args.inflight * 20, args.inflight)  # warm the pool
                best[name] = min(best[name], await _round(reactor, send, args.requests, args.inflight))
        dispatched = "Dispatcher + PlatformAgent (per GA4 event)"
        best[dispatched] = float("inf")
        for _ in range(args.rounds):
            best[dispatched] = min(best[dispatched], await _dispatched(reactor, url, args.requests, args.inflight))
        baseline = best["treq+Agent"]
        print(f"CPU per request ({args.requests} requests, {args.inflight} in flight, best of {args.rounds}):")
        for name, seconds in best.items():
            print(f"  {name:48} {seconds * 1e6:7.1f} us  {seconds / baseline:5.2f}x treq+Agent")
        await pool.closeCachedConnections()
        await lean.close()
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
