"""The README stays a short front door, and the links between it and docs/ hold."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door():
    """What a newcomer reads first stays short: the reference lives in docs/."""
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 200


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_names_a_file_that_exists(page):
    """A page moved or renamed leaves no link pointing at nothing."""
    text = page.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (page.parent / t).exists()]
    assert missing == []


def test_every_doc_is_on_the_readmes_map():
    """Each file in docs/ is named in the README's table of documents."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []


def test_every_module_is_in_the_architecture_map():
    """docs/architecture.md's tables name every module of tagd's packages, each under its
    package, so that the map a newcomer reads is the layout they will find."""
    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = ("proxy", "tagging", "delivery", "admin", "daemon")
    modules = [
        path.relative_to(REPO_ROOT / "tagd").as_posix()
        for package in packages
        for path in sorted((REPO_ROOT / "tagd" / package).glob("*.py"))
        if path.name != "__init__.py"
    ]
    assert len(modules) > 30
    assert [module for module in modules if f"| `{module}` |" not in text] == []
    flat = sorted(p.name for p in (REPO_ROOT / "tagd").glob("*.py") if p.name != "__init__.py")
    assert flat == ["ratelimit.py"]  # the one module every package uses


def twistd_commands(page: Path) -> list[str]:
    """The twistd commands a page tells its reader to run: indented lines, or a unit's
    C{ExecStart=}, that start twistd (after any variables set for it), comments cut off."""
    found = []
    for line in page.read_text(encoding="utf-8").splitlines():
        command = line.removeprefix("ExecStart=")  # the unit's
        words = command.split("#")[0].split()
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]  # TAGD_CONFIG=... before the command
        if words and Path(words[0]).name == "twistd" and command.startswith(("    ", "/")):
            found.append(" ".join(words))
    return found


def test_every_twistd_command_leaves_no_pidfile():
    """Each twistd command of the README and docs/ (and the unit's) runs in the foreground
    with --pidfile= (empty): twistd would otherwise write twistd.pid where it runs, and the
    next run from there, after a kill, would refuse to start."""
    pages = [*PAGES, REPO_ROOT / "contrib" / "systemd" / "tagd.service"]
    commands = [command for page in pages for command in twistd_commands(page)]
    assert len(commands) >= 6, commands  # the README's, operating.md's four, the unit's
    assert [c for c in commands if "--pidfile=" not in c.split() or not {"-n", "--nodaemon"} & set(c.split())] == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (.ci/run installs it)")
def test_make_test_takes_paths_from_the_checkout():
    """C{make test PYTEST_ARGS=tests/...}, as the README has it: the recipe runs pytest from
    the checkout, which finds the test by that path."""
    venv = Path(sys.executable).parent.parent
    target = "tests/test_docs.py::test_the_readme_is_a_front_door"
    # Not the settings of a make this test may run under (make test itself).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "test", f"VENV={venv}", f"PYTEST_ARGS={target}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    recipe = planned.stdout.splitlines()[-1]
    assert recipe.endswith(f"-m pytest {target}") and not recipe.startswith("cd "), recipe
    result = subprocess.run(recipe, shell=True, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
