"""Match-key coverage: which of the keys a platform matches on each event handed to it carried.

Meta scores events by how many of its keys they carry (Event Match Quality), and TikTok and
GA4 match or attribute by their own; a shop owner raises the score by adding what is
missing, usually in the tracking header of checkout pages.  So tagd counts, per
destination and event name, the events handed to it and, per key, those carrying it, and
says in one line for each key what raises it.

Counting runs for every tracked event and destination, on the reactor: plain integers in
dicts, read by Prometheus (L{Coverage.collect}) and the dashboard only when asked.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily

from tagd.events import STANDARD_EVENTS, Event

# Custom event names are the origin's to choose: one label value for all of them keeps the
# number of series bounded.
CUSTOM_EVENT = "custom"

Check = Callable[[Event], bool]


def _user(key: str) -> Check:
    return lambda event: bool(event.user_data.get(key))


def _field(name: str) -> Check:
    return lambda event: bool(getattr(event, name))


_EMAIL = ("email", _user("em"), "put the customer's e-mail in user_data.em wherever the shop knows it (account, checkout, order confirmation)")
_PHONE = ("phone", _user("ph"), "put the phone number from checkout in user_data.ph, with its country code")
_EXTERNAL_ID = ("external_id", _user("external_id"), "put your customer id in user_data.external_id for visitors who are logged in")
_IP = ("client_ip", _field("client_ip"), "behind a proxy or CDN, list it in [proxy] trusted_proxies so that tagd sees the visitor's address")
_USER_AGENT = ("user_agent", _field("user_agent"), "browsers always send one: its absence means requests that are no page views")
# Each platform's keys: (name, check, the advice that raises it), in the platform's order.
PLATFORM_KEYS: Mapping[str, tuple[tuple[str, Check, str], ...]] = {
    "meta": (
        _EMAIL, _PHONE, _EXTERNAL_ID,
        ("fbp", _field("fbp"), "keep first_party_cookies on (and marketing consent asked): tagd sets _fbp itself"),
        ("fbc", _field("fbc"), "only ad clicks carry fbclid: track the landing pages, so that tagd keeps _fbc"),
        _IP, _USER_AGENT,
    ),
    "tiktok": (
        _EMAIL, _PHONE, _EXTERNAL_ID,
        ("ttclid", _field("ttclid"), "only TikTok ad clicks carry ttclid: track the landing pages, so that tagd keeps it"),
        ("ttp", _field("ttp"), "load TikTok's pixel on the pages: it sets _ttp, which tagd passes on"),
        _IP, _USER_AGENT,
    ),
    "ga4": (
        ("client_id", _field("ga_client_id"), "load gtag on the pages or keep first_party_cookies on: GA4 gets no event without a client id"),
        ("session_id", _field("ga_session_id"), "load gtag on the pages: its _ga_<stream> cookie ties server events to the browser's session"),
        _EMAIL, _PHONE, _IP, _USER_AGENT,
    ),
}  # fmt: skip
ADVICE: Mapping[str, Mapping[str, str]] = {
    platform: {name: advice for name, _check, advice in keys} for platform, keys in PLATFORM_KEYS.items()
}


def event_label(name: str) -> str:
    """The event name as a label value: Meta's standard names, every other one as L{CUSTOM_EVENT}."""
    return name if name in STANDARD_EVENTS else CUSTOM_EVENT


def carried(platform: str, event: Event) -> Iterator[str]:
    """The names of C{platform}'s keys that C{event} carries (none for a platform without keys)."""
    for name, check, _advice in PLATFORM_KEYS.get(platform, ()):
        if check(event):
            yield name


class Coverage:
    """The counts, and a Prometheus collector of them (register it on tagd's registry)."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.keys: Counter[tuple[str, str, str]] = Counter()
        self.platforms: dict[str, str] = {}

    def count(self, destination: str, platform: str, events: Iterable[Event]) -> None:
        """C{events} were handed to C{destination}, of C{platform}'s type."""
        if platform not in PLATFORM_KEYS:
            return
        self.platforms[destination] = platform
        for event in events:
            label = event_label(event.event_name)
            self.events[destination, label] += 1
            for key in carried(platform, event):
                self.keys[destination, label, key] += 1

    def report(self) -> list[dict]:
        """Per destination and event: the count, and per key its share and advice, the
        least carried first (the dashboard's panel)."""
        rows = []
        for (destination, event), total in sorted(self.events.items()):
            platform = self.platforms[destination]
            keys = [
                {
                    "key": name,
                    "percent": round(100 * self.keys[destination, event, name] / total),
                    "advice": advice,
                }
                for name, _check, advice in PLATFORM_KEYS[platform]
            ]
            keys.sort(key=lambda entry: entry["percent"])
            rows.append({"destination": destination, "event": event, "events": total, "keys": keys})
        return rows

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = CounterMetricFamily(
            "tagd_match_key_events",
            "Events handed to a destination with match keys, by event name.",
            labels=["destination", "event"],
        )
        for (destination, event), count in self.events.items():
            events.add_metric([destination, event], count)
        keys = CounterMetricFamily(
            "tagd_match_keys",
            "Of those events, the ones carrying each of the platform's match keys.",
            labels=["destination", "event", "key"],
        )
        for (destination, event, key), count in self.keys.items():
            keys.add_metric([destination, event, key], count)
        yield events
        yield keys
