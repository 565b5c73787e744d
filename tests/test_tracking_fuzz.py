"""hypothesis fuzzing of the tracking header through a running tagd.

tagd runs as users run it (C{twistd -n tagd --config FILE}, with all three platform
destinations), in front of a raw origin served from a thread of the test process, which
answers every request with the bytes the current example chose.  The platforms are one
threaded stub that answers as each platform does and checks each payload with the fakes'
rules.  The test itself is a plain blocking client: nothing here needs the reactor that
pytest-twisted runs, so nothing can deadlock on it.

For every example the visitor's response must be the origin's bytes minus the tracking
header line, plus tagd's first-party cookies exactly when the header parses; the daemon
must stay up and log no traceback.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeGA4, FakeMeta, FakeTikTok, Recorded
from header_numbers import numbered_values
from helpers import ADMIN_TOML, TWISTD, raw_response, read_log, recorded_post, running, tagd_up, wait_until
from tagd.tagging.events import TrackingHeaderError, parse_tracking_header

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
BODY = b"<!doctype html><title>fuzz</title><p>body bytes \x00\xff kept as they are</p>\n"
TAGD_COOKIES = (b"_fbp=", b"_fbc=", b"ttclid=", b"_ga=", b"_tagd_sid=", b"tagd_event_id=", b"tagd_event_id_")
TIMEOUT = 5.0


def origin_answer(tracking: bytes | None) -> bytes:
    """The origin's response, the tracking line (if any) among the other headers."""
    return raw_response(
        tracking,
        BODY,
        before=[b"Content-Type: text/html", b"Cache-Control: no-store"],
        after=[b"X-Shop: fuzz"],
    )


# -- the raw origin, in a thread ------------------------------------------------------


class RawOrigin(socketserver.ThreadingTCPServer):
    """Answers every request, on kept-alive connections, with C{self.answer}."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.answer = origin_answer(None)


class _OriginHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        buffer = b""
        self.request.settimeout(30)
        while True:
            while b"\r\n\r\n" not in buffer:
                try:
                    data = self.request.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
            _, buffer = buffer.split(b"\r\n\r\n", 1)  # GETs only: no body follows
            self.request.sendall(self.server.answer)


# -- the platforms, in a thread -------------------------------------------------------


class PlatformStub(ThreadingHTTPServer):
    """Meta, GA4 and TikTok on one port: the requests they got, each with its violations."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PlatformHandler)
        self.received: list[tuple[str, Recorded]] = []


class _PlatformHandler(BaseHTTPRequestHandler):
    """Answers as each platform does, told apart by path; each request is checked."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the platforms' servers
    checkers = {"meta": FakeMeta(), "ga4": FakeGA4(), "tiktok": FakeTikTok()}

    def log_message(self, *args) -> None:  # no access lines: they would carry tokens
        pass

    def do_POST(self) -> None:
        recorded = recorded_post(self)
        if recorded is None:
            return
        path, body = recorded.path, recorded.body
        platform = "ga4" if "/mp/collect" in path else "tiktok" if "open_api" in path else "meta"
        recorded.violations.extend(self.checkers[platform].check(recorded))
        self.server.received.append((platform, recorded))
        answer = {
            "meta": (200, {"events_received": len((body or {}).get("data", [])), "messages": [], "fbtrace_id": "x"}),
            "ga4": (204, None),
            "tiktok": (200, {"code": 0, "message": "OK", "request_id": "x", "data": {}}),
        }[platform]
        content = b"" if answer[1] is None else json.dumps(answer[1]).encode()
        self.send_response(answer[0])
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


@contextmanager
def serving(server):
    """Run C{server} in a daemon thread for the block."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


# -- the visitor ----------------------------------------------------------------------


def fetch(port: int, path: bytes = b"/fuzz", host: bytes = b"shop.example", extra: bytes = b"") -> bytes:
    """GET C{path} from tagd on a new connection, with C{Host: host} and C{extra} header
    lines (each ending in CRLF); the exact bytes of the response."""
    request = b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\n%s\r\n" % (path, host, FIREFOX, extra)
    deadline = time.monotonic() + TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
        connection.sendall(request)
        data = b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                length = re.search(rb"\r\nContent-Length: (\d+)", data[:end])
                if length and len(data) >= end + 4 + int(length[1]):
                    return data
            assert time.monotonic() < deadline, f"no complete response in {TIMEOUT}s: {data[:200]!r}"
            chunk = connection.recv(65536)
            if not chunk:
                return data
            data += chunk


def without_tagd_cookies(response: bytes) -> tuple[bytes, int]:
    """The response without the C{Set-Cookie} lines of tagd's own cookies, and their count."""
    head, sep, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept = [line for line in lines if not (line.startswith(b"Set-Cookie: ") and line[12:].startswith(TAGD_COOKIES))]
    return b"\r\n".join(kept) + sep + body, len(lines) - len(kept)


