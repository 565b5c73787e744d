"""How soon tagd delivers what an outage left owed, once the platforms answer again.

The figure (issue "Delivery that recovers the moment a platform does"): 1,000 events
owed to each of Meta, GA4 and TikTok after a 5-minute outage, all delivered within 10 s
of the platforms answering again when they come back healthy, within 60 s when they come
back flaky (30 % 503, 10 % 429 with C{Retry-After: 1}); the platforms answer in 50 ms.

Each run fills a spool through tagd's own Spool with the events (one visitor per event
by default, so that GA4 needs one request per event: its worst case), starts the fake
platforms (bench/delivery_processes.py) answering 503 to everything, starts tagd on the
spool with its default delivery settings, waits out the outage (C{--outage} seconds;
tagd's backoff for the destinations grows meanwhile, up to its cap), then switches the
fakes to healthy or flaky and times, per platform, the last successful answer carrying
the last owed event.  The outage's length matters only until tagd's backoff reaches its
cap (C{[delivery] outage_backoff_cap}, 5 s): after about half a minute a longer outage
changes nothing, so C{--outage 60} measures the same as the honest default of 300.

The visitors' side of the same outage (requests/s and p99 with the platforms answering
503, within 10 % of a healthy run) is the "down" row of bench/delivery.py's isolation
section: C{bench/delivery.py --only isolation}.

Run with the Python of the virtual environment that tagd is installed in:
C{.venv/bin/python bench/outage.py [--outage 300] [--events 1000] [--only healthy,flaky]}.
The exit status is 0 even when a target is missed (this is a report); it is 1 only when
something could not be started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from delivery import (
    POLL,
    fill_spool,
    owed,
    platform_stats,
    start_platforms,
    stop_tagd,
    tagd_config,
)
from delivery_processes import PLATFORMS
from proxy_throughput import (
    Processes,
    StartError,
    check_python,
    fetch,
    free_port,
    parse_only,
    print_columns,
    run_and_clean_up,
    start_tagd,
    wait_until_listening,
)

COMEBACKS = {"healthy": ("slow", 10.0), "flaky": ("flaky", 60.0)}  # fake mode, target seconds
ANSWER_DELAY = 0.05  # seconds the platforms take to answer, as the figure says


def switch(ports: dict[str, int], mode: str) -> None:
    status, _, _ = fetch(ports["meta"], f"/_mode/{mode}")
    if status != 200:
        raise StartError(f"the fakes refused mode {mode}")


def run_comeback(label: str, processes: Processes, args) -> dict:
    """One outage and its end: returns each platform's figures."""
    mode, target = COMEBACKS[label]
    print(f"{label}:", flush=True)
    spool = os.path.join(args.run_dir, f"spool-{label}.sqlite3")
    fill_spool(spool, args.events, args.visitors)
    fakes, ports = start_platforms(processes, label, "down", args)
    try:
        tagd = start_tagd(processes, free_port(), args.run_dir, f"tagd-{label}",
                          tagd_config(ports, spool, max_events=args.events + 1))
        try:
            wait_until_listening(tagd)
            print(f"  platforms down (503) for {args.outage:.0f} s, {args.events:,} events owed to each", flush=True)
            time.sleep(args.outage)
            before = platform_stats(ports)
            switch(ports, mode)
            back = time.monotonic()
            print(f"  platforms back, {label}: answering in {ANSWER_DELAY * 1000:.0f} ms", flush=True)
            ninety: dict[str, float] = {}  # when 90 % had arrived, by platform
            while True:
                stats = platform_stats(ports)
                waited = time.monotonic() - back
                for platform, s in stats.items():
                    if s["answered_events"] >= 0.9 * args.events:
                        ninety.setdefault(platform, round(waited, 1))
                if all(s["answered_events"] >= args.events for s in stats.values()) or waited > args.timeout:
                    break
                time.sleep(POLL)
        finally:
            stop = stop_tagd(processes, tagd)
    finally:
        processes.stop(fakes)
    result = {"label": label, "target_s": target, "outage_s": args.outage, "stop": stop,
              "owed_after": owed(spool), "platforms": {}}
    for platform, s in stats.items():
        done = s["answered_events"] >= args.events
        seconds = s["answered_last_at"] - back if done and s["answered_last_at"] else None
        result["platforms"][platform] = {
            "delivered": s["answered_events"], "seconds": None if seconds is None else round(seconds, 2),
            "ninety_percent_s": ninety.get(platform),
            "requests_during_outage": before[platform]["requests"],
            "requests_after": s["requests"] - before[platform]["requests"],
            "refused_after": s["refused"] - before[platform]["refused"],
            "pass": seconds is not None and seconds <= target,
        }
        shown = "NOT all" if seconds is None else f"all in {seconds:.2f} s, 90 % in {ninety[platform]} s"
        print(f"  {platform}: {shown} ({s['answered_events']:,} delivered; "
              f"{result['platforms'][platform]['requests_after']:,} requests after the return, "
              f"{result['platforms'][platform]['refused_after']:,} of them refused; "
              f"{before[platform]['requests']:,} probes during the outage)", flush=True)
    return result


def print_results(results: list[dict]) -> None:
    rows = []
    for r in results:
        for platform, p in r["platforms"].items():
            rows.append((f"{r['label']}: {platform}", f"{p['delivered']:,}",
                         "-" if p["seconds"] is None else f"{p['seconds']:.2f}", f"<= {r['target_s']:.0f}",
                         f"{p['requests_after']:,}", f"{p['requests_during_outage']:,}",
                         "PASS" if p["pass"] else "MISS"))
    print_columns(("after the outage", "delivered", "seconds", "wanted", "requests", "outage probes", "verdict"), rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=300.0,
                        help="seconds the platforms are down before they come back (default 300)")
    parser.add_argument("--events", type=int, default=1000, help="events owed to each platform (default 1000)")
    parser.add_argument("--visitors", type=int, default=None,
                        help="distinct visitors among them (default: one per event, GA4's worst case)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait after the return before reporting unfinished (default 180)")
    parser.add_argument("--only", default=",".join(COMEBACKS), help="comma-separated subset of " + ",".join(COMEBACKS))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, spools)")
    args = parser.parse_args(argv)
    args.only = parse_only(parser, args.only, tuple(COMEBACKS))
    args.visitors = args.visitors or args.events
    args.delay = ANSWER_DELAY  # the fakes' answer delay (delivery.start_platforms reads it)
    if args.outage < 0 or args.events < 1 or args.visitors < 1:
        parser.error("--outage must be at least 0, --events and --visitors at least 1")
    return args


def run(args, processes: Processes) -> int:
    check_python()
    print(f"machine: {os.cpu_count()} CPUs; {args.events:,} events to each of {', '.join(PLATFORMS)}, "
          f"{args.visitors:,} visitor(s); tagd's default delivery settings\n", flush=True)
    results, failed = [], []
    for label in args.only:
        try:
            results.append(run_comeback(label, processes, args))
        except StartError as e:
            print(f"  {label} FAILED: {e}", flush=True)
            failed.append(label)
    print()
    if results:
        print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failed": failed}, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    return run_and_clean_up(parse_args(argv), run, prefix="tagd-bench-outage-")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
