"""tagd's agent for the platforms against scripted servers on loopback: honest answers
(by length, chunked, until the connection's end; kept connections, TLS with certificate
verification) and hostile ones (garbage, huge heads, too many headers, wrong lengths,
bad chunks, early closes, answers nobody asked for, answers without end).  Each hostile
answer is no answer, and its connection is never used again.  Requests go as the
dispatcher sends them (L{exchange}: the agent, its answer read by C{treq.collect}), and
through Twisted's and treq's own interfaces: treq's C{HTTPClient} built over the agent,
Twisted's C{Agent} given tagd's body producer.
"""

from __future__ import annotations

from pathlib import Path

import json

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings, strategies as st
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from certificates import authority_and_localhost
from conftest import sleep, within
from tagd.delivery.client import (
    CLOSE_GRACE,
    MAX_HEAD,
    BytesProducer,
    PlatformAgent,
    PlatformProtocolError,
    _Factory,
    _Request,
    _Response,
)
from tagd.delivery.destinations import OutgoingRequest
from tagd.delivery.direct import AnswerTooLarge, exchange, read_answer

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


async def post(agent: PlatformAgent, url: str, body: bytes = b'{"a":1}', headers=None) -> tuple[IResponse, bytes]:
    """A POST as the dispatcher sends it: the answer and its whole body."""
    request = OutgoingRequest(url, body, headers or {"Content-Type": "application/json"})
    return await within(exchange(agent, request))


@pytest_twisted.ensureDeferred
async def test_posts_and_keeps_the_connection(scripted, platforms):
    """Two POSTs go on one connection, each with its Host, Content-Length, headers and body."""
    server, url = scripted(ok(b'{"ok":true}'), NO_CONTENT)
    first, first_body = await post(platforms, url, b'{"n":1}', {"Content-Type": "application/json", "User-Agent": "tagd/1"})
    second, second_body = await post(platforms, url, b'{"n":22}')
    assert (first.code, first_body, second.code, second_body) == (200, b'{"ok":true}', 204, b"")
    assert (first.phrase, first.version, first.length, second.phrase, second.length) == (b"OK", (b"HTTP", 1, 1), 11, b"No Content", 0)
    assert first.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert second.headers.getRawHeaders(b"server") == [b"fake"]
    assert (first.request.method, first.request.absoluteURI) == (b"POST", url.encode())
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
    assert (await post(platforms, url))[1] == b"hello world"
    await post(platforms, url)
    assert [connection for connection, _, _ in server.requests] == [0, 0]
    write_and_close = server.connections[0]
    answer = Deferred.fromCoroutine(post(platforms, url))
    await sleep(0.1)
    write_and_close.transport.loseConnection()
    assert (await answer)[1] == b"all of it"


@pytest_twisted.ensureDeferred
async def test_interim_answers_are_skipped(scripted, platforms):
    _, url = scripted(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"x"))
    answer, body = await post(platforms, url)
    assert (answer.code, body, answer.headers.getRawHeaders(b"link")) == (200, b"x", None)


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
    assert (await post(platforms, url))[0].code == 204
    assert [connection for connection, _, _ in server.requests] == [0, 1]


@pytest_twisted.ensureDeferred
async def test_an_answer_nobody_asked_for_is_never_taken_for_the_next(scripted, platforms):
    """A second answer in the same read as the first, or one sent while the connection is
    idle: the first is the answer, the connection is dropped, and the next request is
    answered on a new one."""
    smuggled = ok(b"SMUGGLED")
    server, url = scripted(NO_CONTENT + smuggled, NO_CONTENT, NO_CONTENT)
    assert (await post(platforms, url))[1] == b""
    assert (await post(platforms, url))[1] == b""
    server.connections[1].transport.write(smuggled)  # while idle
    await sleep(0.1)
    assert (await post(platforms, url))[1] == b""
    assert [connection for connection, _, _ in server.requests] == [0, 1, 2]


@pytest_twisted.ensureDeferred
async def test_an_answer_past_the_limit_closes_the_connection(scripted, platforms):
    """The collector given to C{treq.collect} refuses the byte past the limit; treq then
    loses the body's transport, which closes the connection, whether the answer came
    whole in one read (its connection kept a moment) or its chunks never end."""

    async def limited(url: str) -> bytes:
        response = await within(platforms.request(b"POST", url.encode(), None, BytesProducer(b"{}")))
        return await within(read_answer(response, limit=1000))

    server, url = scripted(ok(b"x" * 1001), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"64\r\n" + b"y" * 100 + b"\r\n" * 1)
    with pytest.raises(AnswerTooLarge):
        await limited(url)
    await within(server.connections[0].lost)
    endless_chunks = Deferred.fromCoroutine(limited(url))
    await sleep(0.05)
    for _ in range(10):
        server.connections[1].transport.write(b"64\r\n" + b"y" * 100 + b"\r\n")
    with pytest.raises(AnswerTooLarge):
        await endless_chunks
    await within(server.connections[1].lost)


