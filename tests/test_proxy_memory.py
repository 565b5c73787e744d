"""tagd as users run it (C{twistd -n tagd}) keeps its memory flat while 1 GiB streams through."""

from __future__ import annotations

import re
from pathlib import Path

import pytest_twisted
from twisted.internet.task import LoopingCall

from conftest import eventually, proxy_toml, sleep, within
from helpers import TWISTD, read_log, running

GiB = 1 << 30
MB = 1000 * 1000


def _rss(pid: int) -> int:
    """The resident set size of process C{pid}, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


@pytest_twisted.async_yield_fixture
async def tagd_process(origin, tmp_path):
    """A real tagd process in front of the test origin; yields (pid, port)."""
    config = tmp_path / "tagd.toml"
    config.write_text(
        proxy_toml(
            {"listen": "tcp:0:interface=127.0.0.1", "origin": f"http://127.0.0.1:{origin.port}"}
        )
    )
    log = tmp_path / "tagd.log"
    with running([TWISTD, "-n", "tagd", "--config", str(config)], cwd=tmp_path, log=log) as process:

        def listening():
            if process.poll() is not None:
                raise AssertionError(f"tagd exited with {process.returncode}:\n{read_log(log)}")
            return re.search(rb"starting on (\d+)", log.read_bytes())

        started = await eventually(listening, timeout=20, interval=0.1)
        yield process.pid, int(started.group(1))


@pytest_twisted.ensureDeferred
async def test_one_gibibyte_download_keeps_tagd_memory_flat(tagd_process, connect):
    """A 1 GiB body goes through a twistd-run tagd to a visitor who reads nothing for a
    second and then reads at full speed; tagd's resident memory grows by less than
    20 MB, so it never holds the body."""
    pid, port = tagd_process
    visitor = await connect(port)
    assert (await within(visitor.request(b"GET", b"/page"))).status == 200  # warmed up
    baseline = peak = _rss(pid)

    def sample():
        nonlocal peak
        peak = max(peak, _rss(pid))

    sampler = LoopingCall(sample)
    sampler.start(0.05)
    try:
        visitor.pause()
        answer = visitor.request(b"GET", b"/big?size=%d" % GiB, sink=lambda data: None)
        await sleep(1.0)
        visitor.resume()
        response = await within(answer, 60)
    finally:
        sampler.stop()
    sample()
    assert response.complete and response.body_length == GiB
    assert peak - baseline < 20 * MB, f"tagd grew by {(peak - baseline) / MB:.1f} MB"
