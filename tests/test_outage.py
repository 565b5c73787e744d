"""A platform outage lived through as an operator does: real processes, the journal's lines.

tagd runs as the systemd unit runs it (C{twistd --logger=tagd.daemon.logs.observer -n tagd}), in
front of an origin whose pages carry the tracking header, its spool in the test's folder.
The fake Meta, GA4 and TikTok (tests/fakes.py) are served from threads of the test
process, so that they outlive the tagd the test kills.

While every platform is down (Meta refusing connections, GA4 and TikTok answering 503),
visitors are tracked, tagd is killed with C{kill -9} and started again, and more visitors
come.  The journal says so (one warning per destination and run, reminders), and
C{/metrics} shows each destination down, its backlog and the age of its oldest event, with
no retry counted against any event.  Then the platforms come back, healthy or flaky (30 %
503, 10 % 429 with C{Retry-After: 1}): every event is delivered within generous bounds
(the figures themselves are measured in bench/outage.py), an attempt is counted only for
an event whose own request was refused while the destination delivered others, and the
journal says once per destination that it delivers again.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAKE_GA4_SECRET, FAKE_META_TOKEN, FAKE_TIKTOK_TOKEN, process_config, threaded_platforms
from helpers import (
    TRACKED_PAGE,
    TagdProcess,
    TrackedOrigin,
    browser_get,
    events_accepted,
    free_port,
    http_get,
    read_log,
    spool_rows,
    tagd_up,
    wait_until,
)

VISITS = 60  # per run of tagd, one new visitor each
REMINDER = 2.0  # seconds between the reminders that a destination is still out
# Seconds from the platforms' return until every event is delivered, at most: generous,
# for a loaded machine (the figures are 10 s and 60 s for 1000 events, in bench/).
BACK_HEALTHY = 30.0
BACK_FLAKY = 90.0
DESTINATIONS = ("meta", "ga4", "tiktok")


def metric_samples(admin: int) -> dict[tuple[str, str], float]:
    """The samples of C{/metrics} with a destination label, by (name, destination)."""
    status, _, body = http_get(admin, "/metrics")
    assert status == 200
    return {
        (sample.name, sample.labels["destination"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if "destination" in sample.labels
    }


def journal(tagd: TagdProcess, run: int) -> list[dict]:
    """The JSON lines run C{run} of tagd wrote, parsed."""
    lines = []
    for line in read_log(tagd.runs[run][1]).splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line from the production logger: {line!r}") from None
    return lines


def said(lines: list[dict], destination: str, words: str) -> list[dict]:
    return [line for line in lines if line["text"].startswith(f"{destination}: ") and words in line["text"]]


def visit(port: int, admin: int, prefix: str) -> set[str]:
    """C{VISITS} tracked page views, each by a new visitor; returns their event ids once
    tagd has accepted them all."""
    ids = {f"{prefix}-{n:03d}" for n in range(VISITS)}
    before = events_accepted(admin)
    for event_id in sorted(ids):
        status, _, body = browser_get(port, f"/e/{event_id}")
        assert (status, body) == (200, TRACKED_PAGE)
    wait_until(lambda: events_accepted(admin) >= before + VISITS, 10, "every visit's event accepted")
    return ids


@pytest.mark.parametrize("comeback", ["healthy", "flaky"])
def test_an_outage_survives_kill_9_and_ends_with_everything_delivered_and_said(tmp_path, comeback):
    """Down, then killed with SIGKILL and started again, then back healthy or flaky:
    every event tracked is delivered to Meta, GA4 and TikTok within the bounds, no event
    gains an attempt from the outage, and the journal and /metrics tell the story."""
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    meta, ga4, tiktok = platforms
    port = free_port()
    spool = tmp_path / "spool.sqlite3"
    config = tmp_path / "tagd.toml"
    config.write_text(
        process_config(
            port, origin.url, spool, platforms,
            spool={"flush_interval": 0.02}, delivery={"outage_reminder": REMINDER},
        )
    )  # fmt: skip
    tagd = TagdProcess(config, tmp_path, production_logger=True)
    try:
        # Down: Meta refuses connections (not listening), GA4 and TikTok answer 503.
        ga4.failing = tiktok.failing = 503
        ga4.up()
        tiktok.up()
        tagd.start()
        _, admin = tagd_up(tagd.process, tagd.runs[-1][1])
        tracked = visit(port, admin, "first")
        tagd.kill()
        tagd.start()
        _, admin = tagd_up(tagd.process, tagd.runs[-1][1])
        tracked |= visit(port, admin, "second")
        wait_until(
            lambda: all(said(journal(tagd, -1), name, "still not accepting events") for name in DESTINATIONS),
            4 * REMINDER + 10,
            "a reminder for every destination",
        )
        during = metric_samples(admin)
        assert meta.received == []
        assert ga4.delivered_ids() == tiktok.delivered_ids() == set()

        # Back.
        for platform in platforms:
            platform.failed = 0
            platform.flaky = random.Random(f"{comeback}-{platform.platform}") if comeback == "flaky" else None
        ga4.failing = tiktok.failing = None
        meta.up()
        back = time.monotonic()
        wait_until(
            lambda: all(tracked <= platform.delivered_ids() for platform in platforms),
            BACK_HEALTHY if comeback == "healthy" else BACK_FLAKY,
            "every event delivered to every platform",
            interval=0.1,
        )
        took = time.monotonic() - back
        wait_until(lambda: spool_rows(spool) == [], 10, "the spool drained")
        wait_until(
            lambda: all(said(journal(tagd, -1), name, "delivering again") for name in DESTINATIONS),
            2 * REMINDER + 10,
            "a line for every destination delivering again",
        )
        after = wait_until(
            lambda: (samples := metric_samples(admin))
            and all(samples[("tagd_spool_backlog_events", name)] == 0 for name in DESTINATIONS)
            and samples,
            10,
            "the backlog gauges at 0",
        )
    finally:
        tagd.close()
        for platform in platforms:
            platform.close()
        origin.close()

    for name in DESTINATIONS:
        # During the outage: down, the backlog counted, its age growing, no retry counted.
        assert during[("tagd_destination_up", name)] == 0, name
        assert during[("tagd_spool_backlog_events", name)] == 2 * VISITS, name
        assert during[("tagd_spool_oldest_pending_seconds", name)] > REMINDER, name
        assert during[("tagd_delivery_retries_total", name)] == 0, name
        assert after[("tagd_destination_up", name)] == 1, name
        assert after[("tagd_spool_oldest_pending_seconds", name)] == 0, name
    for platform in platforms:
        retried = after[("tagd_delivery_retries_total", platform.platform)]
        if comeback == "healthy":
            assert retried == 0, platform.platform
        else:
            # Only events whose own request was answered with a 5xx can have gained one.
            assert retried <= platform.failed, (platform.platform, retried, platform.failed)
        assert platform.violations == [], (platform.platform, platform.violations[:5])
    print(f"{comeback}: every event delivered {took:.1f} s after the platforms came back")

    first, last = journal(tagd, 0), journal(tagd, -1)
    for name in DESTINATIONS:
        # One warning per run that saw the outage begin, with why and what waits.
        # A flaky platform may fail two requests in a row after its return, which is an
        # outage again, said as such and ended as such: a line pair each, never a flood.
        again = 0 if comeback == "healthy" else 2
        for lines in (first, last):
            warnings = said(lines, name, "stopped accepting events")
            assert 1 <= len(warnings) <= 1 + (again if lines is last else 0), [w["text"] for w in warnings]
            for warning in warnings:
                assert warning["level"] == "warn" and "event(s) wait" in warning["text"], warning
        assert "ConnectionRefusedError" in said(first, "meta", "stopped accepting")[0]["text"]
        assert "HTTP 503" in said(first, "ga4", "stopped accepting")[0]["text"]
        recoveries = said(last, name, "delivering again")
        assert len(recoveries) == len(said(last, name, "stopped accepting events")), name
        for recovery in recoveries:
            assert "out (since" in recovery["text"] and "sent since" in recovery["text"], recovery
    # Never a flood: a few lines per destination and reminder, whatever the retries.
    for lines in (first, last):
        assert len(lines) < 120, [line["text"] for line in lines][-40:]
    text = read_log(tagd.runs[0][1]) + read_log(tagd.runs[-1][1])
    assert "Traceback" not in text
    for secret in (FAKE_META_TOKEN, FAKE_GA4_SECRET, FAKE_TIKTOK_TOKEN):
        assert secret not in text
