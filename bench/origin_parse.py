"""What parsing one origin response costs tagd's reactor, outside any load.

A 38 KB page's response, with the headers nginx sends and the tracking header, is fed to
one L{tagd.proxy.origin.OriginConnection} over an in-memory transport, in two reads (head and
the first 16,000 body bytes, then the rest), as often as asked; the best of the rounds
is printed in µs per response.  Run with the Python of tagd's virtual environment:
C{.venv/bin/python bench/origin_parse.py [--responses 20000] [--rounds 5]}.
"""

from __future__ import annotations

import argparse
import sys
import time

from twisted.internet.testing import MemoryReactorClock, StringTransport

from tagd.proxy.origin import OriginClient, OriginConnection

HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 23:00:00 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 38000\r\n"
    b"Last-Modified: Mon, 07 Dec 2026 22:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6578-9470"\r\nWorker-Tracking: {"event_name": "PageView"}\r\nAccept-Ranges: bytes\r\n\r\n'
)
BODY = b"x" * 38_000
FIRST_READ = 16_000


class _Sink:
    """A receiver that takes the response and does nothing with it."""

    def response_head(self, code, phrase, headers) -> None:
        pass

    def response_data(self, data) -> None:
        pass

    def read_done(self) -> None:
        pass

    def response_end(self) -> None:
        pass

    def response_failed(self, reason, retryable) -> None:
        raise SystemExit(f"the response failed to parse: {reason.getErrorMessage()}")


def time_responses(count: int) -> float:
    """Seconds for C{count} responses on one kept-alive connection."""
    # No pool: each complete response closes the in-memory transport, which takes no
    # notice, so the pool's bookkeeping stays out of what is timed.
    client = OriginClient(MemoryReactorClock(), "http://127.0.0.1:8000", connect_timeout=1, pool_size=0, idle_timeout=60)
    connection = OriginConnection(client)
    connection.makeConnection(StringTransport())
    sink, first, rest = _Sink(), HEAD + BODY[:FIRST_READ], BODY[FIRST_READ:]
    started = time.perf_counter()
    for _ in range(count):
        connection.send(sink, b"GET", b"GET / HTTP/1.1\r\n\r\n", None, None, reused=True)
        connection.dataReceived(first)
        connection.dataReceived(rest)
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    best = min(time_responses(args.responses) for _ in range(args.rounds))
    print(f"{1e6 * best / args.responses:.2f} µs per response (best of {args.rounds} rounds of {args.responses:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
