"""What durable delivery costs tagd, whether sick platforms reach visitors, how fast the spool drains.

Three questions, each answered against figures measured in the same run, on loopback,
because absolute requests/s depend on the machine:

  1. Tracking overhead: tagd's requests/s with every response tracked to three
     destinations (fake Meta, GA4 and TikTok answering at once) over tagd's with no
     destinations: a figure, no longer a target (page_view_cpu.py judges what tracking
     costs, as CPU per page view with everything delivered).  The fakes count what arrives afterwards, since
     a tagd that silently dropped events would look cheap.  Beside it, where the cost
     lies: a "spool full" tagd that tracks every response but stores and sends nothing
     (L{SPOOL_FULL}), and CPU time per request, the reactor thread's under load and all
     of tagd's until the last event arrived.
  2. Isolation: the same tracked load with the platforms answering after 5 s, never
     (the connection accepted and held), and 503 at once (an outage: tagd backs each
     destination off, one probe at a time).  A visitor must not notice: requests/s and
     p99 within 10 % of the run with healthy platforms.
  3. Drain rate: a spool filled beforehand (through tagd's own Spool, as if the platforms
     had been down) drained by tagd into instant fakes; events/s until it is empty, and
     requests per event, which shows the batching (Meta and TikTok take up to 1000 events
     a request, GA4 25, and only those of one visitor).

The load is wrk (as in proxy_throughput.py, whose helpers this reuses) sending what a
browser sends: a browser User-Agent, since bots are not tracked, and the C{_fbp} and
C{_ga} cookies, so that the visitor's ids are read rather than invented.  Configurations
run one after the other, never together, each tagd and each set of fakes in a process
of its own, in rounds (three by default): untracked, healthy, spool full, slow, never,
down, then again.
One run's p99 on a small machine varies by half or more (a garbage collection or a large
encode in the wrong second), so the targets are judged on each configuration's medians
(L{medians}); every round is printed too.

Run with the Python of the virtual environment that tagd is installed in:
C{.venv/bin/python bench/delivery.py [--duration 10] [--rounds 3] [--only overhead,isolation,drain]}.
The exit status is 0 even when a target is missed (this is a report); it is 1 only when
something could not be started or answered wrongly before being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from proxy_throughput import (
    BENCH_DIR,
    HOST,
    LoadError,
    Processes,
    Server,
    StartError,
    check_answer,
    check_python,
    cpu_cell,
    fetch,
    find_tools,
    free_port,
    measure,
    median_run,
    parse_only,
    prepare_origin,
    print_columns,
    run_and_clean_up,
    run_builtin,
    run_wrk,
    start_tagd,
    versions,
    wait_until_listening,
)
from delivery_processes import PLATFORMS, USER_AGENT

SECTIONS = ("overhead", "isolation", "drain")
HELPERS = os.path.join(BENCH_DIR, "delivery_processes.py")
# A returning visitor of a shop with the Meta pixel and gtag: tagd reads both ids.
COOKIES = "_fbp=fb.1.1700000000000.1234567890; _ga=GA1.1.1234567890.1700000000"
LOAD_HEADERS = (f"User-Agent: {USER_AGENT}", f"Cookie: {COOKIES}")
ISOLATION_TOLERANCE = 0.10  # req/s and p99 with sick platforms, within this of healthy
# Sick platforms: (row label, fake mode).  "slow" answers after --delay seconds; "down"
# answers 503 at once, an outage, which puts tagd's destinations in backoff.
SICK = (("slow", "slow"), ("never", "hang"), ("down", "down"))
# The visitor's path alone: a spool of one event with platforms that never answer, so that
# tagd decides, sets the cookies and builds every event as usual, and then refuses all but
# the first as queue full.  Its requests/s over untracked's is about the most the overhead
# ratio could be with storage and delivery free (a hand-over to another process would still
# serialise and write each event, which a refusal skips).
SPOOL_FULL = "spool full"
POLL = 0.25  # seconds between looks at the fakes' counters
# Once every fake has what wrk counted, stragglers (requests wrk cut off) may still come.
STRAGGLERS = 1.0
# tagd's own shutdown deadline is 10 s by default; it gets that and a margin before a kill.
TAGD_STOP_TIMEOUT = 15.0
PROFILE_SECONDS = 8  # of the measured run, which must outlast py-spy's recording


# --- fakes and tagd ---------------------------------------------------------------------------


def start_platforms(processes: Processes, label: str, mode: str, args) -> tuple[Server, dict[str, int]]:
    """The three fake platforms in one process, each on its own port."""
    ports = {platform: free_port() for platform in PLATFORMS}
    argv = [sys.executable, HELPERS, "platforms", mode, str(args.delay), *(str(ports[p]) for p in PLATFORMS)]
    fakes = processes.start(f"fakes-{label}", ports["meta"], argv, cwd=args.run_dir)
    for port in ports.values():
        wait_until_listening(replace(fakes, port=port))
    return fakes, ports


# Each fake platform's [[destinations]] table, its endpoint filled in.
DESTINATIONS = {
    "meta": 'type = "meta"\npixel_id = "1234"\naccess_token = "bench-token"\n',
    "ga4": 'type = "ga4"\nmeasurement_id = "G-BENCH"\napi_secret = "bench-secret"\n',
    "tiktok": 'type = "tiktok"\npixel_code = "BENCH"\naccess_token = "bench-token"\n',
}


def tagd_config(ports: dict[str, int] | None, spool: str | None = None, max_events: int = 100_000) -> str:
    """The TOML after C{[proxy]}: the spool, and one destination per fake platform in C{ports}.

    Delivery settings stay at their defaults: the figures are those a user gets.
    """
    if ports is None:
        return ""
    return f"\n[spool]\npath = {json.dumps(spool)}\nmax_events = {max_events}\n" + "".join(
        f'\n[[destinations]]\n{DESTINATIONS[platform]}endpoint = "http://{HOST}:{port}"\n'
        for platform, port in ports.items()
    )


def platform_stats(ports: dict[str, int]) -> dict[str, dict]:
    """Each fake's counters (see delivery_processes.Counters)."""
    stats = {}
    for platform, port in ports.items():
        status, _, body = fetch(port, "/_stats")
        if status != 200:
            raise StartError(f"the fake {platform} answered {status} to /_stats")
        stats[platform] = json.loads(body)
    return stats


