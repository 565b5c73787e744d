"""The shop and Meta of the deployment tests, run inside the container they deploy to.

The container has a network of its own (only a loopback), so the servers tagd talks to run
inside it, each as a transient systemd unit (C{systemd-run}) with the container's
C{/opt/tagd} Python:

    droplet_servers.py shop PORT                          the shop (L{helpers.TrackedOrigin})
    droplet_servers.py meta PORT FOLDER PIXEL              Meta's fake, over HTTPS

Meta's fake (tests/fakes.py's, checking the payloads as Meta documents them) serves TLS with
C{FOLDER/cert.pem} and C{FOLDER/key.pem} and takes the token in C{FOLDER/token} (not
on a command line, which systemd would log), and the certificate's authority the container trusts as a
droplet trusts Meta's.  The test, outside, steers it and reads it through files in
C{FOLDER}: while C{failing} holds an HTTP status every request gets it, and C{state.json}
holds the event ids of every request received, those delivered, and the violations found.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
from pathlib import Path

from helpers import ThreadedPlatform, TrackedOrigin


def serve_shop(port: int) -> None:
    shop = TrackedOrigin(port)
    print(f"shop on {shop.url}", flush=True)
    while True:
        time.sleep(3600)


def serve_meta(port: int, folder: Path, pixel_id: str) -> None:
    from fakes import FakeMeta

    meta = ThreadedPlatform("meta", FakeMeta(pixel_id=pixel_id, access_token=(folder / "token").read_text()), port)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    meta.up(tls)
    print(f"Meta on https://localhost:{port}", flush=True)
    failing, state = folder / "failing", folder / "state.json"
    while True:
        meta.failing = int(failing.read_text()) if failing.exists() else None
        with meta.lock:
            current = {"received": meta.received, "delivered": meta.delivered, "violations": meta.violations}
            text = json.dumps(current)
        written = folder / "state.json.new"
        written.write_text(text)
        os.replace(written, state)
        time.sleep(0.05)


if __name__ == "__main__":
    kind, port, *rest = sys.argv[1:]
    if kind == "shop":
        serve_shop(int(port))
    else:
        [folder, pixel_id] = rest
        serve_meta(int(port), Path(folder), pixel_id)