@pytest_twisted.ensureDeferred
async def test_a_timeout_cancels_and_closes_the_connection(scripted, platforms, reactor):
    """A platform that answers nothing (or trickles): the request's timeout cancels it,
    and the connection is closed, never kept half-read."""
    server, url = scripted("hold", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    with pytest.raises(TimeoutError):
        await exchange(platforms, OutgoingRequest(url, b"{}")).addTimeout(0.2, reactor)
    await within(server.connections[0].lost)
    with pytest.raises(TimeoutError):
        await exchange(platforms, OutgoingRequest(url, b"{}")).addTimeout(0.2, reactor)
    await within(server.connections[1].lost)


@pytest_twisted.ensureDeferred
async def test_a_connection_the_platform_closed_is_not_reused(scripted, platforms, reactor):
    server, url = scripted(NO_CONTENT, NO_CONTENT)
    await post(platforms, url)
    connection = server.connections[0]
    connection.transport.loseConnection()
    await within(connection.lost)
    assert (await post(platforms, url))[0].code == 204
    assert [connection for connection, _, _ in server.requests] == [0, 1]


@pytest_twisted.ensureDeferred
async def test_keeps_as_many_connections_as_requests_in_flight_and_closes_them(scripted, reactor):
    client = PlatformAgent(reactor, pool_size=2)
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


async def _together(client: PlatformAgent, url: str, count: int) -> None:
    await gatherResults([Deferred.fromCoroutine(post(client, url)) for _ in range(count)])


@pytest_twisted.ensureDeferred
async def test_a_header_or_url_with_a_line_break_is_refused_unsent(scripted, platforms):
    """As the dispatcher sends them, and given to the agent itself: no header of the
    caller's can end a line, hold a control character or frame the body."""
    server, url = scripted()
    for request in (
        OutgoingRequest(url, b"{}", {"X-Evil": "1\r\nX-Injected: 2"}),
        OutgoingRequest(url + "\r\nX: 1", b"{}"),
        OutgoingRequest("ftp://127.0.0.1/x", b"{}"),
        OutgoingRequest(url, b"{}", {"X-Name": "\u0101"}),
        OutgoingRequest(url, b"{}", {"X-Name\r\nX-Injected": "2"}),
        OutgoingRequest(url, b"{}", method="GET /x HTTP/1.1\r\nX:"),
    ):
        with pytest.raises(ValueError):
            await exchange(platforms, request)
    uri = url.encode()
    for headers in (Headers({b"X-Nul": [b"a\x00b"]}), Headers({b"Content-Length": [b"0"]}), Headers({b"Transfer-Encoding": [b"chunked"]})):
        with pytest.raises(ValueError):
            await platforms.request(b"POST", uri, headers, BytesProducer(b"{}"))
    for method in (b"HEAD", b"GET /", b""):
        with pytest.raises(ValueError):
            await platforms.request(method, uri)
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
    trusted = PlatformAgent(reactor, tls=lambda host: optionsForClientTLS(host, trustRoot=Certificate.loadPEM(authority)))
    untrusted = PlatformAgent(reactor)
    try:
        assert (await post(trusted, url))[1] == b"tls"
        assert (await post(trusted, url))[0].code == 204
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
    client = PlatformAgent(reactor, tls=lambda host: optionsForClientTLS(host, trustRoot=Certificate.loadPEM(authority)))
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


class Recording(Protocol):
    """A body protocol that keeps what it is given and how the body ended."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ends: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.ends.append(reason)


@settings(max_examples=300, deadline=None)
@given(
    answer=st.one_of(st.binary(max_size=300), st.sampled_from([a for a, _ in HOSTILE.values()])),
    cut=st.integers(0, 300),
    clean=st.booleans(),
    late=st.booleans(),
)
def test_any_bytes_end_the_request_once_as_an_answer_or_a_known_failure(answer, cut, clean, late):
    """Whatever arrives, in two reads and then a close: the request ends exactly once,
    with an answer or one of the agent's failures, never with tagd's own error; an
    answer's body (its protocol given at once or only after the close) ends exactly
    once too, whole or with one of Agent's reasons."""
    agent = PlatformAgent(Clock())
    connection = _Factory(agent, (False, "x", 80)).buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    request = _Request(b"POST / HTTP/1.1\r\n\r\n", b"", (b"POST", b"http://x/", None))
    outcomes = []
    body = Recording()
    request.deferred.addBoth(outcomes.append)
    connection.send(request)
    for piece in (answer[:cut], answer[cut:]):
        if not late and outcomes and isinstance(outcomes[0], _Response) and not body.connected:
            outcomes[0].deliverBody(body)
        if piece and not transport.disconnecting:
            connection.dataReceived(piece)
    connection.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))
    assert len(outcomes) == 1
    outcome = outcomes[0]
    if isinstance(outcome, _Response):
        if not body.connected:
            outcome.deliverBody(body)
        assert len(body.ends) == 1
        assert body.ends[0].check(ResponseDone, PotentialDataLoss, ResponseFailed), body.ends[0]
    else:
        assert outcome.check(PlatformProtocolError, ResponseFailed, ResponseNeverReceived), outcome


