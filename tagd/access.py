"""Who may use the admin listener when C{[admin] token} is set.

Programs (Prometheus, curl, monitors) send C{Authorization: Bearer TOKEN}.  A browser
cannot add that header to the dashboard's live stream (C{EventSource} sends none), so a
person logs in once: the token goes in a form, posted to C{/login}, never in a URL (where
history, bookmarks and proxies' logs would keep it), and the answer sets a session cookie.

The cookie holds an HMAC of a fixed text keyed with the token, not the token: it opens the
admin pages, but whoever reads it cannot learn the token that C{/metrics} scrapers use, and
changing the token ends every session.  It is C{HttpOnly} (no script reads it) and
C{SameSite=Strict} (no other site's page sends it).  Both the header and the cookie are
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs

from twisted.web.resource import Resource
from twisted.web.server import Request

COOKIE = b"tagd_admin"
_SESSION_KEY = b"tagd admin session"
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
# A form's body is a few dozen bytes; more is not a login.
MAX_LOGIN_BODY = 4096

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tagd admin: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; margin: 3em">
<h1>tagd admin</h1>
<p>{notice}</p>
<form method="post" action="login">
<label>Admin token <input id="token" name="token" type="password" autocomplete="current-password" autofocus></label>
<button id="login" type="submit">Log in</button>
</form></body></html>
"""


def _login_page(notice: str) -> bytes:
    return _LOGIN_PAGE.format(notice=notice).encode("utf-8")


class Access:
    """The check for C{token}; an empty token lets everyone in."""

    def __init__(self, token: str) -> None:
        secret = token.encode("ascii")
        self._digest = hashlib.sha256(secret).digest() if token else None
        self._session = hmac.new(secret, _SESSION_KEY, hashlib.sha256).hexdigest().encode("ascii")

    def allows(self, request: Request) -> bool:
        """Whether C{request} carries the bearer token or a session cookie.

        The header's comparison is between SHA-256 digests, so that the time it takes
        tells nothing about the token, not even its length.
        """
        if self._digest is None:
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(hashlib.sha256(given.strip()).digest(), self._digest)
        cookie = request.getCookie(COOKIE)
        return cookie is not None and hmac.compare_digest(cookie, self._session)

    def login(self) -> Resource:
        """C{/login}: the token from a posted form, answered with the session cookie."""
        return _Login(self)

    def refusal(self, path: bytes) -> Resource:
        """The answer to a request without the token: for the dashboard (C{/}) the login
        form, which a browser shows; elsewhere a line of text for programs."""
        return _Unauthorized(_login_page("This admin listener needs its token.") if path == b"" else None)

    def session(self, token: bytes) -> bytes | None:
        """The session cookie's value, when C{token} is the right one."""
        if self._digest is not None and hmac.compare_digest(hashlib.sha256(token).digest(), self._digest):
            return self._session
        return None


class _Unauthorized(Resource):
    isLeaf = True

    def __init__(self, page: bytes | None) -> None:
        super().__init__()
        self._page = page

    def render(self, request: Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="tagd admin"')
        if self._page is None:
            request.setHeader(b"Content-Type", _TEXT)
            return b"a bearer token is required\n"
        request.setHeader(b"Content-Type", _HTML)
        request.setHeader(b"Cache-Control", b"no-store")
        return self._page


class _Login(Resource):
    isLeaf = True

    def __init__(self, access: Access) -> None:
        super().__init__()
        self._access = access

    def render_POST(self, request: Request) -> bytes:
        """Only the form's body is read: a token in the query string would be in a URL."""
        form = parse_qs(request.content.read(MAX_LOGIN_BODY).decode("latin-1"))
        token = (form.get("token") or [""])[0].encode("latin-1")
        session = self._access.session(token)
        request.setHeader(b"Cache-Control", b"no-store")
        if session is None:
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", _HTML)
            return _login_page("That is not the token.")
        request.addCookie(COOKIE, session, path=b"/", httpOnly=True, sameSite="strict")
        request.setResponseCode(303)
        request.setHeader(b"Location", b"./")
        request.setHeader(b"Content-Type", _TEXT)
        return b"logged in\n"
