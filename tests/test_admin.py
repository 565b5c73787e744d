"""The admin listener over real loopback sockets: /metrics in Prometheus' text format after
real proxied requests and deliveries, the bearer token, /healthz while serving, with a
broken or missing spool and during shutdown, and the [admin] table itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from conftest import (
    FAKE_META_TOKEN,
    _listening_port,
    eventually,
    exchange,
    raw_request,
    toml_table,
    within,
)
from helpers import free_port

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
TOKEN = "s3cret-Admin_token"


@attrs.define
class AdminTagd:
    """A running tagd and its admin listener."""

    service: object
    port: int
    admin: object  # tagd.admin.listener.AdminService
    metrics: object  # tagd.admin.metrics.Metrics

    @property
    def admin_port(self) -> int:
        return self.admin.port.getHost().port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"


@pytest_twisted.async_yield_fixture
async def start_admin_tagd(reactor, origin, tmp_path):
    """Start tagd with an admin listener on a free loopback port.

    C{await start_admin_tagd(admin={...}, destinations=[...], proxy={...}, delivery={...},
    spool={...})}: keys of those tables; the spool is in the test's folder unless given.
    """
    from tagd.admin.listener import AdminService
    from tagd.daemon.config import parse_config
    from tagd.admin.metrics import Metrics
    from tagd.daemon.tap import build_service

    started = []

    async def start(*, admin=None, destinations=(), proxy=None, delivery=None, spool=None) -> AdminTagd:
        text = toml_table(
            "[proxy]",
            {
                "listen": "tcp:0:interface=127.0.0.1",
                "origin": f"http://127.0.0.1:{origin.port}",
                "connect_timeout": 2,
                "response_timeout": 5,
                **(proxy or {}),
            },
        )
        text += toml_table("[admin]", {"listen": "tcp:0:interface=127.0.0.1", **(admin or {})})
        text += toml_table("[spool]", spool or {"path": str(tmp_path / f"spool-{len(started)}.sqlite3")})
        text += toml_table("[delivery]", delivery or {})
        text += "".join(toml_table("[[destinations]]", d) for d in destinations)
        metrics = Metrics()
        service = build_service(parse_config(text, "(test)"), reactor, metrics)
        service.startService()
        started.append(service)
        port = await within(_listening_port(service))
        (admin_service,) = [s for s in service if isinstance(s, AdminService)]
        return AdminTagd(service, port, admin_service, metrics)

    yield start
    for service in started:
        if service.running:
            await within(service.stopService())


async def get(http, url: str, token: str | None = None, **headers: str):
    """GET C{url}; the status, the headers and the body as text."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = await within(http.get(url, headers={k.replace("_", "-"): v for k, v in headers.items()}))
    return response.code, response.headers, await within(response.text())


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels, parsed by prometheus_client."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float | None:
    """The sample C{name} with exactly C{labels}, or None when there is none."""
    return parsed.get((name, frozenset(labels.items())))


def meta_destination(fake_meta) -> dict:
    """A C{[[destinations]]} table for the fake Meta."""
    return {"type": "meta", "name": "meta", "pixel_id": "1234", "access_token": FAKE_META_TOKEN,
            "endpoint": fake_meta.base}  # fmt: skip


async def tracked_visit(http, tagd: AdminTagd) -> None:
    """A browser's page view that the origin marks with a tracking header."""
    header = json.dumps({"event_name": "PageView"})
    code, _, _ = await get(http, tagd.url("/page"), User_Agent=FIREFOX, X_Track=header)
    assert code == 200