def wait_for_events(ports: dict[str, int], expected: int, timeout: float) -> tuple[dict[str, dict], float, bool]:
    """Poll the fakes until every one has C{expected} events, or C{timeout} seconds pass.

    Returns the counters, read again L{STRAGGLERS} seconds after the last look so that
    late duplicates or extra events show too, the seconds until C{expected} arrived (or
    the timeout), and whether they all did.
    """
    started = time.monotonic()
    while True:
        stats = platform_stats(ports)
        waited = time.monotonic() - started
        # Distinct event ids where the fake knows them (Meta, TikTok): a duplicate must not
        # pass for an event still owed.
        arrived = all((s["events"] if s["distinct"] is None else s["distinct"]) >= expected for s in stats.values())
        if arrived or waited >= timeout:
            time.sleep(STRAGGLERS)
            return platform_stats(ports), waited, arrived
        time.sleep(POLL)


# --- the load runs --------------------------------------------------------------------------


def run_config(label: str, mode: str | None, processes: Processes, origin: Server, drive, args,
               expected_body: bytes, round_number: int) -> dict:
    """One tagd configuration under load: no destinations (C{mode} None) or three fakes.

    Each round has a spool of its own: what sick platforms left owed in one round must not
    fill the next one's spool towards its bound, which would refuse events and look cheap
    (unless refusing is the point: L{SPOOL_FULL}).

    Besides the load's figures: C{reactor_us_per_request}, the reactor thread's CPU time
    per request over warm-up and run, which bounds requests/s; and C{cpu_us_per_request}
    and C{reactor_done_us_per_request}, tagd's CPU time (all threads) and the reactor's
    per request from the warm-up on until the work the load caused is done: for healthy
    platforms, until the last event arrived, since delivery that lags behind the load runs
    after it (None if not every event arrived).
    """
    print(f"{label}, round {round_number}:", flush=True)
    fakes, ports = start_platforms(processes, label, mode, args) if mode else (None, None)
    spool = os.path.join(args.run_dir, f"spool-{label}-{round_number}.sqlite3")
    max_events = 1 if label == SPOOL_FULL else 100_000
    try:
        tagd = start_tagd(processes, origin.port, args.run_dir, f"tagd-{label}",
                          tagd_config(ports, spool, max_events=max_events))
        try:
            wait_until_listening(tagd)
            if not check_answer(tagd, expected_body, "before"):
                raise StartError(f"tagd ({label}) did not return the origin's page; not measured")
            profile = profiling(args, tagd, label)
            cpu_before, reactor_before = tagd.cpu_seconds(), tagd.main_thread_cpu_seconds()
            result = measure(tagd, origin, drive, args, expected_body, others=[fakes] if fakes else (),
                             around_run=profile)
            reactor = _cpu_used(reactor_before, tagd.main_thread_cpu_seconds())
            result["label"] = label
            result["fakes_cpu_pct"] = result.pop(f"{fakes.name}_cpu_pct") if fakes else None
            print(f"  {result['rps']:,.0f} req/s, p99 {result['p99_ms']:.2f} ms, {result['error_total']} errors",
                  flush=True)
            expected = result["requests"] + result["warmup_requests"]
            done = True
            if ports is not None:
                if mode == "ok":
                    stats, waited, done = wait_for_events(ports, expected, args.settle)
                else:
                    stats, waited = platform_stats(ports), None
            cpu = _cpu_used(cpu_before, tagd.cpu_seconds())
            reactor_done = _cpu_used(reactor_before, tagd.main_thread_cpu_seconds())
            result["reactor_us_per_request"] = _per_request(reactor, expected)
            result["cpu_us_per_request"] = _per_request(cpu, expected) if done else None
            result["reactor_done_us_per_request"] = _per_request(reactor_done, expected) if done else None
        finally:
            result_stop = stop_tagd(processes, tagd)
    finally:
        if fakes is not None:
            processes.stop(fakes)
    result["stop"] = result_stop
    if label == SPOOL_FULL:
        result["stored"] = max(owed(spool).values(), default=0)
        print(f"  {result['stored']} event(s) stored (1 expected: the first, every later one refused as "
              f"queue full; none would mean nothing was tracked)", flush=True)
    elif ports is not None:
        result["delivery"] = delivery_check(stats, waited, owed(spool), expected, args)
    return result


