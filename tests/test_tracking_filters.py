"""What never becomes an event: filtered visits and malformed tracking headers, end to end.

The raw origin answers with exact bytes, so each test can demand that the visitor's
response is byte for byte the origin's minus the tracking header line: no cookie added,
nothing else touched.  That nothing reached a platform is proved with a sentinel: after
the filtered visit, one tracked visit is made and waited for at every fake, and then the
fakes must hold that one event only.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.logger import formatEvent

from conftest import eventually, exchange, raw_request, sleep
from helpers import raw_response

FIREFOX = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BODY = b"<!doctype html><title>shop</title><p>Blue mug, 12.50 EUR</p>\n" * 20
PERSONAL = "marker.person@example.com"


def origin_answer(tracking: bytes | None, status: bytes = b"200 OK") -> bytes:
    """The raw origin's response; the tracking header line sits among the others.

    Header names are in canonical case and each appears once, with C{Content-Length}
    last, as tagd writes a head: so the bytes without the tracking line are exactly what
    the visitor must get.
    """
    return raw_response(
        tracking,
        BODY,
        status=status,
        before=[
            b"Content-Type: text/html; charset=utf-8",
            b"Cache-Control: private, max-age=0",
            b"Set-Cookie: cart=abc; Path=/; HttpOnly",
        ],
        after=[b"X-Shop: 1"],
    )


SENTINEL = {"event_name": "PageView", "event_id": "sentinel-1"}


async def only_the_sentinel_arrives(tagd, origin, fakes, headers=()) -> None:
    """Make one tracked visit and wait for it at every fake; then each fake must hold that
    event only, and no fake may have found anything to object to."""
    origin.answer_raw(b"/sentinel", origin_answer(json.dumps(SENTINEL).encode()))
    response = await exchange(
        tagd.port,
        raw_request(b"GET", b"/sentinel", headers=[(b"User-Agent", FIREFOX), *headers]),
    )
    assert b"Set-Cookie: tagd_event_id=sentinel-1" in response
    meta, ga4, tiktok = fakes
    await eventually(lambda: all(f.fake.events for f in fakes))
    await sleep(0.1)  # a late event of the visit before would show up by now
    assert [e["event_id"] for e in meta.fake.events] == ["sentinel-1"]
    assert [e["event_id"] for e in tiktok.fake.events] == ["sentinel-1"]
    assert [e["params"]["page_location"] for e in ga4.fake.events] == ["http://shop.example/sentinel"]
    for served in fakes:
        assert served.fake.violations == []
    assert tagd.metrics.value("events_accepted") == 1


FILTERS = {
    # id: ([tracking] keys, path, request headers, origin status, reason, sentinel's extra headers)
    "bot": ({}, b"/p", [(b"User-Agent", GOOGLEBOT)], b"200 OK", "bot", []),
    "no user agent": ({}, b"/p", [], b"200 OK", "bot", []),
    "extra bot pattern": (
        {"extra_bots": ["ShopMonitor/"]}, b"/p", [(b"User-Agent", b"ShopMonitor/2.0 (uptime)")],
        b"200 OK", "bot", [],
    ),
    "sec-purpose prefetch": (
        {}, b"/p", [(b"User-Agent", FIREFOX), (b"Sec-Purpose", b"prefetch")], b"200 OK", "prefetch", []
    ),
    "sec-purpose prerender": (
        {}, b"/p", [(b"User-Agent", FIREFOX), (b"Sec-Purpose", b"prefetch;prerender")],
        b"200 OK", "prefetch", [],
    ),
    "purpose prefetch": (
        {}, b"/p", [(b"User-Agent", FIREFOX), (b"Purpose", b"prefetch")], b"200 OK", "prefetch", []
    ),
    "x-moz prefetch": (
        {}, b"/p", [(b"User-Agent", FIREFOX), (b"X-Moz", b"prefetch")], b"200 OK", "prefetch", []
    ),
    "global privacy control": (
        {}, b"/p", [(b"User-Agent", FIREFOX), (b"Sec-GPC", b"1")], b"200 OK", "consent", []
    ),
    "consent cookie absent": (
        {"consent_cookie": "cookie_consent"}, b"/p", [(b"User-Agent", FIREFOX)], b"200 OK", "consent",
        [(b"Cookie", b"cookie_consent=granted")],
    ),
    "consent cookie refused": (
        {"consent_cookie": "cookie_consent"}, b"/p",
        [(b"User-Agent", FIREFOX), (b"Cookie", b"_fbp=fb.1.1706540400000.123; cookie_consent=denied")],
        b"200 OK", "consent", [(b"Cookie", b"cookie_consent=granted")],
    ),
    "excluded path": (
        {"exclude_paths": ["/account/*"]}, b"/account/orders?page=2", [(b"User-Agent", FIREFOX)],
        b"200 OK", "path", [],
    ),
    "not an included path": (
        {"include_paths": ["/shop/*", "/sentinel"]}, b"/blog/post", [(b"User-Agent", FIREFOX)],
        b"200 OK", "path", [],
    ),
    "not found": ({}, b"/p", [(b"User-Agent", FIREFOX)], b"404 Not Found", "status", []),
    "server error": ({}, b"/p", [(b"User-Agent", FIREFOX)], b"500 Internal Server Error", "status", []),
}  # fmt: skip


@pytest.mark.parametrize(
    "tracking, path, headers, status, reason, sentinel_headers", FILTERS.values(), ids=list(FILTERS)
)
@pytest_twisted.ensureDeferred
async def test_filtered_visit_makes_no_event_and_leaves_the_response_untouched(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok,
    tracking, path, headers, status, reason, sentinel_headers,
):  # fmt: skip
    """A filtered visit to a page with a valid tracking header: the visitor gets the
    origin's bytes minus the tracking header line (so no Set-Cookie is added), no event
    reaches any platform, and the drop is counted under its reason and no other."""
    tagd = await start_tracking_tagd(raw=True, tracking=tracking)
    tracking_value = json.dumps(
        {"event_name": "Purchase", "event_id": "filtered-1", "custom_data": {"currency": "EUR", "value": 5}}
    ).encode()
    origin.answer_raw(path, origin_answer(tracking_value, status))
    for _ in range(2):
        response = await exchange(tagd.port, raw_request(b"GET", path, headers=headers))
        assert response == origin_answer(None, status)
    assert tagd.dropped(reason) == 2
    others = {"bot", "prefetch", "consent", "path", "status", "malformed", "event_time", "too_many_events"} - {reason}
    assert all(tagd.dropped(other) == 0 for other in others)
    await only_the_sentinel_arrives(tagd, origin, (fake_meta, fake_ga4, fake_tiktok), sentinel_headers)


@pytest_twisted.ensureDeferred
async def test_without_destinations_the_header_is_only_removed(start_tracking_tagd, origin, fake_meta):
    """With no C{[[destinations]]} the header is still removed, and nothing else happens:
    no cookie, no event, no count."""
    tagd = await start_tracking_tagd(raw=True, destinations=[])
    origin.answer_raw(b"/p", origin_answer(json.dumps(SENTINEL).encode()))
    response = await exchange(tagd.port, raw_request(b"GET", b"/p", headers=[(b"User-Agent", FIREFOX)]))
    assert response == origin_answer(None)
    await sleep(0.1)
    assert fake_meta.fake.requests == []
    assert tagd.metrics.value("events_accepted") == 0


def _many_keys(size: int) -> bytes:
    """A well-formed header of about C{size} bytes: custom data with many short strings."""
    custom = {f"k{i}": "v" * 90 for i in range(size // 100 + 1)}
    return json.dumps({"event_name": "ViewContent", "custom_data": custom}).encode()


MALFORMED = {
    # id: (header value, [tracking] keys, what the log line says)
    "bad json": (b'{"event_name": "ViewContent", "user_data": {"em": "' + PERSONAL.encode() + b'"',
                 {}, "not valid JSON"),
    "not utf-8": (b'{"event_name": "View\xffContent"}', {}, "not valid JSON"),
    "a bare string": (b'"ViewContent"', {}, "must be a JSON object"),
    "an empty array": (b"[]", {}, "1 to 10 events"),
    "eleven events": (json.dumps([{"event_name": "PageView"}] * 11).encode(), {}, "1 to 10 events"),
    "event_time a string": (
        json.dumps({"event_name": "Purchase", "event_time": "yesterday", "user_data": {"em": PERSONAL}}).encode(),
        {}, "event_time must be Unix seconds",
    ),
    "value not finite": (b'{"event_name": "Purchase", "custom_data": {"value": NaN}}', {}, "finite number"),
    "custom_data a list": (
        json.dumps({"event_name": "Purchase", "custom_data": ["EUR", 5]}).encode(), {}, "custom_data must be an object"
    ),
    "quantity zero": (
        json.dumps({"event_name": "AddToCart", "contents": [{"id": "a", "quantity": 0}]}).encode(),
        {}, "positive whole number",
    ),
    "content without id": (
        json.dumps({"event_name": "AddToCart", "contents": [{"quantity": 1}]}).encode(), {}, "id is missing"
    ),
    "unknown key": (
        json.dumps({"event_name": "ViewContent", "user": {"em": PERSONAL}}).encode(), {}, "unknown key"
    ),
    "unknown user_data key": (
        json.dumps({"event_name": "Lead", "user_data": {"email": PERSONAL}}).encode(), {}, "has an unknown key"
    ),
    "unknown event name pattern": (
        json.dumps({"event_name": "View Content!", "user_data": {"em": PERSONAL}}).encode(),
        {}, "neither a standard nor a valid custom name",
    ),
    "no event name": (json.dumps({"custom_data": {"value": 1}}).encode(), {}, "event_name must be"),
    "oversized": (_many_keys(9000), {}, "longer than the 8192 bytes allowed"),
    "over a configured cap": (_many_keys(1500), {"max_header_bytes": 1024}, "longer than the 1024 bytes allowed"),
}  # fmt: skip


def _tagd_lines(log_events) -> list[str]:
    """The formatted text of every event that tagd's own modules logged."""
    return [
        formatEvent(event)
        for event in log_events
        if str(event.get("log_namespace", "")).startswith("tagd")
    ]