# -- /metrics -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_latency_deliveries_spool_and_drops(start_admin_tagd, http, fake_meta):
    """After real requests and deliveries /metrics parses as Prometheus text and holds each
    metric with the values those requests make: requests by status, the origin latency
    histogram, delivery outcomes (a retry, a dead letter), the spool depth, drops by reason."""
    destination = {**meta_destination(fake_meta), "timeout": 5}
    tagd = await start_admin_tagd(destinations=[destination], delivery={"backoff_base": 0.05})
    meta = fake_meta.fake

    # One event answered late: while Meta holds it, the spool owes it.
    meta.inject(1, delay=2.0)
    await tracked_visit(http, tagd)
    await eventually(lambda: len(meta.requests) == 1)
    code, headers, text = await get(http, tagd.admin_url("/metrics"))
    assert code == 200
    assert headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    assert value(samples(text), "tagd_spool_undelivered_events") == 1
    await eventually(lambda: tagd.metrics.value("events_delivered", destination="meta", outcome="success") == 1)

    # One event that fails once, transiently, and is retried; one that Meta refuses.
    meta.inject(1, status=500, code=2)
    await tracked_visit(http, tagd)
    await eventually(lambda: tagd.metrics.value("events_delivered", destination="meta", outcome="success") == 2)
    meta.inject(1, status=400, code=100)
    await tracked_visit(http, tagd)
    await eventually(lambda: tagd.metrics.value("events_delivered", destination="meta", outcome="dead") == 1)

    # A bot's page view, a missing page, an origin error.
    assert (await get(http, tagd.url("/page"), User_Agent="curl/8.5.0", X_Track="{}"))[0] == 200
    assert (await get(http, tagd.url("/status/404")))[0] == 404
    assert (await get(http, tagd.url("/status/500")))[0] == 500

    code, _, text = await get(http, tagd.admin_url("/metrics"))
    assert code == 200
    parsed = samples(text)
    assert value(parsed, "tagd_requests_total", status="200") == 4
    assert value(parsed, "tagd_requests_total", status="404") == 1
    assert value(parsed, "tagd_requests_total", status="500") == 1
    assert value(parsed, "tagd_requests_in_flight") == 0

    count = value(parsed, "tagd_origin_latency_seconds_count")
    assert count == 6
    assert 0 < value(parsed, "tagd_origin_latency_seconds_sum") < 6 * 5
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in parsed.items()
        if name == "tagd_origin_latency_seconds_bucket"
    )  # fmt: skip
    assert len(buckets) == 12 and buckets[-1] == (float("inf"), count)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    # No answer can take longer than the response timeout of 5 s.
    assert value(parsed, "tagd_origin_latency_seconds_bucket", le="5.0") == count

    assert value(parsed, "tagd_events_accepted_total") == 3
    for outcome, expected in [("success", 2), ("transient", 1), ("permanent", 1), ("dead", 1)]:
        assert value(parsed, "tagd_events_delivered_total", destination="meta", outcome=outcome) == expected
    assert value(parsed, "tagd_delivery_retries_total", destination="meta") == 1
    assert value(parsed, "tagd_tracking_dropped_total", reason="bot") == 1
    assert value(parsed, "tagd_spool_undelivered_events") == 0
    assert value(parsed, "tagd_spool_buffered_events") == 0
    assert value(parsed, "tagd_spool_healthy") == 1


@pytest_twisted.ensureDeferred
async def test_every_drop_reason_and_delivery_outcome_is_listed_at_zero(start_admin_tagd, http, fake_meta):
    """Before any traffic /metrics lists every drop reason and, for each destination, every
    delivery outcome and its retries at 0, so that a rate alert has a series from the start."""
    from tagd.admin.metrics import DROP_REASONS
    from tagd.delivery.outcomes import OUTCOMES

    tagd = await start_admin_tagd(destinations=[meta_destination(fake_meta)])
    parsed = samples((await get(http, tagd.admin_url("/metrics")))[2])
    assert {reason: value(parsed, "tagd_tracking_dropped_total", reason=reason) for reason in DROP_REASONS} == {
        reason: 0 for reason in DROP_REASONS
    }
    outcomes = {o: value(parsed, "tagd_events_delivered_total", destination="meta", outcome=o) for o in OUTCOMES}
    assert outcomes == {outcome: 0 for outcome in OUTCOMES}
    assert value(parsed, "tagd_delivery_retries_total", destination="meta") == 0