def _per_request(seconds: float | None, requests: int) -> int | None:
    """Microseconds per request, or None when the CPU time could not be read."""
    return round(1e6 * seconds / requests) if seconds is not None and requests else None


def profiling(args, tagd: Server, label: str):
    """A context manager for L{measure}'s run: py-spy records tagd when C{--profile} asks.

    Raw (collapsed stacks) output, one file per configuration; L{summarise_profile} reads
    it.  py-spy pauses tagd to take each sample, so a profiled run is slower than an
    unprofiled one: its figures are for finding where time goes, not for the targets.
    """
    if not args.profile:
        return contextlib.nullcontext
    path = os.path.join(args.profile, f"tagd-{label}.txt")
    seconds = min(PROFILE_SECONDS, args.duration)

    @contextlib.contextmanager
    def record():
        argv = [args.py_spy, "record", "-p", str(tagd.proc.pid), "-d", str(seconds), "-f", "raw", "-o", path]
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            yield
        finally:
            try:
                _, err = spy.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if spy.returncode == 0 and os.path.exists(path):
                print(f"  profile written to {path}")
            else:
                print(f"  py-spy failed (status {spy.returncode}): {err.strip()[-500:]}")

    return record


def _frame_file(frame: str) -> str:
    return frame.rpartition(" (")[2].rstrip(")")


