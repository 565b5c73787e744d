"""The installed package as a user meets it: twistd's plugin, the wheel, the daemon and the tac.

Every test runs real processes; the daemon tests use real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import (
    ADMIN_TOML,
    REPO_ROOT,
    TWISTD,
    copy_checkout,
    free_port,
    read_log,
    running,
    tagd_up,
    wait_for_http,
    wait_until,
)
from tagd.daemon.tap import CONFIG_ERROR_EXIT

# How long a daemon may take to exit after SIGTERM.
STOP_TIMEOUT = 5.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process, without a TAGD_CONFIG inherited from ours."""
    env = {k: v for k, v in os.environ.items() if k != "TAGD_CONFIG"}
    env.update(extra)
    return env


def test_twistd_help_lists_tagd(tmp_path):
    """C{twistd --help}, run away from the checkout, lists the installed tagd plugin."""
    result = subprocess.run(
        [TWISTD, "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+tagd\s+\S", result.stdout, re.MULTILINE), result.stdout


def test_plugin_scan_imports_nothing_of_tagd(tmp_path):
    """Scanning twistd's plugins finds tagd without importing any tagd module."""
    script = (
        "import sys\n"
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
        "print('tagd' in names, sorted(m for m in sys.modules if m.split('.')[0] == 'tagd'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "True []"


def test_wheel_contains_plugin_and_no_twisted_package(tmp_path):
    """The built wheel ships the plugin file and nothing else under twisted/, and the
    dashboard's page.

    An C{__init__.py} under twisted/ would shadow Twisted itself, so neither
    twisted/__init__.py nor twisted/plugins/__init__.py may be in it.  The wheel is built
    from a clean copy of the checkout so that build leftovers cannot leak into it and
    the checkout is not written to.
    """
    source = tmp_path / "source"
    copy_checkout(source)
    dist = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = dist.glob("tagd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/tagd_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert {n for n in names if n.startswith("twisted/")} == {"twisted/plugins/tagd_plugin.py"}
    assert "tagd/__init__.py" in names
    assert "tagd/admin/dashboard.html" in names  # the admin listener's page, read at start-up


@pytest.mark.parametrize(
    "text, key",
    [
        pytest.param("[proxy]\nlisen = 1\n", "proxy.lisen", id="unknown-key"),
        pytest.param("[proxy]\nlisten = 8080\n", "proxy.listen", id="wrong-type"),
        pytest.param('[proxy]\norigin = "gopher://shop"\n', "proxy.origin", id="bad-url"),
        pytest.param('[proxy]\nlisten = "nonsense:1"\n', "proxy.listen", id="bad-endpoint"),
        pytest.param("[proxy\n", "(file)", id="bad-toml"),
        pytest.param(
            '[proxy]\nlisten = "tcp:70000"\n',
            "proxy.listen",
            id="port-out-of-range",
        ),
        pytest.param(
            '[proxy]\norigin = "http://bücher.example"\n',
            "proxy.origin",
            id="non-ascii-origin",
        ),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path, text, key):
    """C{twistd -n tagd --config BAD.toml} exits non-zero with one line naming file and key."""
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    assert_stops_with_one_line(path, key, cwd=tmp_path)


def test_missing_named_config_stops_with_one_line(tmp_path):
    """A --config file that does not exist stops start-up with one line naming it."""
    assert_stops_with_one_line(tmp_path / "absent.toml", "(file)", cwd=tmp_path)


def assert_stops_with_one_line(path: Path, key: str, *, cwd: Path) -> None:
    """C{twistd -n tagd --config path} fails with one line naming C{path} and C{key}."""
    result = subprocess.run(
        [TWISTD, "-n", "tagd", "--config", str(path)],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert result.returncode == CONFIG_ERROR_EXIT, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert str(path) in lines[0]
    assert f": {key}: " in lines[0]


PAGE = b"<!doctype html><title>origin page</title><p>" + b"served through tagd " * 200 + b"</p>\n"


@pytest.fixture
def file_origin(tmp_path):
    """A real HTTP origin on 127.0.0.1 serving C{/page.html}; yields its URL."""
    root = tmp_path / "origin"
    root.mkdir()
    (root / "page.html").write_bytes(PAGE)
    port = free_port()
    log = tmp_path / "origin.log"
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    with running(args, cwd=root, log=log) as process:
        status, _, body = wait_for_http(port, "/page.html", process=process, log=log)
        assert (status, body) == (200, PAGE)
        yield f"http://127.0.0.1:{port}"


def assert_serves_and_stops(args: list[str], *, cwd: Path, env: dict[str, str], port: int) -> None:
    """Run the daemon C{args}; it proxies /page.html on C{port}, then shuts down on SIGTERM."""
    log = cwd / "tagd.log"
    with running(args, cwd=cwd, env=env, log=log) as process:
        status, headers, body = wait_for_http(port, "/page.html", process=process, log=log)
        assert status == 200, read_log(log)
        assert body == PAGE
        assert headers.get("Content-Type") == "text/html"
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tagd did not stop within {STOP_TIMEOUT}s of SIGTERM:\n{read_log(log)}")
        # twistd stops the services, then ends itself with the signal that stopped it, so
        # that a supervisor sees why it exited: -SIGTERM is its clean exit, as is 0.
        assert returncode in (0, -signal.SIGTERM), read_log(log)
    output = read_log(log)
    assert "Server Shut Down." in output
    assert "Traceback" not in output


def test_twistd_plugin_serves(tmp_path, file_origin):
    """C{twistd -n --pidfile= tagd} with --listen and --origin proxies a real origin and stops on SIGTERM.

    The file names another port and a dead origin, so a 200 here also proves that the
    command-line options override the file.
    """
    port = free_port()
    config = tmp_path / "good.toml"
    config.write_text(
        '[proxy]\nlisten = "tcp:1:interface=127.0.0.1"\norigin = "http://127.0.0.1:9"\n'
        'trusted_proxies = ["127.0.0.0/8"]\nresponse_timeout = 10\n' + ADMIN_TOML
    )
    args = [
        TWISTD, "-n", "--pidfile=", "tagd",
        "--config", str(config),
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--origin", file_origin,
    ]
    assert_serves_and_stops(args, cwd=tmp_path, env=clean_env(), port=port)


def test_tac_serves(tmp_path, file_origin):
    """C{twistd -n --pidfile= -y tagd.tac} takes its configuration from TAGD_CONFIG and proxies the origin."""
    port = free_port()
    config = tmp_path / "tac.toml"
    config.write_text(
        f'[proxy]\nlisten = "tcp:{port}:interface=127.0.0.1"\norigin = "{file_origin}"\n' + ADMIN_TOML
    )
    args = [TWISTD, "-n", "--pidfile=", "-y", str(REPO_ROOT / "tagd.tac")]
    assert_serves_and_stops(args, cwd=tmp_path, env=clean_env(TAGD_CONFIG=str(config)), port=port)


def readme_run_command() -> list[str]:
    """The README's command that runs tagd, with the installed twistd in the place of
    C{.venv/bin/twistd}."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    [line] = [line for line in readme.splitlines() if line.strip().startswith(".venv/bin/twistd ")]
    twistd, *args = shlex.split(line.split("#")[0])
    return [TWISTD, *args]


def test_the_readme_s_command_runs_twice_from_one_folder(tmp_path):
    """The README's C{twistd} command leaves no C{twistd.pid} behind, so it runs again from
    the same folder, after a kill (which leaves any pidfile) and beside a run still going
    (twistd would otherwise refuse: "Another twistd server is running")."""
    command = readme_run_command()
    assert command[command.index("--config") + 1] == "tagd.toml"
    (tmp_path / "tagd.toml").write_text(
        '[proxy]\nlisten = "tcp:0:interface=127.0.0.1"\norigin = "http://127.0.0.1:9"\n' + ADMIN_TOML,
        encoding="utf-8",
    )
    env = clean_env()
    with running(command, cwd=tmp_path, env=env, log=tmp_path / "first.log") as first:
        wait_until(lambda: tagd_up(first, tmp_path / "first.log"), 20, "up")
        first.send_signal(signal.SIGKILL)
        first.wait(STOP_TIMEOUT)
    with running(command, cwd=tmp_path, env=env, log=tmp_path / "second.log") as second:
        wait_until(lambda: tagd_up(second, tmp_path / "second.log"), 20, "up")
        with running(command, cwd=tmp_path, env=env, log=tmp_path / "third.log") as third:
            wait_until(lambda: tagd_up(third, tmp_path / "third.log"), 20, "up")
    assert sorted(p.name for p in tmp_path.iterdir() if "pid" in p.name) == []