def parses(value: bytes) -> bool:
    """Whether tagd's parser takes C{value} (at the default cap), as the daemon will."""
    try:
        parse_tracking_header(value.strip(b" \t"))
    except TrackingHeaderError:
        return False
    return True


# -- the header values ----------------------------------------------------------------

# Any byte but CR and LF, which would end the header line and change the message itself.
_FIELD_BYTES = [b for b in range(256) if b not in (0x0D, 0x0A)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
event_names = st.sampled_from(["ViewContent", "Purchase", "PageView", "Lead", "my_event", "", "1x", "View Content"])
now = int(time.time())
# GA4 takes events at most 72 hours old, Meta and TikTok 7 days: a valid event is younger
# than both (the older ones are the subject of test_tracking_e2e's GA4 test).
oldest = now - 71 * 3600
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
valid_events = st.fixed_dictionaries(
    {"event_name": st.sampled_from(["ViewContent", "AddToCart", "Purchase", "PageView", "Lead", "Search"])
     | st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,39}", fullmatch=True)},
    optional={
        "event_id": st.text(min_size=1, max_size=30),
        "event_time": st.integers(min_value=oldest, max_value=now),
        "custom_data": st.dictionaries(st.text(max_size=12), scalars | st.text(max_size=40), max_size=6),
        "contents": st.lists(
            st.fixed_dictionaries(
                {"id": st.text(min_size=1, max_size=8) | st.integers(0, 10**6)},
                optional={"quantity": st.integers(1, 50),
                          "item_price": st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
                          "title": st.text(min_size=1, max_size=20), "category": st.text(min_size=1, max_size=10)},
            ),
            max_size=3,
        ),
        "user_data": st.dictionaries(
            st.sampled_from(["em", "ph", "fn", "ln", "db", "ge", "ct", "st", "zp", "country", "external_id"]),
            st.text(min_size=1, max_size=30) | st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=3),
            max_size=4,
        ),
    },
)  # fmt: skip
# Events with any field possibly of the wrong type or shape.
near_events = st.fixed_dictionaries(
    {"event_name": event_names | st.text(max_size=45) | json_values},
    optional={
        "event_id": st.text(max_size=20) | json_values,
        "event_time": st.integers(min_value=oldest, max_value=now + 600) | json_values,
        "custom_data": st.dictionaries(st.text(max_size=12), json_values, max_size=5) | json_values,
        "contents": st.lists(
            st.fixed_dictionaries(
                {"id": st.text(max_size=8) | st.integers()},
                optional={"quantity": st.integers(-2, 5) | json_values, "item_price": st.floats() | json_values,
                          "title": st.text(max_size=20)},
            )
            | json_values,
            max_size=3,
        )
        | json_values,
        "user_data": st.dictionaries(
            st.sampled_from(["em", "ph", "fn", "external_id", "zz"]),
            st.text(max_size=30) | st.lists(st.text(max_size=30), max_size=3) | json_values,
            max_size=4,
        ),
        "unexpected": json_values,
    },
)  # fmt: skip