def _is_idle(frames: list[str]) -> bool:
    """A sample of a pool thread waiting for work: py-spy does not always tell it from
    work, and it would crowd out what costs.  (The reactor's own wait shows as
    C{EPollReactor.doPoll} itself; C{untilConcludes} under C{writeSomeData} is the
    socket send, which is work.)"""
    return frames[-2:] == ["Queue.get (queue.py)", "Condition.wait (threading.py)"]


def summarise_profile(path: str, top: int = 12) -> None:
    """Where tagd's busy samples go, from py-spy's raw output (one line per distinct stack,
    then its count): per thread (the reactor's, where visitors wait, and the spool's pool
    thread), the functions that hold the most samples by themselves (self), and the
    functions outside Twisted's own machinery with what they call (cumulative)."""
    busy, idle, own, total = {}, {}, {}, {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            # "function (file:line)" -> "function (file)": one row per function, not per line.
            frames = [frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame for frame in stack.split(";")]
            thread = "pool thread" if frames[0].startswith("Thread._bootstrap") else "reactor thread"
            if _is_idle(frames):
                idle[thread] = idle.get(thread, 0) + n
                continue
            busy[thread] = busy.get(thread, 0) + n
            own[thread, frames[-1]] = own.get((thread, frames[-1]), 0) + n
            for frame in set(frames):
                if not _frame_file(frame).startswith(("twisted/", "threading.py", "twistd")):
                    total[thread, frame] = total.get((thread, frame), 0) + n
    if not busy:
        print(f"  {path}: no busy samples")
        return
    for thread in sorted(busy, key=lambda t: -busy[t]):
        samples = busy[thread]
        print(f"  {thread}: {samples:,} busy samples, {idle.get(thread, 0):,} idle")
        for title, table in (("self", own), ("cumulative, outside Twisted", total)):
            rows = sorted(((n, frame) for (t, frame), n in table.items() if t == thread), reverse=True)[:top]
            print(f"    by {title}:")
            for n, frame in rows:
                print(f"      {100 * n / samples:5.1f}%  {frame}")


def stop_tagd(processes: Processes, tagd: Server) -> dict:
    """Stop tagd as systemd would, and say how it went.

    tagd flushes its spool on the way out, so an orderly stop is part of "nothing is
    lost"; a tagd that must be killed can lose what it had not yet written.
    """
    started = time.monotonic()
    processes.stop(tagd, timeout=TAGD_STOP_TIMEOUT)
    seconds = time.monotonic() - started
    status = tagd.proc.returncode
    killed = status == -signal.SIGKILL
    # twistd ends by raising the signal it stopped on again, so SIGTERM is the normal end.
    how = f"signal {signal.Signals(-status).name}" if status is not None and status < 0 else f"status {status}"
    print(f"  tagd {'had to be KILLED after' if killed else 'stopped in'} {seconds:.1f} s (exit: {how})", flush=True)
    return {"seconds": round(seconds, 2), "status": status, "killed": killed}


def delivery_check(stats: dict[str, dict], waited: float | None, left: dict[str, int], expected: int,
                   args) -> dict:
    """Whether every tracked response's event reached each fake or is still in the spool.

    Every response wrk received was tracked, one event to each platform.  A few more may
    be tracked than wrk counted: requests in flight when wrk stopped were answered and
    tracked by tagd but are not in wrk's count.  An event is accounted for when a fake
    answered the request carrying it or when the spool still owes it after tagd stopped;
    with healthy fakes every event must have arrived, once.  How long the healthy fakes
    took to get the last event after the load stopped says whether delivery kept up.
    """
    slack = 2 * args.connections
    platforms, delivered, accounted = {}, True, True
    for platform, s in stats.items():
        owed_after = left.get(platform, 0)
        kept = s["answered_events"] + owed_after
        twice = s["distinct"] is not None and s["distinct"] != s["events"]
        platforms[platform] = {**s, "owed_after_stop": owed_after, "accounted": kept, "duplicates": twice}
        delivered &= expected <= s["events"] <= expected + slack and not twice and not s["unreadable"]
        accounted &= kept >= expected
        distinct = "" if s["distinct"] is None else f" ({s['distinct']:,} distinct)"
        print(f"  {platform}: {s['events']:,} events{distinct} arrived in {s['requests']:,} requests, "
              f"{s['answered_events']:,} answered; {owed_after:,} owed in the spool after the stop")
    print(f"  the load received {expected:,} responses in warm-up and run: one event each per platform")
    if waited is not None:
        print(f"  last event arrived {waited:.1f} s after the load stopped" if delivered else
              f"  NOT every event arrived once within {args.settle:.0f} s after the load stopped")
    return {"expected": expected, "platforms": platforms, "settle_s": None if waited is None else round(waited, 2),
            "delivered": delivered, "accounted": accounted}


# --- the drain --------------------------------------------------------------------------------


def fill_spool(path: str, events: int, visitors: int) -> float:
    """Fill a new spool through tagd's Spool in a process of its own; return the seconds taken."""
    started = time.monotonic()
    argv = [sys.executable, HELPERS, "fill", path, str(events), str(visitors), *PLATFORMS]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(path))
    if done.returncode != 0:
        raise StartError(f"filling the spool failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return time.monotonic() - started


def owed(path: str) -> dict[str, int]:
    """Deliveries still owed (pending or in flight) in a spool file, by destination.

    Read after tagd stopped, with SQLite directly: the file's schema is tagd's, but asking
    a running tagd would need its admin interface, and the spool is closed by then.
    """
    if not os.path.exists(path):
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT destination, COUNT(*) FROM deliveries WHERE status IN ('pending', 'inflight') GROUP BY destination"
        ).fetchall()
    finally:
        db.close()
    return dict(rows)


