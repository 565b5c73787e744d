"""Helpers shared by the tests that drive real processes and sockets."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

from prometheus_client.parser import text_string_to_metric_families

# The checkout: the folder that holds setup.cfg, tagd.tac and this tests folder.
REPO_ROOT = Path(__file__).resolve().parent.parent

# The twistd script installed next to the interpreter running the tests.
TWISTD = str(Path(sys.executable).with_name("twistd"))

# Tests start many tagds, often at once: each admin listener takes a free port, never the
# default 9100 that another tagd (or node_exporter) may hold.
ADMIN_TOML = '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\n'


def copy_checkout(destination: Path) -> None:
    """The checkout's files at C{destination}, as a release of them would hold them: without
    its git data, virtual environment and build leftovers, which must not leak into a build
    from the copy (and the checkout itself is not written to)."""
    shutil.copytree(
        REPO_ROOT,
        destination,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
            ".pytest_cache", ".hypothesis", "_trial_temp", "dropin.cache",
        ),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET C{path} from 127.0.0.1:C{port}, bypassing any proxy set in the environment."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def wait_for_http(
    port: int,
    path: str = "/",
    *,
    timeout: float = 20.0,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Poll until 127.0.0.1:C{port} answers C{path}; return the first answer.

    Fails early, with the process's output, when C{process} exits before answering.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"process exited with {process.returncode} before answering:\n{read_log(log)}"
            )
        try:
            return http_get(port, path)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nothing answered on port {port} within {timeout}s:\n{read_log(log)}"
                ) from None
            time.sleep(0.1)


def read_log(log: Path | None) -> str:
    """The text a process wrote to C{log}, or an empty string."""
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")


def tagd_up(process: subprocess.Popen, log: Path) -> tuple[int, int] | None:
    """(visitor port, admin port) of a twistd-run tagd writing to C{log} once it is fully
    up, else None; fails at once, with its output, when the process has exited.

    Up means both listeners are logged and the admin listener answers C{/healthz}
    (whatever it says: an unusable spool makes it 503).  Only a running reactor answers,
    and the reactor installs twistd's signal handlers before it runs: a SIGTERM sent
    when the visitor port is merely bound may find the default handler, which ends tagd
    without its clean shutdown.  Every process test waits for this before signalling,
    so the configuration must have an admin listener (L{ADMIN_TOML}).
    """
    if process.poll() is not None:
        raise AssertionError(f"tagd exited with {process.returncode}:\n{read_log(log)}")
    text = log.read_bytes() if log.exists() else b""
    visitor = re.search(rb"starting on (\d+)", text)
    admin = re.search(rb"admin listener on [0-9.]+:(\d+)", text)
    if visitor is None or admin is None:
        return None
    try:
        http_get(int(admin[1]), "/healthz", timeout=1.0)
    except (OSError, http.client.HTTPException):
        return None
    return int(visitor[1]), int(admin[1])


@contextmanager
def running(args: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run C{args} with its output in C{log}; make sure it is gone when the block ends."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """End C{process}: SIGTERM, then SIGKILL if it does not exit within C{timeout} seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


# -- blocking helpers for tests that start, kill and restart tagd as a real process ------
#
# The servers below run in threads of the test process, so that they outlive any tagd
# process the test kills; the tests that use them are plain blocking code and never touch
# the reactor that pytest-twisted runs.

BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
SERVER_TIMEOUT = 5.0  # seconds any helper server waits on a socket or for its thread


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll C{predicate()} until it is true and return its value; fail saying C{what} after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {timeout} s")
        time.sleep(interval)


def browser_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """GET C{path} from 127.0.0.1:C{port} on a new connection, as a desktop browser would."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": BROWSER_UA, "Host": "shop.example"})
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def tracking_header(event_id: str) -> str:
    """A page view named C{event_id}; GA4 carries no event id, so it also goes in custom data."""
    return json.dumps({"event_name": "PageView", "event_id": event_id, "custom_data": {"probe": event_id}})


def raw_response(
    tracking: bytes | None, body: bytes, *, status: bytes = b"200 OK", before=(), after=()
) -> bytes:
    """The bytes of a raw origin's response with C{body}: a C{Date} (with one, tagd adds
    none), the header lines C{before}, the tracking header line if C{tracking} is not None,
    the lines C{after}, and C{Content-Length} last."""
    head = [b"HTTP/1.1 " + status, b"Date: Fri, 27 Nov 2026 08:00:00 GMT", *before]
    if tracking is not None:
        head.append(b"Worker-Tracking: " + tracking)
    head += [*after, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


TRACKED_PAGE = b"<!doctype html><title>tracked</title>" + b"<p>page body</p>" * 200


class TrackedOrigin(ThreadingHTTPServer):
    """A shop's app on loopback, in threads: C{GET /e/ID?delay=S} answers L{TRACKED_PAGE}
    after C{S} seconds, with the tracking header for the event C{ID}.

    C{waiting} counts the requests held back by their delay right now; L{close} ends
    every delay at once.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _TrackedOriginHandler)
        self.port = self.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.waiting = 0
        self.released = threading.Event()
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def handle_error(self, request, client_address) -> None:
        pass  # tagd killed mid-answer: nothing to report

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()
        self._thread.join(SERVER_TIMEOUT)


