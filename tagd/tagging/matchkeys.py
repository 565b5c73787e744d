"""Match-key coverage: which of the keys a platform matches on each event delivered to it carried.

Meta scores events by how many of its keys they carry (Event Match Quality), and TikTok and
GA4 match or attribute by their own; a shop owner raises the score by adding what is
missing, usually in the tracking header of checkout pages.  So tagd counts, per
destination and event name, the events the platform took (a success: an event
dead-lettered or expired was never sent) and, per key, those carrying it, and says in one
line for each key what raises it.

Counting runs for every delivered batch, on the reactor (about 2 µs an event), so it does
the least it can there: each event counts one entry, the set of its platform's keys it
carried, and those sets are cached by the keys found.
Prometheus (L{Coverage.collect}) and the dashboard add those up only when they ask.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress
from operator import attrgetter
from typing import Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily

from tagd.tagging.events import STANDARD_EVENTS, Event

# Custom event names are the origin's to choose: one label value for all of them keeps the
# number of series bounded.
CUSTOM_EVENT = "custom"

# The advice that raises each key, the same wherever two platforms share a key.
ADVICE: Mapping[str, str] = {
    "email": "put the customer's e-mail in user_data.em wherever the shop knows it (account, checkout, order confirmation)",
    "phone": "put the phone number from checkout in user_data.ph, with its country code",
    "external_id": "put your customer id in user_data.external_id for visitors who are logged in",
    "fbp": "keep first_party_cookies on (and marketing consent asked): tagd sets _fbp itself",
    "fbc": "only ad clicks carry fbclid: track the landing pages, so that tagd keeps _fbc",
    "ttclid": "only TikTok ad clicks carry ttclid: track the landing pages, so that tagd keeps it",
    "ttp": "load TikTok's pixel on the pages: it sets _ttp, which tagd passes on",
    "epik": "only Pinterest ad clicks carry epik: track the landing pages, so that tagd keeps _epik",
    "scclid": "only Snapchat ad clicks carry ScCid: track the landing pages, so that tagd keeps _scclid",
    "scid": "load Snapchat's pixel on the pages: it sets _scid, which tagd passes on",
    "rdt_cid": "only Reddit ad clicks carry rdt_cid: track the landing pages, so that tagd keeps _rdt_cid",
    "rdt_uuid": "load Reddit's pixel on the pages: it sets _rdt_uuid, which tagd passes on",
    "msclkid": "only Microsoft ad clicks carry msclkid: track the landing pages, so that tagd keeps _uetmsclkid",
    "uetvid": "load Microsoft's UET tag on the pages: it sets _uetvid, which tagd passes on",
    "client_id": "load gtag on the pages or keep first_party_cookies on: GA4 gets no event without a client id",
    "session_id": "load gtag on the pages: its _ga_<stream> cookie ties server events to the browser's session",
    "client_ip": "behind a proxy or CDN, list it in [proxy] trusted_proxies so that tagd sees the visitor's address",
    "user_agent": "browsers always send one: its absence means requests that are no page views",
}  # fmt: skip
# How the panel says "carry an e-mail".
DESCRIBED: Mapping[str, str] = {
    "email": "an e-mail", "phone": "a phone number", "external_id": "a customer id",
    "fbp": "_fbp", "fbc": "_fbc (an ad click)", "client_ip": "the visitor's IP",
    "user_agent": "a user agent", "ttclid": "ttclid (an ad click)", "ttp": "_ttp",
    "client_id": "a GA client id", "session_id": "GA's session id",
    "epik": "epik (an ad click)", "scclid": "ScCid (an ad click)", "scid": "_scid",
    "rdt_cid": "rdt_cid (an ad click)", "rdt_uuid": "_rdt_uuid", "msclkid": "msclkid (an ad click)",
    "uetvid": "_uetvid",
}  # fmt: skip
# Each platform's keys, in the platform's order: Meta's em, ph, external_id, fbp, fbc, IP
# and user agent, and the other platforms' equivalents.
PLATFORM_KEYS: Mapping[str, tuple[str, ...]] = {
    "meta": ("email", "phone", "external_id", "fbp", "fbc", "client_ip", "user_agent"),
    "tiktok": ("email", "phone", "external_id", "ttclid", "ttp", "client_ip", "user_agent"),
    "ga4": ("client_id", "session_id", "email", "phone", "client_ip", "user_agent"),
    "pinterest": ("email", "phone", "external_id", "epik", "client_ip", "user_agent"),
    "snapchat": ("email", "phone", "external_id", "scclid", "scid", "client_ip", "user_agent"),
    "reddit": ("email", "phone", "external_id", "rdt_cid", "rdt_uuid", "client_ip", "user_agent"),
    "microsoft": ("email", "phone", "external_id", "msclkid", "uetvid", "client_ip", "user_agent"),
}


def event_label(name: str) -> str:
    """The event name as a label value: Meta's standard names, every other one as L{CUSTOM_EVENT}."""
    return name if name in STANDARD_EVENTS else CUSTOM_EVENT