def run_drain(label: str, visitors: int, processes: Processes, origin: Server, args) -> dict:
    """Fill a spool, start healthy fakes and tagd on it, and time the spool to empty."""
    print(f"drain ({label}):", flush=True)
    spool = os.path.join(args.run_dir, f"spool-drain-{label}.sqlite3")
    fill_seconds = fill_spool(spool, args.drain_events, visitors)
    print(f"  spool filled with {args.drain_events:,} events x {len(PLATFORMS)} destinations, "
          f"{visitors:,} visitor(s), in {fill_seconds:.1f} s", flush=True)
    fakes, ports = start_platforms(processes, f"drain-{label}", "ok", args)
    try:
        config = tagd_config(ports, spool, max_events=args.drain_events + 1)
        tagd = start_tagd(processes, origin.port, args.run_dir, f"tagd-drain-{label}", config)
        started = time.monotonic()
        cpu_before = (tagd.cpu_seconds(), fakes.cpu_seconds())
        try:
            stats, _, _ = wait_for_events(ports, args.drain_events, args.drain_timeout)
            cpu_after = (tagd.cpu_seconds(), fakes.cpu_seconds())
        finally:
            result_stop = stop_tagd(processes, tagd)
    finally:
        processes.stop(fakes)
    left = owed(spool)
    ends = [s["last_at"] for s in stats.values() if s["last_at"] is not None]
    wall = (max(ends) - started) if ends else float("nan")
    result = {"label": label, "visitors": visitors, "events": args.drain_events, "left": left,
              "wall_s": round(wall, 2), "stop": result_stop, "platforms": {}}
    for platform, s in stats.items():
        seconds = (s["last_at"] - s["first_at"]) if s["first_at"] is not None else 0.0
        # Arrival times bound the window: the first request's events were sent at its start.
        rate = (s["events"] - s["first_events"]) / seconds if seconds > 0 else None
        result["platforms"][platform] = {
            "events": s["events"], "requests": s["requests"], "seconds": round(seconds, 2),
            "events_per_s": round(rate) if rate else None,
            "requests_per_event": round(s["requests"] / s["events"], 4) if s["events"] else None,
            "first_after_start_s": round(s["first_at"] - started, 2) if s["first_at"] is not None else None,
            "complete": s["events"] >= args.drain_events,
            "duplicates": s["distinct"] is not None and s["distinct"] != s["events"],
        }
    starts = [s["first_at"] for s in stats.values() if s["first_at"] is not None]
    total = sum(s["events"] for s in stats.values())
    result["all_events_per_s"] = round(total / (max(ends) - min(starts))) if starts and max(ends) > min(starts) else None
    result["first_after_start_s"] = round(min(starts) - started, 2) if starts else None
    result["tagd_cpu_s"] = _cpu_used(cpu_before[0], cpu_after[0])
    result["fakes_cpu_s"] = _cpu_used(cpu_before[1], cpu_after[1])
    complete = all(p["complete"] for p in result["platforms"].values())
    print(f"  first event {result['first_after_start_s']} s after tagd was started; "
          f"{'spool drained' if complete else 'NOT drained'} {wall:.1f} s after start; "
          f"owed afterwards: {sum(left.values())}", flush=True)
    return result


