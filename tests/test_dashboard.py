"""The dashboard over real loopback sockets: the live stream of events and platform
answers read by a raw HTTP client, its filters, heartbeat and clean-up, a reader that
stops reading, the counters, and the token for a browser (a login form, sessions and
their cookie)."""

from __future__ import annotations

import json

import attrs
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from conftest import FAKE_META_TOKEN, eventually, within
from tagd.admin import access
from tagd.admin.metrics import DROP_REASONS
from tagd.delivery.dispatcher import BACKLOG_EVERY
from tagd.delivery.outcomes import OUTCOMES
from test_admin import FIREFOX, TOKEN, get, meta_destination, samples, start_admin_tagd, value  # noqa: F401

DRY = {"type": "log", "name": "dry"}


class EventStream(Protocol):
    """A raw HTTP/1.1 client for one Server-Sent Events response: the head, the body
    undone from its chunks, and the messages in it."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._raw = bytearray()
        self.head: bytes | None = None
        self.body = bytearray()
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._raw += data
        if self.head is None:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, self._raw = bytes(self._raw[:end]), self._raw[end + 4 :]
        while self.chunked:
            size_end = self._raw.find(b"\r\n")
            if size_end < 0:
                return
            size = int(bytes(self._raw[:size_end]), 16)
            if len(self._raw) < size_end + 2 + size + 2:
                return
            self.body += self._raw[size_end + 2 : size_end + 2 + size]
            del self._raw[: size_end + 2 + size + 2]

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    @property
    def chunked(self) -> bool:
        return b"transfer-encoding: chunked" in (self.head or b"").lower()

    def header(self, name: bytes) -> list[bytes]:
        lines = (self.head or b"").split(b"\r\n")[1:]
        return [line.partition(b":")[2].strip() for line in lines if line.partition(b":")[0].lower() == name]

    @property
    def status(self) -> int:
        return int(self.head.split(b" ")[1])

    def entries(self) -> list[dict]:
        """The JSON of every complete C{data:} message so far."""
        messages = bytes(self.body).split(b"\n\n")[:-1]
        return [json.loads(m[len(b"data: ") :]) for m in messages if m.startswith(b"data: ")]


async def open_stream(port: int, path: bytes = b"/events", headers: bytes = b"") -> EventStream:
    """Connect to C{path} and wait for the response's head."""
    from twisted.internet import reactor

    request = b"GET %s HTTP/1.1\r\nHost: admin\r\nAccept: text/event-stream\r\n%s\r\n" % (path, headers)
    stream = await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), EventStream(request)))
    await eventually(lambda: stream.head is not None)
    return stream


def feed_of(tagd):
    """The feed the admin listener's dashboard follows."""
    return tagd.admin._root.events._feed


