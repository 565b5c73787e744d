"""C{tagd send-test-event} and C{tagd check-config} for Pinterest, Snapchat, Reddit and
Microsoft, as a user runs them: the installed console script against the fakes on loopback."""

from __future__ import annotations

import tomllib

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from conftest import serve_quietly, within
from fakes import FakeMicrosoft, FakePinterest, FakeReddit, FakeSnapchat
from test_cli import ok, tagd

TOKEN = "platform-token-6f3a"
# type: (fake, its id key and value, the test-mode setting, what the fake sees of it)
PLATFORMS = {
    "pinterest": (FakePinterest, ("ad_account_id", "549755885175"), "test = true"),
    "snapchat": (FakeSnapchat, ("pixel_id", "snap-pixel-1"), 'test_event_code = "TEST77"'),
    "reddit": (FakeReddit, ("pixel_id", "t2_abc123"), 'test_id = "t2_test"'),
    "microsoft": (FakeMicrosoft, ("tag_id", "343000123"), ""),
}


def table(kind: str, base: str, token: str = TOKEN, extra: str = "") -> str:
    _, (key, value), _ = PLATFORMS[kind]
    return (
        f'[[destinations]]\ntype = "{kind}"\n{key} = "{value}"\naccess_token = "{token}"\n'
        f'endpoint = "{base}"\n{extra}\n'
    )


def seen_in_test_mode(kind: str, request) -> bool:
    """Whether the platform saw the request as a test (Microsoft has no test mode)."""
    body = request.body
    if kind == "pinterest":
        return request.query.get("test") == ["true"]
    if kind == "snapchat":
        return body.get("test_event_code") == "TEST77"
    if kind == "reddit":
        return body["data"].get("test_id") == "t2_test"
    return True


@pytest.mark.parametrize("kind", PLATFORMS)
@pytest_twisted.ensureDeferred
async def test_send_test_event(tmp_path, kind):
    """One test event reaches the platform in its test mode (Microsoft has none, and the
    command warns of it), passes its checks, and the answer is shown without the token."""
    fake_type, (key, value), test_mode = PLATFORMS[kind]
    served = serve_quietly(fake_type(**{key: value, "access_token": TOKEN}))
    try:
        (tmp_path / "tagd.toml").write_text(table(kind, served.base, extra=test_mode))
        result = await within(deferToThread(tagd, "send-test-event", "--destination", kind, cwd=tmp_path))
    finally:
        await within(Deferred.fromCoroutine(served.stop()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status: 200" in result.stdout.splitlines()
    assert "outcome: success" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    (request,) = served.fake.requests
    assert request.violations == []
    assert seen_in_test_mode(kind, request)
    assert ("without a test mode" in result.stderr) is (kind == "microsoft")


@pytest.mark.parametrize("kind", PLATFORMS)
@pytest_twisted.ensureDeferred
async def test_send_test_event_with_a_wrong_token(tmp_path, kind):
    """A refused token: exit status 1, the outcome is auth, the token nowhere."""
    fake_type, (key, value), _ = PLATFORMS[kind]
    served = serve_quietly(fake_type(**{key: value, "access_token": TOKEN}))
    wrong = "wrong-token-9c1d"
    try:
        (tmp_path / "tagd.toml").write_text(table(kind, served.base, wrong))
        result = await within(deferToThread(tagd, "send-test-event", "--destination", kind, cwd=tmp_path))
    finally:
        await within(Deferred.fromCoroutine(served.stop()))
    assert result.returncode == 1
    assert "outcome: auth" in result.stdout
    assert wrong not in result.stdout + result.stderr
    assert "has no" in result.stderr or "without a test mode" in result.stderr


def test_check_config_shows_every_key_with_the_token_masked(tmp_path):
    text = "".join(table(kind, "https://proxy.example/") for kind in PLATFORMS)
    (tmp_path / "tagd.toml").write_text(text)
    output = ok(tagd("check-config", "tagd.toml", cwd=tmp_path))
    assert TOKEN not in output
    pin, snap, rdt, ms = tomllib.loads(output)["destinations"]
    assert pin == {
        "type": "pinterest", "name": "pinterest", "timeout": 3.0, "ad_account_id": "549755885175",
        "access_token": "***", "test": False, "endpoint": "https://proxy.example", "event_names": {},
        "max_batch": 1000, "consent_purpose": "marketing", "concurrency": 2,
    }  # fmt: skip
    assert (snap["pixel_id"], snap["max_batch"], snap["access_token"]) == ("snap-pixel-1", 1000, "***")
    assert (rdt["pixel_id"], rdt["max_batch"]) == ("t2_abc123", 1000)
    assert (ms["tag_id"], set(ms)) == (
        "343000123",
        {"type", "name", "timeout", "tag_id", "access_token", "endpoint", "event_names", "max_batch", "consent_purpose",
         "concurrency"},
    )
    assert "# test_event_code is not set" in output and "# test_id is not set" in output
    (tmp_path / "printed.toml").write_text(output)
    assert ok(tagd("check-config", "printed.toml", cwd=tmp_path)).splitlines()[1:] == output.splitlines()[1:]


def test_the_dry_run_shows_the_four_platforms_when_asked(tmp_path):
    """A log destination naming the four shows what each would get, and why not."""
    (tmp_path / "tagd.toml").write_text(
        '[[destinations]]\ntype = "log"\nplatforms = ["pinterest", "snapchat", "reddit", "microsoft"]\n'
    )
    lines = ok(tagd("send-test-event", "--destination", "log", cwd=tmp_path)).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["pinterest", "snapchat", "reddit", "microsoft"]
    for line, name in zip(lines, ('"page_visit"', '"PAGE_VIEW"', '"PAGE_VISIT"', '"pageLoad"')):
        assert name in line and "https://tagd.test/" in line and "192.0.2.0" in line
