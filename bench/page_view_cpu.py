"""What one tracked page view costs tagd in CPU, counted until its events are delivered.

A shop's droplet often has one vCPU, shared with the shop's own app, so what decides
whether a sale saturates it is tagd's CPU per page view with everything it causes done,
not its requests/s under a short burst.  Three configurations, one after the other, each
tagd and its fakes in processes of their own, in rounds (three by default):

  - C{untracked}: no destinations; the baseline every ratio is taken against;
  - C{meta+tiktok}: both batched platforms (up to 1,000 events a request);
  - C{meta+ga4+tiktok}: GA4 too, which takes one client id per request.

The load is wrk over 32 keep-alive connections with a browser User-Agent and no cookies,
so every request is a new visitor (GA4's worst case and a sale's reality: one request
per page view).  tagd's CPU time (all threads, from /proc) is counted from the start of
the warm-up until the fakes have every event of every response, and divided by the
responses.  Targets (ratios from the same run): Meta+TikTok at most 1.3x untracked;
Meta+GA4+TikTok at most 2.0x; one GA4 delivery (the CPU the third configuration adds,
per event) at most one untracked request; tracked p99 at most 1.5x untracked under the
load; unloaded (one request at a time), tracking adds at most 0.1 ms to the median.

C{--soak SECONDS} runs the three-platform configuration that long and samples tagd's
resident memory every 10 s: flat means the last sample is within 10 % of the one after
the first minute.  C{--profile DIR} records each configuration with py-spy (those
figures are not for the targets) and writes a flame graph of each tracked run.

Run with the Python of the virtual environment tagd is installed in:
C{.venv/bin/python bench/page_view_cpu.py [--duration 10] [--rounds 3] [--soak 600]}.
The exit status is 0 even when a target is missed (this is a report); it is 1 only when
something could not be started or did not deliver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from proxy_throughput import (
    LoadError,
    Processes,
    Server,
    StartError,
    check_answer,
    check_python,
    find_tools,
    measure,
    prepare_origin,
    print_columns,
    run_and_clean_up,
    run_builtin,
    run_wrk,
    start_tagd,
    versions,
    wait_until_listening,
)
from delivery import _loadavg, owed, start_platforms, stop_tagd, summarise_profile, tagd_config, wait_for_events
from delivery_processes import USER_AGENT

# (label, the platforms it delivers to); the first is the baseline.
CONFIGS = (("untracked", ()), ("meta+tiktok", ("meta", "tiktok")), ("meta+ga4+tiktok", ("meta", "ga4", "tiktok")))
UNTRACKED, BATCHED, ALL_THREE = (label for label, _ in CONFIGS)
# No cookies: every request is a visitor tagd has never seen.
LOAD_HEADERS = (f"User-Agent: {USER_AGENT}",)
BATCHED_TARGET = 1.3
ALL_THREE_TARGET = 2.0
GA4_DELIVERY_TARGET = 1.0  # one GA4 delivery's CPU over one untracked request's
P99_TARGET = 1.5
UNLOADED_ADDED_MS = 0.1
SOAK_SAMPLE_S = 10
SOAK_FLAT = 0.10  # the last sample within this of the one after the first minute


def rss_kib(server: Server) -> int | None:
    """tagd's resident memory now, from /proc."""
    try:
        with open(f"/proc/{server.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def recording(args, tagd: Server, label: str):
    """py-spy on tagd when C{--profile} asks, from the warm-up until every event arrived,
    so that delivery after the load is in it: raw stacks for the summary printed at the
    end, and an SVG flame graph of its own recording beside them."""
    if not args.profile:
        return contextlib.nullcontext()
    paths = {kind: os.path.join(args.profile, f"tagd-{label}.{ext}") for kind, ext in (("raw", "txt"), ("flamegraph", "svg"))}

    @contextlib.contextmanager
    def record():
        spies = [subprocess.Popen([args.py_spy, "record", "-p", str(tagd.proc.pid), "-r", "200", "-f", kind, "-o", path],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for kind, path in paths.items()]
        try:
            yield
        finally:
            for spy, path in zip(spies, paths.values()):
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
                try:
                    _, err = spy.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
                if not os.path.exists(path):
                    print(f"  py-spy failed (status {spy.returncode}): {err.strip()[-500:]}")
            print(f"  profiles written to {' and '.join(paths.values())}")

    return record()


def run_config(label: str, platforms: tuple[str, ...], processes: Processes, origin: Server, drive, args,
               expected_body: bytes, round_number: int) -> dict:
    """One configuration: load, then wait for every event, then the unloaded latency."""
    print(f"{label}, round {round_number}:", flush=True)
    fakes, ports = start_platforms(processes, label, "ok", args) if platforms else (None, {})
    ports = {p: port for p, port in ports.items() if p in platforms}
    spool = os.path.join(args.run_dir, f"spool-{label}-{round_number}.sqlite3")
    try:
        tagd = start_tagd(processes, origin.port, args.run_dir, f"tagd-{label}",
                          tagd_config(ports or None, spool) if platforms else "")
        try:
            wait_until_listening(tagd)
            if not check_answer(tagd, expected_body, "before"):
                raise StartError(f"tagd ({label}) did not return the origin's page; not measured")
            cpu_before, reactor_before = tagd.cpu_seconds(), tagd.main_thread_cpu_seconds()
            with recording(args, tagd, label):
                result = measure(tagd, origin, drive, args, expected_body, others=[fakes] if fakes else ())
                # +2: check_answer's request before the load and after it, each a page view too.
                expected = result["requests"] + result["warmup_requests"] + 2
                waited, done = None, True
                if ports:
                    stats, waited, done = wait_for_events(ports, expected, args.settle)
                    result["events"] = {p: s["events"] for p, s in stats.items()}
                    result["platform_requests"] = {p: s["requests"] for p, s in stats.items()}
            cpu = tagd.cpu_seconds() - cpu_before
            reactor = tagd.main_thread_cpu_seconds() - reactor_before
            result.update(label=label, expected=expected, delivered=done, settle_s=waited,
                          cpu_us_per_request=1e6 * cpu / expected if done else None,
                          reactor_us_per_request=1e6 * reactor / expected if done else None,
                          rss_kib=rss_kib(tagd))
            result["unloaded_p50_ms"] = drive(tagd.port, args.unloaded_duration, 1, 1)["p50_ms"]
        finally:
            result["stop"] = stop_tagd(processes, tagd)
    finally:
        if fakes is not None:
            processes.stop(fakes)
    if ports:
        result["owed_after_stop"] = owed(spool)
        arrived = ", ".join(f"{p} {n:,} in {result['platform_requests'][p]:,} requests"
                            for p, n in result["events"].items())
        state = f"all delivered {waited:.1f} s after the load" if done else f"NOT all delivered within {args.settle:.0f} s"
        print(f"  {expected:,} page views; events: {arrived}; {state}", flush=True)
    cpu_text = "-" if result["cpu_us_per_request"] is None else f"{result['cpu_us_per_request']:.0f}"
    print(f"  {result['rps']:,.0f} req/s, p99 {result['p99_ms']:.2f} ms, {result['error_total']} errors, "
          f"{cpu_text} µs CPU per page view ({result['reactor_us_per_request'] or 0:.0f} on the reactor), unloaded p50 {result['unloaded_p50_ms']:.3f} ms", flush=True)
    return result


def soak(processes: Processes, origin: Server, drive, args, expected_body: bytes) -> dict:
    """The three-platform configuration under load for C{--soak} seconds, tagd's RSS sampled."""
    print(f"soak: {ALL_THREE} for {args.soak} s, resident memory every {SOAK_SAMPLE_S} s", flush=True)
    fakes, ports = start_platforms(processes, "soak", "ok", args)
    spool = os.path.join(args.run_dir, "spool-soak.sqlite3")
    samples: list[tuple[float, int | None]] = []
    try:
        tagd = start_tagd(processes, origin.port, args.run_dir, "tagd-soak", tagd_config(ports, spool))
        try:
            wait_until_listening(tagd)
            started = time.monotonic()
            load = subprocess.Popen(  # wrk in the background while this process samples
                [sys.executable, "-c", "import sys, json, page_view_cpu as p; "
                 "print(json.dumps(p.soak_load(*sys.argv[1:])))", args.wrk or "", str(tagd.port), str(args.soak),
                 str(args.connections), str(args.threads)],
                cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE, text=True)
            while load.poll() is None:
                samples.append((round(time.monotonic() - started), rss_kib(tagd)))
                print(f"  {samples[-1][0]:>5} s  {samples[-1][1] or 0:,} KiB", flush=True)
                time.sleep(SOAK_SAMPLE_S)
            loaded = json.loads(load.stdout.read())
            stats, waited, done = wait_for_events(ports, loaded["requests"], args.settle)
            samples.append((round(time.monotonic() - started), rss_kib(tagd)))
        finally:
            stop = stop_tagd(processes, tagd)
    finally:
        processes.stop(fakes)
    after_minute = next((kib for t, kib in samples if t >= 60), samples[0][1])
    arrived = ", ".join(f"{platform} {counts['events']:,}" for platform, counts in stats.items())
    last = samples[-1][1]
    flat = None not in (after_minute, last) and last <= after_minute * (1 + SOAK_FLAT)
    print(f"  {loaded['requests']:,} page views at {loaded['rps']:,.0f} req/s; RSS {after_minute:,} KiB after a minute, "
          f"{last:,} KiB at the end, at most {max(k or 0 for _, k in samples):,} KiB; "
          f"{'all delivered' if done else 'NOT all delivered'} {waited:.1f} s after the load "
          f"(events: {arrived}); "
          f"owed after the stop: {sum(owed(spool).values())}", flush=True)
    return {"samples": samples, "rss_after_minute_kib": after_minute, "rss_last_kib": last, "flat": flat,
            "requests": loaded["requests"], "rps": loaded["rps"], "delivered": done, "stop": stop,
            "events": {p: s["events"] for p, s in stats.items()}}


def soak_load(wrk: str, port: str, seconds: str, connections: str, threads: str) -> dict:
    """The soak's load, run in a child process so that the parent can sample meanwhile."""
    if wrk:
        return run_wrk(wrk, int(port), int(seconds), int(connections), int(threads), headers=LOAD_HEADERS)
    return run_builtin(int(port), int(seconds), int(connections), int(threads), headers=LOAD_HEADERS)


# --- the report ------------------------------------------------------------------------------


def medians(runs: list[dict]) -> dict:
    """A configuration's rounds as one: the median of each figure the targets judge (CPU per
    page view, p99 and unloaded p50), since a whole median round would carry one
    round's noise in whichever figure it did not sort by."""
    done = [r for r in runs if r["cpu_us_per_request"] is not None]
    return {
        "label": runs[0]["label"],
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in done) if done else None,
        "unloaded_p50_ms": statistics.median(r["unloaded_p50_ms"] for r in runs),
        "delivered": all(r["delivered"] for r in runs),
        "error_total": max(r["error_total"] for r in runs),
        "rss_kib": max(r["rss_kib"] or 0 for r in runs),
        "proxy_cpu_pct": statistics.median(r["proxy_cpu_pct"] or 0 for r in runs),
    }


def print_runs(results: list[dict]) -> None:
    print_columns(
        ("configuration", "req/s", "p50 ms", "p99 ms", "errors", "tagd CPU under load", "µs CPU/page view, all delivered",
         "unloaded p50 ms", "RSS MiB"),
        [(r["label"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", str(r["error_total"]),
          f"{r['proxy_cpu_pct']:.0f}%", "-" if r["cpu_us_per_request"] is None else f"{r['cpu_us_per_request']:.0f}",
          f"{r['unloaded_p50_ms']:.3f}", f"{(r['rss_kib'] or 0) / 1024:.0f}") for r in results])


def verdicts(by_label: dict[str, dict]) -> list[tuple[str, str, str, bool | None]]:
    """(what, figure, wanted, passed) for every target the runs can judge."""
    found = []
    base = by_label.get(UNTRACKED)
    if base is None or base["cpu_us_per_request"] is None:
        return found
    cpu = {label: r["cpu_us_per_request"] for label, r in by_label.items()}
    for label, target in ((BATCHED, BATCHED_TARGET), (ALL_THREE, ALL_THREE_TARGET)):
        if label in by_label:
            r = by_label[label]
            if cpu[label] is None:
                found.append((f"CPU per page view, {label}/untracked", "not delivered", f"<= {target}", False))
            else:
                ratio = cpu[label] / cpu[UNTRACKED]
                found.append((f"CPU per page view, {label}/untracked", f"{ratio:.2f}", f"<= {target}", ratio <= target))
            p99 = r["p99_ms"] / base["p99_ms"]
            found.append((f"p99 under load, {label}/untracked", f"{p99:.2f}", f"<= {P99_TARGET}", p99 <= P99_TARGET))
            added = r["unloaded_p50_ms"] - base["unloaded_p50_ms"]
            found.append((f"unloaded p50 added, {label}", f"{added:+.3f} ms", f"<= {UNLOADED_ADDED_MS} ms",
                          added <= UNLOADED_ADDED_MS))
    if cpu.get(BATCHED) and cpu.get(ALL_THREE):
        ga4 = (cpu[ALL_THREE] - cpu[BATCHED]) / cpu[UNTRACKED]
        found.append(("one GA4 delivery's CPU / one untracked request's", f"{ga4:.2f}", f"<= {GA4_DELIVERY_TARGET}",
                      ga4 <= GA4_DELIVERY_TARGET))
    return found


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before the measured run (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2), help="wrk threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three configurations (default 3)")
    parser.add_argument("--unloaded-duration", type=int, default=3,
                        help="seconds of one-at-a-time requests per configuration and round (default 3)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds the events may take to arrive after the load (default 60)")
    parser.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                        help="afterwards, a tracked run this long with tagd's memory sampled (600 for the target)")
    parser.add_argument("--only", default=",".join(label for label, _ in CONFIGS),
                        help="comma-separated subset of the configurations")
    parser.add_argument("--profile", metavar="DIR", help="record tagd with py-spy into DIR (slows tagd down)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, spools)")
    args = parser.parse_args(argv)
    known = [label for label, _ in CONFIGS]
    args.only = [name for name in args.only.split(",") if name]
    if not args.only or any(name not in known for name in args.only):
        parser.error(f"--only takes a comma-separated subset of {','.join(known)}")
    if args.duration < 1 or args.rounds < 1 or args.connections < 1 or args.warmup < 0 or args.soak < 0:
        parser.error("--duration, --rounds and --connections must be at least 1, --warmup and --soak at least 0")
    if args.profile:
        args.py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if args.py_spy is None:
            parser.error("--profile needs py-spy (pip install py-spy into the virtual environment)")
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    args.delay = 0.0  # start_platforms passes it on; "ok" fakes never wait
    return args