def _json_bytes(value, ensure_ascii: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


header_values = st.one_of(
    st.lists(st.sampled_from(_FIELD_BYTES), max_size=200).map(bytes),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(_json_bytes, json_values, st.booleans()),
    st.builds(_json_bytes, valid_events | st.lists(valid_events, min_size=1, max_size=10), st.booleans()),
    st.builds(_json_bytes, near_events | st.lists(near_events, max_size=12), st.booleans()),
    # Values around and beyond the 8192-byte cap (the whole head stays under the proxy's
    # 64 KiB limit for a response head, beyond which the origin's answer is a 502).
    st.tuples(st.sampled_from([b"x", b'{"a":', b"[", b'{"event_name":"PageView"} ']), st.integers(1, 2200)).map(
        lambda pair: pair[0] * pair[1]
    ),
).map(lambda value: bytes(b for b in value if b not in (0x0D, 0x0A)))


# The bytes a field value may not hold (CTLs but HTAB); CR and LF never reach the origin's line.
_CONTROLS = frozenset(range(0x20)) - {0x09} | {0x7F}


# -- the tests ------------------------------------------------------------------------


@attrs.frozen
class Fuzzed:
    """A tagd run by twistd for fuzzing, and the servers around it."""

    port: int
    origin: RawOrigin
    platforms: PlatformStub


@contextmanager
def fuzzed_tagd(tmp_path) -> Iterator[Fuzzed]:
    """tagd as users run it (C{twistd -n tagd --config FILE}, all three platform
    destinations) in front of a L{RawOrigin}, sending to a L{PlatformStub}.  When the
    block is done, tagd must still be up and must have logged no traceback, no secret,
    and the platforms must have found nothing to object to."""
    with serving(RawOrigin()) as origin, serving(PlatformStub()) as platforms:
        base = f"http://127.0.0.1:{platforms.server_address[1]}"
        config = tmp_path / "tagd.toml"
        config.write_text(
            "[proxy]\n"
            'listen = "tcp:0:interface=127.0.0.1"\n'
            f'origin = "http://127.0.0.1:{origin.server_address[1]}"\n'
            + ADMIN_TOML
            + "\n[[destinations]]\n"
            f'type = "meta"\npixel_id = "1234"\naccess_token = "meta-token"\nendpoint = "{base}"\n'
            "\n[[destinations]]\n"
            f'type = "ga4"\nmeasurement_id = "G-TEST"\napi_secret = "ga-secret"\nendpoint = "{base}"\n'
            "\n[[destinations]]\n"
            f'type = "tiktok"\npixel_code = "CTEST123"\naccess_token = "tt-token"\nendpoint = "{base}"\n'
        )
        log = tmp_path / "tagd.log"
        with running([TWISTD, "-n", "tagd", "--config", str(config)], cwd=tmp_path, log=log) as process:
            port, _ = wait_until(lambda: tagd_up(process, log), 20, "up", interval=0.05)
            yield Fuzzed(port, origin, platforms)
            # Still up, still proxying, still tracking.
            origin.answer = origin_answer(b'{"event_name": "PageView", "event_id": "after-fuzz"}')
            response, cookies = without_tagd_cookies(fetch(port))
            assert response == origin_answer(None) and cookies > 0
            deadline = time.monotonic() + TIMEOUT
            while not any(b'"after-fuzz"' in r.raw for _, r in list(platforms.received)):
                assert time.monotonic() < deadline, "the last event did not reach the platforms"
                time.sleep(0.05)
            assert process.poll() is None
            text = read_log(log)  # what it logged while running; stopping is tested elsewhere
    assert "Traceback" not in text and "Unhandled" not in text, text[-3000:]
    assert "meta-token" not in text and "ga-secret" not in text and "tt-token" not in text
    violations = [(platform, str(v)) for platform, r in platforms.received for v in r.violations]
    assert violations == []


def test_fuzzed_tracking_headers_never_change_the_response_nor_stop_tagd(tmp_path):
    """hypothesis chooses tracking header values (arbitrary bytes, text, JSON, near-valid
    events, oversized values); for each, tagd's visitor gets the origin's exact bytes
    minus the tracking line, plus tagd's cookies exactly when the header parses (a 502
    when the value holds a control character, which no field value may); every
    platform request it makes meanwhile passes the fakes' checks; and afterwards the
    daemon still serves and has logged no traceback."""
    with fuzzed_tagd(tmp_path) as tagd:
        outcomes = {"parsed": 0, "refused": 0}

        @settings(
            max_examples=200,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(header_values)
        def one_response(value: bytes) -> None:
            tagd.origin.answer = origin_answer(value)
            response, cookies = without_tagd_cookies(fetch(tagd.port))
            if any(byte in _CONTROLS for byte in value):
                # RFC 9110 section 5.5: no field value holds a control character but
                # HTAB; a proxy refuses such a response rather than pass it on.
                assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and cookies == 0
                outcomes["refused"] += 1
                return
            assert response == origin_answer(None)
            expected = parses(value)
            outcomes["parsed" if expected else "refused"] += 1
            assert (cookies > 0) == expected, (cookies, value[:200])

        one_response()
    assert outcomes["parsed"] > 0 and outcomes["refused"] > 0, outcomes


def test_no_number_in_the_header_keeps_the_other_values_events_from_coming_out(tmp_path):
    """hypothesis puts any number Python's json reads (integers of any size, past its
    4300-digit limit too; floats, NaN and the infinities; exponents far past a float's
    range) wherever the tracking header has a number, in up to three values beside up to
    three well-formed ones on one response: every well-formed value's event still comes
    out (its event-id cookie is set), a value with such numbers gets its cookie exactly
    when the parser takes it, and tagd stays up without a traceback."""
    with fuzzed_tagd(tmp_path) as tagd:

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            st.lists(st.sampled_from(["ViewContent", "AddToCart", "Lead"]), min_size=1, max_size=3),
            st.lists(numbered_values("Probe"), max_size=3),
            st.randoms(use_true_random=False),
        )
        def one_response(good_names, probes, order) -> None:
            good = [
                json.dumps({"event_name": f"{name}{i}", "event_id": f"good-{i}"}).encode()
                for i, name in enumerate(good_names)
            ]
            probes = [probe.replace(b'"Probe"', b'"Probe%d"' % i) for i, probe in enumerate(probes)]
            values = good + probes
            order.shuffle(values)
            tagd.origin.answer = origin_answer(None).replace(
                b"X-Shop: fuzz\r\n", b"X-Shop: fuzz\r\n" + b"".join(b"Worker-Tracking: %s\r\n" % v for v in values)
            )
            response = fetch(tagd.port)
            head = response.partition(b"\r\n\r\n")[0]
            assert b"Worker-Tracking" not in head and response.endswith(BODY)
            for i, name in enumerate(good_names):
                assert b"\r\nSet-Cookie: tagd_event_id_%s%d=good-%d;" % (name.encode(), i, i) in head, head
            for probe in probes:
                name = re.search(rb'"event_name": "(Probe\d+)"', probe)
                has_cookie = name is not None and b"Set-Cookie: tagd_event_id_%s=" % name[1] in head
                assert has_cookie == parses(probe), probe[:300]

        one_response()


# Host headers a visitor may send: names under one-, two- and three-label public suffixes,
# with ports, upper case and a final dot; IPs; a public suffix itself; non-ASCII; junk.
_HOST_LABEL = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,10}", fullmatch=True)
host_headers = st.one_of(
    st.builds(
        lambda labels, suffix, dot, port: ".".join([*labels, suffix]).encode() + dot + port,
        st.lists(_HOST_LABEL, min_size=1, max_size=3),
        st.sampled_from(["com", "co.uk", "com.au", "github.io", "foo.kawasaki.jp", "CO.UK", "xn--p1ai"]),
        st.sampled_from([b"", b"."]),
        st.sampled_from([b"", b":8080", b":0", b":99999", b":x"]),
    ),
    st.sampled_from([b"co.uk", b"github.io", b"localhost", b"127.0.0.1", b"[::1]", b"[2001:db8::1]:443",
                     b"203.0.113.7:80", b"1.2.3", b"..", b"-a-.com", b"a..b.com", b"example.com;Domain=evil.com"]),
    st.text(min_size=1, max_size=20).map(lambda t: t.encode("utf-8")),
    st.lists(st.sampled_from([b for b in _FIELD_BYTES if b not in _CONTROLS]), min_size=1, max_size=40).map(bytes),
)  # fmt: skip
consent_cookies = st.sampled_from(
    [b"", b"_fbp=fb.1.1706540400000.1234567890; ", b"_fbc=fb.1.1706540400000.Click; ",
     b"_fbp=fb.1.1706540400000.1.Bg; _fbc=fb.9.1.x.toolongappendix; ", b"_ga=GA1.2.3.4; _fbp=%ff; "]
)  # fmt: skip


