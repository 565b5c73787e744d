"""Unit tests for L{tagd.ratelimit}: one line a minute of each kind, with a count of the rest."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from tagd.ratelimit import RateLimitedLog


def test_one_line_per_kind_per_interval_with_the_count_held_back():
    """Lines of one kind within the interval are held back and counted in the next one
    written; another kind has an interval of its own."""
    events: list[dict] = []
    clock = Clock()
    limited = RateLimitedLog(Logger(observer=events.append), clock.seconds, interval=60)
    for _ in range(3):
        limited.warn("a", "refused: {why}", why="a")
    limited.warn("b", "refused: {why}", why="b")
    clock.advance(59)
    limited.warn("a", "refused: {why}", why="a")
    clock.advance(1)
    limited.warn("a", "refused: {why}", why="a")
    assert [formatEvent(e) for e in events] == [
        "refused: a (0 more since the last such line)",
        "refused: b (0 more since the last such line)",
        "refused: a (3 more since the last such line)",
    ]


def test_information_lines_are_limited_the_same_way():
    """info takes the same interval per kind as warn, at the information level."""
    from twisted.logger import LogLevel

    events: list[dict] = []
    clock = Clock()
    limited = RateLimitedLog(Logger(observer=events.append), clock.seconds, interval=60)
    limited.info("slow", "closed: {why}", why="late")
    limited.info("slow", "closed: {why}", why="late")
    clock.advance(60)
    limited.info("slow", "closed: {why}", why="late")
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (LogLevel.info, "closed: late (0 more since the last such line)"),
        (LogLevel.info, "closed: late (1 more since the last such line)"),
    ]