def run(args, processes: Processes) -> int:
    check_python()
    tools = find_tools(args)
    args.wrk = tools["wrk"]
    if tools["wrk"]:
        drive = lambda *a: run_wrk(tools["wrk"], *a, headers=LOAD_HEADERS)  # noqa: E731
    else:
        drive = lambda *a: run_builtin(*a, headers=LOAD_HEADERS)  # noqa: E731
    origin, origin_text, expected_body, generator = prepare_origin(args, processes, tools)
    print(f"load:   {generator}, {args.connections} keep-alive connections, {args.warmup} s warm-up + "
          f"{args.duration} s per configuration; a browser User-Agent, no cookies: every request a new visitor")
    print(f"machine: {os.cpu_count()} CPUs, load average {_loadavg()} (1/5/15 min) before the run\n", flush=True)
    configs = [(label, platforms) for label, platforms in CONFIGS if label in args.only]
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    failed = []
    for round_number in range(1, args.rounds + 1):
        for label, platforms in configs:
            if label in failed:
                continue
            try:
                runs[label].append(run_config(label, platforms, processes, origin, drive, args, expected_body,
                                              round_number))
            except (StartError, LoadError) as e:
                print(f"  {label} FAILED: {e}", flush=True)
                failed.append(label)
    soaked = None
    if args.soak:
        try:
            soaked = soak(processes, origin, drive, args, expected_body)
        except (StartError, LoadError) as e:
            print(f"  soak FAILED: {e}", flush=True)
            failed.append("soak")
    print(f"\nload average {_loadavg()} after the run\n")
    results = [medians(done) for done in runs.values() if done]
    if args.rounds > 1:
        print("every round:")
        print_runs([{**r, "label": f"{r['label']} #{n}"} for done in runs.values() for n, r in enumerate(done, 1)])
        print(f"\nmedians of {args.rounds} rounds (the targets are judged on these):")
    print_runs(results)
    found = verdicts({r["label"]: r for r in results})
    if soaked is not None:
        found.append(("memory over the soak: last/after a minute",
                      f"{soaked['rss_last_kib'] / soaked['rss_after_minute_kib']:.2f}",
                      f"<= {1 + SOAK_FLAT:.2f}", soaked["flat"]))
    if found:
        print()
        print_columns(("target", "figure", "wanted", "verdict"),
                      [(what, figure, wanted, "" if ok is None else "PASS" if ok else "MISS")
                       for what, figure, wanted, ok in found])
    if args.profile:
        print("\nprofiles (py-spy slowed tagd down in these runs: the figures above are not for the targets)")
        for r in results:
            path = os.path.join(args.profile, f"tagd-{r['label']}.txt")
            if os.path.exists(path):
                print(f"{r['label']}:")
                summarise_profile(path)
    undelivered = [r["label"] for r in results if not r["delivered"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"origin": origin_text, "page_bytes": len(expected_body), "load_generator": generator,
                       "versions": versions(tools), "runs": runs, "results": results, "soak": soaked,
                       "verdicts": found, "failed": failed}, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 1 if failed or undelivered else 0


def main(argv: list[str]) -> int:
    return run_and_clean_up(parse_args(argv), run, prefix="tagd-bench-cpu-")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
