"""tagd's client for the platforms against scripted servers on loopback: honest answers
(by length, chunked, until the connection's end; kept connections, TLS with certificate
verification) and hostile ones (garbage, huge heads, too many headers, wrong lengths,
bad chunks, early closes, answers nobody asked for, answers without end).  Each hostile
answer is no answer, and its connection is never used again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from certificates import authority_and_localhost
from conftest import sleep, within
from tagd.delivery.client import (
    CLOSE_GRACE,
    MAX_HEAD,
    AnswerTooLarge,
    Answer,
    PlatformClient,
    PlatformProtocolError,
    _Factory,
    _Request,
)

NO_CONTENT = b"HTTP/1.1 204 No Content\r\nServer: fake\r\n\r\n"


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Scripted(Protocol):
    """Reads whole POSTs (head and Content-Length body) and answers each with the next
    of the server's answers: bytes, or C{None} for a clean close, or C{"hold"} to answer
    nothing and keep the connection open."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""
        self.lost = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                0,
            )
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append((len(self.factory.connections) - 1, head, rest[:length]))
            answer = self.factory.answers.pop(0) if self.factory.answers else NO_CONTENT
            if answer is None:
                self.transport.loseConnection()
            elif answer != "hold":
                self.transport.write(answer)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class ScriptedServer(Factory):
    protocol = Scripted

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.connections: list[Scripted] = []
        self.requests: list[tuple[int, bytes, bytes]] = []


@pytest.fixture
def scripted(reactor):
    ports = []

    def start(*answers) -> tuple[ScriptedServer, str]:
        server = ScriptedServer(*answers)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        ports.append(port)
        return server, f"http://127.0.0.1:{port.getHost().port}/mp/collect?api_secret=s3cret"

    yield start
    for port in ports:
        port.stopListening()
        for connection in port.factory.connections:
            if connection.transport.connected:
                connection.transport.abortConnection()


async def post(client: PlatformClient, url: str, body: bytes = b'{"a":1}', headers=None) -> Answer:
    return await within(client.request("POST", url, body, headers or {"Content-Type": "application/json"}))


@pytest_twisted.ensureDeferred
async def test_posts_and_keeps_the_connection(scripted, platforms):
    """Two POSTs go on one connection, each with its Host, Content-Length, headers and body."""
    server, url = scripted(ok(b'{"ok":true}'), NO_CONTENT)
    first = await post(platforms, url, b'{"n":1}', {"Content-Type": "application/json", "User-Agent": "tagd/1"})
    second = await post(platforms, url, b'{"n":22}')
    assert (first.code, first.body, second.code, second.body) == (200, b'{"ok":true}', 204, b"")
    assert first.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert second.headers.getRawHeaders(b"server") == [b"fake"]
    assert [connection for connection, _, _ in server.requests] == [0, 0]
    (_, head, body) = server.requests[0]
    lines = head.split(b"\r\n")
    port = url.split(":")[2].split("/")[0].encode()
    assert lines[0] == b"POST /mp/collect?api_secret=s3cret HTTP/1.1"
    assert set(lines[1:]) == {b"Host: 127.0.0.1:" + port, b"Content-Type: application/json", b"User-Agent: tagd/1", b"Content-Length: 7"}
    assert body == b'{"n":1}'


@pytest_twisted.ensureDeferred
async def test_a_chunked_answer_and_one_read_until_the_close(scripted, platforms):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    server, url = scripted(chunked, NO_CONTENT, until_close)
    assert (await post(platforms, url)).body == b"hello world"
    await post(platforms, url)
    assert [connection for connection, _, _ in server.requests] == [0, 0]
    write_and_close = server.connections[0]
    answer = Deferred.fromCoroutine(post(platforms, url))
    await sleep(0.1)
    write_and_close.transport.loseConnection()
    assert (await answer).body == b"all of it"


@pytest_twisted.ensureDeferred
async def test_interim_answers_are_skipped(scripted, platforms):
    _, url = scripted(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"x"))
    answer = await post(platforms, url)
    assert (answer.code, answer.body, answer.headers.getRawHeaders(b"link")) == (200, b"x", None)