class _TrackedOriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SERVER_TIMEOUT * 6

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        event_id = parts.path.rpartition("/")[2]
        delay = float(parse_qs(parts.query).get("delay", ["0"])[0])
        if delay:
            with self.server.lock:
                self.server.waiting += 1
            try:
                self.server.released.wait(delay)
            finally:
                with self.server.lock:
                    self.server.waiting -= 1
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Worker-Tracking", tracking_header(event_id))
        self.send_header("Content-Length", str(len(TRACKED_PAGE)))
        self.end_headers()
        self.wfile.write(TRACKED_PAGE)


def event_ids_in(platform: str, body) -> list[str]:
    """The event ids a platform request carries (GA4's in the C{probe} parameter, Reddit's
    as its conversion id, Microsoft's as C{eventId})."""
    if not isinstance(body, dict):
        return []
    if platform == "ga4":
        events = body.get("events")
        return [e.get("params", {}).get("probe") for e in events] if isinstance(events, list) else []
    if platform == "reddit":
        data = body.get("data")
        events = data.get("events") if isinstance(data, dict) else None
        return [e.get("metadata", {}).get("conversion_id") for e in events] if isinstance(events, list) else []
    key = "eventId" if platform == "microsoft" else "event_id"
    events = body.get("data")
    return [e.get(key) for e in events] if isinstance(events, list) else []


class ThreadedPlatform:
    """A fake platform of tests/fakes.py served from a thread on a fixed loopback port.

    Down (not listening) until L{up}; while up it can fail every request with an HTTP
    status (C{failing}), answer late (C{delay}, seconds), refuse for good any request
    carrying an event id in C{refuse} (with the fake's answer to C{refusal}), and be
    flaky (C{flaky}, a seeded C{random.Random}): 30 % of requests get a 503, 10 % a 429
    with C{Retry-After: 1}.  Otherwise it answers as the fake does.  C{failed} counts
    the events of the requests answered with a 5xx.  C{delivered} holds the ids of the events it accepted, and
    the fake's C{requests} every request, as the fake records those it serves itself.
    C{cut} counts the requests it never handled because their connection closed or was
    reset before their whole body came: expected only when tagd stopped with a request
    in flight, or cancelled one.
    """

    def __init__(self, platform: str, fake, port: int | None = None) -> None:
        self.platform = platform
        self.fake = fake
        self.port = free_port() if port is None else port
        self.base = f"http://127.0.0.1:{self.port}"
        self.failing: int | None = None
        self.delay = 0.0
        self.refuse: set[str] = set()
        self.refusal = None  # a fakes.Injection
        self.flaky = None  # a random.Random, once flaky
        self.failed = 0
        self.delivered: list[str] = []
        self.received: list[list[str]] = []  # the event ids of every request, in order
        self.violations: list[str] = []
        self.cut = 0
        self.lock = threading.Lock()
        self.released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def up(self, tls: ssl.SSLContext | None = None) -> None:
        """Listen (on the port tagd was configured with) and answer, over TLS with C{tls}."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _PlatformHandler, bind_and_activate=False)
        server.allow_reuse_address = True
        server.daemon_threads = True
        server.request_queue_size = 128
        server.server_bind()
        server.server_activate()
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        server.platform = self
        server.handle_error = lambda request, address: None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and end every delayed answer."""
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(SERVER_TIMEOUT)
            self._server = None

    def answer(self, recorded) -> tuple[int, bytes, dict[str, str]]:
        """Record C{recorded} and choose the answer (status, body, extra headers) as configured."""
        from fakes import Injection  # the fakes import the reactor; only tests that serve them pay

        ids = event_ids_in(self.platform, recorded.body)
        with self.lock:
            self.fake.requests.append(recorded)
            self.received.append(ids)
            self.violations.extend(str(v) for v in recorded.violations)
        if self.delay:
            self.released.wait(self.delay)
        headers = {}
        with self.lock:
            draw = self.flaky.random() if self.flaky is not None else 1.0
        failing = self.failing if draw >= 0.4 else 503 if draw < 0.3 else 429
        if failing == 429:
            headers["Retry-After"] = "1"
        if failing is not None:
            # Meta judges by its code: 4 is its throttle (the application's rate limit).
            answer = self.fake.injected_answer(Injection(status=failing, code=4 if failing == 429 else None))
            if failing >= 500:
                with self.lock:
                    self.failed += len(ids)
        elif self.refuse & set(ids):
            answer = self.fake.injected_answer(self.refusal)
        else:
            answer = self.fake.answer(recorded)
            if 200 <= answer.status < 300 and not recorded.violations:
                with self.lock:
                    self.delivered.extend(ids)
        body = b"" if answer.body is None else json.dumps(answer.body).encode()
        return answer.status, body, headers

    def delivered_ids(self) -> set[str]:
        """The ids of the events this platform accepted so far."""
        with self.lock:
            return set(self.delivered)


