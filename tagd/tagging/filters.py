"""Decisions that keep a response out of tracking: bots, speculative loads, paths, status.

Each function here runs on the proxy's hot path for every response that carries the
tracking header, so each is pure, allocates little and does its expensive preparation
(regex compilation) once, when it is constructed.  None of them ever touches the response:
they only answer "track this or not", and the caller counts the answer.  Consent, which
is decided per destination, is L{tagd.tagging.consent}'s.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import re._constants as _sre
import re._parser as _sre_parse
from typing import Iterable, Sequence
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers


# --- bots -----------------------------------------------------------------------------------

# A user agent longer than this is judged but not cached: the cache is bounded in entries,
# and a client sending huge distinct user agents must not make it unbounded in bytes.
MAX_CACHED_USER_AGENT = 1024
# A pattern of the crawler list that expands to more literal strings than this stays a regex.
_MAX_EXPANSION = 64
# Stand-ins for ^ and $ while a pattern is expanded into literal strings.
_START, _END = "\x02", "\x03"


def _expand(items: Sequence) -> list[str] | None:
    """Every string that a parsed regex matches, when that set is small and finite.

    Nearly all of the crawler list's patterns are plain words, a few with a character
    class (C{[wW]get}), a group of alternatives or an anchor.  Turned into literal strings
    they fit in one trie regex, which tries one branch per distinct next character instead
    of one per pattern: the difference between about 8 and about 100 microseconds for a
    browser's user agent, which matches nothing and so is the slow case.
    """
    results = [""]
    for op, arg in items:
        if op is _sre.LITERAL:
            options = [chr(arg)]
        elif op is _sre.IN and all(kind is _sre.LITERAL for kind, _ in arg):
            options = [chr(code) for _, code in arg]
        elif op is _sre.SUBPATTERN:
            options = _expand(arg[3])
        elif op is _sre.BRANCH:
            branches = [_expand(branch) for branch in arg[1]]
            options = None if None in branches else [s for b in branches for s in b]
        elif op is _sre.AT and arg is _sre.AT_BEGINNING:
            options = [_START]
        elif op is _sre.AT and arg is _sre.AT_END:
            options = [_END]
        else:
            return None
        if options is None:
            return None
        results = [done + more for done in results for more in options]
        if len(results) > _MAX_EXPANSION:
            return None
    return results


def _trie_regex(words: Iterable[str]) -> str:
    """One regex matching wherever any of C{words} occurs, shaped as a trie.

    Only the existence of a match matters, so a word that extends a shorter one is dropped.
    """
    root: dict = {}
    for word in sorted(set(words), key=len):
        node = root
        for char in word:
            if "" in node:
                break
            node = node.setdefault(char, {})
        else:
            node.clear()
            node[""] = {}
    return _node_regex(root) if root else r"(?!)"


def _node_regex(node: dict) -> str:
    if "" in node:
        return ""
    branches = [re.escape(char) + _node_regex(child) for char, child in sorted(node.items())]
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


@functools.cache
def _crawler_list_matcher():
    """A fast predicate equivalent to the crawler list, built once per process.

    The list's patterns are case-sensitive by design (C{crawleruseragents.is_crawler}'s
    default), so they stay case-sensitive here.  Patterns whose literal expansions are
    anchored go to C{match} and C{endswith}; the handful that are real regexes stay in
    one small alternation.
    """
    from crawleruseragents import CRAWLER_USER_AGENTS_DATA

    anywhere, at_start, at_end, exact, regexes = [], [], [], set(), []
    for entry in CRAWLER_USER_AGENTS_DATA:
        pattern = entry["pattern"]
        strings = None if _START in pattern or _END in pattern else _expand(_sre_parse.parse(pattern))
        if strings is None or any(_START in s[1:] or _END in s[:-1] for s in strings):
            regexes.append(pattern)
            continue
        for s in strings:
            starts, ends = s.startswith(_START), s.endswith(_END)
            core = s[starts : len(s) - ends]
            if starts and ends:
                exact.add(core)
            elif starts:
                at_start.append(core)
            elif ends:
                at_end.append(core)
            else:
                anywhere.append(core)
    search_anywhere = re.compile(_trie_regex(anywhere)).search
    match_start = re.compile(_trie_regex(at_start)).match
    suffixes = tuple(at_end)
    search_rest = re.compile("|".join(regexes) or r"(?!)").search
    frozen_exact = frozenset(exact)

    def is_listed(user_agent: str) -> bool:
        # Like the regex "$", the end anchors also match before one final newline.
        end = user_agent[:-1] if user_agent.endswith("\n") else user_agent
        return bool(
            search_anywhere(user_agent)
            or match_start(user_agent)
            or end.endswith(suffixes)
            or end in frozen_exact
            or search_rest(user_agent)
        )

    return is_listed


def _alternation(patterns: Sequence[str], what: str):
    """One case-insensitive search for any of C{patterns}; C{None} when there are none.

    A pattern that is not a valid regex is a configuration error, named in the message.
    """
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {e}") from None
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE).search


class BotDetector:
    """Tells crawlers, scripts and monitors from browsers by their C{User-Agent}.

    The maintained C{crawler-user-agents} list decides, with C{extra_patterns} added for a
    shop's own unwanted visitors; a user agent matching one of C{allow_patterns} is never a
    bot, for a shop's own monitoring or a partner the list flags wrongly.  Verdicts are
    cached per user agent in a bounded LRU, since real traffic repeats a few thousand user
    agents and a browser's is the list's slowest case.
    """

    def __init__(
        self,
        extra_patterns: Sequence[str] = (),
        allow_patterns: Sequence[str] = (),
        cache_size: int = 10000,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        listed = _crawler_list_matcher()
        extra = _alternation(tuple(extra_patterns), "extra bot")
        allowed = _alternation(tuple(allow_patterns), "allowed bot")

        # A closure rather than a method: a cache of a bound method would make the
        # detector refer to itself, and one of start-up that a reload replaces would never
        # be freed (see tagd.daemon.collection).
        def judge(user_agent: str) -> bool:
            if allowed is not None and allowed(user_agent):
                return False
            if listed(user_agent):
                return True
            return extra is not None and bool(extra(user_agent))

        self._judge = judge
        self._cached = functools.lru_cache(maxsize=cache_size)(judge)

    def is_bot(self, user_agent: str | None) -> bool:
        """Whether this user agent is a bot; a missing or blank one is, since browsers send one."""
        if not user_agent or not user_agent.strip():
            return True
        if len(user_agent) > MAX_CACHED_USER_AGENT:
            return self._judge(user_agent)
        return self._cached(user_agent)


# --- speculative loads ----------------------------------------------------------------------

# Headers by which browsers mark a load the visitor may never see: Sec-Purpose (Chrome's
# speculation rules, Safari), Purpose (older Chrome), X-Moz (Firefox link prefetch) and
# X-Purpose (Safari's Top Sites previews).  The browser pixel counts a prerendered page if it
# is activated; at request time tagd cannot know, so it counts none.
_SPECULATIVE_HEADERS = (b"sec-purpose", b"purpose", b"x-moz", b"x-purpose")
_SPECULATIVE_TOKENS = frozenset({b"prefetch", b"prerender", b"preview"})


def _tokens(value: bytes) -> Iterable[bytes]:
    """The tokens of a structured list value such as C{prefetch;prerender}, lower-cased."""
    return (t.strip().lower() for t in value.replace(b";", b",").split(b","))


def is_speculative(headers: Headers) -> bool:
    """Whether the request is a prefetch, prerender or preview rather than a page view."""
    for name in _SPECULATIVE_HEADERS:
        for value in headers.getRawHeaders(name, ()):
            if any(t in _SPECULATIVE_TOKENS for t in _tokens(value)):
                return True
    return False


# --- paths ----------------------------------------------------------------------------------


def _request_path(target: bytes) -> str:
    """The percent-decoded path of a request target, without query or fragment.

    Globs are matched on the decoded path so that C{/caf%C3%A9} and C{/café} are the same
    page, as the origin will see them.  An absolute-form target loses its scheme and host.
    """
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        scheme_end = path.find(b"://")
        if scheme_end != -1:
            slash = path.find(b"/", scheme_end + 3)
            path = path[slash:] if slash != -1 else b"/"
    return unquote_to_bytes(path).decode("utf-8", "replace") or "/"


def _globs(patterns: Sequence[str]):
    """One anchored match for any of C{patterns}, fnmatch-style; C{None} when there are none."""
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


class PathFilter:
    """Which request paths are tracked, from C{include_paths} and C{exclude_paths} globs.

    Globs follow C{fnmatch}: C{*} matches any run of characters I{including} C{/} (so
    C{/admin/*} covers the whole admin tree), C{?} one character, C{[...]} a set; matching
    is case-sensitive, like paths.  No include glob means every path; an exclude glob wins
    over an include glob.  The query string never takes part.
    """

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self._include = _globs(tuple(include))
        self._exclude = _globs(tuple(exclude))

    def allows(self, path: bytes) -> bool:
        """Whether a request for this target (path, optionally with a query) is tracked."""
        if self._include is None and self._exclude is None:
            return True
        decoded = _request_path(path)
        if self._exclude is not None and self._exclude(decoded):
            return False
        return self._include is None or bool(self._include(decoded))


# --- status ---------------------------------------------------------------------------------

_STATUS_CLASS = re.compile(r"([1-5])xx")
_STATUS_RANGE = re.compile(r"(\d{3})\s*-\s*(\d{3})")


def _status_codes(item: int | str) -> range:
    """The codes one configuration item names: C{204}, C{"3xx"} or C{"200-299"}."""
    if isinstance(item, int) and not isinstance(item, bool):
        if 100 <= item <= 599:
            return range(item, item + 1)
    elif isinstance(item, str):
        text = item.strip().lower()
        if match := _STATUS_CLASS.fullmatch(text):
            start = int(match[1]) * 100
            return range(start, start + 100)
        if (match := _STATUS_RANGE.fullmatch(text)) and 100 <= int(match[1]) <= int(match[2]) <= 599:
            return range(int(match[1]), int(match[2]) + 1)
        if text.isdigit() and 100 <= int(text) <= 599:
            return range(int(text), int(text) + 1)
    raise ValueError(f"{item!r} is not a status code (100-599), a class like '2xx' or a range like '200-299'")


def tracked_statuses(spec: Iterable[int | str]) -> frozenset[int]:
    """The set of tracked status codes from configuration items such as C{["2xx", 304]}.

    Expanded to a set once, so that the per-response check is one set lookup.
    """
    return frozenset(code for item in spec for code in _status_codes(item))
