"""Read tagd's TOML configuration into frozen attrs objects.

Every problem is reported as a L{ConfigError} that names the file and the key, so that
start-up can stop with one clear line instead of a traceback.

A secret (a destination module's C{SECRETS}, C{[admin] token}, each value of a webhook's
C{headers}) may be given as a reference instead: C{{ credential = "NAME" }} reads the file
C{$CREDENTIALS_DIRECTORY/NAME} (systemd's C{LoadCredential=}), C{{ env = "NAME" }} an
environment variable.  Then the configuration file can be shared, or kept in a repository,
without any token in it.  References are resolved once, when the file is loaded, so that a
missing credential stops start-up rather than the first delivery.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import serverFromString

from tagd.proxy.clientip import CLOUDFLARE_WORD
from tagd.tagging.consent import CONSENT_PURPOSES, DEFAULT_PURPOSES, NONE, SOURCES
from tagd.tagging.cookiedomain import check_cookie_domain
from tagd.delivery.destinations.registry import DESTINATION_TYPES, destination_module
from tagd.tagging.filters import tracked_statuses


COMMAND_LINE = "the command line"


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
    allow_underscores_in_headers: bool = False
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    pool_size: int = 64
    pool_idle_timeout: float = 60.0
    shutdown_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: float = 1024.0
    upload_timeout: float = 600.0
    max_connections: int = 1024
    keepalive_timeout: float = 60.0


@attrs.frozen
class TrackingConfig:
    """The C{[tracking]} table: which responses become events, and the cookies tagd sets."""

    include_paths: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    extra_bots: tuple[str, ...] = ()
    allow_bots: tuple[str, ...] = ()
    honor_gpc: bool = True
    consent_source: str = ""
    consent_cookie: str = ""
    consent_values: tuple[str, ...] = ("1", "true", "yes", "granted", "all")
    track_statuses: tuple[int | str, ...] = ("2xx",)
    event_id_cookie: str = "tagd_event_id"
    first_party_cookies: bool = True
    cookie_domain: str = ""
    max_header_bytes: int = 8192
    max_events_per_response: int = 20


@attrs.frozen
class SpoolConfig:
    """The C{[spool]} table: where accepted events wait for delivery."""

    path: str = "tagd-spool.sqlite3"
    max_events: int = 100_000
    flush_interval: float = 0.05


@attrs.frozen
class DeliveryConfig:
    """The C{[delivery]} table: how the dispatcher drains the spool."""

    poll_interval: float = 1.0
    # Requests in flight per destination; None: each destination type's own default.
    concurrency: int | None = None
    backoff_base: float = 0.25
    backoff_cap: float = 600.0
    max_retry_after: float = 3600.0
    outage_backoff_cap: float = 5.0
    outage_reminder: float = 300.0
    max_attempts: int = 10


@attrs.frozen
class AdminConfig:
    """The C{[admin]} table: where C{/metrics} and C{/healthz} are served, and their token.

    C{token} is a secret (C{metadata["secret"]}): C{tagd check-config} masks it.
    """

    listen: str = "tcp:9100:interface=127.0.0.1"
    token: str = attrs.field(default="", repr=False, metadata={"secret": True})


@attrs.frozen
class DestinationConfig:
    """One C{[[destinations]]} table, checked and built into its destination object."""

    type: str
    name: str
    timeout: float
    concurrency: int
    destination: Any = attrs.field(repr=False)
    secrets: tuple[str, ...] = ()
    consent_purpose: str = NONE


@attrs.frozen
class SpoolSettings:
    """What the spool commands read of a configuration: the C{[spool]} table and the names
    of the destinations, built only by L{parse_spool_settings}.

    Nothing else is checked and no secret resolved, so that a token only the service can
    read (an admin token from a variable set in the unit) does not stop a look into the
    spool beside it.
    """

    path: str
    spool: SpoolConfig = SpoolConfig()
    destination_names: tuple[str, ...] = ()


@attrs.frozen
class Config:
    """Everything tagd needs to start; built only by L{load_config} or L{parse_config}."""

    path: str
    proxy: ProxyConfig = ProxyConfig()
    tracking: TrackingConfig = TrackingConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    admin: AdminConfig = AdminConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    # The secrets given by reference, by key as errors name it ("admin.token",
    # "destinations[0].headers.Authorization"): the reference table, which names where the
    # secret was read and not the secret, so that check-config can show it.
    references: Mapping[str, Mapping[str, str]] = MappingProxyType({})


def _systemd_endpoint(value: str) -> str:
    """Check a C{systemd:} endpoint string's form only.

    Twisted's parser looks the descriptor up among those systemd passed in, which exist
    only inside the service: C{tagd check-config} and the C{spool} commands, run beside
    it, would refuse a valid file.
    """
    options = dict(part.partition("=")[::2] for part in value.split(":")[1:])
    if options.get("domain") not in ("INET", "INET6", "UNIX"):
        raise ValueError(f"{value!r}: a systemd endpoint needs domain=INET6, INET or UNIX")
    index, name = options.get("index"), options.get("name")
    if (index is None) == (name is None) or (index is not None and not index.isdigit()):
        raise ValueError(f"{value!r}: a systemd endpoint needs either index=N or name=NAME")
    unknown = set(options) - {"domain", "index", "name"}
    if unknown:
        raise ValueError(f"{value!r}: unknown systemd endpoint option(s) {', '.join(sorted(unknown))}")
    return value


def _endpoint_string(value: str) -> str:
    if value.startswith("systemd:"):
        return _systemd_endpoint(value)
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


def _destination_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", value):
        raise ValueError("must be 1 to 64 letters, digits, _ . - (it names the destination in logs and metrics)")
    return value


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number greater than zero")
    return value


def _strings(value: list) -> tuple[str, ...]:
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"entries must be strings, got {type(item).__name__}")
    return tuple(value)


def _patterns(value: list) -> tuple[str, ...]:
    for item in _strings(value):
        try:
            re.compile(item)
        except re.error as e:
            raise ValueError(f"{item!r} is not a regular expression: {e}") from None
    return tuple(value)


def _statuses(value: list) -> tuple[int | str, ...]:
    """Status codes (200), classes ("2xx") and ranges ("200-299"), as the filter reads them."""
    tracked_statuses(value)  # raises ValueError naming the bad item
    return tuple(value)


def _cookie_name(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9_\-.]+", value):
        raise ValueError("must be a cookie name (letters, digits, _ - .) or empty")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value

    return check


def _bearer_token(value: str) -> str:
    # What an Authorization header can carry as one word.  The message never quotes the
    # value: it is a secret.
    if not all("\x21" <= c <= "\x7e" for c in value):
        raise ValueError("may hold only printable ASCII without spaces")
    return value


def _identity(value: Any) -> Any:
    return value


# key -> (accepted TOML types, description of the type, check/convert)
_Field = tuple[tuple[type, ...], str, Callable[[Any], Any]]
_STRINGS: _Field = ((list,), "a list of strings", _strings)
_PROXY_FIELDS: dict[str, _Field] = {
    "listen": ((str,), "a string", _endpoint_string),
    "origin": ((str,), "a string", _origin_url),
    "tracking_header": ((str,), "a string", _header_name),
    "trusted_proxies": ((list,), "a list of strings", _trusted_proxies),
    "client_ip_header": ((str,), "a string", _header_name),
    "allow_underscores_in_headers": ((bool,), "true or false", _identity),
    "connect_timeout": ((int, float), "a number of seconds", _positive),
    "response_timeout": ((int, float), "a number of seconds", _positive),
    "pool_size": ((int,), "a whole number", _positive),
    "pool_idle_timeout": ((int, float), "a number of seconds", _positive),
    "shutdown_timeout": ((int, float), "a number of seconds", _positive),
    "header_timeout": ((int, float), "a number of seconds", _positive),
    "body_timeout": ((int, float), "a number of seconds", _positive),
    "body_min_rate": ((int, float), "a number of bytes per second", _positive),
    "upload_timeout": ((int, float), "a number of seconds", _positive),
    "max_connections": ((int,), "a whole number", _positive),
    "keepalive_timeout": ((int, float), "a number of seconds", _positive),
}
_SECONDS: _Field = ((int, float), "a number of seconds", _positive)
_SPOOL_FIELDS: dict[str, _Field] = {
    "path": ((str,), "a string", _nonempty),
    "max_events": ((int,), "a whole number", _positive),
    "flush_interval": _SECONDS,
}
_DELIVERY_FIELDS: dict[str, _Field] = {
    "poll_interval": _SECONDS,
    "concurrency": ((int,), "a whole number", _positive),
    "backoff_base": _SECONDS,
    "backoff_cap": _SECONDS,
    "max_retry_after": _SECONDS,
    "outage_backoff_cap": _SECONDS,
    "outage_reminder": _SECONDS,
    "max_attempts": ((int,), "a whole number", _positive),
}
_ADMIN_FIELDS: dict[str, _Field] = {
    "listen": ((str,), "a string", _endpoint_string),
    "token": ((str,), "a string", _bearer_token),
}
_TRACKING_FIELDS: dict[str, _Field] = {
    "include_paths": _STRINGS,
    "exclude_paths": _STRINGS,
    "extra_bots": ((list,), "a list of regular expressions", _patterns),
    "allow_bots": ((list,), "a list of regular expressions", _patterns),
    "honor_gpc": ((bool,), "true or false", _identity),
    "consent_source": ((str,), "a string", _one_of(SOURCES)),
    "consent_cookie": ((str,), "a string", _cookie_name),
    "consent_values": _STRINGS,
    "track_statuses": ((list,), "a list of status codes, classes or ranges", _statuses),
    "event_id_cookie": ((str,), "a string", _cookie_name),
    "first_party_cookies": ((bool,), "true or false", _identity),
    "cookie_domain": ((str,), "a string", check_cookie_domain),
    "max_header_bytes": ((int,), "a whole number", _positive),
    "max_events_per_response": ((int,), "a whole number", _positive),
}
_TABLES = {
    "proxy": (_PROXY_FIELDS, ProxyConfig),
    "tracking": (_TRACKING_FIELDS, TrackingConfig),
    "spool": (_SPOOL_FIELDS, SpoolConfig),
    "delivery": (_DELIVERY_FIELDS, DeliveryConfig),
    "admin": (_ADMIN_FIELDS, AdminConfig),
}
_DESTINATION_COMMON: dict[str, _Field] = {
    "type": ((str,), "a string", _identity),
    "name": ((str,), "a string", _destination_name),
    "timeout": ((int, float), "a number of seconds", _positive),
    "consent_purpose": ((str,), "a string", _one_of(CONSENT_PURPOSES)),
    "concurrency": ((int,), "a whole number", _positive),
}


def _checked(path: str, prefix: str, raw: dict, fields: dict[str, _Field]) -> dict[str, Any]:
    """The table's values, each checked against its field; unknown keys are errors."""
    values = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(path, full, f"unknown key (known: {', '.join(fields)})")
        types, described, check = fields[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(path, full, f"must be {described}, got {type(value).__name__}")
        try:
            values[key] = check(value)
        except ValueError as e:
            raise ConfigError(path, full, str(e)) from None
    return values


# What each kind of reference names.
_REFERENCE_KINDS = {"credential": "file in $CREDENTIALS_DIRECTORY", "env": "environment variable"}


def _read_credential(name: str, environ: Mapping[str, str]) -> str:
    """The contents of systemd credential C{name}, without the newline a file usually ends with."""
    if "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"credential {name!r} must be a file name, not a path")
    directory = environ.get("CREDENTIALS_DIRECTORY")
    not_found = f"credential {name!r} not found (no $CREDENTIALS_DIRECTORY, or no such file in it)"
    if not directory:
        raise ValueError(not_found)
    try:
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(not_found) from None
    except OSError as e:
        raise ValueError(f"credential {name!r} cannot be read: {e.strerror}") from None
    try:
        value = data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError:
        raise ValueError(f"credential {name!r} is not UTF-8 text") from None
    if not value:
        raise ValueError(f"credential {name!r} is empty")
    return value


def _read_env(name: str, environ: Mapping[str, str]) -> str:
    """The value of environment variable C{name}, which must be set and not empty."""
    if name not in environ:
        raise ValueError(f"environment variable {name} is not set")
    if not environ[name]:
        raise ValueError(f"environment variable {name} is empty")
    return environ[name]


def _secret(
    path: str, key: str, value: Any, environ: Mapping[str, str], references: dict[str, Any]
) -> Any:
    """C{value} itself, or, for a reference table, the secret it names (recorded in
    C{references} under C{key}).  Errors name the reference, never the value read.

    An empty literal is refused: it is a token not pasted yet, which every platform would
    refuse at every send (and an empty C{[admin] token} would leave the admin port open).
    """
    if isinstance(value, str) and not value.strip():
        raise ConfigError(
            path, key, 'must not be empty: give the secret, or { credential = "NAME" } or { env = "NAME" }'
        )
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or next(iter(value)) not in _REFERENCE_KINDS:
        raise ConfigError(
            path, key,
            'a secret given as a table must be { credential = "NAME" } or { env = "NAME" }, '
            f"got keys: {', '.join(value) or '(none)'}",
        )
    [(kind, name)] = value.items()
    if not isinstance(name, str) or not name:
        raise ConfigError(
            path, key, f"{kind} must name the {_REFERENCE_KINDS[kind]} as a non-empty string"
        )
    read = _read_credential if kind == "credential" else _read_env
    try:
        secret = read(name, environ)
    except ValueError as e:
        raise ConfigError(path, key, str(e)) from None
    references[key] = MappingProxyType({kind: name})
    return secret


def _with_secrets(
    path: str,
    prefix: str,
    raw: dict,
    fields: dict[str, _Field],
    secrets: tuple[str, ...],
    environ: Mapping[str, str],
    references: dict[str, Any],
) -> dict:
    """C{raw} with each secret given by reference replaced by the secret; a secret that is a
    table (webhook C{headers}) may give each of its values by reference."""
    resolved = dict(raw)
    for key in secrets:
        if key not in raw:
            continue
        full = f"{prefix}.{key}"
        if dict not in fields[key][0]:
            resolved[key] = _secret(path, full, raw[key], environ, references)
        elif isinstance(raw[key], dict):
            resolved[key] = {
                name: _secret(path, f"{full}.{name}", item, environ, references)
                for name, item in raw[key].items()
            }
    return resolved


def _table(
    path: str,
    name: str,
    raw: Any,
    overrides: dict[str, Any],
    environ: Mapping[str, str],
    references: dict[str, Any],
):
    fields, cls = _TABLES[name]
    if not isinstance(raw, dict):
        raise ConfigError(path, name, "must be a table")
    secrets = tuple(field.name for field in attrs.fields(cls) if field.metadata.get("secret"))
    raw = _with_secrets(path, name, raw, fields, secrets, environ, references)
    values = _checked(path, name, raw, fields)
    # A bad command-line value is the command line's fault, not the file's.
    values.update(_checked(COMMAND_LINE, name, overrides, fields))
    return cls(**values)


def _destination_fields(module) -> dict[str, _Field]:
    """The checks for one destination type: its own keys, typed as the module declares."""
    fields = dict(_DESTINATION_COMMON)
    for key, (types, _required, _default) in module.KEYS.items():
        described = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        fields[key] = (types, described, _identity)
    return fields


_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
               dict: "a table", list: "a list"}


