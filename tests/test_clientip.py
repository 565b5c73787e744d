"""Tests for L{tagd.proxy.clientip}: whose word about the visitor's address is believed."""

from __future__ import annotations

import pytest

from tagd.proxy.clientip import ClientIPResolver

# Real Cloudflare edge addresses (cloudflare.com's own A and AAAA records).
CLOUDFLARE_EDGE_V4 = "104.16.132.229"
CLOUDFLARE_EDGE_V6 = "2606:4700::6810:84e5"
# A public address that is not Cloudflare's (Google's resolver).
NOT_CLOUDFLARE = "8.8.8.8"

VISITOR_V4 = "198.51.100.23"
VISITOR_V6 = "2001:db8:85a3::8a2e:370:7334"


@pytest.fixture
def cloudflare() -> ClientIPResolver:
    """A resolver that trusts Cloudflare's published ranges only."""
    return ClientIPResolver(["cloudflare"])


@pytest.mark.parametrize("edge", [CLOUDFLARE_EDGE_V4, CLOUDFLARE_EDGE_V6])
def test_cloudflare_edge_believed(cloudflare, edge):
    """A real Cloudflare edge, over IPv4 or IPv6, is trusted and its header believed."""
    assert cloudflare.is_trusted(edge)
    assert cloudflare.resolve(edge, VISITOR_V4.encode()) == VISITOR_V4


@pytest.mark.parametrize("peer", [NOT_CLOUDFLARE, "127.0.0.1", "10.0.0.1", "2001:4860:4860::8888"])
def test_spoofed_header_from_untrusted_peer_ignored(cloudflare, peer):
    """A peer outside the trusted ranges gets its own address, whatever header it sends."""
    assert not cloudflare.is_trusted(peer)
    assert cloudflare.resolve(peer, VISITOR_V4.encode()) == peer


def test_cidr_entries_trusted():
    """CIDR entries, IPv4 and IPv6 and single addresses, make exactly their peers trusted."""
    resolver = ClientIPResolver(["10.0.0.0/8", "fd00::/8", "192.0.2.10"])
    for peer in ("10.0.0.1", "10.255.255.254", "fd12:3456::1", "192.0.2.10"):
        assert resolver.resolve(peer, VISITOR_V4.encode()) == VISITOR_V4, peer
    for peer in ("11.0.0.1", "192.0.2.11", "fe80::1", CLOUDFLARE_EDGE_V4):
        assert resolver.resolve(peer, VISITOR_V4.encode()) == peer, peer


def test_cidr_and_cloudflare_combined():
    """The word "cloudflare" and CIDR entries can be mixed; each adds its peers."""
    resolver = ClientIPResolver(["cloudflare", "127.0.0.0/8"])
    assert resolver.resolve("127.0.0.1", VISITOR_V4.encode()) == VISITOR_V4
    assert resolver.resolve(CLOUDFLARE_EDGE_V6, VISITOR_V4.encode()) == VISITOR_V4
    assert resolver.resolve(NOT_CLOUDFLARE, VISITOR_V4.encode()) == NOT_CLOUDFLARE


def test_nothing_trusted():
    """With no trusted proxies, even a Cloudflare edge's header is not believed."""
    resolver = ClientIPResolver([])
    assert resolver.resolve(CLOUDFLARE_EDGE_V4, VISITOR_V4.encode()) == CLOUDFLARE_EDGE_V4


def test_no_header_from_trusted_peer(cloudflare):
    """A trusted peer that sends no header is itself the client."""
    assert cloudflare.resolve(CLOUDFLARE_EDGE_V4, None) == CLOUDFLARE_EDGE_V4


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"unknown",
        b"198.51.100.23, 203.0.113.9",
        b"198.51.100.23:443",
        b"[2001:db8::1]",
        b"999.1.1.1",
        b"198.51.100.0/24",
        b"\xff\xfe\x00",
    ],
)
def test_garbage_header_ignored(cloudflare, value):
    """A header from a trusted peer that is not one IP address is ignored: the peer is used."""
    assert cloudflare.resolve(CLOUDFLARE_EDGE_V4, value) == CLOUDFLARE_EDGE_V4


def test_ipv6_visitor_kept_as_ipv6(cloudflare):
    """An IPv6 visitor address is handed on as IPv6, in its canonical text form."""
    assert cloudflare.resolve(CLOUDFLARE_EDGE_V4, VISITOR_V6.encode()) == VISITOR_V6
    assert cloudflare.resolve(CLOUDFLARE_EDGE_V4, b"2001:0db8:0000::0001") == "2001:db8::1"


def test_ipv6_peer_kept_as_ipv6(cloudflare):
    """An untrusted IPv6 peer is the client and stays IPv6."""
    assert cloudflare.resolve(VISITOR_V6, b"192.0.2.1") == VISITOR_V6


def test_ipv4_mapped_peer_treated_as_ipv4(cloudflare):
    """An IPv4-mapped IPv6 peer (a dual-stack listener) is matched and reported as IPv4."""
    mapped_edge = "::ffff:" + CLOUDFLARE_EDGE_V4
    assert cloudflare.is_trusted(mapped_edge)
    assert cloudflare.resolve(mapped_edge, VISITOR_V4.encode()) == VISITOR_V4
    assert cloudflare.resolve("::ffff:" + VISITOR_V4, b"192.0.2.1") == VISITOR_V4


def test_ipv4_mapped_peer_matches_ipv4_cidr():
    """A configured IPv4 CIDR also trusts the same peers seen as IPv4-mapped IPv6."""
    resolver = ClientIPResolver(["10.0.0.0/8"])
    assert resolver.resolve("::ffff:10.1.2.3", VISITOR_V4.encode()) == VISITOR_V4


def test_ipv4_mapped_header_reported_as_ipv4(cloudflare):
    """An IPv4-mapped address in the header is handed on as the IPv4 address it is."""
    assert cloudflare.resolve(CLOUDFLARE_EDGE_V6, b"::ffff:" + VISITOR_V4.encode()) == VISITOR_V4