def recorded_post(handler: BaseHTTPRequestHandler):
    """The POST that C{handler} serves, its body read whole, as the fakes record a request
    (a L{fakes.Recorded}, its body C{None} where it is not JSON); C{None} for a request
    whose connection closed or was reset before its whole body came.

    A server never handles a request cut short, and tagd cuts one when it stops with a
    POST in flight: Twisted's client writes the head, and the body in a later turn, and a
    cancelled request aborts its connection (a reset, not a close).
    """
    from fakes import Recorded  # the fakes import the reactor; only tests that serve them pay

    declared = int(handler.headers.get("Content-Length", 0))
    try:
        raw = handler.rfile.read(declared)
    except OSError:  # reset, or no more within the server's timeout
        raw = b""
    if len(raw) < declared:
        handler.close_connection = True
        return None
    parts = urlsplit(handler.path)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return Recorded(
        method="POST",
        path=parts.path,
        query=parse_qs(parts.query),
        headers={k.lower(): v for k, v in handler.headers.items()},
        raw=raw,
        body=body,
    )


class _PlatformHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the platforms' servers
    timeout = SERVER_TIMEOUT * 12

    def log_message(self, *args) -> None:  # no access lines: they would carry tokens
        pass

    def do_POST(self) -> None:
        recorded = recorded_post(self)
        platform = self.server.platform
        if recorded is None:
            with platform.lock:
                platform.cut += 1
            return
        recorded.violations.extend(platform.fake.check(recorded))
        status, content, headers = platform.answer(recorded)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


class TagdProcess:
    """tagd as users run it, C{twistd -n --pidfile= tagd --config FILE}, which a test may
    kill and start again; each run logs to a file of its own (C{tagd-N.log}).  With
    C{production_logger}, twistd logs through C{--logger=tagd.daemon.logs.observer}, as the
    systemd unit runs it: JSON lines at info and above."""

    def __init__(self, config: Path, cwd: Path, production_logger: bool = False) -> None:
        self.config = config
        self.cwd = cwd
        self.logger = ["--logger=tagd.daemon.logs.observer"] if production_logger else []
        self.runs: list[tuple[subprocess.Popen, Path]] = []
        self._files = []

    @property
    def process(self) -> subprocess.Popen:
        """The latest run."""
        return self.runs[-1][0]

    def start(self, timeout: float = 20.0) -> int:
        """Start a run and wait until it is up (L{tagd_up}); return its visitor port."""
        log = self.cwd / f"tagd-{len(self.runs)}.log"
        out = open(log, "wb")
        self._files.append(out)
        process = subprocess.Popen(
            [TWISTD, *self.logger, "-n", "--pidfile=", "tagd", "--config", str(self.config)],
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.runs.append((process, log))
        return wait_until(lambda: tagd_up(process, log), timeout, "up", interval=0.02)[0]

    def kill(self) -> None:
        """C{kill -9} the running tagd."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(SERVER_TIMEOUT)

    def close(self) -> None:
        """End every run still going (SIGTERM, then SIGKILL) and close the log files."""
        for process, _ in self.runs:
            stop(process)
        for out in self._files:
            out.close()

    def logs(self) -> str:
        """What every run logged, in order."""
        return "".join(read_log(log) for _, log in self.runs)


def events_accepted(admin_port: int) -> float:
    """tagd_events_accepted_total, read from the admin listener's C{/metrics}."""
    status, _, body = http_get(admin_port, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "tagd_events_accepted":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError("no tagd_events_accepted_total in /metrics")


def spool_rows(path: Path) -> list[tuple[str, str, str, int, str | None]]:
    """Every delivery in the spool file: (event_id, destination, status, attempts, last_error)."""
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
    try:
        return db.execute(
            "SELECT e.event_id, d.destination, d.status, d.attempts, d.last_error"
            " FROM deliveries d JOIN events e ON e.id = d.event ORDER BY e.event_id, d.destination"
        ).fetchall()
    finally:
        db.close()