@pytest.mark.parametrize("value, tracking, reason", MALFORMED.values(), ids=list(MALFORMED))
@pytest_twisted.ensureDeferred
async def test_malformed_header_makes_no_event_one_log_line_and_a_count(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok, log_events, value, tracking, reason
):
    """A malformed tracking header, twice: the response is the origin's bytes minus the
    header line each time, no event reaches a platform, both are counted as malformed
    (or as out of the time window), and one log line gives the path and the reason but
    neither the header nor any personal value in it; nothing raised."""
    tagd = await start_tracking_tagd(raw=True, tracking=tracking)
    origin.answer_raw(b"/bad?session=42", origin_answer(value))
    for _ in range(2):
        response = await exchange(
            tagd.port, raw_request(b"GET", b"/bad?session=42", headers=[(b"User-Agent", FIREFOX)])
        )
        assert response == origin_answer(None)
    assert tagd.dropped("malformed") == 2
    assert tagd.metrics.value("events_accepted") == 0
    await eventually(lambda: [line for line in _tagd_lines(log_events) if "/bad" in line])
    lines = [line for line in _tagd_lines(log_events) if "/bad" in line]
    assert len(lines) == 1, lines
    assert reason in lines[0]
    assert "session=42" not in lines[0]  # the path is named, not the query
    text = "\n".join(_tagd_lines(log_events))
    assert PERSONAL not in text
    assert value.decode("utf-8", "replace") not in text
    assert not [e for e in log_events if "log_failure" in e]
    await only_the_sentinel_arrives(tagd, origin, (fake_meta, fake_ga4, fake_tiktok))


