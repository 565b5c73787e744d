"""Helpers shared by the tests that drive real processes and sockets."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The checkout: the folder that holds setup.cfg, tagd.tac and this tests folder.
REPO_ROOT = Path(__file__).resolve().parent.parent

# The twistd script installed next to the interpreter running the tests.
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET C{path} from 127.0.0.1:C{port}, bypassing any proxy set in the environment."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def wait_for_http(
    port: int,
    path: str = "/",
    *,
    timeout: float = 20.0,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Poll until 127.0.0.1:C{port} answers C{path}; return the first answer.

    Fails early, with the process's output, when C{process} exits before answering.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"process exited with {process.returncode} before answering:\n{read_log(log)}"
            )
        try:
            return http_get(port, path)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nothing answered on port {port} within {timeout}s:\n{read_log(log)}"
                ) from None
            time.sleep(0.1)


def read_log(log: Path | None) -> str:
    """The text a process wrote to C{log}, or an empty string."""
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")


@contextmanager
def running(args: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run C{args} with its output in C{log}; make sure it is gone when the block ends."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """End C{process}: SIGTERM, then SIGKILL if it does not exit within C{timeout} seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
