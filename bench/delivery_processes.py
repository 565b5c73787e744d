"""What delivery.py runs in processes of its own: fake ad platforms, and a spool filler.

C{platforms MODE DELAY META_PORT GA4_PORT TIKTOK_PORT}: three fake platforms on loopback,
one port each, in one asyncio process.  They are deliberately minimal: the benchmark
measures tagd, so a fake must cost next to nothing and never be the bottleneck.  They do
not validate payloads (the test suite's fakes do that); they parse the JSON only to count
the events, so that the benchmark can check that what tagd claims to deliver arrived.
MODE says how they answer a POST:

  - C{ok}: at once, as the platform answers a success (Meta C{{"events_received": N}},
    GA4 204, TikTok C{{"code": 0}});
  - C{slow}: the same answer, DELAY seconds late;
  - C{hang}: never; the request is read and the connection held until tagd drops it;
  - C{down}: 503 with an empty body at once, as a platform's load balancer in an outage;
  - C{flaky}: DELAY seconds late, 30 % of requests 503, 10 % 429 with C{Retry-After: 1}
    (seeded, so that runs compare), the others the success answer.

C{GET /_stats} on any port answers that platform's counters as JSON, whatever the mode;
C{GET /_mode/MODE} switches all three platforms to MODE (the end of an outage).

C{fill PATH EVENTS VISITORS DESTINATION...}: write EVENTS page views into a new spool
file through L{tagd.delivery.spool.Spool} itself, owed to each DESTINATION, as if tagd had accepted
them while the platforms were down.  C{VISITORS} distinct visitors take turns, which
decides how well GA4 can batch (it takes the events of one client per request).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

HOST = "127.0.0.1"
PLATFORMS = ("meta", "ga4", "tiktok")
MODES = ("ok", "slow", "hang", "down", "flaky")
# Where each platform's request body holds its list of events.
EVENTS_KEY = {"meta": "data", "ga4": "events", "tiktok": "data"}
# A browser's User-Agent (bots are not tracked): delivery.py's load sends it too.
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"


# --- fake platforms -----------------------------------------------------------------------


class Counters:
    """One platform's tally: what arrived, when, and what was answered."""

    def __init__(self) -> None:
        self.requests = 0
        self.events = 0
        self.bytes = 0
        self.answered = 0
        self.answered_events = 0
        self.refused = 0  # requests answered with a 503 or a 429
        self.answered_last_at: float | None = None  # time.monotonic() of the last success
        self.unreadable = 0  # bodies that were not the JSON expected: tagd or fake is wrong
        self.event_ids: set[str] = set()  # Meta and TikTok only: GA4 events carry no id
        self.first_at: float | None = None  # time.monotonic() of the first POST's arrival
        self.first_events = 0
        self.last_at: float | None = None

    def record(self, platform: str, body: bytes) -> int:
        """Count one request's events; return how many it carried."""
        try:
            events = json.loads(body)[EVENTS_KEY[platform]]
            count = len(events)
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            events, count = [], 0
        if platform != "ga4":
            self.event_ids.update(e.get("event_id") for e in events if isinstance(e, dict))
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.first_events = now, count
        self.last_at = now
        self.requests += 1
        self.events += count
        self.bytes += len(body)
        return count

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "events": self.events,
                "distinct": len(self.event_ids) if self.event_ids else None,
                "bytes": self.bytes,
                "answered": self.answered,
                "answered_events": self.answered_events,
                "refused": self.refused,
                "answered_last_at": self.answered_last_at,
                "unreadable": self.unreadable,
                "first_at": self.first_at,
                "first_events": self.first_events,
                "last_at": self.last_at,
                "now": time.monotonic(),
            }
        ).encode()


def _answer(platform: str, events: int) -> tuple[str, bytes]:
    """The platform's success answer: status line text and JSON body."""
    if platform == "meta":
        return "200 OK", json.dumps({"events_received": events, "fbtrace_id": "bench"}).encode()
    if platform == "tiktok":
        return "200 OK", b'{"code": 0, "message": "OK", "data": {}}'
    return "204 No Content", b""


def _response(status: str, body: bytes) -> bytes:
    # A 204 has no body and, by RFC 9110, no Content-Length either.
    head = f"HTTP/1.1 {status}\r\n" if status.startswith("204") else f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    kind = "Content-Type: application/json\r\n" if body else ""
    return (head + kind + "\r\n").encode() + body


