"""The demo as a newcomer runs it, C{tagd demo} or C{python -m tagd.demo}: a real process on
ports of the test's choosing, visited over loopback, stopped with Ctrl-C or SIGTERM."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BROWSER_UA, browser_get, free_port, read_log, running, wait_until

TAGD = str(Path(sys.executable).with_name("tagd"))
LAUNCHERS = {"tagd demo": [TAGD, "demo"], "python -m tagd.demo": [sys.executable, "-m", "tagd.demo"]}


def head(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """HEAD C{path} from 127.0.0.1:C{port}, as a browser would send it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("HEAD", path, headers={"User-Agent": BROWSER_UA})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_the_demo_on_ports_of_one_s_choice(tmp_path, launcher, stop):
    """The demo listens where --port, --shop-port and --admin-port say, prints the shop's,
    tagd's and the dashboard's URLs, answers HEAD with GET's head and no body (and no
    warning about one), and removes its temporary folder when stopped."""
    ports = {"--port": free_port(), "--shop-port": free_port(), "--admin-port": free_port()}
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    log = tmp_path / "demo.log"
    args = [*LAUNCHERS[launcher], *(str(item) for pair in ports.items() for item in pair)]
    env = {k: v for k, v in os.environ.items() if k != "TAGD_CONFIG"} | {"TMPDIR": str(temporary)}
    with running(args, cwd=tmp_path, env=env, log=log) as demo:
        wait_until(lambda: demo.poll() is not None or "dashboard on" in read_log(log), 20, "up")
        output = read_log(log)
        assert f"demo shop on http://127.0.0.1:{ports['--shop-port']}/" in output, output
        assert f"tagd in front of it on http://127.0.0.1:{ports['--port']}/" in output
        dashboard = re.search(r"dashboard on (http://\S+/)", output)[1]
        assert dashboard == f"http://127.0.0.1:{ports['--admin-port']}/"
        [folder] = temporary.iterdir()
        assert folder.name.startswith("tagd-demo-")

        status, headers, page = browser_get(ports["--port"], "/product/123")
        assert status == 200 and b"Espresso beans" in page
        assert "worker-tracking" not in {name.lower() for name, _ in headers}
        wait_until(lambda: '"ViewContent"' in read_log(log), 10, "logged by the dry run")
        for port in (ports["--port"], ports["--shop-port"]):
            status, heads, body = head(port, "/product/123")
            assert (status, body) == (200, b"")
            assert heads["Content-Length"] == str(len(page))
        for path in ("/", "/healthz", "/metrics", "/stats.json", "/nowhere"):
            got, gets, page = browser_get(ports["--admin-port"], path)
            status, heads, body = head(ports["--admin-port"], path)
            assert (status, body) == (got, b""), path
            assert heads["Content-Type"] == dict(gets)["Content-Type"], path
            if path in ("/metrics", "/stats.json"):  # their figures may move between the two
                assert int(heads["Content-Length"]) > 0, path
            elif path != "/nowhere":  # Twisted's 404 page is streamed, without a length
                assert heads["Content-Length"] == str(len(page)), path

        demo.send_signal(stop)
        assert demo.wait(10) == 0, read_log(log)
    output = read_log(log)
    assert "Traceback" not in output
    assert "HEAD" not in output.replace('"HEAD /product/123 HTTP/1.1"', ""), output
    assert list(temporary.iterdir()) == []


def test_the_demo_refuses_a_port_that_is_none(tmp_path):
    """A port that is no port number is argparse's usage error, naming the option."""
    result = subprocess.run(
        [TAGD, "demo", "--shop-port", "http"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--shop-port: must be a port number from 1 to 65535, not 'http'" in result.stderr
