"""What the spool costs in CPU per event when every event is delivered at once.

The healthy case of a busy shop: events accepted one tracked response at a time, at a
steady rate, each for two destinations, and a dispatcher that leases and acknowledges
each destination's rows as soon as the spool offers them (the platforms answering at
once).  This drives a real spool (a real SQLite file in a scratch directory, its thread,
the intake journal) on the real reactor through enqueue, the group commit's ticks, lease
and ack for N events, and prints the process's CPU time (every thread, so the spool's
SQLite thread too) per event, with what ended in the file, less what the same loop costs
with no spool behind it (measured in the same run).  Nothing is sent anywhere.

Run with the Python of the virtual environment tagd is installed in:
C{.venv/bin/python bench/spool_cpu.py [--events 10000] [--rate 2000] [--rounds 3]}.  It
times that installed tagd (it prints where it is), so install it again after changing the
code.  Each round runs in a process of its own, and the best is reported.  The exit
status is 0, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing

DESTINATIONS = ("meta", "tiktok")
TICK = 0.001  # seconds between the reactor's enqueue turns


def one_round(events: int, rate: float, baseline: bool = False) -> dict:
    """Drive one spool through C{events} events; the CPU per event and what the file holds.

    With C{baseline}, the same turns of the reactor with no spool behind them: what the
    loop itself costs, which the report takes off."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import ensureDeferred

    from tagd.delivery.spool import Spool
    from tagd.tagging.events import Event

    scratch = tempfile.mkdtemp(prefix="tagd-spool-cpu-")
    path = os.path.join(scratch, "spool.db")
    spool = Spool.open(path, reactor=reactor)
    made = [
        Event("PageView", f"ev-{n}", 1_700_000_000, "https://shop.example/p", "192.0.2.1", "Mozilla/5.0 bench")
        for n in range(events)
    ]
    delivered = {name: 0 for name in DESTINATIONS}
    draining = set()

    async def drain(destination: str) -> None:
        """Lease and acknowledge everything due, as a dispatcher whose platform answers at once."""
        draining.add(destination)
        try:
            while True:
                leases = await spool.lease(destination, 1000, reactor.seconds())
                if not leases:
                    return
                await spool.ack(destination, [lease.key for lease in leases])
                delivered[destination] += len(leases)
        finally:
            draining.discard(destination)

    def wake() -> None:
        for destination in DESTINATIONS:
            if destination not in draining:
                ensureDeferred(drain(destination))

    spool.on_offer = wake
    result: dict = {}
    if baseline:
        spool.on_offer = lambda: None

    async def run() -> None:
        per_turn = max(1, round(rate * TICK))
        started_cpu, started = time.process_time(), time.monotonic()
        sent = 0
        while sent < events:
            if not baseline:
                for event in made[sent : sent + per_turn]:
                    spool.enqueue([event], DESTINATIONS)
            sent += per_turn
            await task.deferLater(reactor, TICK)
        while not baseline and (min(delivered.values()) < events or spool.buffered):
            wake()  # as the dispatcher's poll would
            await task.deferLater(reactor, 0.01)
        cpu, wall = time.process_time() - started_cpu, time.monotonic() - started
        await spool.close()
        with closing(sqlite3.connect(path)) as db:
            left = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        result.update(cpu_us=cpu / events * 1e6, wall_s=wall, commits=spool.commits, rows_left=left)

    def done(outcome):
        reactor.stop()
        return outcome

    reactor.callWhenRunning(lambda: ensureDeferred(run()).addBoth(done))
    reactor.run()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="events accepted per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round", choices=["spool", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        print(json.dumps(one_round(args.events, args.rate, args.round == "baseline")))
        return 0
    import tagd

    print(f"tagd from {os.path.dirname(tagd.__file__)}")
    print(f"{args.events} events to {' and '.join(DESTINATIONS)} at {args.rate:.0f}/s, best of {args.rounds} rounds")
    rounds, baselines = [], []
    for _ in range(args.rounds):
        for kind, results in (("baseline", baselines), ("spool", rounds)):
            command = [sys.executable, __file__, "--round", kind, "--events", str(args.events), "--rate", str(args.rate)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.splitlines()[-1]))
    for figures, base in zip(rounds, baselines):
        print(
            f"  {figures['cpu_us']:7.1f} µs CPU per event ({base['cpu_us']:.1f} of it the loop alone), "
            f"{figures['wall_s']:.1f} s, {figures['commits']} commits, {figures['rows_left']} rows left in the file"
        )
    spool = min(figures["cpu_us"] for figures in rounds) - min(base["cpu_us"] for base in baselines)
    print(f"best: {spool:.1f} µs CPU per event for the spool (best round less the best loop alone)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
