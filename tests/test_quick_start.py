"""The README's quick start run where a reader runs it, in the checkout: what tagd leaves
there (its configuration, the spool and SQLite's files beside it) is nothing git lists."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

from helpers import REPO_ROOT, TWISTD, browser_get, free_port, running, tagd_up, wait_until


def git(folder, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout


def quick_start_config(port: int, admin_port: int, unreachable: int) -> str:
    """The README's tagd.toml, on free ports, its Meta endpoint a closed loopback port so
    that nothing leaves the machine; the spool where the README's leaves it (the default)."""
    [block] = re.findall(r"```toml\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert 'listen = "tcp:8080"' in block and "[admin]" not in block and "[spool]" not in block, block
    block = block.replace('listen = "tcp:8080"', f'listen = "tcp:{port}:interface=127.0.0.1"')
    return block + f'endpoint = "http://127.0.0.1:{unreachable}"\n\n[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"\n'


def test_a_quick_start_in_the_checkout_leaves_nothing_for_git(tmp_path):
    """While tagd runs (its spool's WAL and shared memory beside the spool) and after it
    stops (the intake journal's lock is kept), C{git status} in a checkout with the
    project's .gitignore is clean."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(REPO_ROOT / ".gitignore", checkout / ".gitignore")
    git(checkout, "init", "-q")
    git(checkout, "add", ".gitignore")
    (checkout / "tagd.toml").write_text(quick_start_config(free_port(), free_port(), free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGD_")} | {"META_TOKEN": "quick-start-token"}
    log = tmp_path / "tagd.log"
    with running([TWISTD, "-n", "--pidfile=", "tagd", "--config", "tagd.toml"], cwd=checkout, env=env, log=log) as tagd:
        port, _ = wait_until(lambda: tagd_up(tagd, log), 20, "tagd up")
        assert browser_get(port, "/")[0] == 502  # no shop behind it, but tagd answers
        left = {p.name for p in checkout.iterdir()} - {".git", ".gitignore"}
        assert {"tagd.toml", "tagd-spool.sqlite3", "tagd-spool.sqlite3-wal"} <= left, left
        assert git(checkout, "status", "--porcelain", "--untracked-files=all") == "A  .gitignore\n"
    assert tagd.returncode == -signal.SIGTERM  # twistd ends as the signal it stopped for
    assert "tagd-spool.sqlite3.intake.lock" in {p.name for p in checkout.iterdir()}
    assert git(checkout, "status", "--porcelain", "--untracked-files=all") == "A  .gitignore\n"
