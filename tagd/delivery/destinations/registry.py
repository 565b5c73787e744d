"""Destination types by name, as C{type = "..."} in a C{[[destinations]]} table."""

from __future__ import annotations

import importlib
from types import ModuleType

DESTINATION_TYPES = ("meta", "ga4", "tiktok", "pinterest", "snapchat", "reddit", "microsoft", "webhook", "log")


def destination_module(kind: str) -> ModuleType:
    """The module of destination type C{kind}: its C{KEYS}, C{SECRETS}, C{DEFAULT_TIMEOUT},
    C{DEFAULT_CONCURRENCY}, C{build}."""
    if kind not in DESTINATION_TYPES:
        raise KeyError(kind)
    return importlib.import_module(f"tagd.delivery.destinations.{kind}")