def _destination_type(path: str, prefix: str, raw: Any) -> str:
    """The C{type} of one C{[[destinations]]} table, which must be a table."""
    if not isinstance(raw, dict):
        raise ConfigError(path, prefix, "must be a table ([[destinations]])")
    kind = raw.get("type")
    if kind not in DESTINATION_TYPES:
        raise ConfigError(
            path, f"{prefix}.type", f"must be one of {', '.join(DESTINATION_TYPES)}, got {kind!r}"
        )
    return kind


def _destination(
    path: str,
    index: int,
    raw: Any,
    environ: Mapping[str, str],
    references: dict[str, Any],
    concurrency: int | None,
) -> DestinationConfig:
    """One C{[[destinations]]} table; C{concurrency} is C{[delivery] concurrency}, which a
    table's own C{concurrency} overrides, and which overrides the type's default."""
    prefix = f"destinations[{index}]"
    kind = _destination_type(path, prefix, raw)
    module = destination_module(kind)
    fields = _destination_fields(module)
    raw = _with_secrets(path, prefix, raw, fields, tuple(module.SECRETS), environ, references)
    values = _checked(path, prefix, raw, fields)
    settings = {}
    for key, (_types, required, default) in module.KEYS.items():
        if key in values:
            settings[key] = values[key]
        elif required:
            raise ConfigError(path, f"{prefix}.{key}", f"is required for type {kind!r}")
        else:
            settings[key] = default
    name = values.get("name", kind)
    try:
        destination = module.build(name, settings)
    except ValueError as e:
        key, sep, reason = str(e).partition(": ")
        if not (sep and key in module.KEYS):
            key, reason = "", str(e)
        raise ConfigError(path, f"{prefix}.{key}" if key else prefix, reason) from None
    return DestinationConfig(
        type=kind,
        name=name,
        timeout=float(values.get("timeout", module.DEFAULT_TIMEOUT)),
        concurrency=values.get("concurrency", concurrency or module.DEFAULT_CONCURRENCY),
        destination=destination,
        secrets=tuple(module.SECRETS),
        consent_purpose=values.get("consent_purpose", DEFAULT_PURPOSES[kind]),
    )


