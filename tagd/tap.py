"""twistd integration: command-line options and the service tree.

C{twistd -n tagd --config PATH} and C{twistd -ny tagd.tac} both end in L{makeService}.
"""

from __future__ import annotations

import os

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from tagd.clientip import ClientIPResolver
from tagd.config import Config, ConfigError, load_config, parse_config
from tagd.origin import OriginClient
from tagd.proxy import ProxyResource
from tagd.site import TagdSite
from tagd.delivery import DirectDelivery, Route, http_client
from tagd.metrics import Metrics
from tagd.tracker import Tracker
from tagd.tracking import TrackingHook, not_configured

DEFAULT_CONFIG = "tagd.toml"

log = Logger()


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


class _PlatformPoolService(Service):
    """Closes the connections to the ad platforms when tagd stops."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self):
        super().stopService()
        return self._pool.closeCachedConnections()


def _tracking_hook(config: Config, reactor, metrics: Metrics, top: MultiService) -> TrackingHook:
    """The tracker when destinations are configured; without any, the header is only removed."""
    if not config.destinations:
        log.info("no [[destinations]] configured: tracking headers are removed, no events sent")
        return not_configured
    http, pool = http_client(reactor)
    _PlatformPoolService(pool).setServiceParent(top)
    delivery = DirectDelivery(
        reactor=reactor,
        routes=[Route(d.destination, d.timeout) for d in config.destinations],
        http=http,
        metrics=metrics,
    )
    return Tracker(config=config.tracking, submit=delivery.submit, metrics=metrics)


def build_service(config: Config, reactor, metrics: Metrics | None = None) -> MultiService:
    """The service tree for C{config}: the visitor listener, the origin connections, tagging."""
    proxy = config.proxy
    metrics = metrics if metrics is not None else Metrics()
    top = MultiService()
    client = OriginClient(
        reactor,
        proxy.origin,
        connect_timeout=proxy.connect_timeout,
        pool_size=proxy.pool_size,
        idle_timeout=proxy.pool_idle_timeout,
    )
    resource = ProxyResource(
        reactor=reactor,
        client=client,
        resolver=ClientIPResolver(proxy.trusted_proxies),
        client_ip_header=proxy.client_ip_header,
        tracking_header=proxy.tracking_header,
        response_timeout=proxy.response_timeout,
        on_tracking=_tracking_hook(config, reactor, metrics, top),
    )
    _OriginService(client).setServiceParent(top)
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
