"""Unit tests for the tracking filters in L{tagd.tagging.filters}: bots, speculative loads, paths
and status codes (consent: test_consent.py)."""

from __future__ import annotations

import crawleruseragents
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from tagd.daemon.config import TrackingConfig
from tagd.tagging.filters import (
    MAX_CACHED_USER_AGENT,
    BotDetector,
    PathFilter,
    is_speculative,
    tracked_statuses,
)

BROWSERS = {
    "chrome-windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "chrome-android": "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "firefox-windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "firefox-android": "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
    "safari-mac": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "safari-iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "edge": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "samsung": "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
    # In-app browsers: the visitors who just clicked an ad, so never bots.
    "facebook-ios": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/470.0.0.38.108;FBBV/123;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;FBSV/17.5;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5;FBRV/0]",
    "facebook-android": "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/AP2A.240805.005; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/127.0.6533.103 Mobile Safari/537.36 [FB_IAB/FB4A;FBAV/478.0.0.41.86;]",
    "instagram": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 Instagram 340.0.2.19.109 (iPhone15,2; iOS 17_5; en_US; en; scale=3.00; 1179x2556; 623311463)",
    "tiktok": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 musical_ly_35.4.0 JsSdk/2.0 NetType/WIFI Channel/App Store ByteLocale/en Region/US WKWebView/1 BytedanceWebview/d8a21c6",
}

BOTS = {
    "googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "googlebot-smartphone": "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "adsbot-google": "AdsBot-Google (+http://www.google.com/adsbot.html)",
    "bingbot": "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "ahrefsbot": "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "facebookexternalhit": "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "gptbot": "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
    "headless-chrome": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
    "uptimerobot": "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
    # The list anchors curl at the start (^curl) and matches python-requests anywhere.
    "curl": "curl/8.5.0",
    "python-requests": "python-requests/2.32.3",
    "wget": "Wget/1.21.4",
}


@pytest.fixture(scope="module")
def detector() -> BotDetector:
    """One detector for the module: building the list's matcher is done once per process."""
    return BotDetector()


@pytest.mark.parametrize("name", sorted(BROWSERS))
def test_browsers_are_not_bots(detector: BotDetector, name: str) -> None:
    """Desktop, mobile and in-app browsers are real visitors."""
    assert detector.is_bot(BROWSERS[name]) is False


@pytest.mark.parametrize("name", sorted(BOTS))
def test_crawlers_and_scripts_are_bots(detector: BotDetector, name: str) -> None:
    """Search engines, SEO crawlers, link previews, headless browsers, monitors and HTTP
    libraries (the list names C{^curl}, C{python-requests} and C{[wW]get}) are bots."""
    assert detector.is_bot(BOTS[name]) is True


@pytest.mark.parametrize("user_agent", [None, "", "   "])
def test_missing_user_agent_is_a_bot(detector: BotDetector, user_agent: str | None) -> None:
    """Every browser sends a user agent: a request without one is a script."""
    assert detector.is_bot(user_agent) is True


def test_matcher_agrees_with_the_list_on_all_its_examples(detector: BotDetector) -> None:
    """The compiled matcher says what the package's own C{is_crawler} says, for every
    example user agent the list ships and for the browsers above."""
    samples = [ua for entry in crawleruseragents.CRAWLER_USER_AGENTS_DATA for ua in entry["instances"]]
    samples += list(BROWSERS.values())
    assert len(samples) > 1000
    uncached = BotDetector(cache_size=0)
    disagreements = [ua for ua in samples if uncached.is_bot(ua) != crawleruseragents.is_crawler(ua)]
    assert disagreements == []


LIST_EXAMPLES = sorted({ua for e in crawleruseragents.CRAWLER_USER_AGENTS_DATA for ua in e["instances"]})


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(min_size=1, max_size=200),
        st.builds(
            lambda before, example, after: before + example[: len(example) // 2] + after,
            st.text(max_size=10),
            st.sampled_from(LIST_EXAMPLES),
            st.sampled_from(["", "\n", " x", "/1.0"]),
        ),
    )
)
def test_matcher_agrees_with_the_list_on_any_text(user_agent: str) -> None:
    """On arbitrary text and on cut-up examples of the list, too, the verdict is the
    list's own (a blank user agent aside, which tagd always calls a bot)."""
    expected = crawleruseragents.is_crawler(user_agent) or not user_agent.strip()
    assert BotDetector(cache_size=0).is_bot(user_agent) == expected


