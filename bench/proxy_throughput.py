"""Throughput of tagd next to Twisted's stock reverse proxy and nginx, on loopback.

The targets for tagd are relative (at least 3x the stock Twisted proxy, at least 0.7x
nginx), and absolute requests/s depend on the machine, so every figure is measured here,
in the same run, against the same origin: a page of about 38 KB carrying the tracking
header.  The proxies run one after the other, never together, so none steals CPU from
another, in rounds (three by default): tagd, stock, nginx, then again.  On a small
machine one proxy's figure varies by a tenth from one run to the next; each proxy's
median round, a whole run of its own, is what the ratios compare, and every round is
printed.  The origin is nginx serving a static file when nginx is installed, because an
origin slower than the proxies would be what gets measured; otherwise the Twisted demo
shop stands in and the figures say more about the shop than about the proxies.

Load comes from wrk (32 keep-alive connections by default); without wrk a small asyncio
client does the job, far slower, so its figures only show that things work.

Run with the Python of the virtual environment that tagd is installed in:
C{.venv/bin/python bench/proxy_throughput.py [--duration 10] [--rounds 3] [--only tagd,stock]}.
The exit status is 0 even when a target is missed (this is a report); it is 1 only when
something could not be started or answered wrongly before being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Sequence

HOST = "127.0.0.1"
PATH = "/"
PAGE_SIZE = 38_000
TRACKING_HEADER = "Worker-Tracking"
# What the demo shop's home page puts in the tracking header.
TRACKING_VALUE = json.dumps({"event_name": "PageView"})
PROXIES = ("tagd", "stock", "nginx")
# tagd's targets, as multiples of the other proxy's requests/s.
TARGETS = {"stock": 3.0, "nginx": 0.7}
# The most tagd may add to one unloaded request's median latency, in milliseconds.
UNLOADED_TARGET_MS = 0.25
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
WRK_SCRIPT = os.path.join(BENCH_DIR, "wrk_summary.lua")


class StartError(Exception):
    """A server that did not start, or answered wrongly before being measured."""


class LoadError(Exception):
    """The load generator itself failed (not the server under test)."""


# --- processes ----------------------------------------------------------------------


@dataclass
class Server:
    """One process the benchmark started, with the port it should answer on."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: str
    log_file: object = field(repr=False)

    def log_tail(self, size: int = 3000) -> str:
        """The end of the server's output, to show why it died or misbehaved."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - size))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        """User+system CPU time so far, all threads, from /proc (None where there is no /proc).

        It shows whether a server was CPU-bound during its run: a proxy near 100% of
        one core is the bottleneck, an origin near 100% would make the figures worthless.
        """
        return _stat_cpu_seconds(f"/proc/{self.proc.pid}/stat")

    def cpu_split(self) -> tuple[float, float] | None:
        """User and system CPU time so far: Python's own work against the kernel's."""
        return _stat_cpu_split(f"/proc/{self.proc.pid}/stat")

    def main_thread_cpu_seconds(self) -> float | None:
        """The CPU time of the process's first thread alone: for a Twisted server, the
        reactor's, which bounds its requests/s whatever its other threads do."""
        return _stat_cpu_seconds(f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat")


def _stat_cpu_seconds(path: str) -> float | None:
    """User+system CPU seconds from a /proc C{stat} file, or None when it cannot be read."""
    split = _stat_cpu_split(path)
    return None if split is None else sum(split)


def _stat_cpu_split(path: str) -> tuple[float, float] | None:
    """User and system CPU seconds from a /proc C{stat} file, or None when it cannot be read."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


class Processes:
    """Every process started, so that one finally block can end them all."""

    def __init__(self, log_dir: str) -> None:
        self._log_dir = log_dir
        self._servers: list[Server] = []

    def start(self, name: str, port: int, argv: list[str], cwd: str, env: dict[str, str] | None = None) -> Server:
        """Start C{argv} with its output in C{<log_dir>/<name>.log}; C{env} adds to the
        environment it inherits."""
        log_path = os.path.join(self._log_dir, f"{name}.log")
        log_file = open(log_path, "wb")
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, **env} if env else None,
            )
        except OSError as e:
            log_file.close()
            raise StartError(f"{name}: cannot run {argv[0]}: {e}") from None
        server = Server(name, port, proc, log_path, log_file)
        self._servers.append(server)
        return server

    def stop(self, server: Server, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate, then kill if it does not exit within C{timeout} seconds."""
        proc = server.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        server.log_file.close()
        if server in self._servers:
            self._servers.remove(server)

    def stop_all(self) -> None:
        for server in reversed(list(self._servers)):
            try:
                self.stop(server)
            except (OSError, subprocess.TimeoutExpired) as e:
                print(f"warning: could not stop {server.name} (pid {server.proc.pid}): {e}")


def free_port() -> int:
    """A port that is free on loopback right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_listening(server: Server, timeout: float = START_TIMEOUT) -> None:
    """Wait until the server accepts connections; fail early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise StartError(
                f"{server.name} exited with status {server.proc.returncode} before listening; "
                f"its output:\n{server.log_tail()}"
            )
        try:
            socket.create_connection((HOST, server.port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise StartError(
        f"{server.name} did not listen on {HOST}:{server.port} within {timeout:.0f} s; "
        f"its output:\n{server.log_tail()}"
    )


# --- checking answers -----------------------------------------------------------------

# No proxy from the environment: every request here must go straight to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(port: int, path: str = PATH) -> tuple[int, dict[str, str], bytes]:
    """One GET of C{path} (the page by default): status, headers (lower-case names) and body."""
    url = f"http://{HOST}:{port}{path}"
    try:
        with _OPENER.open(url, timeout=REQUEST_TIMEOUT) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    except (OSError, urllib.error.URLError) as e:
        raise StartError(f"GET {url} failed: {e}") from None


def _traceback_ends(lines) -> list[str]:
    """The exception line of each traceback in a Twisted log (the last indented line)."""
    ends, last, inside = [], None, False
    for line in lines:
        indented = line.startswith(("\t", " "))
        if inside and indented and line.strip():
            last = line.strip()
        elif inside and not indented:
            ends.append(last or "Traceback")
            inside, last = False, None
        if line.lstrip().startswith("Traceback (most recent call last)"):
            inside = True
    if inside:
        ends.append(last or "Traceback")
    return ends


def _unfolded(lines: Sequence[str]) -> list[str]:
    """C{lines} with the traceback of each of tagd's JSON lines (see tagd.daemon.logs) written out
    below it, indented as twistd's text log indents one, for L{_traceback_ends}."""
    out = []
    for line in lines:
        out.append(line)
        if line.startswith("{"):
            try:
                failure = json.loads(line).get("failure")
            except (ValueError, AttributeError):
                failure = None
            if isinstance(failure, str):
                out.extend("\t" + part for part in failure.splitlines())
    return out


def summarize_log(path: str) -> tuple[int, dict[str, int]]:
    """How many lines a server logged, and its tracebacks counted by exception.

    The load generator only sees what reaches the wire; a server can log errors on every
    request and still answer, and per-request log lines are themselves a cost worth seeing.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0, {}
    ends = _traceback_ends(_unfolded(lines))
    return len(lines), {end: ends.count(end) for end in sorted(set(ends))}


def check_answer(server: Server, expected_body: bytes, when: str) -> bool:
    """Whether the server returns the origin's page byte for byte; prints what it saw.

    Without this, a proxy answering fast with an error page or a truncated body would
    look like a winner.
    """
    status, headers, body = fetch(server.port)
    ok = status == 200 and body == expected_body
    tracking = "passed through" if TRACKING_HEADER.lower() in headers else "removed"
    verdict = "ok" if ok else f"WRONG (expected 200 and the origin's {len(expected_body)} bytes)"
    print(f"  {when}: GET {PATH} -> {status}, {len(body)} bytes, {TRACKING_HEADER} {tracking}: {verdict}")
    return ok


# --- nginx --------------------------------------------------------------------------------

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # Keep-alive connections stay open for the whole run, as they do with Twisted.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{body}
}}
"""

_NGINX_ORIGIN = """\
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    server {{
        listen {host}:{port};
        root {dir}/www;
        default_type "text/html; charset=utf-8";
        location / {{
            index index.html;
            add_header {header} '{value}' always;
            add_header Cache-Control "public, max-age=60" always;
        }}
    }}"""

_NGINX_PROXY = """\
    upstream origin {{
        server {host}:{origin_port};
        keepalive 32;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Do what tagd does with the header: keep it from the visitor.
            proxy_hide_header {header};
        }}
    }}"""


def nginx_version(nginx: str) -> tuple[int, ...]:
    """nginx's version, (0,) when it cannot be told."""
    try:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(n) for n in match.groups()) if match else (0,)


def start_nginx(processes: Processes, nginx: str, name: str, body: str, port: int, run_dir: str) -> Server:
    """Start nginx in one process, everything it writes kept under its own directory."""
    conf_dir = os.path.join(run_dir, name)
    os.makedirs(conf_dir, exist_ok=True)
    conf_path = os.path.join(conf_dir, "nginx.conf")
    with open(conf_path, "w") as f:
        f.write(_NGINX_CONF.format(dir=conf_dir, body=body))
    argv = [nginx, "-p", conf_dir, "-c", conf_path]
    if nginx_version(nginx) >= (1, 19, 5):
        # Otherwise nginx complains about the default error log before reading the conf.
        argv += ["-e", os.path.join(conf_dir, "error.log")]
    return processes.start(name, port, argv, cwd=conf_dir)


# --- the origin -----------------------------------------------------------------------------


def start_origin(processes: Processes, nginx: str | None, run_dir: str) -> tuple[Server, str]:
    """The origin and a description of it: nginx with a static file, else the demo shop."""
    port = free_port()
    if nginx is None:
        argv = [sys.executable, os.path.join(BENCH_DIR, "twisted_servers.py"), "shop", str(port), str(PAGE_SIZE)]
        server = processes.start("origin", port, argv, cwd=run_dir)
        return server, "Twisted demo shop (nginx not installed; the shop may cap every proxy)"
    from tagd.demo.shop import page

    www = os.path.join(run_dir, "origin", "www")
    os.makedirs(www)
    with open(os.path.join(www, "index.html"), "wb") as f:
        f.write(page("Demo shop", "<p>Welcome.</p>", PAGE_SIZE))
    if "'" in TRACKING_VALUE or "\\" in TRACKING_VALUE:
        raise StartError("the tracking value cannot be quoted for nginx")
    body = _NGINX_ORIGIN.format(host=HOST, port=port, dir=os.path.join(run_dir, "origin"),
                                header=TRACKING_HEADER, value=TRACKING_VALUE)
    return start_nginx(processes, nginx, "origin", body, port, run_dir), "nginx static file, one process"


# --- the proxies --------------------------------------------------------------------------


def start_tagd(processes: Processes, origin_port: int, run_dir: str, name: str = "tagd", extra_config: str = "") -> Server:
    """tagd through twistd, as a user runs it, from the installed package and plugin, with
    the log observer its systemd unit uses (JSON lines at C{info}: the dispatcher's
    per-request C{debug} lines are dropped before any formatting, as in production).

    C{extra_config} is TOML appended after the C{[proxy]} table (destinations, spool), so
    that other benchmarks start tagd the same way; C{name} keeps their runs apart.
    """
    # twistd sits next to this Python in the virtual environment tagd is installed in.
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(twistd):
        raise StartError(f"no twistd next to {sys.executable}; run with the venv's Python")
    port = free_port()
    tagd_dir = os.path.join(run_dir, name)
    os.makedirs(tagd_dir, exist_ok=True)  # the same proxy again, in a later round
    config = os.path.join(tagd_dir, "tagd.toml")
    with open(config, "w") as f:
        f.write(f'[proxy]\nlisten = "tcp:{port}:interface={HOST}"\norigin = "http://{HOST}:{origin_port}"\n')
        f.write(extra_config)
    # cwd is a scratch directory so that a source checkout cannot shadow the installed plugin.
    argv = [twistd, "-n", "--pidfile=", "--logger=tagd.daemon.logs.observer", "tagd", "--config", config]
    # The unit's level too, whatever the shell running the benchmark asks of its own tagd.
    return processes.start(name, port, argv, cwd=tagd_dir, env={"TAGD_LOG_LEVEL": "info"})


def start_stock(processes: Processes, origin_port: int, run_dir: str) -> Server:
    """Twisted's stock ReverseProxyResource in a process of its own."""
    port = free_port()
    argv = [sys.executable, os.path.join(BENCH_DIR, "twisted_servers.py"), "stock", str(port), str(origin_port)]
    return processes.start("stock", port, argv, cwd=run_dir)


def start_nginx_proxy(processes: Processes, nginx: str, origin_port: int, run_dir: str) -> Server:
    """nginx as a reverse proxy: one worker, keep-alive to the origin."""
    port = free_port()
    body = _NGINX_PROXY.format(host=HOST, port=port, origin_port=origin_port, header=TRACKING_HEADER)
    return start_nginx(processes, nginx, "nginx", body, port, run_dir)


# --- load: wrk --------------------------------------------------------------------------------


def load_result(requests: int, seconds: float, size: int, errors: dict, latencies_ms: dict) -> dict:
    """One run's figures in the shape both load generators return."""
    return {
        "requests": requests,
        "seconds": round(seconds, 3),
        "rps": round(requests / seconds, 1) if seconds > 0 else 0.0,
        "bytes_per_response": round(size / requests) if requests else 0,
        "errors": errors,
        "error_total": sum(errors.values()),
        **latencies_ms,
    }


def run_wrk(wrk: str, port: int, duration: int, connections: int, threads: int, headers: Sequence[str] = ()) -> dict:
    """Drive C{port} with wrk over keep-alive; the Lua script hands back JSON.

    C{headers} ("Name: value") go on every request, for a load that looks like browsers.
    """
    url = f"http://{HOST}:{port}{PATH}"
    argv = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
            "--timeout", f"{REQUEST_TIMEOUT:.0f}s", "--latency", "-s", WRK_SCRIPT]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise LoadError(f"wrk did not finish within {duration + 30} s") from None
    line = next((l for l in done.stdout.splitlines() if l.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise LoadError(f"wrk failed (status {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    raw = json.loads(line[len("WRK_JSON "):])
    errors = {k: int(raw[k]) for k in ("connect", "read", "write", "timeout", "status")}
    latencies = {f"{p}_ms": raw[f"{p}_us"] / 1000 for p in ("p50", "p90", "p99", "max")}
    return load_result(int(raw["requests"]), raw["duration_us"] / 1e6, int(raw["bytes"]), errors, latencies)


# --- load: built-in fallback -----------------------------------------------------------------


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    size: int = 0
    errors: dict = field(default_factory=lambda: dict.fromkeys(("connect", "read", "write", "timeout", "status"), 0))


_MAX_CHUNKS = 100_000


async def _read_chunked(reader: asyncio.StreamReader) -> int:
    """Read a chunked body; return the bytes read."""
    size = 0
    for _ in range(_MAX_CHUNKS):
        line = await reader.readuntil(b"\r\n")
        length = int(line.split(b";", 1)[0], 16)
        size += len(line)
        if length == 0:
            for _ in range(_MAX_CHUNKS):  # trailers up to the empty line
                trailer = await reader.readuntil(b"\r\n")
                size += len(trailer)
                if trailer == b"\r\n":
                    return size
            break
        size += len(await reader.readexactly(length + 2))
    raise ValueError("chunked body too long")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """Read one response: status, bytes on the wire, whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    size = len(head)
    if status in (204, 304) or status < 200:
        pass
    elif "content-length" in headers:
        size += len(await reader.readexactly(int(headers["content-length"])))
    elif "chunked" in headers.get("transfer-encoding", ""):
        size += await _read_chunked(reader)
    else:
        raise ValueError("response without framing; cannot keep the connection")
    return status, size, headers.get("connection") != "close"


async def _client(port: int, deadline: float, tally: _Tally, headers: Sequence[str] = ()) -> None:
    """One keep-alive connection sending requests back to back until the deadline."""
    extra = "".join(f"{header}\r\n" for header in headers)
    request = f"GET {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}\r\n".encode("latin-1")
    writer = None
    try:
        while time.monotonic() < deadline:
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), REQUEST_TIMEOUT)
                except (OSError, asyncio.TimeoutError):
                    tally.errors["connect"] += 1
                    await asyncio.sleep(0.05)
                    continue
            started = time.perf_counter()
            try:
                writer.write(request)
                status, size, keep = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                tally.errors["timeout"] += 1
                keep = False
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
                tally.errors["read"] += 1
                keep = False
            else:
                tally.latencies.append(time.perf_counter() - started)
                tally.size += size
                tally.errors["status"] += status >= 400
            if not keep:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def run_builtin(port: int, duration: int, connections: int, threads: int, headers: Sequence[str] = ()) -> dict:
    """The fallback when wrk is missing: asyncio clients in this process (much slower)."""
    tally = _Tally()

    async def all_clients() -> None:
        deadline = time.monotonic() + duration
        clients = [_client(port, deadline, tally, headers) for _ in range(connections)]
        await asyncio.wait_for(asyncio.gather(*clients), duration + 2 * REQUEST_TIMEOUT + 5)

    started = time.monotonic()
    try:
        asyncio.run(all_clients())
    except asyncio.TimeoutError:
        raise LoadError("the built-in load generator did not finish in time") from None
    seconds = time.monotonic() - started
    ordered = sorted(tally.latencies)
    latencies = {f"p{int(q * 100)}_ms": _percentile(ordered, q) * 1000 for q in (0.5, 0.9, 0.99)}
    latencies["max_ms"] = (ordered[-1] * 1000) if ordered else 0.0
    return load_result(len(ordered), seconds, tally.size, tally.errors, latencies)


# --- one proxy's run -------------------------------------------------------------------------------


def measure(server: Server, origin: Server, drive, args, expected_body: bytes, others: Sequence[Server] = (),
            around_run=contextlib.nullcontext) -> dict:
    """Warm up, drive the proxy, and check that it still answers right afterwards.

    The CPU of C{others} (more processes the proxy depends on) is reported as
    C{<name>_cpu_pct}; C{warmup_requests} counts the requests of the warm-up, which
    reached the proxy too.  C{around_run()} is a context manager entered for the measured
    run only, after the warm-up: a profiler attached there sees the steady state.
    """
    warmup = drive(server.port, args.warmup, args.connections, args.threads) if args.warmup > 0 else None
    watched = [server, origin, *others]
    keys = ["proxy_cpu_pct", "origin_cpu_pct", *(f"{other.name}_cpu_pct" for other in others)]
    cpu_before = [s.cpu_seconds() for s in watched]
    split_before = server.cpu_split()
    with around_run():
        result = drive(server.port, args.duration, args.connections, args.threads)
    cpu_after = [s.cpu_seconds() for s in watched]
    split_after = server.cpu_split()
    # Per request, in µs: what the proxy's own code costs (user) and what the kernel does
    # for it (system), which tell why tagd/nginx differs between machines.
    for key, index in (("proxy_user_us", 0), ("proxy_sys_us", 1)):
        ok = split_before is not None and split_after is not None and result["requests"]
        result[key] = round(1e6 * (split_after[index] - split_before[index]) / result["requests"], 1) if ok else None
    for key, before, after in zip(keys, cpu_before, cpu_after):
        ok = before is not None and after is not None and result["seconds"] > 0
        result[key] = round(100 * (after - before) / result["seconds"]) if ok else None
    result["warmup_requests"] = warmup["requests"] if warmup else 0
    result["name"] = server.name
    result["alive_after"] = server.proc.poll() is None
    result["answer_ok_after"] = result["alive_after"] and check_answer(server, expected_body, "after ")
    if not result["alive_after"]:
        print(f"  {server.name} DIED during the run (status {server.proc.returncode}); its output:\n{server.log_tail()}")
    result["log_lines"], result["log_errors"] = summarize_log(server.log_path)
    print(f"  {server.name} wrote {result['log_lines']:,} log lines during start, warm-up and run")
    for error, count in result["log_errors"].items():
        print(f"  {server.name} logged {count} x {error}")
    return result


def run_one(name: str, processes: Processes, origin: Server, tools: dict, drive, args, expected_body: bytes,
            label: str | None = None) -> dict:
    """Start one proxy, check its answer, measure it, stop it; C{label} names the run."""
    starters = {
        "tagd": lambda: start_tagd(processes, origin.port, args.run_dir),
        "stock": lambda: start_stock(processes, origin.port, args.run_dir),
        "nginx": lambda: start_nginx_proxy(processes, tools["nginx"], origin.port, args.run_dir),
    }
    print(f"{label or name}:", flush=True)
    server = starters[name]()
    try:
        wait_until_listening(server)
        if not check_answer(server, expected_body, "before"):
            raise StartError(f"{name} did not return the origin's page; not measured")
        result = measure(server, origin, drive, args, expected_body)
        result["unloaded_p50_ms"] = unloaded_p50(drive, server.port, args)
        print(f"  {result['rps']:,.0f} req/s, {result['error_total']} errors; "
              f"unloaded p50 {result['unloaded_p50_ms']:.3f} ms", flush=True)
        return result
    finally:
        processes.stop(server)


def unloaded_p50(drive, port: int, args) -> float:
    """The median latency of requests sent one at a time on one connection: what a proxy
    adds to a single visit when nothing else is going on."""
    return drive(port, args.unloaded_duration, 1, 1)["p50_ms"]


def print_unloaded(origin_runs: list[float], results: list[dict]) -> dict:
    """Each proxy's unloaded p50 over the origin's own, measured in the same rounds."""
    if not origin_runs:
        return {}
    origin_p50 = sorted(origin_runs)[(len(origin_runs) - 1) // 2]
    print(f"\nunloaded (one connection, one request at a time): origin alone p50 {origin_p50:.3f} ms")
    added = {}
    for r in results:
        extra = r["unloaded_p50_ms"] - origin_p50
        verdict = ""
        if r["name"] == "tagd":
            verdict = f"   target <= {UNLOADED_TARGET_MS} ms   {'PASS' if extra <= UNLOADED_TARGET_MS else 'MISS'}"
        print(f"  {r['name']:<6} p50 {r['unloaded_p50_ms']:.3f} ms, adds {extra:+.3f} ms{verdict}")
        added[r["name"]] = round(extra, 3)
    return {"origin_p50_ms": origin_p50, "added_ms": added}


# --- the report --------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _us(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def cpu_cell(value) -> str:
    """A CPU percentage for a table; "-" where /proc could not tell."""
    return "-" if value is None else f"{value}%"


def print_columns(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table: the first column left-aligned, the figures right-aligned."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    for row in (columns, *rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        print("  ".join(cells))


def median_run(runs: list[dict]) -> dict:
    """The run with the median requests/s (the lower middle one of an even count): a whole
    run, its latencies and CPU with it, never figures mixed from different runs."""
    return sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2]


def print_table(results: list[dict], label=lambda r: r["name"]) -> None:
    columns = ("proxy", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "proxy CPU", "origin CPU",
               "user µs/req", "sys µs/req")
    rows = [
        (label(r), f"{r['rps']:,.0f}", _ms(r["p50_ms"]), _ms(r["p90_ms"]), _ms(r["p99_ms"]),
         str(r["error_total"]), cpu_cell(r["proxy_cpu_pct"]), cpu_cell(r["origin_cpu_pct"]),
         _us(r.get("proxy_user_us")), _us(r.get("proxy_sys_us")))
        for r in results
    ]
    print_columns(columns, rows)


def ratios(results: list[dict]) -> dict:
    """tagd's requests/s over each other proxy's, with the target and PASS/MISS."""
    by_name = {r["name"]: r for r in results}
    out = {}
    for other, target in TARGETS.items():
        if "tagd" in by_name and other in by_name and by_name[other]["rps"] > 0:
            ratio = by_name["tagd"]["rps"] / by_name[other]["rps"]
            out[f"tagd/{other}"] = {"ratio": round(ratio, 3), "target": target,
                                    "verdict": "PASS" if ratio >= target else "MISS"}
    return out


def print_ratios(found: dict) -> None:
    for key, other in (("tagd/stock", "stock"), ("tagd/nginx", "nginx")):
        if key in found:
            r = found[key]
            print(f"{key:<11} {r['ratio']:5.2f}x   target >= {r['target']}x   {r['verdict']}")
        else:
            print(f"{key:<11} not measured (tagd or {other} was not run)")


# --- main ------------------------------------------------------------------------------------------


def parse_only(parser, text: str, names) -> list[str]:
    """The comma-separated subset of C{names} that C{--only} asks for; a usage error otherwise."""
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        parser.error(f"--only takes names among {','.join(names)}; got {unknown or 'nothing'}")
    return chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per proxy (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2), help="wrk threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each proxy, in turn; the median counts (default 3)")
    parser.add_argument("--only", default=",".join(PROXIES), help="comma-separated subset of tagd,stock,nginx")
    parser.add_argument("--unloaded-duration", type=int, default=3,
                        help="seconds of one-at-a-time requests per proxy and round, for the unloaded latency (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    args = parser.parse_args(argv)
    args.only = parse_only(parser, args.only, PROXIES)
    if args.duration < 1 or args.warmup < 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--duration, --rounds and --connections must be at least 1, --warmup at least 0")
    return args


def find_tools(args) -> dict:
    """nginx and wrk from PATH (also the sbin directories, where nginx usually lives)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    tools = {"nginx": shutil.which("nginx", path=search), "wrk": shutil.which("wrk")}
    if tools["nginx"] is None and "nginx" in args.only:
        print("note: nginx is not installed; skipping the nginx proxy and using the Twisted shop as origin")
        args.only = [p for p in args.only if p != "nginx"]
    if tools["wrk"] is None:
        print("note: wrk is not installed; using the built-in asyncio load generator, which is far "
              "slower than wrk: its figures show that things work, not how fast they are")
    return tools


def calibrate(rounds: int = 5) -> dict:
    """How fast this machine runs the two kinds of work a proxy does, best of C{rounds}:
    pure-Python bytecode (most of tagd's CPU) and the kernel's copy of a page over
    loopback (most of nginx's).  Both proxies spend about the same system time per
    request; tagd's user time, Python's, is what moves tagd/nginx from one machine (or
    hour) to the next, so this is printed beside the figures to compare runs by."""
    lines = [b"X-Header-%d: value-%d" % (i, i) for i in range(12)]

    def python_work() -> None:
        for _ in range(2_000):
            headers = []
            for line in lines:
                name, _, value = line.partition(b":")
                headers.append((name.lower(), value.strip()))

    page = b"x" * PAGE_SIZE
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def kernel_work() -> None:
        for _ in range(200):
            left.sendall(page)
            got = 0
            while got < PAGE_SIZE:
                got += len(right.recv(1 << 17))

    def best(work, per: int) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return min(times) / per * 1e6

    try:
        python_us = best(python_work, 2_000)
        kernel_us = best(kernel_work, 200)
    finally:
        left.close()
        right.close()
    return {"python_us_per_head": round(python_us, 2), "kernel_us_per_page": round(kernel_us, 2),
            "python_over_kernel": round(python_us / kernel_us, 3)}


def versions(tools: dict) -> dict:
    import twisted

    found = {"python": platform.python_version(), "twisted": twisted.__version__, "cpus": os.cpu_count()}
    if tools["nginx"]:
        found["nginx"] = ".".join(map(str, nginx_version(tools["nginx"])))
    return found


def check_python() -> None:
    """tagd and Twisted must be importable: the script runs with the venv's Python."""
    try:
        import tagd.demo.shop  # noqa: F401
        import twisted  # noqa: F401
    except ImportError as e:
        raise StartError(f"{e}; run this with the Python of the virtual environment tagd is installed in") from None


def prepare_origin(args, processes: Processes, tools: dict):
    """Start the origin and check its page; say what it serves.

    Returns the origin, its description, the page it serves and the load generator's name.
    """
    origin, origin_text = start_origin(processes, tools["nginx"], args.run_dir)
    wait_until_listening(origin)
    status, _, expected_body = fetch(origin.port)
    if status != 200:
        raise StartError(f"the origin answered {status}")
    generator = f"wrk, {args.threads} thread(s)" if tools["wrk"] else "built-in asyncio client"
    print(f"origin: {origin_text}; {len(expected_body):,}-byte page with {TRACKING_HEADER}: {TRACKING_VALUE}")
    return origin, origin_text, expected_body, generator


def run(args, processes: Processes) -> int:
    """The whole benchmark; returns the exit status."""
    check_python()
    tools = find_tools(args)
    drive = (lambda *a: run_wrk(tools["wrk"], *a)) if tools["wrk"] else run_builtin
    machine = calibrate()
    print(f"machine: {os.cpu_count()} CPUs; Python splits a 12-line head in {machine['python_us_per_head']} µs, "
          f"the kernel moves a {PAGE_SIZE:,}-byte page over loopback in {machine['kernel_us_per_page']} µs "
          f"(quotient {machine['python_over_kernel']})")
    origin, origin_text, expected_body, generator = prepare_origin(args, processes, tools)
    print(f"load:   {generator}, {args.connections} keep-alive connections, "
          f"{args.warmup} s warm-up + {args.duration} s per proxy and round, one proxy at a time, "
          f"{args.rounds} round(s)\n", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in PROXIES if name in args.only}
    failed: list[str] = []
    origin_unloaded: list[float] = []
    for round_number in range(1, args.rounds + 1):
        try:
            origin_unloaded.append(unloaded_p50(drive, origin.port, args))
        except LoadError as e:
            print(f"  origin's unloaded latency FAILED: {e}", flush=True)
        for name in (n for n in runs if n not in failed):
            try:
                result = run_one(name, processes, origin, tools, drive, args, expected_body,
                                 label=f"{name}, round {round_number}")
            except (StartError, LoadError) as e:
                print(f"  {name} FAILED: {e}", flush=True)
                failed.append(name)
            else:
                runs[name].append({**result, "round": round_number})
    print()
    if args.rounds > 1:
        every = sorted((r for done in runs.values() for r in done), key=lambda r: r["round"])
        if every:
            print("every round:")
            print_table(every, label=lambda r: f"{r['name']} #{r['round']}")
            for round_number in range(1, args.rounds + 1):
                print(f"round {round_number}: " + "   ".join(
                    f"{key} {v['ratio']:.2f}x" for key, v in
                    ratios([r for r in every if r["round"] == round_number]).items()))
            print()
        print(f"median round of each proxy (of {args.rounds}):")
    results = [median_run(done) for name, done in runs.items() if done and name not in failed]
    if results:
        print_table(results)
        print()
    found = ratios(results)
    print_ratios(found)
    unloaded = print_unloaded(origin_unloaded, results)
    if args.json:
        report = {"origin": origin_text, "page_bytes": len(expected_body), "load_generator": generator,
                  "connections": args.connections, "duration_s": args.duration, "warmup_s": args.warmup,
                  "rounds": args.rounds, "versions": versions(tools), "machine": machine, "results": results,
                  "every_round": runs, "ratios": found, "unloaded": unloaded, "failed": failed}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 1 if failed else 0


def _terminate(signum, frame):
    # SIGTERM takes the same path as Ctrl-C, so the finally block ends every process.
    raise KeyboardInterrupt


def run_and_clean_up(args, run, prefix: str = "tagd-bench-") -> int:
    """C{run(args, processes)} in a scratch directory, ending every process it started
    however it ends (error, Ctrl-C, SIGTERM); returns the exit status.

    C{args.run_dir} is set to the scratch directory; C{args.keep} keeps it afterwards.
    """
    signal.signal(signal.SIGTERM, _terminate)
    args.run_dir = tempfile.mkdtemp(prefix=prefix)
    processes = Processes(args.run_dir)
    try:
        return run(args, processes)
    except StartError as e:
        print(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        processes.stop_all()
        if args.keep:
            print(f"scratch directory kept: {args.run_dir}")
        else:
            shutil.rmtree(args.run_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    return run_and_clean_up(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
