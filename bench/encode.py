"""What encoding one event for each platform costs, next to storing it in the spool.

Every tracked event is turned into JSON twice on tagd's reactor thread: once for the spool
(L{tagd.delivery.spool.event_to_json}, when it is accepted) and once per destination, when the
dispatcher encodes a batch for the platform.  This times both on the same events, in one
process, and prints each platform's cost per event and its ratio to the spool's JSON, the
baseline measured in the same run: a ratio says how much a platform's shaping adds (names
mapped, empty fields left out, ids hashed) beyond writing the event down.

The events are what the delivery benchmark's load makes: a PageView of a returning
visitor with the C{_fbp} and C{_ga} cookies, in batches of 1,000 (GA4 puts up to 25 of one
visitor in a request).

Run with the Python of the virtual environment tagd is installed in:
C{.venv/bin/python bench/encode.py [--events 1000] [--repeat 20]}.  It times that
installed tagd (it prints where it is), so install it again after changing the code.
The exit status is 0, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import tagd
from tagd.daemon.config import parse_config
from tagd.tagging.events import Event
from tagd.delivery.spool import event_to_json

# One destination of each platform with a token, on its default endpoint: nothing is sent.
CONFIG = """
[[destinations]]
type = "meta"
pixel_id = "1234"
access_token = "bench-token"

[[destinations]]
type = "ga4"
measurement_id = "G-BENCH"
api_secret = "bench-secret"

[[destinations]]
type = "tiktok"
pixel_code = "BENCH"
access_token = "bench-token"

[[destinations]]
type = "pinterest"
ad_account_id = "1234"
access_token = "bench-token"

[[destinations]]
type = "snapchat"
pixel_id = "BENCH"
access_token = "bench-token"

[[destinations]]
type = "reddit"
pixel_id = "t2_bench"
access_token = "bench-token"

[[destinations]]
type = "microsoft"
tag_id = "1234"
access_token = "bench-token"
"""
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


def events(count: int) -> list[Event]:
    """C{count} PageViews of one returning visitor, as the tracker builds them."""
    now = int(time.time())
    return [
        Event(
            "PageView",
            f"{n:032x}",
            now,
            "https://shop.example/product/1",
            "203.0.113.7",
            USER_AGENT,
            fbp="fb.1.1700000000000.1234567890",
            ga_client_id="1234567890.1700000000",
            ga_session_id=str(now - now % 1800),
        )
        for n in range(count)
    ]


def per_event(work, batch: list[Event], repeat: int) -> float:
    """The median of C{repeat} runs of C{work(batch)}, in microseconds per event: the
    garbage collections that a run's allocations cause are part of its cost, and the
    median keeps one run that something else disturbed out."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        work(batch)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) / len(batch) * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000, help="events per batch (default 1000)")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each, the median kept (default 20)")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 1:
        parser.error("--events and --repeat must be at least 1")
    print(f"tagd from {os.path.dirname(tagd.__file__)}; {args.events:,} events a batch, median of {args.repeat}")
    batch = events(args.events)
    config = parse_config(CONFIG, "(bench)")
    spool = per_event(lambda b: [event_to_json(e) for e in b], batch, args.repeat)
    print(f"{'encoding':<24}{'µs/event':>10}{'× spool JSON':>14}")
    print(f"{'spool JSON (baseline)':<24}{spool:>10.2f}{1:>14.2f}")
    for destination in config.destinations:
        cost = per_event(destination.destination.encode, batch, args.repeat)
        print(f"{destination.type:<24}{cost:>10.2f}{cost / spool:>14.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
