"""twistd integration: command-line options and the service tree.

C{twistd -n tagd --config PATH} and C{twistd -ny tagd.tac} both end in L{makeService}.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from tagd import __version__
from tagd.admin.listener import Health, build_admin
from tagd.proxy.clientip import ClientIPResolver
from tagd.daemon.collection import tune_collector
from tagd.daemon.config import (
    Config,
    ConfigError,
    SpoolSettings,
    parse_config,
    parse_spool_settings,
    read_config_file,
)
from tagd.admin.feed import Feed
from tagd.proxy.origin import OriginClient
from tagd.proxy.resource import ProxyResource
from tagd.proxy.site import TagdSite
from tagd.daemon.startup import CONFIG_ERROR_EXIT, START_FAILED_EXIT, ExitOnFailedStart, describe, exit_before_logging
from tagd.daemon.lifecycle import Draining, OrderedServices, visitor_budget
from tagd.admin.metrics import Metrics
from tagd.delivery.service import build_tagging
from tagd.daemon.reload import ReloadOnHangup, Reloader
from tagd.daemon.systemd import SystemdNotifier

DEFAULT_CONFIG = "tagd.toml"
# The path of the configuration tagd runs on when no file is named and there is no ./tagd.toml.
BUILT_IN = "(built-in defaults)"

log = Logger()


class Options(usage.Options):
    """C{twistd tagd} options; C{--listen} and C{--origin} override the file."""

    optParameters = [
        ["config", "c", None, "TOML configuration file [default: $TAGD_CONFIG or ./tagd.toml]"],
        ["listen", "l", None, "Twisted endpoint to serve visitors on, e.g. tcp:8080"],
        ["origin", "o", None, "URL of the shop's web app, e.g. http://127.0.0.1:8000"],
    ]


def _named(options, environ) -> str | None:
    """The file the options or the environment name, if any."""
    return options.get("config") or environ.get("TAGD_CONFIG")


def _overrides(options) -> dict[str, dict]:
    """The command-line values that replace the file's, by table."""
    return {"proxy": {k: options[k] for k in ("listen", "origin") if options.get(k) is not None}}


def _source(path: str, *, required: bool) -> tuple[str, str]:
    """The text and path of the file at C{path}; when it is not C{required} and does not
    exist, those of the built-in defaults."""
    if not required and not os.path.exists(path):
        return "", BUILT_IN
    return read_config_file(path), path


def _read(path: str, overrides: dict[str, dict], *, required: bool) -> Config:
    """The configuration at C{path} (see L{_source})."""
    return parse_config(*_source(path, required=required), overrides)


def config_from_options(options, environ=os.environ) -> Config:
    """Load the configuration file named by the options or the environment.

    A missing file is an error only when it was named; with no name and no
    C{./tagd.toml}, tagd runs on its defaults.
    """
    named = _named(options, environ)
    return _read(named or DEFAULT_CONFIG, _overrides(options), required=named is not None)


def spool_settings_from_options(options, environ=os.environ) -> SpoolSettings:
    """The spool and destination names of the file L{config_from_options} would load, read
    without its secrets (see L{SpoolSettings})."""
    named = _named(options, environ)
    return parse_spool_settings(*_source(named or DEFAULT_CONFIG, required=named is not None))


def config_loader(options, environ=os.environ) -> Callable[[], Config]:
    """How the daemon reads its configuration, at start-up and at every reload.

    The file is found once, here, as L{config_from_options} finds it, and its path made
    absolute: a reload reads the very file start-up read, whatever the working directory
    is by then.  Once a file was found, its absence is an error like any other, so that a
    C{./tagd.toml} an editor renames while saving fails that reload instead of bringing
    back the defaults, which would remove every destination.  A tagd that started on its
    defaults looks for the same C{./tagd.toml} at each reload.
    """
    named = _named(options, environ)
    path = os.path.abspath(named or DEFAULT_CONFIG)
    return partial(_read, path, _overrides(options), required=named is not None or os.path.exists(path))


class _OriginService(Service):
    """Runs the origin client's idle sweep, and closes its connections when tagd stops."""

    def __init__(self, client: OriginClient) -> None:
        self._client = client

    def startService(self) -> None:
        super().startService()
        self._client.start()

    def stopService(self):
        super().stopService()
        return self._client.close()