# The keys an event may carry, and a getter of the event's fields that hold them, in the
# same order after the three of the user data: one C call reads them all.
_KEY_NAMES = (
    "email", "phone", "external_id", "fbp", "fbc", "ttclid", "ttp", "client_id", "session_id", "epik",
    "scclid", "scid", "rdt_cid", "rdt_uuid", "msclkid", "uetvid", "client_ip", "user_agent",
)  # fmt: skip
_KEY_FIELDS = attrgetter(
    "fbp", "fbc", "ttclid", "ttp", "ga_client_id", "ga_session_id", "epik",
    "scclid", "scid", "rdt_cid", "rdt_uuid", "msclkid", "uetvid", "client_ip", "user_agent",
)  # fmt: skip


# The keys carried, by which of the values are not empty: events come in a few dozen such
# shapes, each key set built once (a bound keeps a flood of rare shapes out).
_SHAPES: dict[tuple[bool, ...], frozenset[str]] = {}
MAX_SHAPES = 1024


def present(event: Event) -> frozenset[str]:
    """Every key (of any platform) that C{event} carries: those whose value is not empty.

    This runs for every event delivered to each destination, on the reactor."""
    user = event.user_data
    values = (user.get("em"), user.get("ph"), user.get("external_id"), *_KEY_FIELDS(event))
    shape = tuple(map(bool, values))
    found = _SHAPES.get(shape)
    if found is None:
        found = frozenset(compress(_KEY_NAMES, values))
        if len(_SHAPES) < MAX_SHAPES:
            _SHAPES[shape] = found
    return found


def carried(platform: str, event: Event) -> frozenset[str]:
    """The names of C{platform}'s keys that C{event} carries (none for a platform without keys)."""
    return present(event) & frozenset(PLATFORM_KEYS.get(platform, ()))


def coverage(events: Mapping[tuple[str, str], int], keys: Mapping[tuple[str, str, str], int]) -> list[dict]:
    """The dashboard's panel from the counters' values: per destination and event, the
    events delivered and, per key, the share carrying it and the advice that raises it,
    the least carried first."""
    rows = {
        (destination, event): {"destination": destination, "event": event, "events": total, "keys": []}
        for (destination, event), total in sorted(events.items())
        if total
    }
    for (destination, event, key), count in keys.items():
        row = rows.get((destination, event))
        if row is not None and key in ADVICE:
            percent = round(100 * count / row["events"])
            row["keys"].append({"key": key, "carry": DESCRIBED[key], "percent": percent, "advice": ADVICE[key]})
    for row in rows.values():
        row["keys"].sort(key=lambda entry: (entry["percent"], entry["key"]))
    return list(rows.values())


class Coverage:
    """The counts, and a Prometheus collector of them (register it on tagd's registry)."""

    def __init__(self) -> None:
        # (destination, event label, the platform's keys carried) -> events
        self._seen: Counter[tuple[str, str, frozenset[str]]] = Counter()
        self._platforms: dict[str, str] = {}
        self._own_keys: dict[tuple[str, frozenset[str]], frozenset[str]] = {}

    def count(self, name: str, kind: str, events: Iterable[Event]) -> None:
        """C{events} were delivered to destination C{name} of type C{kind}; a type without
        match keys (webhook, log) is not counted."""
        keys = PLATFORM_KEYS.get(kind)
        if keys is None:
            return
        self._platforms[name] = kind
        for event in events:
            found = present(event)
            own = self._own_keys.get((kind, found))
            if own is None:
                own = self._own_keys[kind, found] = found & frozenset(keys)
            self._seen[name, event_label(event.event_name), own] += 1

    def totals(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, str], int]]:
        """Events per (destination, event), and per (destination, event, key) those
        carrying the key; every key of the platform from the first event, at 0 until one
        carries it."""
        events: Counter[tuple[str, str]] = Counter()
        keys: Counter[tuple[str, str, str]] = Counter()
        for (name, label, own), count in self._seen.items():
            events[name, label] += count
            for key in PLATFORM_KEYS[self._platforms[name]]:
                keys[name, label, key] += count if key in own else 0
        return dict(events), dict(keys)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals, keys = self.totals()
        events = CounterMetricFamily(
            "tagd_match_key_events",
            "Events delivered to a destination with match keys, by event name.",
            labels=["destination", "event"],
        )
        for (destination, event), count in totals.items():
            events.add_metric([destination, event], count)
        carrying = CounterMetricFamily(
            "tagd_match_keys",
            "Of those events, the ones carrying each of the platform's match keys.",
            labels=["destination", "event", "key"],
        )
        for (destination, event, key), count in keys.items():
            carrying.add_metric([destination, event, key], count)
        yield events
        yield carrying
