"""tagd's C{_fbp}/C{_fbc} against Meta's own Parameter Builder (C{capi-param-builder-python})
as the oracle: for the same URL, cookies and host, the same cookies are set, on the same
domain, for the same time, with the same values (times, random parts and the appendix's
version aside; its format, language and kind of write compared).

The builder is given the Public Suffix List through its resolver interface, as its
documentation asks: without one it drops the first label, which is wrong for
C{shop.example.co.uk}.  Its quirks are left out of the inputs (an empty C{fbclid=}, which
it makes C{fb.1.<t>..} of in some paths; the appendix it adds to URLs, which tagd never
reads).
"""

from __future__ import annotations

import random
from base64 import urlsafe_b64decode
from urllib.parse import parse_qs, urlencode

from capi_param_builder import EtldPlusOneResolver, ParamBuilder
from hypothesis import given, settings
from hypothesis import strategies as st

from tagd.tagging.cookiedomain import CookieScoper, registrable_domain
from tagd.tagging.identity import META, resolve_identity

SUFFIXES = ["com", "de", "co.uk", "com.au", "github.io", "foo.kawasaki.jp"]
LABEL = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
FBCLID = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
APPENDIX = st.one_of(
    st.sampled_from(["AQ", "Ag", "Aw", "BA", "BQ", "Bg"]), st.from_regex(r"[A-Za-z0-9_-]{8}", fullmatch=True)
)
MS = st.integers(10**12, 2 * 10**12 - 1).map(str)


class PublicSuffixes(EtldPlusOneResolver):
    """The builder's resolver, backed by the list tagd uses."""

    def resolve(self, host_name: str) -> str:
        return registrable_domain(host_name) or host_name


@st.composite
def hosts(draw) -> str:
    labels = draw(st.lists(LABEL, min_size=1, max_size=3))
    port = draw(st.sampled_from(["", ":8080", ":443"]))
    return ".".join([*labels, draw(st.sampled_from(SUFFIXES))]) + port


@st.composite
def cookie_values(draw, payload) -> str | None:
    """Absent, the pixel's old four segments, five with an appendix, or junk."""
    kind = draw(st.sampled_from(["absent", "four", "five", "junk"]))
    if kind == "absent":
        return None
    if kind == "junk":
        return draw(st.sampled_from(["x", "fb.1", "fb.1.2.3.4.5.6", "fb.1.170.1.toolongappendix"]))
    value = f"fb.{draw(st.integers(0, 3))}.{draw(MS)}.{draw(payload)}"
    return value if kind == "four" else f"{value}.{draw(APPENDIX)}"


@st.composite
def requests(draw):
    host = draw(hosts())
    click = draw(st.one_of(st.none(), FBCLID))
    params = [("utm_source", "facebook")] if draw(st.booleans()) else []
    if click is not None:
        params.append(("fbclid", click))
    cookies = {}
    fbp = draw(cookie_values(st.integers(0, 2**31 - 1).map(str)))
    # The same click as the URL's, or another one.
    fbc = draw(cookie_values(st.one_of(FBCLID, st.just(click or "Same"))))
    if fbp is not None:
        cookies["_fbp"] = fbp
    if fbc is not None:
        cookies["_fbc"] = fbc
    return host, urlencode(params), cookies


def masked(value: str | None) -> tuple | None:
    """A value without what differs by design: the time and random number of a new one,
    the appendix's version bytes."""
    if value is None:
        return None
    parts = value.split(".")
    if len(parts) == 4:
        return tuple(parts)
    head, appendix = parts[:4], parts[4]
    kind = tuple(urlsafe_b64decode(appendix + "==")[:3]) if len(appendix) == 8 else appendix
    return (*head, kind)


def comparable(value: str | None, original: str | None, cookie: str) -> tuple | None:
    """L{masked}, and for a value written now (not the visitor's own, kept or upgraded)
    its time, and for C{_fbp} its random number, left out too."""
    value_parts = masked(value)
    if value_parts is None or (original is not None and value.split(".")[:4] == original.split(".")[:4]):
        return value_parts
    payload = "<random>" if cookie == "_fbp" else value_parts[3]
    return (value_parts[0], value_parts[1], "<time>", payload, *value_parts[4:])


@settings(max_examples=300, deadline=None)
@given(requests(), st.booleans())
def test_cookies_and_values_match_meta_s_parameter_builder(request, secure) -> None:
    """Hosts with one-, two- and three-label public suffixes, URLs with and without a
    click, four- and five-segment cookies and junk: the same cookies as Meta's library."""
    host, query, cookies = request
    builder = ParamBuilder(PublicSuffixes())
    meta_cookies = {c.name: c for c in builder.process_request(host, parse_qs(query), dict(cookies))}
    identity = resolve_identity(
        cookies={k.encode(): v.encode() for k, v in cookies.items()},
        query=query.encode(),
        now=1_706_540_400.25,
        secure=secure,
        rand=random.Random(1),
        create_for=frozenset({META}),
        scope=CookieScoper("").scope(host.encode()),
    )
    ours = {}
    for header in identity.set_cookies:
        first, *attributes = header.decode().split("; ")
        name, _, value = first.partition("=")
        ours[name] = (value, dict(a.partition("=")[::2] for a in attributes))

    assert set(ours) == set(meta_cookies)
    for name, cookie in meta_cookies.items():
        value, attributes = ours[name]
        assert attributes["Domain"] == cookie.domain
        assert int(attributes["Max-Age"]) == cookie.max_age
        assert comparable(value, cookies.get(name), name) == comparable(cookie.value, cookies.get(name), name)
    assert comparable(identity.fbp, cookies.get("_fbp"), "_fbp") == comparable(builder.get_fbp(), cookies.get("_fbp"), "_fbp")
    assert comparable(identity.fbc, cookies.get("_fbc"), "_fbc") == comparable(builder.get_fbc(), cookies.get("_fbc"), "_fbc")
