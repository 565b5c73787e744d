"""Who may use the admin listener when C{[admin] token} is set.

Programs (Prometheus, curl, monitors) send C{Authorization: Bearer TOKEN}.  A browser
cannot add that header to the dashboard's live stream (C{EventSource} sends none), so a
person logs in: the token goes in a form, posted to C{/login}, never in a URL (where
history, bookmarks and proxies' logs would keep it), and the answer sets a session cookie.

The cookie holds a random session id, new at every login, not the token nor anything
made from it: whoever copies it cannot learn the token, and it opens the admin paths only
while tagd keeps that session.  tagd keeps it in memory, for L{SESSION_LIFETIME} from the
login (checked here, whatever the browser does with the cookie's C{Max-Age}), until
C{/logout} ends it, or until it is the oldest of more than L{MAX_SESSIONS}.  Being in
memory, every session ends when tagd restarts, which is also the only way the token
changes (C{[admin]} is read at start-up).  The cookie is C{HttpOnly} (no script reads it)
and C{SameSite=Strict} (no other site's page sends it, nor posts the login or logout).

The token is compared in constant time, as digests.  Sessions are kept by their id's
digest: a lookup's time then tells nothing of the ids kept, and tagd's memory holds none.
Neither the token nor a session id is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from urllib.parse import parse_qs

from twisted.web.resource import Resource
from twisted.web.server import Request

COOKIE = b"tagd_admin"
# A working day at the dashboard; after that, the token again.
SESSION_LIFETIME = 12 * 3600
# Sessions kept at once: a few people with a few browsers each.  A login beyond that ends
# the oldest session, so that logins cannot grow tagd's memory.
MAX_SESSIONS = 32
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
# A form's body is a few dozen bytes: a longer one is refused, not parsed.
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
    """The check for C{token}, and the sessions of the browsers that logged in with it;
    an empty token lets everyone in.

    @param reactor: its C{seconds} times the sessions.
    """

    def __init__(self, token: str, reactor) -> None:
        self._digest = hashlib.sha256(token.encode("ascii")).digest() if token else None
        self._reactor = reactor
        # Each session id's digest and when the session ends, oldest first.
        self._sessions: OrderedDict[bytes, float] = OrderedDict()

    def allows(self, request: Request) -> bool:
        """Whether C{request} carries the bearer token or the cookie of a session that
        has not ended.

        The header's comparison is between SHA-256 digests, so that the time it takes
        tells nothing about the token, not even its length.
        """
        if self._digest is None:
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(hashlib.sha256(given.strip()).digest(), self._digest)
        cookie = request.getCookie(COOKIE)
        if cookie is None:
            return False
        key = _key(cookie)
        ends = self._sessions.get(key)
        if ends is None:
            return False
        if ends <= self._reactor.seconds():
            del self._sessions[key]
            return False
        return True

    def login(self) -> Resource:
        """C{/login}: the token from a posted form, answered with a new session's cookie."""
        return _Login(self)

    def logout(self) -> Resource:
        """C{/logout}: the end of the session whose cookie is posted."""
        return _Logout(self)

    def refusal(self, path: bytes) -> Resource:
        """The answer to a request without the token: for the dashboard (C{/}) the login
        form, which a browser shows; elsewhere a line of text for programs."""
        return _Unauthorized(_login_page("This admin listener needs its token.") if path == b"" else None)

    def start_session(self, token: bytes) -> bytes | None:
        """A new session's id, when C{token} is the right one.  Sessions past their end
        are forgotten first; the oldest one goes when L{MAX_SESSIONS} are kept."""
        if self._digest is None or not hmac.compare_digest(hashlib.sha256(token).digest(), self._digest):
            return None
        now = self._reactor.seconds()
        # All live equally long, so the oldest end first.
        sessions = self._sessions
        while sessions and (len(sessions) >= MAX_SESSIONS or next(iter(sessions.values())) <= now):
            sessions.popitem(last=False)
        session = secrets.token_urlsafe(32).encode("ascii")
        self._sessions[_key(session)] = now + SESSION_LIFETIME
        return session

    def end_session(self, session: bytes | None) -> None:
        """Forget C{session}; an unknown or missing one is ignored (a second logout)."""
        if session is not None:
            self._sessions.pop(_key(session), None)


def _key(session: bytes) -> bytes:
    """What a session is kept by: its id's digest."""
    return hashlib.sha256(session).digest()


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


def _set_cookie(request: Request, value: bytes, max_age: int) -> None:
    """The session cookie, for the whole listener; C{max_age} 0 makes the browser drop it."""
    request.addCookie(
        COOKIE, value, path=b"/", max_age=str(max_age).encode("ascii"), httpOnly=True, sameSite="strict"
    )


def _back_to_the_dashboard(request: Request, text: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"Location", b"./")
    request.setHeader(b"Content-Type", _TEXT)
    return text


class _Login(Resource):
    isLeaf = True

    def __init__(self, access: Access) -> None:
        super().__init__()
        self._access = access

    def render_POST(self, request: Request) -> bytes:
        """Only the form's body is read: a token in the query string would be in a URL."""
        body = request.content.read(MAX_LOGIN_BODY + 1)
        if len(body) > MAX_LOGIN_BODY:
            request.setResponseCode(413)
            request.setHeader(b"Content-Type", _TEXT)
            return b"a login form is never that long\n"
        form = parse_qs(body.decode("latin-1"))
        token = (form.get("token") or [""])[0].encode("latin-1")
        session = self._access.start_session(token)
        request.setHeader(b"Cache-Control", b"no-store")
        if session is None:
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", _HTML)
            return _login_page("That is not the token.")
        _set_cookie(request, session, SESSION_LIFETIME)
        return _back_to_the_dashboard(request, b"logged in\n")


class _Logout(Resource):
    """Open without the token, like C{/login}: a browser whose session has already ended
    must still be able to drop its cookie."""

    isLeaf = True

    def __init__(self, access: Access) -> None:
        super().__init__()
        self._access = access

    def render_GET(self, request: Request) -> bytes:
        """A link cannot log out (another site could embed one): only the form's POST."""
        request.setResponseCode(405)
        request.setHeader(b"Allow", b"POST")
        request.setHeader(b"Content-Type", _TEXT)
        return b"log out with the dashboard's button\n"

    def render_POST(self, request: Request) -> bytes:
        self._access.end_session(request.getCookie(COOKIE))
        request.setHeader(b"Cache-Control", b"no-store")
        _set_cookie(request, b"", 0)
        return _back_to_the_dashboard(request, b"logged out\n")
