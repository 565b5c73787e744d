"""L{tagd.proxy.writes.send_now} on real loopback connections: straight to the socket of a
plain TCP connection, never past the encryption of a TLS one."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.tcp import Connection

from certificates import self_signed
from conftest import eventually, within
from tagd.proxy.writes import send_now

MESSAGE = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n" * 100


class Collector(Protocol):
    """The server side: keeps what it reads, decrypted when the endpoint is TLS."""

    def __init__(self, received: list[bytes]) -> None:
        self.received = received

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


async def _connected_pair(reactor, server: str, client_endpoint) -> tuple[Protocol, list[bytes], object]:
    received: list[bytes] = []
    port = await within(serverFromString(reactor, server).listen(Factory.forProtocol(lambda: Collector(received))))
    client = await within(connectProtocol(client_endpoint(port.getHost().port), Protocol()))
    return client, received, port


@pytest_twisted.ensureDeferred
async def test_plain_tcp_bytes_go_straight_to_the_socket(reactor):
    client, received, port = await _connected_pair(
        reactor, "tcp:0:interface=127.0.0.1", lambda p: TCP4ClientEndpoint(reactor, "127.0.0.1", p)
    )
    try:
        assert isinstance(client.transport, Connection)
        send_now(client.transport, MESSAGE)
        # Nothing was queued for the reactor: the kernel took the bytes at once.
        assert not client.transport.dataBuffer and not client.transport._tempDataBuffer
        await eventually(lambda: b"".join(received) == MESSAGE)
    finally:
        client.transport.abortConnection()
        await port.stopListening()


@pytest.mark.parametrize("before_handshake", [True, False])
@pytest_twisted.ensureDeferred
async def test_tls_bytes_are_encrypted(reactor, tmp_path, before_handshake):
    """A TLS transport forwards attribute lookups to the TCP connection beneath it, so its
    socket is within reach; the bytes must still go through TLS, whether the handshake
    is done or not."""
    keys = self_signed(tmp_path)
    client, received, port = await _connected_pair(
        reactor,
        f"ssl:0:interface=127.0.0.1:{keys}",
        lambda p: SSL4ClientEndpoint(reactor, "127.0.0.1", p, CertificateOptions(verify=False)),
    )
    try:
        if not before_handshake:
            send_now(client.transport, b"x")
            await eventually(lambda: received)
            received.clear()
        send_now(client.transport, MESSAGE)
        await eventually(lambda: b"".join(received) == MESSAGE)
    finally:
        client.transport.abortConnection()
        await port.stopListening()
