"""The spool's intake journal: an accepted event is in the kernel before enqueueing returns.

The spool keeps accepted events in memory until a group-commit tick writes what is still
owed of them (L{tagd.delivery.held}), so that no visitor waits for the disk.  A process killed meanwhile (C{kill -9}, the OOM killer, a crash)
would lose them, although their visitors had their answers.  So L{Spool.enqueue} also
appends each event, as one line, to a journal segment beside the spool file: one
C{write(2)} into the page cache, never a sync, so the reactor does not wait for the disk
either (opening the next segment after a tick is the only other call it makes).
What the kernel holds outlives the process.

Each tick seals the segment being written (the next event opens a new one), and the next
tick, once it wrote what is still owed of those events (or found nothing owed), removes
it.  At start-up L{Spool.open} replays the segments it finds: a line whose key the
spool's sequence covers was dealt with before the process died (written, or delivered
and skipped: every write moves the sequence past the keys it covers) and is skipped, any
other is inserted.  Keys are handed out in order, and only by the one process that
writes events; a lock beside the spool (L{Journal.lock}) keeps a second process from
opening it meanwhile.

What the journal does not cover: an OS crash or a power loss before the kernel wrote the
page cache out (the group commit's sync covers written events), and an event the
process had not yet accepted (see docs/delivery.md: acceptance follows the response head).

A segment holds what the spool holds (personal data), so it is created with mode 0600.
Lines are C{key TAB created TAB destinations TAB body}: the body is the spool's JSON of
the event, which escapes every control character, so a line holds no tab or newline of
its own.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
from typing import Sequence

import attrs

SEGMENT = ".intake-"  # a segment is the spool's path, this, and its number
LOCK = ".intake.lock"  # the spool's path and this: held by the process that has the spool open
UNREADABLE = ".unreadable"  # added to a segment that could not be read at start-up


@attrs.frozen
class Entry:
    """One accepted event as the journal keeps it."""

    key: int
    created: float
    destinations: tuple[str, ...]
    event_id: str = attrs.field(repr=False)
    body: str = attrs.field(repr=False)


def entry_line(key: int, created: float, destinations: str, body: str) -> bytes:
    """The journal line of an event; C{destinations} is their JSON list, C{body} the event's JSON."""
    return f"{key}\t{created!r}\t{destinations}\t{body}\n".encode("utf-8")


def _entry(line: bytes) -> Entry:
    key, created, destinations, body = line.decode("utf-8").split("\t", 3)
    names = json.loads(destinations)
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError("no destinations")
    event = json.loads(body)  # a line cut short by a full disk ends inside its body
    if not isinstance(event, dict) or not isinstance(event.get("event_id"), str):
        raise ValueError("not an event")
    return Entry(int(key), float(created), tuple(names), event["event_id"], body)


def read_segment(path: str) -> tuple[list[Entry], int]:
    """The entries of the segment at C{path}, and how many of its lines could not be read
    (a write the disk had no room to finish)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    entries, unreadable = [], 0
    for line in lines:
        if not line:
            continue
        try:
            entries.append(_entry(line))
        except (ValueError, UnicodeDecodeError):
            unreadable += 1
    return entries, unreadable


def _number(path: str, prefix: str) -> int | None:
    suffix = path[len(prefix) :]
    return int(suffix) if suffix.isascii() and suffix.isdigit() else None


class Journal:
    """The segments of one spool file (used on the reactor thread, L{lock} aside)."""

    def __init__(self, spool_path: str) -> None:
        self._lock_path = os.path.abspath(spool_path) + LOCK
        self._lock_fd: int | None = None
        self._prefix = os.path.abspath(spool_path) + SEGMENT
        self._fd: int | None = None
        self._writing: str | None = None
        self._cut: list[str] = []  # segments a failed append sealed, for the next seal() to return
        self._last = max((number for _, number in self._numbered()), default=0)

    def _numbered(self) -> list[tuple[str, int]]:
        found = ((path, _number(path, self._prefix)) for path in glob.glob(glob.escape(self._prefix) + "*"))
        return [(path, number) for path, number in found if number is not None]

    def lock(self) -> bool:
        """Take the spool for this process; False when another process holds it.

        Keys are handed out by one process only (see above): a second one replaying the
        first one's journal and moving the sequence on would make that one's group
        commits fail for good.  The kernel releases the lock when the process ends, however.
        """
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                return False
            raise
        self._lock_fd = fd
        return True

    @property
    def lock_path(self) -> str:
        """The lock file, for messages about it."""
        return self._lock_path

    def unlock(self) -> None:
        """Let another process open the spool (once it is closed)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def leftovers(self) -> list[str]:
        """The segments on disk now, oldest first: at start-up, those of a process that died."""
        return [path for path, _ in sorted(self._numbered(), key=lambda found: found[1])]

    def append(self, data: bytes) -> None:
        """Append C{data} (whole lines) to the segment being written, opening one if none is;
        raises L{OSError} when the kernel did not take all of it.  The next line must not be
        glued to a cut one, so a failed append ends its segment; the next L{seal} returns it
        with the others, for removal once their events are committed."""
        if self._fd is None:
            self._last += 1
            path = f"{self._prefix}{self._last:08d}"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._writing = path
        try:
            written = os.write(self._fd, data)
        except OSError:
            self._cut += self._close_segment()
            raise
        if written != len(data):
            self._cut += self._close_segment()
            raise OSError(f"the disk took {written} of {len(data)} bytes")

    def seal(self) -> list[str]:
        """Stop writing to the current segment; returns every segment ended since the last
        call (this one, and those that failed appends ended)."""
        ended, self._cut = [*self._cut, *self._close_segment()], []
        return ended

    def _close_segment(self) -> list[str]:
        if self._fd is None:
            return []
        fd, path, self._fd, self._writing = self._fd, self._writing, None, None
        try:
            os.close(fd)
        except OSError:
            pass  # The descriptor is gone all the same, and what was written is in the kernel.
        return [path]


def discard(paths: Sequence[str]) -> list[str]:
    """Remove the segments at C{paths}; returns why each one that could not be removed stays
    (it is harmless: a later replay skips what was committed)."""
    problems = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(f"{os.path.basename(path)}: {e.strerror}")
    return problems