@pytest.mark.parametrize("age", [8 * 86400, -3600], ids=["older than 7 days", "in the future"])
@pytest_twisted.ensureDeferred
async def test_event_outside_the_time_window_is_dropped(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok, log_events, age
):
    """A well-formed event whose C{event_time} is more than 7 days old (Meta would refuse
    the whole batch) or in the future is dropped before delivery, counted and logged once;
    the visitor keeps the response (with the first-party cookies of a tracked page)."""
    tagd = await start_tracking_tagd(raw=True)
    value = json.dumps({"event_name": "Purchase", "event_time": int(time.time()) - age}).encode()
    origin.answer_raw(b"/old", origin_answer(value))
    for _ in range(2):
        response = await exchange(tagd.port, raw_request(b"GET", b"/old", headers=[(b"User-Agent", FIREFOX)]))
        assert response.endswith(BODY) and b"Worker-Tracking" not in response
    await eventually(lambda: tagd.dropped("event_time") == 2)
    assert tagd.metrics.value("events_accepted") == 0
    lines = [line for line in _tagd_lines(log_events) if "/old" in line]
    assert len(lines) == 1 and "event_time" in lines[0], lines
    await only_the_sentinel_arrives(tagd, origin, (fake_meta, fake_ga4, fake_tiktok))