def build_service(
    config: Config, reactor, metrics: Metrics | None = None, load: Callable[[], Config] | None = None
) -> MultiService:
    """The service tree for C{config}, in start-up order (shutdown runs it backwards):
    the admin listener, delivery, origin connections, draining of visitors in flight, the
    visitor listener, and with C{load} (which reads the configuration again) the reload on
    SIGHUP, which stops first so that no reload runs into the shutdown.

    The admin listener starts first and stops last: through the whole shutdown, while
    visitors drain and the spool flushes, C{/healthz} answers 503 instead of refusing
    connections (which a monitor cannot tell from a crash), and C{/metrics} stays readable.
    The notifier comes after the listener so that systemd hears C{READY=1} only once the
    port is bound, and C{STOPPING=1} before anything else stops.
    """
    proxy = config.proxy
    metrics = metrics if metrics is not None else Metrics()
    top = OrderedServices(reactor, deadline=proxy.shutdown_timeout)
    feed = Feed(reactor.seconds, [d.name for d in config.destinations])
    hook, delivery = build_tagging(config, reactor, metrics, feed)
    client = OriginClient(
        reactor,
        proxy.origin,
        connect_timeout=proxy.connect_timeout,
        pool_size=proxy.pool_size,
        idle_timeout=proxy.pool_idle_timeout,
        stall_timeout=proxy.response_timeout,
    )
    resource = ProxyResource(
        reactor=reactor,
        client=client,
        resolver=ClientIPResolver(proxy.trusted_proxies),
        client_ip_header=proxy.client_ip_header,
        tracking_header=proxy.tracking_header,
        response_timeout=proxy.response_timeout,
        on_tracking=hook,
        allow_underscores=proxy.allow_underscores_in_headers,
    )
    site = TagdSite(resource, proxy, metrics, reactor=reactor)
    listener = strports.service(proxy.listen, site, reactor=reactor)
    health = Health(
        serving=lambda: listener.running,
        spool=delivery.spool if delivery is not None else None,
        spool_wanted=bool(config.destinations),
    )
    build_admin(config.admin, reactor, metrics, proxy=resource, health=health, feed=feed).setServiceParent(top)
    if delivery is not None:
        delivery.setServiceParent(top)
    _OriginService(client).setServiceParent(top)
    Draining(
        reactor, lambda: resource.in_flight, budget=visitor_budget(proxy.shutdown_timeout)
    ).setServiceParent(top)
    listener.setServiceParent(top)
    if load is not None:
        reloader = Reloader(config=config, load=load, proxy=resource, delivery=delivery, metrics=metrics)
        ReloadOnHangup(reactor, reloader).setServiceParent(top)
    SystemdNotifier(reactor).setServiceParent(top)
    return top


def start_up_line(config: Config) -> str:
    """What start-up logs first, so that the journal says what this tagd runs with: the
    file, the destinations (name and type, never a secret), the spool and the listeners."""
    destinations = ", ".join(f"{d.name} ({d.type})" for d in config.destinations) or "none"
    spool = os.path.abspath(config.spool.path) if config.destinations else "none (no destinations)"
    return (
        f"tagd {__version__} starting: configuration {config.path}; destinations {destinations}; spool {spool};"
        f" visitors on {config.proxy.listen}, admin on {config.admin.listen}"
    )


def makeService(options, reactor=None) -> MultiService:
    """twistd's entry point: a configuration error ends start-up with one line, in the
    log's form, and the exit status L{CONFIG_ERROR_EXIT}; a tree that then fails to start
    (a port taken) ends it with one line too (L{ExitOnFailedStart})."""
    if reactor is None:
        from twisted.internet import reactor
    load = config_loader(options)
    try:
        config = load()
    except ConfigError as e:
        exit_before_logging(options, str(e), CONFIG_ERROR_EXIT)
    log.info("{line}", line=start_up_line(config))
    try:
        service = build_service(config, reactor, load=load)
    except Exception as e:
        exit_before_logging(options, f"tagd cannot start: {describe(e)}", START_FAILED_EXIT)
    tune_collector(reactor)
    return ExitOnFailedStart(service)
