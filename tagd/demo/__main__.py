"""C{python -m tagd.demo}: the example shop, tagd in front of it and tagd's dashboard.

Open http://127.0.0.1:8080/ and watch the log: each page's tracking header is taken
out of the response and turned into an event, which the dry-run C{log} destination
prints instead of sending it to an ad platform; the dashboard (port 9100) shows each one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Sequence

from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

from tagd.daemon.config import parse_config
from tagd.demo.shop import shop_resource
from tagd.daemon.startup import describe
from tagd.daemon.tap import build_service

SHOP_PORT = 8000
PROXY_PORT = 8080
ADMIN_PORT = 9100
# What the demo is, as C{tagd --help} lists it.
SUMMARY = "an example shop with tagd in front of it, and tagd's dashboard"


def port(text: str) -> int:
    """argparse's type for a TCP port to listen on (not 0: the demo prints its URLs)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, the same for C{python -m tagd.demo} and C{tagd demo}: each of its
    three ports, so that it can run beside whatever holds the default ones."""
    for option, default, what in (
        ("--port", PROXY_PORT, "tagd's port, the one to open"),
        ("--shop-port", SHOP_PORT, "the example shop's port"),
        ("--admin-port", ADMIN_PORT, "the dashboard's port"),
    ):
        parser.add_argument(option, metavar="PORT", type=port, default=default, help=f"{what} [default: {default}]")


def demo_config(ports: argparse.Namespace, spool: str) -> str:
    """The demo's configuration: every listener on loopback, one dry-run destination."""
    return (
        f'[proxy]\nlisten = "tcp:{ports.port}:interface=127.0.0.1"\n'
        f'origin = "http://127.0.0.1:{ports.shop_port}"\n'
        f'[admin]\nlisten = "tcp:{ports.admin_port}:interface=127.0.0.1"\n'
        f"[spool]\npath = {json.dumps(spool)}\n"
        '[[destinations]]\ntype = "log"\n'
    )


def main(reactor, ports: argparse.Namespace) -> None:
    """Run the demo until Ctrl-C or SIGTERM (the reactor stops on either); its spool lives
    in a temporary folder, removed once the reactor has stopped and the spool is closed."""
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    with tempfile.TemporaryDirectory(prefix="tagd-demo-") as folder:
        try:
            reactor.listenTCP(ports.shop_port, Site(shop_resource()), interface="127.0.0.1")
            config = parse_config(demo_config(ports, f"{folder}/spool.sqlite3"), "(demo)")
            service = build_service(config, reactor)
            service.startService()
        except Exception as e:  # before the reactor runs: a port taken, most often
            raise SystemExit(f"tagd demo cannot start: {describe(e)}") from None
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        print(
            f"demo shop on http://127.0.0.1:{ports.shop_port}/, tagd in front of it on "
            f"http://127.0.0.1:{ports.port}/ (open this one)\n"
            f"tagd's dashboard on http://127.0.0.1:{ports.admin_port}/ (Ctrl-C stops all three)",
            flush=True,
        )
        reactor.run()


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of C{python -m tagd.demo}."""
    parser = argparse.ArgumentParser(
        prog="python -m tagd.demo", description=SUMMARY[0].upper() + SUMMARY[1:] + "."
    )
    add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    from twisted.internet import reactor

    main(reactor, arguments())
