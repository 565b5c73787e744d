"""tagd as users run it (C{twistd -n tagd}) keeps its memory flat while 1 GiB streams through."""

from __future__ import annotations

import pytest_twisted

from conftest import sampling_memory, sleep, twistd_tagd, within

GiB = 1 << 30
MB = 1000 * 1000



@pytest_twisted.async_yield_fixture
async def tagd_process(origin, tmp_path):
    """A real tagd process in front of the test origin; yields (pid, port)."""
    async with twistd_tagd(f"http://127.0.0.1:{origin.port}", tmp_path) as started:
        yield started


@pytest_twisted.ensureDeferred
async def test_one_gibibyte_download_keeps_tagd_memory_flat(tagd_process, connect):
    """A 1 GiB body goes through a twistd-run tagd to a visitor who reads nothing for a
    second and then reads at full speed; tagd's resident memory grows by less than
    5 MB, so it never holds the body."""
    pid, port = tagd_process
    visitor = await connect(port)
    assert (await within(visitor.request(b"GET", b"/page"))).status == 200  # warmed up
    with sampling_memory(pid) as memory:
        visitor.pause()
        answer = visitor.request(b"GET", b"/big?size=%d" % GiB, sink=lambda data: None)
        await sleep(1.0)
        visitor.resume()
        response = await within(answer, 60)
    assert response.complete and response.body_length == GiB
    assert memory.growth < 5 * MB, f"tagd grew by {memory.growth / MB:.1f} MB"
