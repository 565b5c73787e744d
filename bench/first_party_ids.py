"""What a tracked page view's first-party ids and consent cost, next to Meta's own library.

For every tracked response the tracker reads the visitor's consent, picks the cookies'
domain and resolves the ids (L{tagd.tagging.identity.resolve_identity}), before the response head
goes out.  This times each step per call in one process, and, as the baseline measured in
the same run, what Meta's Parameter Builder (C{capi-param-builder-python}, a test
dependency) costs for the same request: one builder per request, since a builder keeps
the first host it sees.  The ratio says what tagd's own writing of C{_fbp}/C{_fbc} costs
against calling Meta's library on the tracked path.

The request is a first visit from a Meta ad (an C{fbclid}, no cookie) to
C{shop.example.co.uk}, with each consent source's record granting both purposes; the
first line, for scale, is the tracker's whole work for a returning visitor's page view.
The next two are the page view of C{bench/page_view_cpu.py}: a new visitor (a browser
User-Agent, no cookie, no consent source) tracked to Meta and TikTok, in the tracker
alone, then with its event handed to a real spool (in a temporary directory) as the
daemon does after the head: the enqueue, the spool's JSON and its intake journal.  The
spool's own thread (its group commits) is not counted: that line is the reactor's
thread's CPU time.

Run with the Python of the virtual environment tagd is installed in (with the test
extras): C{.venv/bin/python bench/first_party_ids.py [--calls 20000] [--repeat 5]}.  It
prints the best of C{--repeat} rounds, in microseconds per call.  The exit status is 0, 2
for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from urllib.parse import parse_qs

from encode import CONFIG as ENCODE_CONFIG
from encode import USER_AGENT
from twisted.web.http_headers import Headers

import tagd
from tagd.daemon.config import parse_config
from tagd.tagging.consent import ConsentReader, from_cookiebot, from_onetrust, from_tcf
from tagd.tagging.cookiedomain import CookieScoper, registrable_domain
from tagd.tagging.identity import GA4, META, resolve_identity
from tagd.admin.metrics import Metrics
from tagd.delivery.service import Delivery
from tagd.delivery.spool import FLUSH_AT, Spool
from tagd.tagging.tracker import Tracker
from tagd.tagging.hook import Visit

HOST = b"shop.example.co.uk"
QUERY = b"utm_source=facebook&fbclid=IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYXQvwjNwB_qa2ofrHyiLjcbCRxTDMgk"
COOKIES = {
    b"euconsent-v2": b"CQd924AQd924AASACCENCNFsAP_gAEIAACiQL6QBAAGAAOANmAcAF9IAIADgAA.YIAAAAAAAAAA",
    b"CookieConsent": b"%7Bstamp%3A%27x%27%2Cnecessary%3Atrue%2Cpreferences%3Atrue%2Cstatistics%3Atrue"
    b"%2Cmarketing%3Atrue%2Cmethod%3A%27explicit%27%2Cver%3A1%2Cutc%3A1740000000000%2Cregion%3A%27de%27%7D",
    b"OptanonConsent": b"isGpcEnabled=0&datestamp=Mon+Dec+07+2026&version=202409.1.0&interactionCount=1"
    b"&groups=C0001%3A1%2CC0002%3A1%2CC0003%3A1%2CC0004%3A1&AwaitingReconsent=false",
}


# The encoding benchmark's destinations (nothing is sent), with the shop's banner OneTrust's.
CONFIG = '[tracking]\nconsent_source = "onetrust"\n' + ENCODE_CONFIG
HEADER = b'{"event_name":"ViewContent","custom_data":{"currency":"EUR","value":3.5},"contents":[{"id":"123","quantity":1}]}'


def tracked_page_view():
    """The tracker's whole work for one page view of a returning visitor who consented to
    both purposes: the decision and cookies before the head, the events after it."""
    config = parse_config(CONFIG, "bench.toml")
    tracker = Tracker(
        config=config.tracking,
        submit=lambda events, allowed: None,
        metrics=Metrics(),
        destinations=config.destinations,
        rand=random.Random(1),
    )
    cookie = b"; ".join(
        [b"_fbp=fb.2.1706540400000.1234567890.AQIAAAEA", b"_ga=GA1.1.1234567890.1706540400",
         b"OptanonConsent=" + COOKIES[b"OptanonConsent"]]
    )  # fmt: skip
    headers = Headers({b"user-agent": [USER_AGENT.encode("ascii")], b"cookie": [cookie]})
    visit = Visit("203.0.113.7", "https", b"GET", b"/product/123", HOST, headers, 200)
    return lambda: handed_over([tracker([HEADER], visit)])


# The page view of bench/page_view_cpu.py: Meta and TikTok, and a new visitor's request.
NEW_VISITOR_CONFIG = """
[[destinations]]
type = "meta"
pixel_id = "1234"
access_token = "bench-token"

