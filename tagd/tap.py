"""twistd integration: command-line options and the service tree.

C{twistd -n tagd --config PATH} and C{twistd -ny tagd.tac} both end in L{makeService}.
"""

from __future__ import annotations

import os

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from tagd.clientip import ClientIPResolver
from tagd.config import Config, ConfigError, load_config, parse_config
from tagd.proxy import ProxyResource
from tagd.tracking import log_tracking_values

DEFAULT_CONFIG = "tagd.toml"


class Options(usage.Options):
    """C{twistd tagd} options; C{--listen} and C{--origin} override the file."""

    optParameters = [
        ["config", "c", None, "TOML configuration file [default: $TAGD_CONFIG or ./tagd.toml]"],
        ["listen", "l", None, "Twisted endpoint to serve visitors on, e.g. tcp:8080"],
        ["origin", "o", None, "URL of the shop's web app, e.g. http://127.0.0.1:8000"],
    ]


def config_from_options(options, environ=os.environ) -> Config:
    """Load the configuration file named by the options or the environment.

    A missing file is an error only when it was named; with no name and no
    C{./tagd.toml}, tagd runs on its defaults.
    """
    overrides = {
        "proxy": {k: options[k] for k in ("listen", "origin") if options.get(k) is not None}
    }
    path = options.get("config") or environ.get("TAGD_CONFIG")
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return parse_config("", "(built-in defaults)", overrides)
    return load_config(path or DEFAULT_CONFIG, overrides)


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory without a log line for every origin connection."""

    noisy = False


class _PoolService(Service):
    """Closes the origin connection pool when tagd stops, so no socket is left behind."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self):
        super().stopService()
        return self._pool.closeCachedConnections()


class TagdSite(Site):
    """The visitor-facing site; per-request access lines are left to the metrics."""

    displayTracebacks = False

    def log(self, request) -> None:
        pass


def build_service(config: Config, reactor) -> MultiService:
    """The service tree for C{config}: the visitor listener and the origin pool."""
    proxy = config.proxy
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = proxy.pool_size
    pool.cachedConnectionTimeout = proxy.pool_idle_timeout
    pool._factory = _QuietClientFactory
    agent = Agent(reactor, connectTimeout=proxy.connect_timeout, pool=pool)
    resource = ProxyResource(
        reactor=reactor,
        agent=agent,
        origin=proxy.origin,
        resolver=ClientIPResolver(proxy.trusted_proxies),
        client_ip_header=proxy.client_ip_header,
        tracking_header=proxy.tracking_header,
        response_timeout=proxy.response_timeout,
        on_tracking=log_tracking_values,
    )
    top = MultiService()
    _PoolService(pool).setServiceParent(top)
    strports.service(proxy.listen, TagdSite(resource), reactor=reactor).setServiceParent(top)
    return top


def makeService(options, reactor=None) -> MultiService:
    """twistd's entry point: a configuration error ends start-up with one line."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = config_from_options(options)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    return build_service(config, reactor)
