"""The counters tagd keeps, on a Prometheus registry of its own.

Every drop, delivery outcome and malformed header is counted here, so that a filter never
silently swallows traffic: the admin listener exposes the registry as C{/metrics}.
A registry is passed in (a fresh one per test) rather than Prometheus' global one.
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge

from tagd.tagging.matchkeys import Coverage

# Every reason tagd_tracking_dropped_total counts (by L{tagd.tagging.tracker} and L{tagd.delivery.service}).
DROP_REASONS = (
    "method", "path", "status", "prefetch", "bot", "consent", "malformed", "event_time", "too_many_events",
    "queue_full", "no_destination",
)


@attrs.define
class Metrics:
    """tagd's counters.  Label values are fixed words and destination names, never user data."""

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    tracking_dropped: Counter = attrs.field(init=False)
    events_accepted: Counter = attrs.field(init=False)
    deliveries: Counter = attrs.field(init=False)
    delivery_retries: Counter = attrs.field(init=False)
    config_reloads: Counter = attrs.field(init=False)
    credentials_refused: Gauge = attrs.field(init=False)
    destination_up: Gauge = attrs.field(init=False)
    visitor_connections: Gauge = attrs.field(init=False)
    visitor_connections_refused: Counter = attrs.field(init=False)
    consent_withheld: Counter = attrs.field(init=False)
    match_keys: Coverage = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.tracking_dropped = Counter(
            "tagd_tracking_dropped",
            "Tracked responses or events dropped on purpose, by reason.",
            ["reason"],
            registry=self.registry,
        )
        # Every series from the start, at 0: a rate alert on a reason needs one to match
        # before the first such drop (as for the reload results below).
        for reason in DROP_REASONS:
            self.tracking_dropped.labels(reason)
        self.events_accepted = Counter(
            "tagd_events_accepted",
            "Events accepted for delivery: taken by the spool, or sent at once by a tagd without one.",
            registry=self.registry,
        )
        self.deliveries = Counter(
            "tagd_events_delivered",
            "Events by destination and the outcome of their delivery attempt.",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.delivery_retries = Counter(
            "tagd_delivery_retries",
            "Events the dispatcher scheduled for another attempt after a transient failure.",
            ["destination"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "tagd_config_reloads",
            "Configuration reloads (SIGHUP) by result: ok, or failed (the old one kept).",
            ["result"],
            registry=self.registry,
        )
        # Both series from the start, at 0: an alert on "failed" needs one to compare with.
        for result in ("ok", "failed"):
            self.config_reloads.labels(result)
        self.credentials_refused = Gauge(
            "tagd_destination_credentials_refused",
            "1 while the platform refuses the destination's credentials and nothing is sent to it.",
            ["destination"],
            registry=self.registry,
        )
        self.destination_up = Gauge(
            "tagd_destination_up",
            "1 while the destination accepts requests; 0 while it is out (every request fails) or refuses the credentials.",
            ["destination"],
            registry=self.registry,
        )
        # Read from the site when scraped (it sets the function): nothing per connection.
        self.visitor_connections = Gauge(
            "tagd_visitor_connections",
            "Visitor connections open now; at [proxy] max_connections new ones are refused.",
            registry=self.registry,
        )
        self.visitor_connections_refused = Counter(
            "tagd_visitor_connections_refused",
            "Visitor connections closed as soon as accepted, max_connections being open already.",
            registry=self.registry,
        )
        self.consent_withheld = Counter(
            "tagd_consent_withheld",
            "Events not handed to a destination: the visitor did not grant its consent_purpose.",
            ["destination"],
            registry=self.registry,
        )
        self.match_keys = Coverage()
        self.registry.register(self.match_keys)

    def value(self, counter: str, **labels: str) -> float:
        """A counter's current value (for the CLI and the tests)."""
        sample = self.registry.get_sample_value(f"tagd_{counter}_total", labels or None)
        return sample or 0.0
