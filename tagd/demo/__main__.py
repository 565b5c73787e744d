"""C{python -m tagd.demo}: the example shop on port 8000 and tagd in front of it on 8080.

Open http://127.0.0.1:8080/ and watch the log: each page's tracking header is taken
out of the response and turned into an event, which the dry-run C{log} destination
prints instead of sending it to an ad platform.
"""

from __future__ import annotations

import json
import sys
import tempfile

from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

from tagd.config import parse_config
from tagd.demo.shop import shop_resource
from tagd.startup import describe
from tagd.tap import build_service

SHOP_PORT = 8000
PROXY_PORT = 8080


def main(reactor) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    reactor.listenTCP(SHOP_PORT, Site(shop_resource()), interface="127.0.0.1")
    # The demo's spool lives in a folder of its own, not in the checkout it is run from.
    spool = f"{tempfile.mkdtemp(prefix='tagd-demo-')}/spool.sqlite3"
    config = parse_config(
        f'[proxy]\nlisten = "tcp:{PROXY_PORT}:interface=127.0.0.1"\n'
        f'origin = "http://127.0.0.1:{SHOP_PORT}"\n'
        f"[spool]\npath = {json.dumps(spool)}\n"
        '[[destinations]]\ntype = "log"\n',
        "(demo)",
    )
    service = build_service(config, reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print(
        f"demo shop on http://127.0.0.1:{SHOP_PORT}/, tagd in front of it on "
        f"http://127.0.0.1:{PROXY_PORT}/ (Ctrl-C stops both)",
        flush=True,
    )
    reactor.run()


if __name__ == "__main__":
    from twisted.internet import reactor

    try:
        main(reactor)
    except Exception as e:  # before the reactor runs: a port taken, most often
        raise SystemExit(f"tagd demo cannot start: {describe(e)}") from None