async def visit(http, tagd, event_id: str, event_name: str = "PageView") -> None:
    """A browser's page view that the origin marks with an event of that id."""
    header = json.dumps({"event_name": event_name, "event_id": event_id})
    code, _, _ = await get(http, tagd.url("/page"), User_Agent=FIREFOX, X_Track=header)
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_the_stream_shows_the_accepted_event_and_the_platforms_answer(start_admin_tagd, http, fake_meta):
    """A tracked page view through the proxy appears on an open stream twice: accepted,
    owed to the destination, then Meta's answer (success, HTTP 200, its id).  Nothing on
    the stream names the visitor's IP or user agent, nor Meta's token.  When the reader
    goes, its subscription goes too."""
    tagd = await start_admin_tagd(destinations=[meta_destination(fake_meta)])
    stream = await open_stream(tagd.admin_port)
    assert stream.status == 200
    assert stream.header(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert stream.header(b"cache-control") == [b"no-cache"]
    assert feed_of(tagd).subscribers == 1

    await visit(http, tagd, "order-77", "Purchase")
    entries = await eventually(lambda: len(stream.entries()) >= 2 and stream.entries())
    accepted, answer = entries
    assert {k: accepted[k] for k in ("outcome", "event_name", "event_id", "destinations")} == {
        "outcome": "accepted", "event_name": "Purchase", "event_id": "order-77", "destinations": ["meta"],
    }  # fmt: skip
    assert {k: answer[k] for k in ("outcome", "destination", "status", "count", "event_ids", "event_names")} == {
        "outcome": "success", "destination": "meta", "status": 200, "count": 1,
        "event_ids": ["order-77"], "event_names": ["Purchase"],
    }  # fmt: skip
    text = bytes(stream.body).decode()
    assert text.startswith("retry: ")
    for private in ("127.0.0.1", FIREFOX, "Firefox", FAKE_META_TOKEN, "access_token", "/page", "fbp", "client"):
        assert private not in text, private

    stream.transport.loseConnection()
    await within(stream.closed)
    await eventually(lambda: feed_of(tagd).subscribers == 0)


@pytest_twisted.ensureDeferred
async def test_a_refused_event_shows_the_platforms_message_and_its_dead_letter(start_admin_tagd, http, fake_meta):
    """Meta refuses an event: the stream shows the permanent answer with its HTTP status and
    Meta's message, then the dead letter with the same reason."""
    tagd = await start_admin_tagd(destinations=[meta_destination(fake_meta)])
    stream = await open_stream(tagd.admin_port)
    fake_meta.fake.inject(1, status=400, code=100)
    await visit(http, tagd, "bad-1")
    entries = await eventually(lambda: len(stream.entries()) >= 3 and stream.entries())
    refused, dead = entries[1:]
    assert (refused["outcome"], refused["status"], refused["event_ids"]) == ("permanent", 400, ["bad-1"])
    assert (dead["outcome"], dead["status"], dead["event_ids"]) == ("dead", None, ["bad-1"])
    assert refused["message"] and dead["message"] == refused["message"]
    stream.transport.loseConnection()
    await within(stream.closed)


@pytest_twisted.ensureDeferred
async def test_without_a_spool_the_direct_deliveries_are_streamed(start_admin_tagd, http, tmp_path):
    """When the spool cannot be opened, events go straight to the platforms, and the
    stream shows them as it does through the spool."""
    tagd = await start_admin_tagd(destinations=[DRY], spool={"path": str(tmp_path / "absent" / "spool.sqlite3")})
    stream = await open_stream(tagd.admin_port)
    await visit(http, tagd, "direct-1")
    entries = await eventually(lambda: len(stream.entries()) >= 2 and stream.entries())
    assert [(e["outcome"], e.get("destination"), e.get("event_id") or e["event_ids"]) for e in entries] == [
        ("accepted", None, "direct-1"), ("success", "dry", ["direct-1"]),
    ]  # fmt: skip
    stream.transport.loseConnection()
    await within(stream.closed)


@pytest_twisted.ensureDeferred
async def test_a_new_stream_starts_with_the_recent_entries_filtered(start_admin_tagd, http, fake_meta):
    """Entries from before the connection come first; C{destination=} and C{outcome=}
    select by destination (an accepted event belongs to each of its destinations) and
    by outcome."""
    tagd = await start_admin_tagd(destinations=[meta_destination(fake_meta), DRY])
    await visit(http, tagd, "e1")
    await visit(http, tagd, "e2")

    def delivered(name: str) -> float:
        return tagd.metrics.value("events_delivered", destination=name, outcome="success")

    await eventually(lambda: delivered("meta") == delivered("dry") == 2)

    async def seen(query: bytes, count: int) -> list[tuple]:
        """(outcome, destination, event id) for each event the replay names, once C{count}."""
        stream = await open_stream(tagd.admin_port, b"/events" + query)

        def named():
            return sorted(
                (e["outcome"], e.get("destination"), event_id)
                for e in stream.entries()
                for event_id in ([e["event_id"]] if "event_id" in e else e["event_ids"])
            )

        await eventually(lambda: len(named()) >= count)
        stream.transport.loseConnection()
        await within(stream.closed)
        return named()

    assert len(await seen(b"", 6)) == 6
    assert await seen(b"?destination=dry&outcome=success", 2) == [("success", "dry", "e1"), ("success", "dry", "e2")]
    assert await seen(b"?outcome=accepted", 2) == [("accepted", None, "e1"), ("accepted", None, "e2")]
    assert await seen(b"?destination=meta", 4) == [
        ("accepted", None, "e1"), ("accepted", None, "e2"), ("success", "meta", "e1"), ("success", "meta", "e2"),
    ]  # fmt: skip
    stream = await open_stream(tagd.admin_port, b"/events?destination=tiktok")
    await eventually(lambda: stream.body.startswith(b"retry: ") and stream.body.endswith(b"\n\n"))
    assert stream.entries() == []
    stream.transport.loseConnection()
    await within(stream.closed)
    await eventually(lambda: feed_of(tagd).subscribers == 0)


@pytest_twisted.ensureDeferred
async def test_an_idle_stream_gets_heartbeats(start_admin_tagd, monkeypatch):
    """With nothing to tell, a comment line goes out every heartbeat interval, so that a
    proxy in between does not close the stream as idle."""
    import tagd.admin.dashboard

    monkeypatch.setattr(tagd.admin.dashboard, "HEARTBEAT", 0.05)
    admin = await start_admin_tagd()
    stream = await open_stream(admin.admin_port)
    await eventually(lambda: stream.body.count(b": keep-alive\n\n") >= 2)
    assert stream.entries() == []
    stream.transport.loseConnection()
    await within(stream.closed)


@pytest_twisted.ensureDeferred
async def test_stopping_tagd_ends_open_streams(start_admin_tagd):
    """At shutdown the admin listener ends its streams rather than leaving them open."""
    tagd = await start_admin_tagd()
    stream = await open_stream(tagd.admin_port)
    await within(tagd.service.stopService())
    await within(stream.closed)
    assert feed_of(tagd).subscribers == 0


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_reading_is_cut_off(start_admin_tagd):
    """A reader that reads nothing while entries keep coming is disconnected once about
    L{MAX_BEHIND} bytes wait for it beyond the socket's buffers, instead of tagd keeping
    every entry for it; a reader that keeps up on the same feed stays."""
    from fakes import make_event
    from tagd.admin.dashboard import MAX_BEHIND

    tagd = await start_admin_tagd()
    slow = await open_stream(tagd.admin_port)
    fast = await open_stream(tagd.admin_port)
    slow.transport.pauseProducing()
    feed = feed_of(tagd)
    batch = [make_event(event_id="x" * 400 + str(n)) for n in range(20)]  # 8 KiB an entry
    published = 0
    # The kernel's buffers on loopback take a few MiB; 64 MiB is far beyond them.
    while feed.subscribers == 2 and published * 8192 < 64 * 1024 * 1024:
        for _ in range(32):
            feed.delivered("meta", "success", batch, 200)
        published += 32
        await eventually(lambda: fast.body.count(b"\n\n") == 1 + published, timeout=10)
    assert feed.subscribers == 1, "the slow reader was never cut off"
    assert published * 8192 > MAX_BEHIND
    slow.transport.resumeProducing()
    await within(slow.closed)
    assert slow.body.count(b"\n\n") < published
    assert not fast.closed.called
    fast.transport.loseConnection()
    await within(fast.closed)
    await eventually(lambda: feed.subscribers == 0)


@pytest_twisted.ensureDeferred
async def test_stats_json_holds_the_metrics_counts(start_admin_tagd, http, fake_meta):
    """C{/stats.json} gives the numbers C{/metrics} has, grouped for the page: answers by
    status, in flight, accepted, outcomes by destination, drops, the spool."""
    tagd = await start_admin_tagd(destinations=[meta_destination(fake_meta)])
    await visit(http, tagd, "s1")
    assert (await get(http, tagd.url("/page"), User_Agent="curl/8.5.0", X_Track="{}"))[0] == 200
    await eventually(lambda: tagd.metrics.value("events_delivered", destination="meta", outcome="success") == 1)
    # The backlog is a look at the spool every few seconds: one taken while the event was
    # owed says so until the next.
    await eventually(lambda: backlog_gauge(tagd) in (None, 0), timeout=BACKLOG_EVERY + 5)
    code, headers, body = await get(http, tagd.admin_url("/stats.json"))
    assert code == 200 and headers.getRawHeaders("content-type") == ["application/json"]
    stats = json.loads(body)
    metrics = samples((await get(http, tagd.admin_url("/metrics")))[2])
    # Every outcome and reason is listed from the start, at 0 until it happens.
    assert stats == {
        "destinations": ["meta"],
        "outcomes": ["success", "transient", "throttle", "permanent", "auth", "expired", "dead"],
        "requests": {"200": value(metrics, "tagd_requests_total", status="200")},
        "in_flight": 0,
        "accepted": 1,
        "delivered": {"meta": {outcome: int(outcome == "success") for outcome in OUTCOMES}},
        "state": {"meta": {"up": 1, "backlog": 0, "oldest_seconds": 0}},
        "dropped": {reason: int(reason == "bot") for reason in DROP_REASONS},
        "spool": {"undelivered": 0, "buffered": 0, "healthy": 1},
        "match_keys": stats["match_keys"],
    }
    assert stats["requests"]["200"] == 2
    # The page view Meta got: IP, user agent and the _fbp tagd set, no e-mail or click.
    [row] = stats["match_keys"]
    assert (row["destination"], row["event"], row["events"]) == ("meta", "PageView", 1)
    shares = {key["key"]: key["percent"] for key in row["keys"]}
    assert shares == {"email": 0, "phone": 0, "external_id": 0, "fbc": 0, "fbp": 100, "client_ip": 100, "user_agent": 100}
    assert [key["key"] for key in row["keys"]][:4] == ["email", "external_id", "fbc", "phone"]
    assert row["keys"][0]["carry"] == "an e-mail" and "user_data.em" in row["keys"][0]["advice"]


@pytest_twisted.ensureDeferred
async def test_the_page_is_served_with_a_strict_policy(start_admin_tagd, http):
    """C{/} is the HTML page; its policy allows its own script and connections back to
    tagd only, so nothing is loaded from elsewhere."""
    tagd = await start_admin_tagd()
    code, headers, body = await get(http, tagd.admin_url("/"))
    assert code == 200 and "<title>tagd</title>" in body and "EventSource" in body
    assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    (policy,) = headers.getRawHeaders("content-security-policy")
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'sha256-" in policy
    assert "http" not in body.replace("http-equiv", "")  # no URL to fetch anything from


# -- the token, for a browser -------------------------------------------------------------


async def post_login(http, tagd, token: str):
    response = await within(
        http.post(
            tagd.admin_url("/login"),
            data=f"token={token}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        )
    )
    await within(response.text())
    return response


async def log_in(http, tagd) -> str:
    """Log in with the token; the C{Cookie} header's value for the session."""
    response = await post_login(http, tagd, TOKEN)
    assert response.code == 303
    (cookie,) = response.headers.getRawHeaders("set-cookie")
    return cookie.split(";")[0]


async def log_out(http, tagd, pair: str):
    response = await within(http.post(tagd.admin_url("/logout"), headers={"Cookie": pair}, allow_redirects=False))
    await within(response.text())
    return response


async def opens(http, tagd, pair: str) -> bool:
    """Whether the session cookie C{pair} opens the dashboard and C{/metrics}; when it
    does not, the dashboard asks to log in."""
    page, _, body = await get(http, tagd.admin_url("/"), Cookie=pair)
    metrics = (await get(http, tagd.admin_url("/metrics"), Cookie=pair))[0]
    assert (page, metrics) in ((200, 200), (401, 401))
    assert ('action="login"' in body) == (page == 401)
    return page == 200


@pytest_twisted.ensureDeferred
async def test_with_a_token_a_browser_logs_in_for_a_cookie(start_admin_tagd, http, log_events):
    """With a token, the page, the counters and the stream answer 401 without it (the page
    with a login form), 200 with the bearer header, and 200 with the cookie that posting
    the token to C{/login} sets: C{HttpOnly}, C{SameSite=Strict}, C{Max-Age} the
    session's lifetime, not the token itself.  A wrong token, or the token in the query
    string, opens nothing; no log line holds the token or the session id."""
    tagd = await start_admin_tagd(admin={"token": TOKEN})
    for path in ("/", "/stats.json", "/events", f"/?token={TOKEN}", f"/events?token={TOKEN}"):
        assert (await get(http, tagd.admin_url(path)))[0] == 401, path
    code, headers, body = await get(http, tagd.admin_url("/"))
    assert 'action="login"' in body and 'type="password"' in body
    assert (await get(http, tagd.admin_url("/stats.json"), token=TOKEN))[0] == 200

    wrong = await post_login(http, tagd, TOKEN + "x")
    assert wrong.code == 401 and wrong.headers.getRawHeaders("set-cookie") is None
    response = await post_login(http, tagd, TOKEN)
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["./"]
    (cookie,) = response.headers.getRawHeaders("set-cookie")
    assert TOKEN not in cookie
    pair, *attributes = [part.strip() for part in cookie.split(";")]
    assert pair.startswith("tagd_admin=")
    lifetime = f"max-age={access.SESSION_LIFETIME}"
    assert {a.lower() for a in attributes} == {"path=/", lifetime, "httponly", "samesite=strict"}

    code, _, body = await get(http, tagd.admin_url("/"), Cookie=pair)
    assert code == 200 and "<title>tagd</title>" in body and 'action="logout"' in body
    assert (await get(http, tagd.admin_url("/stats.json"), Cookie=pair))[0] == 200
    assert (await get(http, tagd.admin_url("/metrics"), Cookie="tagd_admin=" + TOKEN))[0] == 401
    stream = await open_stream(tagd.admin_port, headers=b"Cookie: %s\r\n" % pair.encode())
    assert stream.status == 200 and stream.header(b"content-type") == [b"text/event-stream; charset=utf-8"]
    stream.transport.loseConnection()
    await within(stream.closed)
    session = pair.partition("=")[2]
    assert not [e for e in log_events if TOKEN in repr(e) or session in repr(e)]


@pytest_twisted.ensureDeferred
async def test_each_login_is_a_session_of_its_own_until_its_logout(start_admin_tagd, http):
    """Two logins get two random ids, each opening every path; logging out ends that
    session only and has the browser drop its cookie; a second logout is harmless."""
    tagd = await start_admin_tagd(admin={"token": TOKEN})
    first, second = await log_in(http, tagd), await log_in(http, tagd)
    assert first != second
    assert await opens(http, tagd, first) and await opens(http, tagd, second)

    response = await log_out(http, tagd, first)
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["./"]
    (cookie,) = response.headers.getRawHeaders("set-cookie")
    assert [part.strip().lower() for part in cookie.split(";")][:3] == ["tagd_admin=", "path=/", "max-age=0"]
    assert not await opens(http, tagd, first)
    assert await opens(http, tagd, second)
    assert (await log_out(http, tagd, first)).code == 303
    assert (await get(http, tagd.admin_url("/logout")))[0] == 405  # a link cannot log out


@pytest_twisted.ensureDeferred
async def test_an_overlong_login_form_is_refused_unread(start_admin_tagd, http):
    """A login body longer than any form (the token padded past 4 KiB) gets 413 and no
    session, even with the right token first."""
    tagd = await start_admin_tagd(admin={"token": TOKEN})
    response = await post_login(http, tagd, TOKEN + "&pad=" + "x" * 5000)
    assert response.code == 413 and response.headers.getRawHeaders("set-cookie") is None


@pytest_twisted.ensureDeferred
async def test_without_a_token_there_is_no_session_to_end(start_admin_tagd, http):
    tagd = await start_admin_tagd()
    code, _, body = await get(http, tagd.admin_url("/"))
    assert code == 200 and 'action="logout"' not in body
    assert (await log_out(http, tagd, "tagd_admin=x")).code == 404


@attrs.define
class ClockedAdmin:
    """An admin listener with a token whose sessions are timed by C{clock}."""

    clock: Clock
    service: object

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.service.port.getHost().port}{path}"


@pytest_twisted.async_yield_fixture
async def clocked_admin(reactor):
    """The admin listener on a real loopback port, its sessions on a fake clock."""
    from tagd.admin.listener import AdminRoot, AdminService, Health
    from tagd.admin.feed import Feed
    from tagd.admin.metrics import Metrics

    clock = Clock()
    health = Health(serving=lambda: True, spool=None, spool_wanted=False)
    root = AdminRoot(Metrics(), health, Feed(clock.seconds), TOKEN, clock)
    service = AdminService(reactor, "tcp:0:interface=127.0.0.1", root)
    service.startService()
    await eventually(lambda: service.port is not None)
    yield ClockedAdmin(clock, service)
    await within(service.stopService())


@pytest_twisted.ensureDeferred
async def test_a_session_ends_after_its_lifetime_whatever_the_cookie_says(clocked_admin, http):
    """A session opens the admin paths until its lifetime from the login is up, then
    the page asks to log in again and C{/metrics} answers 401, with the same cookie."""
    pair = await log_in(http, clocked_admin)
    clocked_admin.clock.advance(access.SESSION_LIFETIME - 1)
    assert await opens(http, clocked_admin, pair)
    later = await log_in(http, clocked_admin)
    clocked_admin.clock.advance(1)
    assert not await opens(http, clocked_admin, pair)
    assert await opens(http, clocked_admin, later)


@pytest_twisted.ensureDeferred
async def test_past_the_bound_a_login_ends_the_oldest_session(clocked_admin, http, monkeypatch):
    """Logins cannot grow tagd's memory: past L{MAX_SESSIONS} the oldest session ends."""
    monkeypatch.setattr(access, "MAX_SESSIONS", 2)
    oldest, older, newest = [await log_in(http, clocked_admin) for _ in range(3)]
    assert [await opens(http, clocked_admin, pair) for pair in (oldest, older, newest)] == [False, True, True]


def backlog_gauge(tagd) -> float | None:
    """C{tagd_spool_backlog_events} of the meta destination, as the dispatcher's last look read it."""
    return tagd.metrics.registry.get_sample_value("tagd_spool_backlog_events", {"destination": "meta"})