class Mode:
    """How the three platforms answer now, shared by them, switched by C{GET /_mode/MODE}."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rand = random.Random(12)

    def failure(self) -> str | None:
        """The status line of a refusal, or None to answer as usual."""
        if self.name == "down":
            return "503 Service Unavailable"
        if self.name == "flaky":
            draw = self.rand.random()
            if draw < 0.3:
                return "503 Service Unavailable"
            if draw < 0.4:
                return "429 Too Many Requests"
        return None


def _refusal(status: str) -> bytes:
    retry = "Retry-After: 1\r\n" if status.startswith("429") else ""
    return f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n{retry}\r\n".encode()


async def _serve_connection(reader, writer, platform: str, counters: Counters, mode: Mode, delay: float) -> None:
    """HTTP/1.1 keep-alive with Content-Length bodies: all tagd's client sends."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ", 2)[:2]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            if method == "GET" and target.startswith("/_stats"):
                writer.write(_response("200 OK", counters.as_json()))
                continue
            if method == "GET" and target.startswith("/_mode/") and target[7:] in MODES:
                mode.name = target[7:]
                writer.write(_response("200 OK", b"{}"))
                continue
            events = counters.record(platform, body)
            if mode.name == "hang":
                await reader.read()  # until tagd gives up and closes the connection
                return
            if mode.name in ("slow", "flaky"):
                await asyncio.sleep(delay)
            refusal = mode.failure()
            if refusal is not None:
                writer.write(_refusal(refusal))
                counters.refused += 1
                continue
            writer.write(_response(*_answer(platform, events)))
            counters.answered += 1
            counters.answered_events += events
            counters.answered_last_at = time.monotonic()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def serve_platforms(name: str, delay: float, ports: list[int]) -> None:
    servers, mode = [], Mode(name)
    for platform, port in zip(PLATFORMS, ports):
        counters = Counters()

        async def handle(reader, writer, platform=platform, counters=counters):
            await _serve_connection(reader, writer, platform, counters, mode, delay)

        servers.append(await asyncio.start_server(handle, HOST, port, backlog=1024, limit=1 << 24))
    await asyncio.gather(*(server.serve_forever() for server in servers))


# --- spool filler ---------------------------------------------------------------------------


def visitor_ids(visitor: int, now: float) -> dict[str, str]:
    """The first-party ids of visitor number C{visitor}, as tagd reads them from cookies."""
    return {
        "fbp": f"fb.1.{int(now * 1000)}.{1_000_000_000 + visitor}",
        "ga_client_id": f"{1_000_000_000 + visitor}.{int(now)}",
        "ga_session_id": str(int(now)),
    }


def fill(path: str, count: int, visitors: int, destinations: list[str]) -> None:
    """Enqueue C{count} events through the real spool, then close it (which commits them)."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    from tagd.tagging.events import Event
    from tagd.delivery.spool import Spool

    async def run(reactor) -> None:
        spool = Spool.open(path, reactor=reactor, max_events=count + 1)
        now = time.time()
        ids = [visitor_ids(v, now) for v in range(visitors)]
        chunk = []
        for n in range(count):
            chunk.append(
                Event(
                    event_name="PageView",
                    event_id=f"bench-{n:09d}",
                    event_time=int(now),
                    source_url=f"http://{HOST}/",
                    client_ip=HOST,
                    user_agent=USER_AGENT,
                    **ids[n % visitors],
                )
            )
            if len(chunk) == 500:
                accepted = spool.enqueue(chunk, destinations)
                if accepted != len(chunk):
                    raise SystemExit(f"the spool refused {len(chunk) - accepted} event(s)")
                chunk = []
                await spool.flush()
        if chunk:
            spool.enqueue(chunk, destinations)
        await spool.close()

    task.react(lambda reactor: ensureDeferred(run(reactor)))


def main(argv: list[str]) -> None:
    if argv[:1] == ["platforms"] and len(argv) == 6 and argv[1] in MODES:
        asyncio.run(serve_platforms(argv[1], float(argv[2]), [int(p) for p in argv[3:6]]))
    elif argv[:1] == ["fill"] and len(argv) >= 5:
        fill(argv[1], int(argv[2]), int(argv[3]), argv[4:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
