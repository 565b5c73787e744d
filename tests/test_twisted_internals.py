"""The private parts of Twisted that tagd uses, each checked for the shape tagd relies on.

Twisted is pinned to one release series because of them (setup.cfg).  On a new series,
a test here that fails names the internal that is gone or has changed and the place in
tagd that uses it, rather than leaving a broken hot path to some distant test.  The
internals are listed once, in L{INTERNALS}; docs/dependencies.md's paragraph lists the
same ones, and a test keeps the two lists alike.

The checks use real objects: a Twisted Web channel and its TCP transport on a loopback
connection whose request head has arrived and whose body has not (as tagd's request
sees them when it forwards a large upload), a connection pool connecting over loopback,
and endpoints parsed as tagd's configuration parses them.
"""

from __future__ import annotations

import configparser
import inspect
import re
from typing import Awaitable, Callable

import attrs
import pytest
import pytest_twisted
import twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.tcp import Connection
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from conftest import within
from helpers import REPO_ROOT

UPLOAD_HEAD = b"POST /upload?part=1 HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 100000\r\n\r\n"


class _HeadOnlyRequest(Request):
    """Hands itself to the test once its head is in; its body never comes."""

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        self.channel.site.heads.callback(self)


@attrs.frozen
class Live:
    """Twisted objects in the state in which tagd uses their internals."""

    reactor: object
    channel: HTTPChannel  # the request line in, the body still to come
    request: Request
    visitor: object  # the WireVisitor at the other end of the channel's connection
    port: int  # where the channel's site listens


@pytest_twisted.async_yield_fixture
async def live(reactor, connect):
    """A Twisted Web site on loopback and a visitor that has sent an upload's head only."""
    site = Site(Resource(), requestFactory=_HeadOnlyRequest)
    site.heads = Deferred()
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        port = listening.getHost().port
        visitor = await connect(port)
        visitor.send(UPLOAD_HEAD)
        request = await within(site.heads)
        yield Live(reactor, request.channel, request, visitor, port)
    finally:
        await listening.stopListening()


class Changed(AssertionError):
    """An internal is not what tagd expects; the message says how."""


def attribute(owner: object, name: str, kind: type | tuple[type, ...]):
    """C{owner}'s attribute C{name}, which must be an instance of C{kind}."""
    if not hasattr(owner, name):
        raise Changed(f"{type(owner).__name__} has no attribute {name}")
    value = getattr(owner, name)
    if not isinstance(value, kind):
        raise Changed(f"{name} is {value!r}, not of the type {getattr(kind, '__name__', kind)}")
    return value


def takes(function: Callable, *args: object) -> None:
    """C{function} must be callable with C{args}, as tagd calls it."""
    if not callable(function):
        raise Changed(f"{function!r} is not callable")
    try:
        inspect.signature(function).bind(*args)
    except TypeError as e:
        raise Changed(f"{function!r} no longer takes {len(args)} argument(s): {e}") from None


# -- the checks, one per internal -----------------------------------------------------


def _request_line_part(name: str, expected: bytes) -> Callable[[Live], Awaitable[None]]:
    async def check(live: Live) -> None:
        value = attribute(live.channel, name, bytes)
        if value != expected:
            raise Changed(f"{name} is {value!r} while the body streams, not {expected!r}")

    return check


async def _waiting_for_transport(live: Live) -> None:
    if attribute(live.channel, "_waitingForTransport", bool):
        raise Changed("_waitingForTransport is set on a channel whose writes are not blocked")
    live.channel.pauseProducing()  # as the transport does when the visitor reads too slowly
    try:
        if live.channel._waitingForTransport is not True:
            raise Changed("pausing the channel's writes leaves _waitingForTransport unset")
    finally:
        live.channel.resumeProducing()
    if live.channel._waitingForTransport:
        raise Changed("resuming the channel's writes leaves _waitingForTransport set")


async def _write_buffer(live: Live) -> None:
    transport = live.channel.transport
    if not isinstance(transport, Connection):
        raise Changed(f"the channel's transport is a {type(transport).__name__}, not a tcp.Connection")
    if attribute(transport, "dataBuffer", bytes):
        raise Changed("dataBuffer holds bytes on a connection that has written nothing")


async def _queued_writes(live: Live) -> None:
    transport = live.channel.transport
    if attribute(transport, "_tempDataBuffer", list):
        raise Changed("_tempDataBuffer holds writes on a connection that has written nothing")
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # queued until the reactor's next turn
    if not (transport._tempDataBuffer or transport.dataBuffer):
        raise Changed("a write is queued in neither _tempDataBuffer nor dataBuffer")