@pytest_twisted.ensureDeferred
async def test_malformed_among_good_values_only_the_bad_one_is_dropped(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok
):
    """Two tracking headers on one response, one well-formed and one not: the good one
    becomes an event, the bad one is counted, and the visitor's response is the origin's
    with both lines removed and tagd's cookies added."""
    tagd = await start_tracking_tagd(raw=True)
    good = json.dumps({"event_name": "ViewContent", "event_id": "good-1"}).encode()
    answer = origin_answer(good).replace(
        b"X-Shop: 1\r\n", b"X-Shop: 1\r\nWorker-Tracking: {not json\r\n"
    )
    origin.answer_raw(b"/two", answer)
    response = await exchange(tagd.port, raw_request(b"GET", b"/two", headers=[(b"User-Agent", FIREFOX)]))
    assert b"Worker-Tracking" not in response and b"not json" not in response
    assert response.endswith(BODY)
    assert b"Set-Cookie: tagd_event_id=good-1;" in response
    assert tagd.dropped("malformed") == 1
    await eventually(lambda: all(f.fake.events for f in (fake_meta, fake_ga4, fake_tiktok)))
    assert [e["event_id"] for e in fake_meta.fake.events] == ["good-1"]
    assert [e["event_id"] for e in fake_tiktok.fake.events] == ["good-1"]


def _tracking_lines(*values: bytes) -> bytes:
    """The origin's answer with one tracking header line for each of C{values}, in order."""
    lines = b"".join(b"Worker-Tracking: %s\r\n" % value for value in values)
    return origin_answer(None).replace(b"X-Shop: 1\r\n", b"X-Shop: 1\r\n" + lines)


HUGE = "9" * 401  # beyond a float's range (about 1.8e308), under json's 4300-digit limit

OUT_OF_RANGE = {
    # id: (the event, as JSON text with a number no platform can take; what the log says)
    "value": ('{"event_name": "Purchase", "custom_data": {"value": %s}}' % HUGE, "custom_data.value"),
    "item price": (
        '{"event_name": "AddToCart", "contents": [{"id": "a", "item_price": %s}]}' % HUGE, "item_price"
    ),
    "other custom data": ('{"event_name": "Purchase", "custom_data": {"shelf": [1, %s]}}' % HUGE, "custom_data"),
    "num_items": ('{"event_name": "Purchase", "custom_data": {"num_items": %s}}' % HUGE, "num_items"),
    "event_time": ('{"event_name": "Purchase", "event_time": %s}' % HUGE, "event_time"),
    "order id": ('{"event_name": "Purchase", "custom_data": {"order_id": %s}}' % ("9" * 501), "order_id"),
}  # fmt: skip