def _destination_tables(path: str, raw: Any) -> list:
    if not isinstance(raw, list):
        raise ConfigError(path, "destinations", "must be an array of tables ([[destinations]])")
    return raw


def _destinations(
    path: str, raw: Any, environ: Mapping[str, str], references: dict[str, Any], concurrency: int | None
) -> tuple[DestinationConfig, ...]:
    destinations = tuple(
        _destination(path, i, item, environ, references, concurrency)
        for i, item in enumerate(_destination_tables(path, raw))
    )
    seen = set()
    for i, destination in enumerate(destinations):
        if destination.name in seen:
            raise ConfigError(
                path, f"destinations[{i}].name", f"{destination.name!r} is used twice; names must differ"
            )
        seen.add(destination.name)
    return destinations


def _tables(text: str, path: str) -> dict[str, Any]:
    """The file's TOML, whose tables must all be tagd's."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(file)", f"not valid TOML: {e}") from None
    known = [*_TABLES, "destinations"]
    for name in raw:
        if name not in known:
            raise ConfigError(path, name, f"unknown table (known: {', '.join(known)})")
    return raw


def parse_config(
    text: str,
    path: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Build a L{Config} from TOML text; C{overrides} are command-line values by table.

    C{environ} is where secret references look for C{$CREDENTIALS_DIRECTORY} and variables.
    """
    raw = _tables(text, path)
    overrides = overrides or {}
    references: dict[str, Any] = {}
    tables = {
        name: _table(path, name, raw.get(name, {}), overrides.get(name, {}), environ, references)
        for name in _TABLES
    }
    destinations = _destinations(
        path, raw.get("destinations", []), environ, references, tables["delivery"].concurrency
    )
    tracking = tables["tracking"]
    if tracking.consent_source and tracking.consent_cookie:
        raise ConfigError(
            path, "tracking.consent_cookie",
            f"is read only with consent_source = \"\"; with {tracking.consent_source!r} the "
            "consent banner's own cookie decides (remove one of the two)",
        )
    return Config(
        path=path, destinations=destinations, references=MappingProxyType(references), **tables
    )


def _named_destination(path: str, index: int, raw: Any) -> str:
    """The name one C{[[destinations]]} table gives its destination (by default its type)."""
    prefix = f"destinations[{index}]"
    kind = _destination_type(path, prefix, raw)
    if "name" not in raw:
        return kind
    return _checked(path, prefix, {"name": raw["name"]}, _DESTINATION_COMMON)["name"]


def parse_spool_settings(text: str, path: str) -> SpoolSettings:
    """The L{SpoolSettings} of a configuration's TOML text: its C{[spool]} table checked as
    L{parse_config} checks it, and the destinations' names; no other key is looked at."""
    raw = _tables(text, path)
    spool = _table(path, "spool", raw.get("spool", {}), {}, {}, {})
    names = tuple(
        _named_destination(path, i, item)
        for i, item in enumerate(_destination_tables(path, raw.get("destinations", [])))
    )
    return SpoolSettings(path=path, spool=spool, destination_names=names)


def read_config_file(path: str) -> str:
    """The text of the configuration file at C{path}."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "is not UTF-8 text") from None


def load_config(
    path: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Read and check the file at C{path}; C{environ} as for L{parse_config}."""
    return parse_config(read_config_file(path), path, overrides, environ)