def _cpu_used(before, after) -> float | None:
    return round(after - before, 2) if before is not None and after is not None else None


# --- the report ------------------------------------------------------------------------------


def medians(runs: list[dict]) -> dict:
    """One configuration's rounds as one result: the median round (by requests/s), with the
    median p99 of all rounds, whose noise would otherwise decide the isolation verdicts,
    the most visitor errors of any round, every count of events a spool-full round stored, and
    delivery judged good only if every round's was.
    """
    result = dict(median_run(runs))
    result["p99_ms"] = statistics.median(r["p99_ms"] for r in runs)
    result["error_total"] = max(r["error_total"] for r in runs)
    if "stored" in result:
        result["stored"] = sorted({r["stored"] for r in runs})
    if "delivery" in result:
        result["delivery"] = {
            **result["delivery"],
            "delivered": all(r["delivery"]["delivered"] for r in runs),
            "accounted": all(r["delivery"]["accounted"] for r in runs),
        }
    return result


def print_loadprint_columns(results: list[dict]) -> None:
    columns = ("tagd run", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "tagd CPU", "origin CPU", "fakes CPU",
               "reactor µs/req", "tagd µs/req, all done")
    print_columns(columns, [
        (r["label"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
         str(r["error_total"]), cpu_cell(r["proxy_cpu_pct"]), cpu_cell(r["origin_cpu_pct"]), cpu_cell(r["fakes_cpu_pct"]),
         _us_cell(r.get("reactor_us_per_request")), _us_cell(r.get("cpu_us_per_request")))
        for r in results
    ])


def _us_cell(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def verdicts(by_label: dict[str, dict]) -> list[dict]:
    """Every target that the runs made can be judged, with its figure and PASS/MISS."""
    found = []
    healthy, untracked = by_label.get("healthy"), by_label.get("untracked")
    if healthy and untracked and untracked["rps"] > 0:
        ratio = healthy["rps"] / untracked["rps"]
        found.append({"what": "overhead: tracked/untracked req/s", "value": ratio, "target": "", "pass": None})
        full = by_label.get(SPOOL_FULL)
        if full:
            found.append({"what": "  the most it could be: spool full/untracked req/s", "value": full["rps"] / untracked["rps"],
                          "target": "", "pass": None})
            found.append({"what": "  spool full: events stored before the refusals",
                          "value": "/".join(map(str, full["stored"])), "target": "1 each round",
                          "pass": full["stored"] == [1]})
        for key, what in (("reactor_us_per_request", "reactor CPU per request under load"),
                          ("cpu_us_per_request", "tagd CPU per request, all delivered")):
            cpu = (healthy.get(key), untracked.get(key))
            if None not in cpu and cpu[1] > 0:
                found.append({"what": f"  {what}: tracked/untracked", "value": cpu[0] / cpu[1],
                              "target": "", "pass": None})
    if healthy and healthy.get("reactor_done_us_per_request"):
        found.append({"what": "tracked req/s the reactor could deliver for, at most",
                      "value": f"{1e6 / healthy['reactor_done_us_per_request']:,.0f}", "target": "", "pass": None})
    if healthy and "delivery" in healthy:
        d = healthy["delivery"]
        arrived = "/".join(f"{p['events']:,}" for p in d["platforms"].values())
        found.append({"what": f"healthy: events at meta/ga4/tiktok ({arrived}), {d['expected']:,} responses",
                      "value": None, "target": "each once", "pass": d["delivered"]})
    for label, _mode in SICK:
        sick = by_label.get(label)
        if not (sick and healthy and healthy["rps"] > 0 and healthy["p99_ms"] > 0):
            continue
        rps_ratio = sick["rps"] / healthy["rps"]
        p99_ratio = sick["p99_ms"] / healthy["p99_ms"]
        found.append({"what": f"isolation: {label}/healthy req/s", "value": rps_ratio,
                      "target": f">= {1 - ISOLATION_TOLERANCE:.2f}", "pass": rps_ratio >= 1 - ISOLATION_TOLERANCE})
        found.append({"what": f"isolation: {label}/healthy p99", "value": p99_ratio,
                      "target": f"<= {1 + ISOLATION_TOLERANCE:.2f}", "pass": p99_ratio <= 1 + ISOLATION_TOLERANCE})
        found.append({"what": f"isolation: {label}: visitor errors", "value": sick["error_total"],
                      "target": "0", "pass": sick["error_total"] == 0})
        found.append({"what": f"isolation: {label}: events answered or still owed after the stop",
                      "value": None, "target": "all", "pass": sick["delivery"]["accounted"]})
    for item in found:
        item["verdict"] = "" if item["pass"] is None else "PASS" if item["pass"] else "MISS"
    return found


def print_verdicts(found: list[dict]) -> None:
    rows = []
    for item in found:
        value = item["value"]
        shown = "" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        rows.append((item["what"], shown, item["target"], item["verdict"]))
    print_columns(("target", "figure", "wanted", "verdict"), rows)


def print_drain(drains: list[dict]) -> None:
    rows = []
    for d in drains:
        for platform, p in d["platforms"].items():
            rate = "-" if p["events_per_s"] is None else f"{p['events_per_s']:,}"
            per = "-" if p["requests_per_event"] is None else f"{p['requests_per_event']:.4f}"
            emptied = ("yes" if p["complete"] else "NO") + (", duplicates" if p["duplicates"] else "")
            rows.append((f"{d['label']}: {platform}", f"{p['events']:,}", f"{p['requests']:,}", per,
                         f"{p['seconds']:.2f}", rate, emptied))
        rate = "-" if d["all_events_per_s"] is None else f"{d['all_events_per_s']:,}"
        rows.append((f"{d['label']}: all three", f"{sum(p['events'] for p in d['platforms'].values()):,}",
                     f"{sum(p['requests'] for p in d['platforms'].values()):,}", "", "", rate,
                     "yes" if not d["left"] else f"{sum(d['left'].values())} owed"))
    print_columns(("drain", "events", "requests", "req/event", "seconds", "events/s", "emptied"), rows)
    for d in drains:
        print(f"  {d['label']}: tagd used {d['tagd_cpu_s']} s CPU, the fakes {d['fakes_cpu_s']} s, "
              f"from tagd's start to the last event ({d['wall_s']} s of wall time, start-up included)")


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2), help="wrk threads (default 1)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each load configuration, in turn; the medians count (default 3)")
    parser.add_argument("--delay", type=float, default=5.0, help="seconds the slow platforms take to answer (default 5)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait for the healthy run's events to arrive after the load (default 30)")
    parser.add_argument("--drain-events", type=int, default=20_000,
                        help="events per destination in the pre-filled spool (default 20000)")
    parser.add_argument("--drain-visitors", type=int, default=1000,
                        help="distinct visitors in the second drain, taking turns (default 1000)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds a drain may take before it is reported unfinished (default 120)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record tagd with py-spy during each measured run into DIR (slows tagd down)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, spools)")
    args = parser.parse_args(argv)
    args.only = parse_only(parser, args.only, SECTIONS)
    if (args.duration < 1 or args.warmup < 0 or args.connections < 1 or args.rounds < 1
            or args.drain_events < 1 or args.drain_visitors < 1):
        parser.error("--duration, --connections, --rounds and --drain-* must be at least 1, --warmup at least 0")
    if args.profile:
        args.py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if args.py_spy is None:
            parser.error("--profile needs py-spy (pip install py-spy into the virtual environment)")
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    return args


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def run(args, processes: Processes) -> int:
    """The whole benchmark; returns the exit status."""
    check_python()
    tools = find_tools(args)
    if tools["wrk"]:
        drive = lambda *a: run_wrk(tools["wrk"], *a, headers=LOAD_HEADERS)  # noqa: E731
    else:
        drive = lambda *a: run_builtin(*a, headers=LOAD_HEADERS)  # noqa: E731
    origin, origin_text, expected_body, generator = prepare_origin(args, processes, tools)
    print(f"load:   {generator}, {args.connections} keep-alive connections, {args.warmup} s warm-up + "
          f"{args.duration} s per configuration, one at a time; a browser User-Agent and the _fbp/_ga cookies")
    print(f"machine: {os.cpu_count()} CPUs, load average {_loadavg()} (1/5/15 min) before the run\n", flush=True)

    configs = []
    if "overhead" in args.only:
        configs.append(("untracked", None))
    if "overhead" in args.only or "isolation" in args.only:
        configs.append(("healthy", "ok"))
    if "overhead" in args.only:
        configs.append((SPOOL_FULL, "hang"))
    if "isolation" in args.only:
        configs.extend(SICK)
    runs: dict[str, list[dict]] = {label: [] for label, _mode in configs}
    drains, failed = [], []
    for round_number in range(1, args.rounds + 1):
        for label, mode in configs:
            if label in failed:
                continue
            try:
                result = run_config(label, mode, processes, origin, drive, args, expected_body, round_number)
            except (StartError, LoadError) as e:
                print(f"  {label} FAILED: {e}", flush=True)
                failed.append(label)
            else:
                runs[label].append({**result, "round": round_number})
    if "drain" in args.only:
        for label, visitors in (("1 visitor", 1), (f"{args.drain_visitors} visitors", args.drain_visitors)):
            try:
                drains.append(run_drain(label, visitors, processes, origin, args))
            except (StartError, LoadError, subprocess.TimeoutExpired) as e:
                print(f"  drain ({label}) FAILED: {e}", flush=True)
                failed.append(f"drain {label}")

    print(f"\nload average {_loadavg()} after the run\n")
    every = sorted((r for done in runs.values() for r in done), key=lambda r: r["round"])
    if args.rounds > 1 and every:
        print("every round:")
        print_loadprint_columns([{**r, "label": f"{r['label']} #{r['round']}"} for r in every])
        print(f"\nmedians of each configuration (of {args.rounds} rounds; the targets are judged on these):")
    results = [medians(done) for label, done in runs.items() if done and label not in failed]
    if results:
        print_loadprint_columns(results)
        print()
    found = verdicts({r["label"]: r for r in results})
    if found:
        print_verdicts(found)
        print()
    if drains:
        print_drain(drains)
    if args.profile:
        print("\nprofiles (py-spy slowed tagd down in these runs: the figures above are not for the targets)")
        for r in results:
            path = os.path.join(args.profile, f"tagd-{r['label']}.txt")
            if os.path.exists(path):
                print(f"{r['label']}:")
                summarise_profile(path)
    if args.json:
        report = {"origin": origin_text, "page_bytes": len(expected_body), "load_generator": generator,
                  "connections": args.connections, "duration_s": args.duration, "warmup_s": args.warmup,
                  "rounds": args.rounds, "every_round": every,
                  "versions": versions(tools), "results": results, "verdicts": found, "drains": drains,
                  "failed": failed}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    return run_and_clean_up(parse_args(argv), run, prefix="tagd-bench-delivery-")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
