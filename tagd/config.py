"""Read tagd's TOML configuration into frozen attrs objects.

Every problem is reported as a L{ConfigError} that names the file and the key, so that
start-up can stop with one clear line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import tomllib
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import serverFromString

from tagd.clientip import CLOUDFLARE_WORD


class ConfigError(Exception):
    """A configuration file that tagd cannot run with."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(path, key, reason)
        self.path, self.key, self.reason = path, key, reason

    def __str__(self) -> str:
        return f"tagd: configuration error in {self.path}: {self.key}: {self.reason}"


@attrs.frozen
class ProxyConfig:
    """The C{[proxy]} table: where tagd listens and what it forwards to."""

    listen: str = "tcp:8080"
    origin: str = "http://127.0.0.1:8000"
    tracking_header: str = "Worker-Tracking"
    trusted_proxies: tuple[str, ...] = (CLOUDFLARE_WORD,)
    client_ip_header: str = "CF-Connecting-IP"
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    pool_size: int = 64
    pool_idle_timeout: float = 60.0


@attrs.frozen
class Config:
    """Everything tagd needs to start; built only by L{load_config} or L{parse_config}."""

    path: str
    proxy: ProxyConfig = ProxyConfig()


def _endpoint_string(value: str) -> str:
    # Parsing builds the endpoint object without listening; no reactor is touched.
    try:
        endpoint = serverFromString(None, value)
    except Exception as e:
        raise ValueError(
            f"{value!r} is not a Twisted server endpoint string such as 'tcp:8080' ({e})"
        ) from None
    # TCP endpoints keep these two as given; check them now rather than at bind time.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    interface = getattr(endpoint, "_interface", "")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"interface {interface!r} is not an IP address") from None
    return value


def _origin_url(value: str) -> str:
    if not all("\x21" <= c <= "\x7e" for c in value):
        raise ValueError(
            "may hold only printable ASCII (write an international host name in its xn-- form)"
        )
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("has no host name")
    parts.port  # raises ValueError for a port out of range or not a number
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user name or password")
    if parts.query or parts.fragment:
        raise ValueError("may carry a path prefix but no query or fragment")
    return value


def _header_name(value: str) -> str:
    allowed = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if not value or not set(value) <= allowed:
        raise ValueError("must be an HTTP header name (letters, digits, dashes)")
    return value


def _trusted_proxies(value: list) -> tuple[str, ...]:
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"entries must be strings, got {item!r}")
        if item != CLOUDFLARE_WORD:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is neither a CIDR range nor {CLOUDFLARE_WORD!r}"
                ) from None
    return tuple(value)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


# key -> (accepted TOML types, description of the type, check/convert)
_Field = tuple[tuple[type, ...], str, Callable[[Any], Any]]
_PROXY_FIELDS: dict[str, _Field] = {
    "listen": ((str,), "a string", _endpoint_string),
    "origin": ((str,), "a string", _origin_url),
    "tracking_header": ((str,), "a string", _header_name),
    "trusted_proxies": ((list,), "a list of strings", _trusted_proxies),
    "client_ip_header": ((str,), "a string", _header_name),
    "connect_timeout": ((int, float), "a number of seconds", _positive),
    "response_timeout": ((int, float), "a number of seconds", _positive),
    "pool_size": ((int,), "a whole number", _positive),
    "pool_idle_timeout": ((int, float), "a number of seconds", _positive),
}

_TABLES = {"proxy": (_PROXY_FIELDS, ProxyConfig)}


def _table(path: str, name: str, raw: Any, overrides: dict[str, Any]):
    fields, cls = _TABLES[name]
    if not isinstance(raw, dict):
        raise ConfigError(path, name, "must be a table")
    values = {}
    for key, value in {**raw, **overrides}.items():
        full = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(path, full, f"unknown key (known: {', '.join(fields)})")
        types, described, check = fields[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(path, full, f"must be {described}, got {type(value).__name__}")
        try:
            values[key] = check(value)
        except ValueError as e:
            raise ConfigError(path, full, str(e)) from None
    return cls(**values)


def parse_config(text: str, path: str, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Build a L{Config} from TOML text; C{overrides} are command-line values by table."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(file)", f"not valid TOML: {e}") from None
    overrides = overrides or {}
    for name in raw:
        if name not in _TABLES:
            raise ConfigError(path, name, f"unknown table (known: {', '.join(_TABLES)})")
    tables = {
        name: _table(path, name, raw.get(name, {}), overrides.get(name, {}))
        for name in _TABLES
    }
    return Config(path=path, **tables)


def load_config(path: str, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and check the file at C{path}."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "is not UTF-8 text") from None
    return parse_config(text, path, overrides)
