"""Find the visitor's IP address behind trusted reverse proxies such as Cloudflare.

A forwarded-for style header is believed only when the TCP peer is a proxy the shop
trusts; anyone else could write any address into it.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Iterable

CLOUDFLARE_WORD = "cloudflare"

# Cloudflare's published ranges (https://www.cloudflare.com/ips/), shipped so that the
# daemon never fetches them at start-up.
CLOUDFLARE_RANGES = (
    "173.245.48.0/20",
    "103.21.244.0/22",
    "103.22.200.0/22",
    "103.31.4.0/22",
    "141.101.64.0/18",
    "108.162.192.0/18",
    "190.93.240.0/20",
    "188.114.96.0/20",
    "197.234.240.0/22",
    "198.41.128.0/17",
    "162.158.0.0/15",
    "104.16.0.0/13",
    "104.24.0.0/14",
    "172.64.0.0/13",
    "131.0.72.0/22",
    "2400:cb00::/32",
    "2606:4700::/32",
    "2803:f800::/32",
    "2405:b500::/32",
    "2405:8100::/32",
    "2a06:98c0::/29",
    "2c0f:f248::/32",
)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None  # A link-local zone ("fe80::1%eth0") names no visitor.
        if address.ipv4_mapped:
            return address.ipv4_mapped
    return address


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _as_ipv4_if_mapped(network):
    """An IPv4-mapped IPv6 range as the IPv4 range it is, since peers are compared as IPv4."""
    if network.version == 6 and network.subnet_of(_MAPPED) and network.prefixlen >= 96:
        return ipaddress.ip_network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96)
        )
    return network


@lru_cache(maxsize=4096)
def _peer_text(peer: str) -> str:
    """A peer address as the visitor IP: IPv4-mapped IPv6 written as IPv4 (cached: peers repeat)."""
    address = _parse_ip(peer)
    return str(address) if address is not None else peer


class ClientIPResolver:
    """Decide which address is the visitor's, given the TCP peer and a header value."""

    def __init__(self, trusted: Iterable[str]) -> None:
        networks = []
        for entry in trusted:
            ranges = CLOUDFLARE_RANGES if entry == CLOUDFLARE_WORD else (entry,)
            networks.extend(_as_ipv4_if_mapped(ipaddress.ip_network(r, strict=False)) for r in ranges)
        self._networks = tuple(networks)
        # Peers are few (the proxies' edge servers), so their verdicts are cached.
        self.is_trusted = lru_cache(maxsize=4096)(self._is_trusted)

    def _is_trusted(self, peer: str) -> bool:
        address = _parse_ip(peer)
        if address is None:
            return False
        return any(address in network for network in self._networks)

    def resolve(self, peer: str, header_value: bytes | None) -> str:
        """Return the visitor's IP as text: the header's when C{peer} is trusted, else C{peer}.

        A header that does not hold one IP address is ignored.  IPv6 stays IPv6 (only an
        IPv4-mapped address is written as the IPv4 address it is), so that it matches
        what a browser pixel reports.
        """
        if header_value is not None and self.is_trusted(peer):
            claimed = _parse_ip(header_value.decode("latin-1"))
            if claimed is not None:
                return str(claimed)
        return _peer_text(peer)