HOSTILE = {
    "garbage status line": (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", PlatformProtocolError),
    "another protocol": (b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", PlatformProtocolError),
    "HTTP/2 status line": (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", PlatformProtocolError),
    "status out of range": (b"HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n", PlatformProtocolError),
    "a protocol switch": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", PlatformProtocolError),
    "huge head": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\nContent-Length: 0\r\n\r\n", PlatformProtocolError),
    "too many headers": (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 150 + b"Content-Length: 0\r\n\r\n", PlatformProtocolError),
    "bare LF": (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", PlatformProtocolError),
    "two lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", PlatformProtocolError),
    "a length that is no number": (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\na", PlatformProtocolError),
    "length and chunks": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        PlatformProtocolError,
    ),
    "a bad chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", PlatformProtocolError),
    "a chunk longer than its size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", PlatformProtocolError),
    "a huge chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", PlatformProtocolError),
    "a coding never asked for": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", PlatformProtocolError),
    "a body longer than said, then the close": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", ResponseFailed),
    "half a head": (b"HTTP/1.1 200 OK\r\nContent-Le", ResponseFailed),
    "nothing at all": (b"", ResponseNeverReceived),
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest_twisted.ensureDeferred
async def test_a_hostile_answer_is_no_answer_and_its_connection_is_dropped(scripted, platforms, name):
    """Each hostile answer fails the request (then the server closes, for those that wait
    on more); the next request goes on a fresh connection and is answered."""
    answer, error = HOSTILE[name]
    server, url = scripted(answer, NO_CONTENT)
    attempt = Deferred.fromCoroutine(post(platforms, url))
    await sleep(0.05)
    server.connections[0].transport.loseConnection()
    with pytest.raises(error):
        await attempt
    await within(server.connections[0].lost)
    assert (await post(platforms, url)).code == 204
    assert [connection for connection, _, _ in server.requests] == [0, 1]


@pytest_twisted.ensureDeferred
async def test_an_answer_nobody_asked_for_is_never_taken_for_the_next(scripted, platforms):
    """A second answer in the same read as the first, or one sent while the connection is
    idle: the first is the answer, the connection is dropped, and the next request is
    answered on a new one."""
    smuggled = ok(b"SMUGGLED")
    server, url = scripted(NO_CONTENT + smuggled, NO_CONTENT, NO_CONTENT)
    assert (await post(platforms, url)).body == b""
    assert (await post(platforms, url)).body == b""
    server.connections[1].transport.write(smuggled)  # while idle
    await sleep(0.1)
    assert (await post(platforms, url)).body == b""
    assert [connection for connection, _, _ in server.requests] == [0, 1, 2]


@pytest_twisted.ensureDeferred
async def test_an_answer_past_the_limit_closes_the_connection(scripted, reactor):
    client = PlatformClient(reactor, max_answer=1000)
    try:
        server, url = scripted(ok(b"x" * 1001), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"64\r\n" + b"y" * 100 + b"\r\n" * 1)
        with pytest.raises(AnswerTooLarge):
            await post(client, url)
        await within(server.connections[0].lost)
        endless_chunks = Deferred.fromCoroutine(post(client, url))
        await sleep(0.05)
        for _ in range(10):
            server.connections[1].transport.write(b"64\r\n" + b"y" * 100 + b"\r\n")
        with pytest.raises(AnswerTooLarge):
            await endless_chunks
    finally:
        await within(client.close())


@pytest_twisted.ensureDeferred
async def test_a_timeout_cancels_and_closes_the_connection(scripted, platforms, reactor):
    """A platform that answers nothing (or trickles): the request's timeout cancels it,
    and the connection is closed, never kept half-read."""
    server, url = scripted("hold", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    with pytest.raises(TimeoutError):
        await platforms.request("POST", url, b"{}", {}).addTimeout(0.2, reactor)
    await within(server.connections[0].lost)
    with pytest.raises(TimeoutError):
        await platforms.request("POST", url, b"{}", {}).addTimeout(0.2, reactor)
    await within(server.connections[1].lost)


@pytest_twisted.ensureDeferred
async def test_a_connection_the_platform_closed_is_not_reused(scripted, platforms, reactor):
    server, url = scripted(NO_CONTENT, NO_CONTENT)
    await post(platforms, url)
    connection = server.connections[0]
    connection.transport.loseConnection()
    await within(connection.lost)
    assert (await post(platforms, url)).code == 204
    assert [connection for connection, _, _ in server.requests] == [0, 1]


@pytest_twisted.ensureDeferred
async def test_keeps_as_many_connections_as_requests_in_flight_and_closes_them(scripted, reactor):
    client = PlatformClient(reactor, pool_size=2)
    server, url = scripted()
    await within(Deferred.fromCoroutine(_together(client, url, 4)))
    assert len(server.connections) == 4
    await sleep(0.05)
    assert sum(c.transport.connected for c in server.connections) == 2
    await within(Deferred.fromCoroutine(_together(client, url, 2)))
    assert len(server.connections) == 4  # the two kept ones carried these
    await within(client.close())
    for connection in server.connections:
        await within(connection.lost)
    await post(client, url)  # after the close: a connection of its own, not kept
    await within(server.connections[-1].lost)


async def _together(client: PlatformClient, url: str, count: int) -> None:
    await gatherResults([Deferred.fromCoroutine(post(client, url)) for _ in range(count)])


@pytest_twisted.ensureDeferred
async def test_a_header_or_url_with_a_line_break_is_refused_unsent(scripted, platforms):
    server, url = scripted()
    with pytest.raises(ValueError):
        await platforms.request("POST", url, b"{}", {"X-Evil": "1\r\nX-Injected: 2"})
    with pytest.raises(ValueError):
        await platforms.request("POST", url + "\r\nX: 1", b"{}", {})
    with pytest.raises(ValueError):
        await platforms.request("POST", "ftp://127.0.0.1/x", b"{}", {})
    with pytest.raises(ValueError):
        await platforms.request("POST", url, b"{}", {"X-Name": "\u0101"})
    assert server.requests == []


@pytest_twisted.ensureDeferred
async def test_https_verifies_the_certificate(tmp_path: Path, reactor):
    """Over TLS, a certificate from a trusted authority for the host is taken (and the
    connection kept); the same server is refused when the authority is not trusted."""
    authority = authority_and_localhost(tmp_path)
    server = ScriptedServer(ok(b"tls"), NO_CONTENT, NO_CONTENT)
    endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}")
    port = await within(endpoint.listen(server))
    url = f"https://localhost:{port.getHost().port}/events"
    trusted = PlatformClient(reactor, tls=lambda host: optionsForClientTLS(host, trustRoot=Certificate.loadPEM(authority)))
    untrusted = PlatformClient(reactor)
    try:
        assert (await post(trusted, url)).body == b"tls"
        assert (await post(trusted, url)).code == 204
        assert len(server.connections) == 1
        with pytest.raises(ResponseNeverReceived):
            await post(untrusted, url)
        assert len(server.requests) == 2
    finally:
        await within(trusted.close())
        await within(untrusted.close())
        await port.stopListening()


class Deaf(Scripted):
    """Answers, then reads nothing more: a TLS close_notify is never answered."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_closing_is_not_held_up_by_a_peer_that_never_answers_the_close(tmp_path: Path, reactor):
    authority = authority_and_localhost(tmp_path)
    server = ScriptedServer(NO_CONTENT)
    server.protocol = Deaf
    endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}")
    port = await within(endpoint.listen(server))
    client = PlatformClient(reactor, tls=lambda host: optionsForClientTLS(host, trustRoot=Certificate.loadPEM(authority)))
    try:
        await post(client, f"https://localhost:{port.getHost().port}/events")
        started = reactor.seconds()
        await within(client.close(), 5.0)
        assert reactor.seconds() - started < CLOSE_GRACE + 1.0
    finally:
        for connection in server.connections:
            connection.transport.abortConnection()
        await port.stopListening()


# The parser alone, on every answer hypothesis makes up.


@settings(max_examples=300, deadline=None)
@given(answer=st.one_of(st.binary(max_size=300), st.sampled_from([a for a, _ in HOSTILE.values()])), cut=st.integers(0, 300), clean=st.booleans())
def test_any_bytes_end_the_request_once_as_an_answer_or_a_known_failure(answer, cut, clean):
    """Whatever arrives, in two reads and then a close: the request ends exactly once,
    with an answer or one of the client's failures, never with tagd's own error."""
    client = PlatformClient(Clock())
    connection = _Factory(client, (False, "x", 80)).buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    request = _Request(b"POST / HTTP/1.1\r\n\r\n")
    outcomes = []
    request.deferred.addBoth(outcomes.append)
    connection.send(request)
    for piece in (answer[:cut], answer[cut:]):
        if piece and not transport.disconnecting:
            connection.dataReceived(piece)
    connection.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))
    assert len(outcomes) == 1
    outcome = outcomes[0]
    if not isinstance(outcome, Answer):
        assert outcome.check(PlatformProtocolError, AnswerTooLarge, ResponseFailed, ResponseNeverReceived), outcome