[[destinations]]
type = "tiktok"
pixel_code = "BENCH"
access_token = "bench-token"
"""
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"


def new_visitor_page_view(tracker: Tracker | None = None):
    """C{tracker}'s whole work for a new visitor's page view (no cookie, no consent
    source); by default a tracker that hands its events to nothing."""
    if tracker is None:
        config = parse_config(NEW_VISITOR_CONFIG, "bench.toml")
        tracker = Tracker(
            config=config.tracking,
            submit=lambda events, allowed: None,
            metrics=Metrics(),
            destinations=config.destinations,
        )
    headers = Headers({b"user-agent": [BROWSER.encode("ascii")], b"host": [b"127.0.0.1:8080"]})
    visit = Visit("127.0.0.1", "http", b"GET", b"/", b"127.0.0.1:8080", headers, 200)
    return lambda turn=1: handed_over([tracker([b'{"event_name": "PageView"}'], visit) for _ in range(turn)])


def handed_over(responses) -> None:
    """What the proxy does for the tracked responses of one reactor turn, after their heads."""
    for tracked in responses:
        tracked.deliver()
    hand_over = getattr(responses[0], "hand_over", None)  # None: a version that submits in deliver
    if hand_over is not None:
        hand_over()


def spooled_page_view(directory: str, turn: int = 1):
    """L{new_visitor_page_view} with its event handed to a real spool by the daemon's own
    tracker, C{turn} page views handed over together (as a reactor turn under load hands
    over those whose heads it wrote).  Every L{FLUSH_AT} page views the reactor turns
    once, so that the spool's writes (on its own thread) come back and what it holds in
    memory stays as short as in the daemon; nothing is leased."""
    from twisted.internet import reactor

    config = parse_config(NEW_VISITOR_CONFIG, "bench.toml")
    spool = Spool.open(os.path.join(directory, "spool.db"), reactor=reactor, max_events=10**9)
    delivery = Delivery(reactor=reactor, config=config, metrics=Metrics(), spool=spool)
    page_view = new_visitor_page_view(delivery.tracker(config))
    count = 0

    def spooled() -> None:
        nonlocal count
        page_view(turn)
        count += turn
        if count % FLUSH_AT < turn:
            reactor.iterate(0)

    return spooled


def per_call(function, calls: int, repeat: int, clock=time.perf_counter) -> float:
    """The best of C{repeat} rounds of C{calls} calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        started = clock()
        for _ in range(calls):
            function()
        best = min(best, clock() - started)
    return best / calls * 1e6


def measurements(calls: int, repeat: int) -> dict[str, float]:
    rand = random.Random(1)
    scoper = CookieScoper("")
    scope = scoper.scope(HOST)
    headers = Headers({b"user-agent": [b"Mozilla/5.0"]})
    readers = {source: ConsentReader(source=source) for source in ("tcf", "cookiebot", "onetrust")}

    def ids() -> None:
        resolve_identity(
            cookies={}, query=QUERY, now=time.time(), secure=True, rand=rand,
            create_for=frozenset({META, GA4}), scope=scoper.scope(HOST),
        )  # fmt: skip

    def meta_ids() -> None:
        resolve_identity(
            cookies={}, query=QUERY, now=time.time(), secure=True, rand=rand,
            create_for=frozenset({META}), scope=scope,
        )  # fmt: skip

    with tempfile.TemporaryDirectory() as directory:
        spooled = per_call(spooled_page_view(directory), calls, repeat, time.thread_time)
    with tempfile.TemporaryDirectory() as directory:
        turns = per_call(spooled_page_view(directory, 10), calls // 10 or 1, repeat, time.thread_time) / 10
    results = {
        "tagd: a tracked page view in the tracker, 3 destinations": per_call(tracked_page_view(), calls, repeat),
        "tagd: a new visitor's page view in the tracker, Meta and TikTok": per_call(
            new_visitor_page_view(), calls, repeat, time.thread_time
        ),
        "tagd: the same, its event handed to the spool": spooled,
        "tagd: the same, ten page views a reactor turn (per page view)": turns,
        "tagd: ids and cookies, Meta and GA4 (domain cached)": per_call(ids, calls, repeat),
        "tagd: _fbp/_fbc only": per_call(meta_ids, calls, repeat),
        "tagd: cookie domain, cached host": per_call(lambda: scoper.scope(HOST), calls, repeat),
        "tagd: cookie domain, Public Suffix List lookup": per_call(
            lambda: registrable_domain(HOST.decode()), calls, repeat
        ),
    }
    first_readings = {"tcf": from_tcf, "cookiebot": from_cookiebot, "onetrust": from_onetrust}
    for source, reader in readers.items():
        results[f"tagd: consent from {source}, a record seen before"] = per_call(
            lambda: reader.granted(headers, COOKIES), calls, repeat
        )
        clear = first_readings[source].cache_clear
        results[f"tagd: consent from {source}, a new record"] = per_call(
            lambda: (clear(), reader.granted(headers, COOKIES)), calls, repeat
        )
    try:
        from capi_param_builder import EtldPlusOneResolver, ParamBuilder
    except ImportError:
        return results

    class Resolver(EtldPlusOneResolver):
        def resolve(self, host_name: str) -> str:
            return registrable_domain(host_name) or host_name

    resolver = Resolver()
    queries = parse_qs(QUERY.decode())

    def meta_library() -> None:
        ParamBuilder(resolver).process_request(HOST.decode(), queries, {})

    results["baseline: Meta's Parameter Builder, _fbp/_fbc"] = per_call(meta_library, calls, repeat)
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeat < 1:
        parser.error("--calls and --repeat must be at least 1")
    print(f"tagd {tagd.__version__} from {tagd.__file__}, Python {sys.version.split()[0]}")
    results = measurements(args.calls, args.repeat)
    baseline = results.get("baseline: Meta's Parameter Builder, _fbp/_fbc")
    for name, micros in results.items():
        ratio = f"  ({micros / baseline:.2f}x Meta's library)" if baseline and name == "tagd: _fbp/_fbc only" else ""
        print(f"{micros:8.2f} µs  {name}{ratio}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