@pytest.mark.parametrize("value, reason", OUT_OF_RANGE.values(), ids=list(OUT_OF_RANGE))
@pytest_twisted.ensureDeferred
async def test_a_number_out_of_range_is_malformed_and_the_other_values_go_through(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok, log_events, value, reason
):
    """A tracking header value with a 401-digit number (or an id of 501 digits) where a
    number is read: that value is refused as malformed, counted and logged once with the
    field it names and without a traceback, while the response's other tracking header
    value still becomes its event."""
    tagd = await start_tracking_tagd(raw=True)
    good = json.dumps({"event_name": "ViewContent", "event_id": "good-1"}).encode()
    origin.answer_raw(b"/huge", _tracking_lines(good, value.encode()))
    response = await exchange(tagd.port, raw_request(b"GET", b"/huge", headers=[(b"User-Agent", FIREFOX)]))
    assert response.endswith(BODY) and b"Worker-Tracking" not in response
    assert b"Set-Cookie: tagd_event_id=good-1;" in response
    await eventually(lambda: all(f.fake.events for f in (fake_meta, fake_ga4, fake_tiktok)))
    assert [e["event_id"] for e in fake_meta.fake.events] == ["good-1"]
    assert [e["event_id"] for e in fake_tiktok.fake.events] == ["good-1"]
    assert (tagd.dropped("malformed"), tagd.metrics.value("events_accepted")) == (1, 1)
    lines = [line for line in _tagd_lines(log_events) if "/huge" in line]
    assert len(lines) == 1 and reason in lines[0], lines
    assert HUGE not in "\n".join(_tagd_lines(log_events))
    assert not [e for e in log_events if "log_failure" in e]


def _events_named(prefix: str, count: int, start: int = 0) -> list[dict]:
    return [{"event_name": "PageView", "event_id": f"{prefix}-{i}"} for i in range(start, start + count)]


@pytest.mark.parametrize(
    "tracking, kept", [({}, 20), ({"max_events_per_response": 3}, 3)], ids=["default", "configured"]
)
@pytest_twisted.ensureDeferred
async def test_events_past_the_response_cap_are_dropped_counted_and_logged_once(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok, log_events, tracking, kept
):
    """A response whose tracking header values hold 25 events together (arrays of 10, 10
    and 5, each within the 10 a value may hold): the first C{max_events_per_response}
    in header order reach the platforms and get their cookie, the rest are counted under
    too_many_events, one per event, and a second such response adds to the count without
    another log line."""
    tagd = await start_tracking_tagd(raw=True, tracking=tracking)
    events = _events_named("cap", 25)
    values = [json.dumps(events[at : at + 10]).encode() for at in (0, 10, 20)]
    origin.answer_raw(b"/many", _tracking_lines(*values))
    for _ in range(2):
        response = await exchange(tagd.port, raw_request(b"GET", b"/many", headers=[(b"User-Agent", FIREFOX)]))
        assert response.endswith(BODY) and b"Worker-Tracking" not in response
        assert b"Set-Cookie: tagd_event_id=cap-0;" in response
    assert tagd.dropped("too_many_events") == 2 * (25 - kept)
    assert tagd.dropped("malformed") == 0
    expected = [event["event_id"] for event in events[:kept]] * 2
    await eventually(lambda: len(fake_meta.fake.events) == len(fake_tiktok.fake.events) == len(expected))
    await sleep(0.1)  # an event past the cap would show up by now
    assert sorted(e["event_id"] for e in fake_meta.fake.events) == sorted(expected)
    assert sorted(e["event_id"] for e in fake_tiktok.fake.events) == sorted(expected)
    assert tagd.metrics.value("events_accepted") == len(expected)
    lines = [line for line in _tagd_lines(log_events) if "/many" in line]
    assert len(lines) == 1 and f"{25 - kept} event(s) past max_events_per_response ({kept})" in lines[0], lines
    assert "too_many_events" in lines[0]