def _endpoint_field(name: str, expected: dict[str, object]) -> Callable[[Live], Awaitable[None]]:
    async def check(live: Live) -> None:
        for description, value in expected.items():
            endpoint = serverFromString(None, description)  # as tagd.daemon.config parses [proxy] listen
            if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
                raise Changed(f"{description!r} parses to a {type(endpoint).__name__}")
            found = attribute(endpoint, name, type(value))
            if found != value:
                raise Changed(f"{description!r} keeps {name} as {found!r}, not {value!r}")

    return check


@attrs.frozen
class Internal:
    """A private Twisted name, where tagd uses it, and the check of its shape."""

    name: str  # as docs/dependencies.md's paragraph writes it
    used_in: str
    check: Callable[[Live], Awaitable[None]]


INTERNALS = (
    Internal("HTTPChannel._command", "tagd/proxy/site.py, ProxyRequest._forward", _request_line_part("_command", b"POST")),
    Internal(
        "HTTPChannel._path", "tagd/proxy/site.py, ProxyRequest._forward and gotLength", _request_line_part("_path", b"/upload?part=1")
    ),
    Internal(
        "HTTPChannel._version", "tagd/proxy/site.py, ProxyRequest._forward", _request_line_part("_version", b"HTTP/1.1")
    ),
    Internal("HTTPChannel._waitingForTransport", "tagd/proxy/site.py, TagdChannel.release_body", _waiting_for_transport),
    Internal("Connection.dataBuffer", "tagd/proxy/writes.py, send_now", _write_buffer),
    Internal("Connection._tempDataBuffer", "tagd/proxy/writes.py, send_now", _queued_writes),
    Internal(
        "TCP4ServerEndpoint._port",
        "tagd/daemon/config.py, _endpoint_string",
        _endpoint_field("_port", {"tcp:8080:interface=127.0.0.1": 8080, r"tcp6:8443:interface=\:\:1": 8443}),
    ),
    Internal(
        "TCP4ServerEndpoint._interface",
        "tagd/daemon/config.py, _endpoint_string",
        _endpoint_field("_interface", {"tcp:8080:interface=127.0.0.1": "127.0.0.1", r"tcp6:8443:interface=\:\:1": "::1"}),
    ),
)  # fmt: skip


@pytest.mark.parametrize("internal", INTERNALS, ids=[internal.name for internal in INTERNALS])
@pytest_twisted.ensureDeferred
async def test_the_internal_keeps_the_shape_tagd_relies_on(live, internal):
    """The internal is there, of the type tagd expects, takes the arguments tagd passes,
    and does what tagd counts on; otherwise the failure names it and where tagd uses it."""
    try:
        await internal.check(live)
    except Exception as e:
        pytest.fail(
            f"Twisted {twisted.__version__} has changed {internal.name} (used in {internal.used_in}): {e}",
            pytrace=False,
        )


def test_the_suite_runs_on_the_release_series_setup_cfg_pins():
    """setup.cfg pins Twisted to one release series, C{twisted[tls]~=YEAR.MONTH} (that
    release or a later one of the same year: Twisted's versions are YEAR.MONTH.PATCH;
    with the extra that verifies certificates), and the Twisted these checks ran on is in it."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    requirements = config["options"]["install_requires"].split("\n")
    [pin] = [line.strip() for line in requirements if re.match(r"\s*twisted\b", line, re.I)]
    series = re.fullmatch(r"twisted\[tls\]\s*~=\s*(\d+)\.(\d+)", pin, re.I)
    assert series, f"setup.cfg's {pin!r} is not of the form twisted[tls]~=YEAR.MONTH"
    year, month = int(series[1]), int(series[2])
    running = tuple(int(part) for part in re.findall(r"\d+", twisted.__version__)[:2])
    assert running[0] == year and running >= (year, month), (twisted.__version__, pin)


def _readme_internals() -> list[str]:
    """The names listed under the Twisted item of docs/dependencies.md's section: in its
    sub-items, the code in backquotes that names an attribute (C{Owner.name}), which a
    file path or a setting does not."""
    readme = (REPO_ROOT / "docs" / "dependencies.md").read_text(encoding="utf-8")
    section = readme.split("\n## Dependencies\n", 1)[1].split("\n## ", 1)[0]
    twisted_item = re.search(r"^- Twisted is pinned.*?(?=^- |\Z)", section, re.M | re.S)
    assert twisted_item, "docs/dependencies.md's section has no item on Twisted's pin"
    sub_items = twisted_item[0].split("\n  - ")[1:]
    return [code for item in sub_items for code in re.findall(r"`([^`]+)`", item) if "." in code and "/" not in code]


def test_the_readme_lists_the_internals_checked_here():
    """docs/dependencies.md's paragraph names every internal checked here and no other, so
    that neither list can lose one."""
    listed, checked = _readme_internals(), [internal.name for internal in INTERNALS]
    assert sorted(listed) == sorted(checked), (
        f"only in docs/dependencies.md: {sorted(set(listed) - set(checked))}; only here: {sorted(set(checked) - set(listed))}"
    )
