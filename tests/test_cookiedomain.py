"""The domain of the cookies tagd sets (L{tagd.tagging.cookiedomain}): the Public Suffix List's
registrable domain of the Host, the C{cookie_domain} setting, and hostile Host headers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tagd.daemon.config import ConfigError, parse_config
from tagd.tagging.cookiedomain import CookieScope, CookieScoper, check_cookie_domain, host_name
from tagd.tagging.identity import set_cookie


def scope(host: bytes | None, setting: str = "") -> CookieScope:
    return CookieScoper(setting).scope(host)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"shop.example.co.uk", CookieScope("example.co.uk", 2)),
        (b"example.co.uk", CookieScope("example.co.uk", 2)),
        (b"www.example.com", CookieScope("example.com", 1)),
        (b"checkout.www.example.com:8443", CookieScope("example.com", 1)),
        (b"a.b.example.foo.kawasaki.jp", CookieScope("example.foo.kawasaki.jp", 3)),
        (b"shop.user.github.io", CookieScope("user.github.io", 2)),
        (b"xn--bcher-kva.de", CookieScope("xn--bcher-kva.de", 1)),
        (b"www.xn--bcher-kva.de", CookieScope("xn--bcher-kva.de", 1)),
    ],
)
def test_registrable_domain_from_the_public_suffix_list(host, expected) -> None:
    """Two- and three-label public suffixes, private ones (github.io), ports, case,
    punycode: the cookie goes to the registrable domain, the index its dots."""
    assert scope(host) == expected


@pytest.mark.parametrize(
    ("host", "dots"),
    [
        (b"co.uk", 1),  # a public suffix itself: a browser refuses a cookie for it
        (b"github.io", 1),
        (b"localhost", 0),
        (b"localhost:8080", 0),
        (b"127.0.0.1", 0),
        (b"203.0.113.7:80", 0),
        (b"1.2.3", 0),  # an IPv4 address to a browser (1.2.0.3)
        (b"0x7f.1", 0),
        (b"shop.example.123", 0),
        (b"[::1]", 0),
        (b"[2001:db8::1]:8443", 0),
        ("bücher.de".encode("utf-8"), 0),
        ("bücher.de".encode("latin-1"), 0),
        (b"", 0),
        (None, 0),
        (b"exa mple.com", 0),
        (b"example.com:http", 0),
        (b"-bad-.example.com", 0),
        (b"a..b.com", 0),
        (b"example.com;domain=evil.com", 0),
        (b"x" * 64 + b".com", 0),
        (b"WWW.Example.COM.", 0),  # a browser there refuses Domain=example.com (RFC 6265)
        (b"shop.example.co.uk.", 0),
    ],
)
def test_hostile_or_unregistrable_hosts_get_host_only_cookies(host, dots) -> None:
    """IPs, IPv6, a public suffix, unicode, junk: no Domain attribute at all."""
    assert scope(host) == CookieScope(None, dots)


def test_host_setting_makes_every_cookie_host_only() -> None:
    assert scope(b"shop.example.co.uk", "host") == CookieScope(None, 3)
    assert scope(b"example.com", "host") == CookieScope(None, 1)


def test_a_forced_domain_applies_to_the_hosts_under_it() -> None:
    """A shop on a domain the list does not know as one registrable domain forces it; a
    host outside it gets host-only cookies, which a browser would otherwise refuse."""
    assert scope(b"eu.shop.example.com", "shop.example.com") == CookieScope("shop.example.com", 2)
    assert scope(b"shop.example.com", ".Shop.Example.com") == CookieScope("shop.example.com", 2)
    assert scope(b"other.example.com", "shop.example.com") == CookieScope(None, 2)
    assert scope(b"notshop.example.com", "shop.example.com") == CookieScope(None, 2)
    assert scope(b"127.0.0.1", "shop.example.com") == CookieScope(None, 0)


@pytest.mark.parametrize("value", ["co.uk", "com", "1.2.3.4", "exa mple.com", "bücher.de", "localhost", "-a.com", "a..b"])
def test_bad_cookie_domain_settings_are_refused(value) -> None:
    with pytest.raises(ValueError):
        check_cookie_domain(value)


def test_cookie_domain_in_the_configuration() -> None:
    config = parse_config('[tracking]\ncookie_domain = "Example.CO.UK"\n', "tagd.toml")
    assert config.tracking.cookie_domain == "example.co.uk"
    assert parse_config("", "tagd.toml").tracking.cookie_domain == ""
    with pytest.raises(ConfigError, match="tracking.cookie_domain.*public suffix"):
        parse_config('[tracking]\ncookie_domain = "co.uk"\n', "tagd.toml")


@given(st.one_of(st.binary(max_size=80), st.text(max_size=60).map(lambda t: t.encode("utf-8"))))
def test_any_host_header_gives_a_safe_cookie(host) -> None:
    """Whatever the Host holds, the scope's domain is None or an ASCII domain the host
    matches, and a cookie written for it is one line with one Domain attribute."""
    result = scope(host)
    name = host_name(host)
    if result.domain is not None:
        assert name is not None and (name == result.domain or name.endswith("." + result.domain))
        assert result.dots == result.domain.count(".") >= 1
    header = set_cookie("_fbp", "fb.1.1.1", 60, secure=True, domain=result.domain)
    assert b"\r" not in header and b"\n" not in header
    assert header.count(b"Domain=") == (result.domain is not None)