@pytest_twisted.ensureDeferred
async def test_tagds_own_502_is_counted_without_latency(start_admin_tagd, http):
    """An origin that cannot be reached: the visitor's 502 is counted by status, and the
    latency histogram stays empty, since no origin answered."""
    tagd = await start_admin_tagd(proxy={"origin": f"http://127.0.0.1:{free_port()}"})
    assert (await get(http, tagd.url("/")))[0] == 502
    parsed = samples((await get(http, tagd.admin_url("/metrics")))[2])
    assert value(parsed, "tagd_requests_total", status="502") == 1
    assert value(parsed, "tagd_origin_latency_seconds_count") == 0
    assert value(parsed, "tagd_origin_latency_seconds_sum") == 0


def test_latency_buckets_are_exported_cumulatively():
    """Each bucket of the histogram counts the answers at or below its bound, as Prometheus
    defines it, from the proxy's per-bucket counts."""
    from tagd.admin.listener import ProxyCollector
    from tagd.proxy.resource import ProxyResource

    proxy = ProxyResource(
        reactor=Clock(), client=None, resolver=None, client_ip_header="CF-Connecting-IP",
        tracking_header="Worker-Tracking", response_timeout=1.0, on_tracking=None,
    )  # fmt: skip
    for seconds in (0.001, 0.005, 0.3, 0.3, 99.0):
        proxy.count(200, seconds)
    proxy.count(504)
    families = {f.name: f for f in ProxyCollector(proxy).collect()}
    assert [(s.labels, s.value) for s in families["tagd_requests"].samples] == [({"status": "200"}, 5), ({"status": "504"}, 1)]
    buckets = {s.labels["le"]: s.value for s in families["tagd_origin_latency_seconds"].samples if s.name.endswith("_bucket")}
    assert (buckets["0.005"], buckets["0.25"], buckets["0.5"], buckets["10.0"], buckets["+Inf"]) == (2, 2, 4, 4, 5)
    totals = {s.name: s.value for s in families["tagd_origin_latency_seconds"].samples}
    assert totals["tagd_origin_latency_seconds_count"] == 5
    assert totals["tagd_origin_latency_seconds_sum"] == pytest.approx(99.606)


# -- the token ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bearer_token_is_required_when_set(start_admin_tagd, http):
    """With a token every admin path answers 401 without it, with a wrong one or another
    scheme, and 200 with the right one (the scheme in any letter case)."""
    tagd = await start_admin_tagd(admin={"token": TOKEN})
    for path in ("/metrics", "/healthz", "/", "/nothing"):
        code, headers, body = await get(http, tagd.admin_url(path))
        assert code == 401, path
        assert headers.getRawHeaders("www-authenticate") == ['Bearer realm="tagd admin"']
        assert "tagd_" not in body
        assert (await get(http, tagd.admin_url(path), token=TOKEN + "x"))[0] == 401
        assert (await get(http, tagd.admin_url(path), token=TOKEN[:-1]))[0] == 401
        assert (await get(http, tagd.admin_url(path), Authorization=f"Basic {TOKEN}"))[0] == 401
    code, _, body = await get(http, tagd.admin_url("/metrics"), token=TOKEN)
    assert code == 200 and "tagd_requests_in_flight" in body
    assert (await get(http, tagd.admin_url("/healthz"), Authorization=f"bearer {TOKEN}"))[::2] == (200, "ok\n")
    assert (await get(http, tagd.admin_url("/nothing"), token=TOKEN))[0] == 404


@pytest_twisted.ensureDeferred
async def test_no_token_means_open(start_admin_tagd, http):
    """Without a token (the default) the admin paths answer anyone who can reach them."""
    tagd = await start_admin_tagd()
    assert (await get(http, tagd.admin_url("/metrics")))[0] == 200
    code, _, body = await get(http, tagd.admin_url("/"))
    assert code == 200 and "<title>tagd</title>" in body