def test_list_is_case_sensitive(detector: BotDetector) -> None:
    """The list's patterns are case-sensitive, as the package uses them by default."""
    assert detector.is_bot("Mozilla/5.0 (compatible; Googlebot/2.1)") is True
    assert detector.is_bot("Mozilla/5.0 (compatible; googlebot/2.1)") is False


def test_extra_patterns_are_case_insensitive_regexes() -> None:
    """A shop's own patterns add bots, matched anywhere and whatever the case."""
    detector = BotDetector(extra_patterns=[r"ScrapeR/\d", "evilcorp"])
    assert detector.is_bot("Mozilla/5.0 scraper/2 (like Chrome)") is True
    assert detector.is_bot("Mozilla/5.0 (EvilCorp audit)") is True
    assert detector.is_bot(BROWSERS["chrome-windows"]) is False


def test_allow_patterns_override_the_list() -> None:
    """A user agent matching an allow pattern is never a bot, even one the list flags."""
    detector = BotDetector(allow_patterns=["UptimeRobot", "^partner-feed/"], extra_patterns=["partner"])
    assert detector.is_bot(BOTS["uptimerobot"]) is False
    assert detector.is_bot("partner-feed/1.0") is False
    assert detector.is_bot(BOTS["googlebot"]) is True


def test_allow_patterns_do_not_rescue_a_missing_user_agent() -> None:
    """A blank user agent stays a bot even if an allow pattern would match empty text."""
    assert BotDetector(allow_patterns=[".*"]).is_bot("") is True


def test_invalid_pattern_is_named() -> None:
    """A pattern that is not a regex is a configuration error that names it."""
    with pytest.raises(ValueError, match=r"'\(unclosed'"):
        BotDetector(extra_patterns=["(unclosed"])


def cache_info(detector: BotDetector):
    """Hits, misses and size of the detector's verdict cache, read from the C{lru_cache}
    itself: nothing in tagd needs them, only these tests."""
    return detector._cached.cache_info()


def test_verdicts_are_cached_and_bounded() -> None:
    """A repeated user agent is answered from the cache; the cache keeps at most
    C{cache_size} verdicts, dropping the least recently used."""
    detector = BotDetector(cache_size=2)
    chrome, firefox, safari = BROWSERS["chrome-windows"], BROWSERS["firefox-windows"], BROWSERS["safari-mac"]
    assert [detector.is_bot(chrome), detector.is_bot(chrome)] == [False, False]
    info = cache_info(detector)
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)
    detector.is_bot(firefox)
    detector.is_bot(safari)
    assert cache_info(detector).currsize == 2
    detector.is_bot(chrome)
    assert cache_info(detector).misses == 4


def test_huge_user_agents_are_not_cached() -> None:
    """A user agent longer than the cache's per-entry limit is judged but not kept."""
    detector = BotDetector()
    huge = BROWSERS["chrome-windows"] + " x" * MAX_CACHED_USER_AGENT
    assert detector.is_bot(huge) is False
    assert detector.is_bot(huge + " Googlebot/2.1") is True
    assert cache_info(detector).currsize == 0


def test_negative_cache_size_is_refused() -> None:
    """A negative cache size is a configuration error."""
    with pytest.raises(ValueError):
        BotDetector(cache_size=-1)


# --- speculative loads ----------------------------------------------------------------------


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """Headers holding C{pairs} in order."""
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


@pytest.mark.parametrize(
    "name, value",
    [
        (b"Sec-Purpose", b"prefetch"),
        (b"Sec-Purpose", b"prefetch;prerender"),
        (b"Sec-Purpose", b"prerender"),
        (b"Sec-Purpose", b"prefetch; anonymous-client-ip"),
        (b"sec-purpose", b"PREFETCH"),
        (b"Purpose", b"prefetch"),
        (b"X-Moz", b"prefetch"),
        (b"X-Purpose", b"preview"),
    ],
)
def test_speculative_loads_are_recognised(name: bytes, value: bytes) -> None:
    """Every header by which a browser marks a prefetch, prerender or preview counts."""
    assert is_speculative(headers((name, value))) is True