def test_hostile_hosts_never_make_a_bad_set_cookie(tmp_path):
    """hypothesis chooses the visitor's Host (and old or broken Meta cookies): whatever
    tagd answers, each Set-Cookie is one line holding one cookie with at most one Domain,
    and a Domain is a lower-case ASCII domain with a dot that the host, without port or
    final dot, is or is under; an IP, a public suffix or anything that is no ASCII host
    name gets host-only cookies; tagd stays up without a traceback."""
    with fuzzed_tagd(tmp_path) as tagd:
        tagd.origin.answer = origin_answer(b'{"event_name": "PageView"}')
        answered = {"tracked": 0}

        @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(host_headers, consent_cookies)
        def one_response(host: bytes, cookies: bytes) -> None:
            response = fetch(tagd.port, b"/fuzz?fbclid=IwAR-fuzz", host, b"Cookie: " + cookies + b"x=1\r\n")
            head = response.partition(b"\r\n\r\n")[0].split(b"\r\n")
            set_cookies = [line[12:] for line in head if line.startswith(b"Set-Cookie: ")]
            name = host.lower().rpartition(b":")[0] if re.fullmatch(rb"[^:\[\]]*:\d*", host) else host.lower()
            name = name.removesuffix(b".")
            for line in set_cookies:
                domains = re.findall(rb"; Domain=([^;]*)", line)
                assert len(domains) <= 1 and line.count(b";") >= 3, line
                if domains:
                    domain = domains[0]
                    assert re.fullmatch(rb"[a-z0-9-]+(\.[a-z0-9-]+)+", domain), line
                    assert name == domain or name.endswith(b"." + domain), (host, line)
                    assert not re.fullmatch(rb"[0-9.]+|\[.*", name), (host, line)
                    assert domain not in (b"co.uk", b"github.io", b"com.au"), (host, line)
            answered["tracked"] += bool(set_cookies)

        one_response()
    assert answered["tracked"] > 0
