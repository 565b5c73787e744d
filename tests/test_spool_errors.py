"""A spool that cannot be opened: tagd says so once, and goes on proxying and tagging.

tagd runs as users run it (C{twistd -n tagd --config FILE}) with its C{[spool] path} in a
read-only directory, on a file that is not a database, or in a directory that does not
exist.  In each case it must start, log one error line naming the path and the reason,
answer visitors as always, still send their events straight to the platforms (best
effort), stay up (no crash, hence no restart loop under systemd), leave the file it could
not use as it was, and stop cleanly on SIGTERM.

The origin and the fake Meta, GA4 and TikTok (tests/fakes.py) are served from threads.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from conftest import FAKE_GA4_SECRET, FAKE_META_TOKEN, FAKE_TIKTOK_TOKEN, process_config, threaded_platforms
from helpers import TRACKED_PAGE, TagdProcess, TrackedOrigin, browser_get, free_port, wait_until


@pytest.fixture
def servers():
    """The origin and the three platforms, all up; stopped after the test."""
    origin = TrackedOrigin()
    platforms = threaded_platforms()
    for platform in platforms:
        platform.up()
    try:
        yield origin, platforms
    finally:
        for platform in platforms:
            platform.close()
        origin.close()


def write_config(tmp_path: Path, origin: TrackedOrigin, platforms, spool: Path) -> Path:
    """Write the configuration of a tagd in front of the servers with its spool at C{spool};
    return where."""
    config = tmp_path / "tagd.toml"
    config.write_text(process_config(free_port(), origin.url, spool, platforms))
    return config


def run_without_spool(
    tmp_path: Path, origin: TrackedOrigin, platforms, spool: Path, reasons: tuple[str, ...]
) -> None:
    """Run tagd with the unusable C{spool}, visit tracked pages, and check everything this
    module promises; C{reasons} are the words of which the error line must hold one."""
    tagd = TagdProcess(write_config(tmp_path, origin, platforms, spool), tmp_path)
    try:
        port = tagd.start()
        event_ids = [f"{spool.parent.name}-{i}" for i in range(5)]
        for event_id in event_ids:
            status, headers, body = browser_get(port, f"/e/{event_id}")
            assert (status, body) == (200, TRACKED_PAGE)
            cookies = [value for name, value in headers if name.lower() == "set-cookie"]
            assert any(value.startswith("tagd_event_id=") for value in cookies), cookies
        wait_until(
            lambda: all(set(event_ids) <= platform.delivered_ids() for platform in platforms),
            10,
            "every event sent straight to every platform",
        )
        time.sleep(1.0)  # time for a crash or a second complaint to show
        assert tagd.process.poll() is None, f"tagd exited:\n{tagd.logs()}"
        assert browser_get(port, "/e/still-up")[0] == 200
        assert [platform.cut for platform in platforms] == [0, 0, 0]  # none cut before the stop
        tagd.process.terminate()
        wait_until(lambda: tagd.process.poll() is not None, 10, "stopped after SIGTERM")
    finally:
        tagd.close()

    log = tagd.logs()
    assert len(tagd.runs) == 1
    assert "Server Shut Down." in log
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if "#error]" in line or "#critical]" in line]
    assert len(errors) == 1, errors
    (error,) = errors
    assert str(spool) in error, error
    assert any(reason in error for reason in reasons), error
    for secret in (FAKE_META_TOKEN, FAKE_GA4_SECRET, FAKE_TIKTOK_TOKEN):
        assert secret not in log
    for platform in platforms:
        assert platform.violations == []


def test_spool_in_a_read_only_directory(tmp_path, servers, make_read_only):
    """The spool's directory cannot be written: tagd logs one error naming the path and
    why, proxies and tags as usual sending events straight to the platforms, stays up,
    and creates nothing there."""
    origin, platforms = servers
    directory = tmp_path / "read-only"
    directory.mkdir()
    make_read_only(directory)
    spool = directory / "spool.sqlite3"

    run_without_spool(
        tmp_path, origin, platforms, spool, ("Operation not permitted", "Permission denied", "read-only")
    )
    assert list(directory.iterdir()) == []


def test_existing_spool_in_a_directory_made_read_only(tmp_path, servers, make_read_only):
    """A spool from an earlier run whose directory has since become read-only (SQLite
    cannot create its WAL files next to it): the same, and the file is left as it was."""
    origin, platforms = servers
    directory = tmp_path / "remounted"
    directory.mkdir()
    spool = directory / "spool.sqlite3"
    earlier = TagdProcess(write_config(tmp_path, origin, platforms, spool), tmp_path / "earlier")
    (tmp_path / "earlier").mkdir()
    try:
        earlier.start()
        earlier.process.terminate()
        wait_until(lambda: earlier.process.poll() is not None, 10, "the earlier run stopped")
    finally:
        earlier.close()
    assert sorted(p.name for p in directory.iterdir()) == ["spool.sqlite3", "spool.sqlite3.intake.lock"]
    before = spool.read_bytes()
    make_read_only(directory)

    reasons = ("cannot be opened", "read-only", "Permission denied")
    run_without_spool(tmp_path, origin, platforms, spool, reasons)
    assert spool.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["spool.sqlite3", "spool.sqlite3.intake.lock"]


def test_spool_file_that_is_not_a_database(tmp_path, servers):
    """A spool file of garbage bytes: the same, and tagd never overwrites it (someone may
    want to look at what it was)."""
    origin, platforms = servers
    directory = tmp_path / "corrupt"
    directory.mkdir()
    spool = directory / "spool.sqlite3"
    garbage = random.Random(4).randbytes(64 * 1024)
    spool.write_bytes(garbage)

    run_without_spool(tmp_path, origin, platforms, spool, ("not a SQLite database", "damaged"))
    assert spool.read_bytes() == garbage


def test_spool_in_a_directory_that_does_not_exist(tmp_path, servers):
    """The spool's directory does not exist: the same."""
    origin, platforms = servers
    spool = tmp_path / "missing" / "deeper" / "spool.sqlite3"

    reasons = ("No such file or directory", "does its directory exist")
    run_without_spool(tmp_path, origin, platforms, spool, reasons)