@pytest_twisted.ensureDeferred
async def test_the_response_cap_counts_only_well_formed_events(
    start_tracking_tagd, origin, fake_meta, fake_tiktok
):
    """A malformed value among the tracking header values takes none of the response's
    cap: with a cap of 3, a malformed value between two values of 2 events leaves the
    first 3 well-formed events, in header order, and the fourth is the one dropped."""
    tagd = await start_tracking_tagd(raw=True, tracking={"max_events_per_response": 3})
    first, second = _events_named("ok", 2), _events_named("ok", 2, start=2)
    values = [json.dumps(first).encode(), b"{not json", json.dumps(second).encode()]
    origin.answer_raw(b"/mixed", _tracking_lines(*values))
    response = await exchange(tagd.port, raw_request(b"GET", b"/mixed", headers=[(b"User-Agent", FIREFOX)]))
    assert response.endswith(BODY) and b"Worker-Tracking" not in response
    assert (tagd.dropped("malformed"), tagd.dropped("too_many_events")) == (1, 1)
    await eventually(lambda: len(fake_meta.fake.events) == len(fake_tiktok.fake.events) == 3)
    await sleep(0.1)  # a fourth event would show up by now
    assert [e["event_id"] for e in fake_meta.fake.events] == ["ok-0", "ok-1", "ok-2"]


@pytest_twisted.ensureDeferred
async def test_varying_malformed_headers_on_one_page_log_once(start_tracking_tagd, origin, log_events):
    """A page whose malformed header differs on every view (here: oversized by a different
    amount each time, and a product name used as the event name) logs once a minute, not
    once per view."""
    tagd = await start_tracking_tagd(raw=True)
    values = [_many_keys(9000 + 100 * i) for i in range(3)]
    values += [json.dumps({"event_name": f"View: product {i}"}).encode() for i in range(3)]
    for i, value in enumerate(values):
        origin.answer_raw(b"/vary/%d" % i, origin_answer(value))
        response = await exchange(
            tagd.port, raw_request(b"GET", b"/vary/%d" % i, headers=[(b"User-Agent", FIREFOX)])
        )
        assert response == origin_answer(None)
    assert tagd.dropped("malformed") == 6
    lines = [line for line in _tagd_lines(log_events) if "/vary/" in line]
    # At most one line for the oversized headers and one for the bad event names.
    assert 1 <= len(lines) <= 2, lines


@pytest.mark.parametrize("field", ["user_data", "event_id"])
@pytest_twisted.ensureDeferred
async def test_lone_surrogate_is_malformed(
    start_tracking_tagd, origin, fake_meta, fake_ga4, fake_tiktok, log_events, field
):
    """A header holding a lone UTF-16 surrogate escape (C{"\\ud800"}, which no UTF-8 text
    can carry) is malformed like any other: counted, no cookie, no event, no failure
    logged."""
    spec = {"event_name": "Purchase", "event_id": "ok-1", "user_data": {"em": "ok@example.com"}}
    if field == "user_data":
        spec["user_data"] = {"em": "joe\ud800@example.com"}
    else:
        spec["event_id"] = "order-\ud800"
    value = json.dumps(spec).encode("ascii")  # ensure_ascii writes the escape: "\ud800"
    assert b"\\ud800" in value
    tagd = await start_tracking_tagd(raw=True)
    origin.answer_raw(b"/surrogate", origin_answer(value))
    response = await exchange(
        tagd.port, raw_request(b"GET", b"/surrogate", headers=[(b"User-Agent", FIREFOX)])
    )
    await sleep(0.2)  # delivery, if any, runs after the response
    failures = [e for e in log_events if "log_failure" in e]
    assert (response, tagd.dropped("malformed"), failures) == (origin_answer(None), 1, [])
