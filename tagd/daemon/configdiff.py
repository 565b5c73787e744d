"""What changed between two configurations, for a reload: pure functions, no I/O.

A reload applies what tagd can change while it serves (the destinations, C{[tracking]},
C{[delivery]}) and names the keys it cannot: those of C{[proxy]} (the listener, the origin
connections and the proxy resource are built from them once), C{[spool]} (the open file)
and C{[admin]} (its listener).  Secrets are compared but never shown: a change is told by
the destination's name or the key's, never by the value.
"""

from __future__ import annotations

from typing import Any

import attrs

from tagd.daemon.config import Config, DestinationConfig

# Tables whose every key is read once, at start-up.
RESTART_TABLES = ("proxy", "spool", "admin")


@attrs.frozen
class Changes:
    """The difference between the running configuration and a new one."""

    added: tuple[str, ...] = ()  # destination names, in the new file's order
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # same name, other type, settings, secret or timeout
    tracking: bool = False  # [tracking] differs
    delivery: bool = False  # [delivery] differs
    restart: tuple[str, ...] = ()  # keys that take effect only after a restart

    @property
    def delivering(self) -> bool:
        """Whether delivery changes: its destinations or its C{[delivery]} settings."""
        return bool(self.added or self.removed or self.changed or self.delivery)

    @property
    def reloadable(self) -> bool:
        """Whether anything a reload applies has changed."""
        return self.delivering or self.tracking

    def summary(self) -> str:
        """The reloadable changes in words, for the log: names only, never values."""
        parts = [
            f"destinations {label}: {', '.join(names)}"
            for label, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed))
            if names
        ]
        parts += [f"[{table}] changed" for table in ("tracking", "delivery") if getattr(self, table)]
        return "; ".join(parts) or "nothing changed"


def _settings(destination: DestinationConfig) -> tuple[Any, ...]:
    """What a destination does, as values: platform destinations compare by identity
    (two tables naming one pixel are two destinations), so their fields are compared."""
    built = destination.destination
    return (
        destination.type,
        destination.timeout,
        destination.consent_purpose,
        type(built),
        attrs.astuple(built, recurse=False),
    )


def restart_keys(old: Config, new: Config) -> tuple[str, ...]:
    """The keys of L{RESTART_TABLES} whose values differ, as C{table.key}."""
    keys = []
    for table in RESTART_TABLES:
        before, after = getattr(old, table), getattr(new, table)
        keys += [
            f"{table}.{field.name}"
            for field in attrs.fields(type(before))
            if getattr(before, field.name) != getattr(after, field.name)
        ]
    return tuple(keys)


def diff(old: Config, new: Config) -> Changes:
    """What a reload from C{old} to C{new} changes, and what it cannot."""
    before = {d.name: d for d in old.destinations}
    after = {d.name: d for d in new.destinations}
    return Changes(
        added=tuple(name for name in after if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(
            name for name in after if name in before and _settings(before[name]) != _settings(after[name])
        ),
        tracking=old.tracking != new.tracking,
        delivery=old.delivery != new.delivery,
        restart=restart_keys(old, new),
    )
