"""The domain every first-party cookie tagd sets lives on, from the request's C{Host}.

The browser pixels set C{_fbp}, C{_fbc} and C{_ga} on the shop's registrable domain
(C{example.co.uk} for C{shop.example.co.uk}), so that the shop's sub-domains share them.
tagd does the same, or a browser holds two cookies of one name (tagd's host-only one beside
the pixel's) and a checkout on another sub-domain loses the ids.  The registrable domain
comes from the Public Suffix List as the C{publicsuffixlist} package ships it: never
fetched at run time, updated with the package.

The C{Host} header is the visitor's to write.  Only a plain, ASCII host name with a
registrable domain gets a C{Domain} attribute; an IP address, a name that is itself a
public suffix, a single label (C{localhost}), non-ASCII bytes or anything that is not a
host name at all gets a host-only cookie, which the browser ties to the host it asked.
"""

from __future__ import annotations

import functools
import re

import attrs

# [tracking] cookie_domain: "" for the registrable domain of the Host, HOST_ONLY for
# host-only cookies, any other value a domain to force.
REGISTRABLE, HOST_ONLY = "", "host"
# An ASCII host name as a Domain attribute may carry it: LDH labels of 1 to 63 characters,
# 253 at most in all (punycode's "xn--" labels are such labels).
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# A host whose last label is a number is an IPv4 address to a browser (the URL Standard's
# "ends in a number": 1.2.3 is 1.2.0.3, 0x7f.1 is 127.0.0.1), whatever ipaddress says.
_ENDS_IN_A_NUMBER = re.compile(r"(?:.*\.)?(?:[0-9]+|0x[0-9a-f]*)")
# Distinct hosts whose cookie scope is remembered: a shop answers for a handful.
CACHED_HOSTS = 256


@attrs.frozen
class CookieScope:
    """Where a response's cookies live: C{domain} for the C{Domain} attribute (C{None}:
    host-only), and the domain's number of dots, Meta's "sub-domain index"."""

    domain: str | None
    dots: int


HOST_ONLY_SCOPE = CookieScope(None, 0)


@functools.cache
def _public_suffixes():
    """The Public Suffix List, parsed once per process (a few tens of milliseconds)."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def host_name(host: bytes | None) -> str | None:
    """The request's host name, lower-cased, without port; C{None} unless it is an ASCII
    host name (an IP address, bracketed IPv6 or anything else is C{None}).  A name with a
    final dot is C{None} too: a browser at C{shop.example.co.uk.} refuses a cookie for
    C{example.co.uk} (RFC 6265 compares the names as they are), so it gets host-only ones."""
    if not host or host[:1] == b"[":
        return None
    try:
        text = host.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    name, _, port = text.partition(":")
    if port and not port.isdigit():
        return None
    if len(name) > 253 or not _HOST_NAME.fullmatch(name) or _ENDS_IN_A_NUMBER.fullmatch(name):
        return None
    return name


def _dots(name: str) -> int:
    return name.count(".")


def registrable_domain(name: str) -> str | None:
    """The registrable domain (eTLD+1) of a host name, or C{None} when it has none (it is a
    public suffix itself, or a single label)."""
    domain = _public_suffixes().privatesuffix(name)
    return domain if domain and "." in domain else None


def domain_matches(name: str, domain: str) -> bool:
    """Whether a cookie for C{domain} may be set by host C{name} (RFC 6265, 5.1.3)."""
    return name == domain or name.endswith("." + domain)


def check_cookie_domain(value: str) -> str:
    """A C{[tracking] cookie_domain} setting, lower-cased; C{ValueError} unless it is
    C{""}, C{"host"} or a registrable domain or one under it."""
    setting = value.strip().lower().removeprefix(".")
    if setting in (REGISTRABLE, HOST_ONLY):
        return setting
    if host_name(setting.encode("ascii", "replace")) != setting:
        raise ValueError('must be "", "host" or a domain name such as "example.co.uk" (xn-- for an international one)')
    if registrable_domain(setting) is None:
        raise ValueError(f"{setting!r} is a public suffix: a browser refuses cookies for it")
    return setting


class CookieScoper:
    """The L{CookieScope} for a request's C{Host}, by the C{cookie_domain} setting, cached
    per host.

    A forced domain applies to hosts under it only: for any other host a browser would
    refuse the cookie, so that host's cookies are host-only.
    """

    def __init__(self, setting: str = REGISTRABLE) -> None:
        setting = check_cookie_domain(setting)

        def scope(host: bytes | None) -> CookieScope:
            name = host_name(host)
            if name is None:
                return HOST_ONLY_SCOPE
            if setting == HOST_ONLY:
                return CookieScope(None, _dots(name))
            domain = setting if setting else registrable_domain(name)
            if domain is None or not domain_matches(name, domain):
                return CookieScope(None, _dots(name))
            return CookieScope(domain, _dots(domain))

        # A closure, not a cached method: see tagd.daemon.collection on reference cycles.
        self.scope = functools.lru_cache(maxsize=CACHED_HOSTS)(scope)
