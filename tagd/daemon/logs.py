"""tagd's log observer for twistd: C{twistd --logger=tagd.daemon.logs.observer -n tagd ...}.

Under systemd stdout is a pipe to journald, and a log that tools can read is one JSON
object per line: the time, the level, the namespace (the module that logged), the message
as text, and for an error the traceback.  Nothing else of the event is written: its other
fields are whatever the caller passed to the message, and only the message says which of
them are fit for a log (a URL's query or a request's headers could carry a token).  On a
terminal the same events are written as twistd's usual readable lines.

The lowest level written comes from C{TAGD_LOG_LEVEL} (C{debug}, C{info}, C{warn},
C{error}, C{critical}; C{info} when unset).  twistd creates the observer by calling the
factory named by C{--logger} with no arguments, so the environment is the one source of a
setting it can read without global state; systemd sets it with C{Environment=}.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import Callable, Mapping, TextIO

from twisted.logger import ILogObserver, LogLevel, formatEvent, formatEventAsClassicLogText
from zope.interface import implementer

from tagd.daemon.startup import CONFIG_ERROR_EXIT, critical_event

LEVEL_VARIABLE = "TAGD_LOG_LEVEL"
DEFAULT_LEVEL = "info"

_LEVELS = list(LogLevel.iterconstants())  # lowest first
_NAMES = {level.name: level for level in _LEVELS} | {"warning": LogLevel.warn}


def observer(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> ILogObserver:
    """The observer twistd's C{--logger} asks for: JSON lines on C{stream} (stdout) unless it
    is a terminal, at the level C{TAGD_LOG_LEVEL} names.

    The stream is taken now, before twistd points C{sys.stdout} at the log itself.  A level
    tagd does not know stops start-up as a bad configuration file does: one line, in the
    form the others would have had, and the exit status of a configuration error, which
    systemd does not restart.
    """
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    name = environ.get(LEVEL_VARIABLE, "").strip().lower() or DEFAULT_LEVEL
    render = formatEventAsClassicLogText if stream.isatty() else json_line
    if name not in _NAMES:
        message = f"tagd: {LEVEL_VARIABLE}={name!r}: must be one of debug, info, warn, error, critical"
        LevelObserver(stream, render, LogLevel.critical)(critical_event(message, __name__))
        raise SystemExit(CONFIG_ERROR_EXIT)
    return LevelObserver(stream, render, _NAMES[name])


def json_line(event: Mapping) -> str:
    """C{event} as one line of JSON: time, level, namespace, text, and failure if any."""
    level = event.get("log_level", LogLevel.info)
    when = event.get("log_time")
    record = {
        "time": None if when is None else datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds"),
        "level": level.name,
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    # ASCII escapes keep a line one line and writable whatever stdout's encoding.
    return json.dumps(record) + "\n"


@implementer(ILogObserver)
class LevelObserver:
    """Writes each event at C{minimum} or above to C{stream} as C{render} formats it.

    An event below the level is dropped with one set lookup, before any formatting: the
    dispatcher's per-attempt debug lines cost next to nothing at the default level.
    """

    def __init__(self, stream: TextIO, render: Callable[[Mapping], str | None], minimum: LogLevel) -> None:
        self._stream = stream
        self._render = render
        self._levels = frozenset(_LEVELS[_LEVELS.index(minimum):])

    def __call__(self, event: Mapping) -> None:
        if event.get("log_level", LogLevel.info) not in self._levels:
            return
        text = self._render(event)
        if text:
            self._stream.write(text)
            # A pipe is block-buffered: without this, journald would get lines minutes late.
            self._stream.flush()