# Twisted's and treq's interfaces: the agent under treq's HTTPClient, tagd's body
# producer under Twisted's Agent, the answer's body given to a protocol late.


class Echo(Resource):
    """Answers every request with JSON of what it got: method, path, headers, body."""

    isLeaf = True

    def render(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        heard = {name.decode(): [value.decode() for value in values] for name, values in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read().decode()
        return json.dumps({"method": request.method.decode(), "uri": request.uri.decode(), "headers": heard, "body": body}).encode()


@pytest.fixture
def echo(reactor):
    port = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_treq_s_http_client_works_over_the_agent(echo, platforms):
    """treq's HTTPClient, unchanged, over the agent: a POST of bytes (treq's
    FileBodyProducer), with headers and a query, its JSON answer read by
    C{treq.json_content}; then a GET, on the same kept connection."""
    verifyObject(IAgent, platforms)
    client = HTTPClient(platforms)
    response = await within(client.post(echo + "/collect", data=b'{"n":1}', headers={"Content-Type": "application/json"}, params={"v": "2"}))
    assert response.code == 200
    heard = await within(treq.json_content(response))
    assert (heard["method"], heard["uri"], heard["body"]) == ("POST", "/collect?v=2", '{"n":1}')
    assert heard["headers"]["Content-Type"] == ["application/json"]
    assert heard["headers"]["Content-Length"] == ["7"]
    assert heard["headers"]["Host"] == [echo.removeprefix("http://")]
    got = await within(client.get(echo + "/again"))
    assert (await within(treq.json_content(got)))["method"] == "GET"
    assert len(platforms._connections) == 1


@pytest_twisted.ensureDeferred
async def test_the_answer_is_an_iresponse_and_the_body_producer_works_under_twisted_s_agent(echo, platforms, reactor):
    given = Headers({b"X-A": [b"1"]})
    response = await within(platforms.request(b"PUT", (echo + "/x").encode(), given, BytesProducer(b"abc")))
    verifyObject(IResponse, response)
    assert list(given.getAllRawHeaders()) == [(b"X-A", [b"1"])]  # the agent adds its own lines, never to the caller's
    assert (response.version, response.code, response.phrase, response.previousResponse) == ((b"HTTP", 1, 1), 200, b"OK", None)
    assert response.request.headers.getRawHeaders(b"x-a") == [b"1"]
    assert json.loads(await within(treq.content(response)))["body"] == "abc"
    pool = HTTPConnectionPool(reactor, persistent=False)
    stock = Agent(reactor, pool=pool)
    answer = await within(stock.request(b"POST", (echo + "/y").encode(), None, BytesProducer(b"tagd's")))
    heard = json.loads(await within(treq.content(answer)))
    assert (heard["body"], heard["headers"]["Content-Length"]) == ("tagd's", ["6"])
    await within(pool.closeCachedConnections())


@pytest_twisted.ensureDeferred
async def test_a_body_protocol_given_late_gets_all_of_the_body_in_order(scripted, platforms):
    """The head comes first, the body in reads after it; a protocol given only then
    gets every part and the body's end (C{ResponseDone}; C{PotentialDataLoss} for an
    answer framed by the close, as with Agent); the connection, paused meanwhile,
    is kept for the next request when the answer allows it."""
    server, url = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", NO_CONTENT, b"HTTP/1.1 200 OK\r\n\r\nuntil")
    response = await within(platforms.request(b"POST", url.encode(), None, BytesProducer(b"{}")))
    assert response.length == 10
    server.connections[0].transport.write(b"world")
    await sleep(0.1)
    body = Recording()
    response.deliverBody(body)
    await eventually_ended(body)
    assert (b"".join(body.data), body.ends[0].type) == (b"helloworld", ResponseDone)
    assert (await post(platforms, url))[0].code == 204
    assert [connection for connection, _, _ in server.requests] == [0, 0]
    until_close = await within(platforms.request(b"POST", url.encode(), None, BytesProducer(b"{}")))
    server.connections[0].transport.write(b" the end")
    server.connections[0].transport.loseConnection()
    await sleep(0.1)
    body = Recording()
    until_close.deliverBody(body)
    await eventually_ended(body)
    assert (b"".join(body.data), body.ends[0].type) == (b"until the end", PotentialDataLoss)
    with pytest.raises(RuntimeError):
        until_close.deliverBody(Recording())


async def eventually_ended(body: Recording) -> None:
    for _ in range(100):
        if body.ends:
            return
        await sleep(0.01)
    raise AssertionError("the body never ended")