@pytest.mark.parametrize(
    "pairs",
    [
        (),
        ((b"Sec-Fetch-Dest", b"document"), (b"Sec-Fetch-Mode", b"navigate")),
        ((b"Sec-Purpose", b""),),
        ((b"Purpose", b"navigation"),),
        ((b"X-Moz", b"something-else"),),
    ],
)
def test_ordinary_loads_are_not_speculative(pairs) -> None:
    """A normal navigation, or a purpose header with another value, is a page view."""
    assert is_speculative(headers(*pairs)) is False


# --- paths ----------------------------------------------------------------------------------


def test_empty_path_filter_allows_everything() -> None:
    """No include and no exclude glob: every path is tracked."""
    assert PathFilter().allows(b"/anything/at/all?x=1") is True


def test_exclude_globs_span_slashes_and_ignore_the_query() -> None:
    """C{*} crosses C{/}, and the query string takes no part in matching."""
    paths = PathFilter(exclude=["/admin/*", "*.js", "/health"])
    assert paths.allows(b"/admin/orders/12") is False
    assert paths.allows(b"/static/app/main.js?v=3") is False
    assert paths.allows(b"/health") is False
    assert paths.allows(b"/health?probe=1") is False
    assert paths.allows(b"/healthy") is True
    assert paths.allows(b"/shop/item?next=/admin/x") is True


def test_include_globs_restrict_and_exclude_wins() -> None:
    """With include globs only matching paths are tracked; an exclude beats an include."""
    paths = PathFilter(include=["/shop/*", "/checkout*"], exclude=["/shop/internal/*"])
    assert paths.allows(b"/shop/item/1") is True
    assert paths.allows(b"/checkout/done") is True
    assert paths.allows(b"/blog/post") is False
    assert paths.allows(b"/shop/internal/stock") is False


def test_glob_character_classes_and_case() -> None:
    """C{?} and C{[...]} work as in fnmatch, and matching is case-sensitive."""
    paths = PathFilter(include=["/p/[0-9]?"])
    assert paths.allows(b"/p/1a") is True
    assert paths.allows(b"/p/a1") is False
    assert PathFilter(exclude=["/Admin*"]).allows(b"/admin") is True


def test_paths_are_matched_percent_decoded() -> None:
    """An escaped path is matched as the origin will read it."""
    paths = PathFilter(exclude=["/admin*", "/café"])
    assert paths.allows(b"/%61dmin/x") is False
    assert paths.allows(b"/caf%C3%A9") is False


def test_absolute_form_targets_use_their_path() -> None:
    """A request target in absolute form is matched on its path alone."""
    paths = PathFilter(exclude=["/admin*"])
    assert paths.allows(b"http://shop.example/admin/x") is False
    assert paths.allows(b"https://shop.example") is True


# --- status ---------------------------------------------------------------------------------


def test_default_tracks_only_2xx() -> None:
    """By default a success is tracked, a redirect or an error is not."""
    tracked = tracked_statuses(TrackingConfig().track_statuses)
    assert [c in tracked for c in (200, 204, 299, 199, 301, 304, 404, 500)] == [
        True, True, True, False, False, False, False, False,
    ]
    assert tracked == frozenset(range(200, 300))


def test_tracked_statuses_from_configuration() -> None:
    """Codes, classes and ranges from the configuration become one set."""
    tracked = tracked_statuses(["2xx", 304, "410", "451-452"])
    assert tracked == frozenset(range(200, 300)) | {304, 410, 451, 452}
    assert 304 in tracked and 301 not in tracked


@pytest.mark.parametrize("item", [99, 600, "6xx", "300-200", "abc", True, 2.0, "2XX0"])
def test_bad_status_items_are_named(item) -> None:
    """An item that names no valid status code is refused with the item in the message."""
    with pytest.raises(ValueError, match="is not a status code"):
        tracked_statuses([item])