def _head_and_body(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """A response's status line, its headers by lower-cased name, and what followed the head."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return status, headers, body


@pytest_twisted.ensureDeferred
async def test_head_answers_get_s_head_on_every_path_with_no_body_and_no_warning(start_admin_tagd, log_events):
    """An uptime check's C{HEAD /healthz}, and HEAD on every other admin path (the login
    page, a refusal, C{/login} that only takes a POST, a path that is none), gets the head
    GET gets, its Content-Length included, then no body; and nothing is logged about it."""
    tagd = await start_admin_tagd(admin={"token": TOKEN}, destinations=[{"type": "log", "name": "dry"}])
    bearer = [(b"Authorization", b"Bearer " + TOKEN.encode()), (b"Connection", b"close")]
    anonymous = [(b"Connection", b"close")]
    asked = [(path, bearer) for path in (b"/", b"/healthz", b"/metrics", b"/stats.json", b"/nothing")]
    asked += [(path, anonymous) for path in (b"/", b"/healthz", b"/login", b"/logout")]
    for path, headers in asked:
        got_status, got, page = _head_and_body(await exchange(tagd.admin_port, raw_request(b"GET", path, headers)))
        status, heads, body = _head_and_body(await exchange(tagd.admin_port, raw_request(b"HEAD", path, headers)))
        assert (status, body) == (got_status, b""), path
        assert heads[b"content-type"] == got[b"content-type"], path
        assert b"transfer-encoding" not in heads, path
        if path in (b"/metrics", b"/stats.json"):  # their figures may move between the two
            assert int(heads[b"content-length"]) > 0, path
        elif b"content-length" in got:  # Twisted's 404 page is streamed, without a length
            assert heads[b"content-length"] == got[b"content-length"] == b"%d" % len(page), path
    said = [e for e in log_events if "HEAD" in str(e.get("log_format", ""))]
    assert said == []


# -- /healthz ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_ok_while_serving_with_a_spool(start_admin_tagd, http):
    """Serving, with a writable spool: 200 ok."""
    tagd = await start_admin_tagd(destinations=[{"type": "log", "name": "dry"}])
    code, headers, body = await get(http, tagd.admin_url("/healthz"))
    assert (code, body) == (200, "ok\n")
    assert headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_healthz_ok_without_destinations(start_admin_tagd, http):
    """No destination needs a spool, so serving alone is healthy."""
    tagd = await start_admin_tagd()
    assert (await get(http, tagd.admin_url("/healthz")))[::2] == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_healthz_503_while_the_spool_cannot_be_written(start_admin_tagd, http):
    """A spool whose writes fail (healthy false) makes /healthz 503 with the reason, and
    200 again once it writes."""
    tagd = await start_admin_tagd(destinations=[{"type": "log", "name": "dry"}])
    # The delivery service holds the spool; make its writes look failed.
    (spool,) = [s._spool for s in tagd.service if hasattr(s, "_spool")]
    spool.healthy, spool.last_error = False, "the disk is full (database or disk is full)"
    code, _, body = await get(http, tagd.admin_url("/healthz"))
    assert (code, body) == (503, "the spool cannot be written: the disk is full (database or disk is full)\n")
    parsed = samples((await get(http, tagd.admin_url("/metrics")))[2])
    assert value(parsed, "tagd_spool_healthy") == 0
    spool.healthy, spool.last_error = True, None
    assert (await get(http, tagd.admin_url("/healthz")))[::2] == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_healthz_503_when_the_spool_could_not_be_opened(start_admin_tagd, http, tmp_path):
    """A spool that cannot be opened (its folder does not exist): tagd proxies and sends
    events directly, and /healthz says 503, since nothing it accepts is kept."""
    tagd = await start_admin_tagd(
        destinations=[{"type": "log", "name": "dry"}],
        spool={"path": str(tmp_path / "absent" / "spool.sqlite3")},
    )
    assert (await get(http, tagd.url("/page")))[0] == 200
    code, _, body = await get(http, tagd.admin_url("/healthz"))
    assert code == 503
    assert body.startswith("no spool: it could not be opened at start-up")
    assert "tagd_spool_" not in (await get(http, tagd.admin_url("/metrics")))[2]


@pytest_twisted.ensureDeferred
async def test_healthz_503_during_shutdown_until_the_admin_listener_stops_last(start_admin_tagd, http, connect):
    """Once shutdown starts, while a visitor's slow response still drains, /healthz answers
    503 (the admin listener stops after the visitors, not before); the visitor gets the
    whole response, and at the end the admin port is closed."""
    tagd = await start_admin_tagd()
    visitor = await connect(tagd.port)
    response = visitor.request(b"GET", b"/slow?parts=20&delay=0.05")
    await eventually(lambda: tagd.metrics.registry.get_sample_value("tagd_requests_in_flight") == 1)
    healthz, admin_port = tagd.admin_url("/healthz"), tagd.admin_port
    stopping = tagd.service.stopService()
    code, _, body = await get(http, healthz)
    assert (code, body) == (503, "shutting down: new visitors are not accepted\n")
    assert bytes((await within(response)).body) == b"slow " * 20
    await within(stopping)
    with pytest.raises(ConnectionRefusedError):
        await exchange(admin_port, raw_request(b"GET", b"/healthz"))


# -- the listener itself -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_taken_admin_port_is_logged_and_visitors_are_still_served(start_admin_tagd, http, reactor, log_events):
    """When the admin endpoint cannot be bound, tagd says why in one error line and goes on
    proxying: the shop does not depend on its monitoring."""
    from twisted.internet.protocol import Factory

    taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    try:
        port = taken.getHost().port
        tagd = await start_admin_tagd(admin={"listen": f"tcp:{port}:interface=127.0.0.1"})
        assert (await get(http, tagd.url("/page")))[0] == 200
        assert tagd.admin.port is None
        errors = [e for e in log_events if e.get("log_namespace") == "tagd.admin.listener" and e["log_level"].name == "error"]
        assert len(errors) == 1
        assert f"tcp:{port}:interface=127.0.0.1" in errors[0]["listen"]
        assert "Address already in use" in errors[0]["reason"]
    finally:
        await taken.stopListening()


# -- the [admin] table ---------------------------------------------------------------------


def test_admin_table_defaults_and_values():
    """Without an [admin] table the listener is on loopback port 9100 with no token; the
    keys set in the table are taken as given."""
    from tagd.daemon.config import parse_config

    default = parse_config("", "(test)").admin
    assert (default.listen, default.token) == ("tcp:9100:interface=127.0.0.1", "")
    admin = parse_config(f'[admin]\nlisten = "unix:/run/tagd-admin.sock"\ntoken = "{TOKEN}"\n', "(test)").admin
    assert (admin.listen, admin.token) == ("unix:/run/tagd-admin.sock", TOKEN)
    assert TOKEN not in repr(admin)


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ('[admin]\nlisten = "nonsense:1"\n', "admin.listen", "not a Twisted server endpoint"),
        ('[admin]\nlisten = "tcp:70000"\n', "admin.listen", "outside 0-65535"),
        (f'[admin]\ntoken = "{TOKEN} x"\n', "admin.token", "printable ASCII without spaces"),
        (f'[admin]\ntoken = "{TOKEN}\\n"\n', "admin.token", "printable ASCII without spaces"),
        ("[admin]\ntoken = 1234\n", "admin.token", "must be a string"),
        ("[admin]\nport = 9100\n", "admin.port", "unknown key"),
    ],
)
def test_bad_admin_values_name_the_key_and_never_the_token(text, key, reason):
    """A bad [admin] value stops start-up with an error naming the key; the token's value is
    never quoted."""
    from tagd.daemon.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(text, "tagd.toml")
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert TOKEN not in str(caught.value)


def test_check_config_masks_the_admin_token(tmp_path):
    """C{tagd check-config} shows the [admin] table with the token as ***, and an unset
    token as a comment saying so (the output stays a valid file: an empty token is not)."""
    tagd = str(Path(sys.executable).with_name("tagd"))
    env = {k: v for k, v in os.environ.items() if k != "TAGD_CONFIG"}
    (tmp_path / "set.toml").write_text(f'[admin]\ntoken = "{TOKEN}"\n', encoding="utf-8")
    (tmp_path / "unset.toml").write_text("", encoding="utf-8")
    shown = {}
    for name in ("set", "unset"):
        result = subprocess.run(
            [tagd, "check-config", f"{name}.toml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stderr) == (0, "")
        assert TOKEN not in result.stdout
        shown[name] = tomllib.loads(result.stdout)["admin"]
        if name == "unset":
            assert "# token is not set" in result.stdout.splitlines()
    assert shown["set"] == {"listen": "tcp:9100:interface=127.0.0.1", "token": "***"}
    assert shown["unset"] == {"listen": "tcp:9100:interface=127.0.0.1"}
