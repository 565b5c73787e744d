"""The README stays a short front door, and the links between it and docs/ hold."""

from __future__ import annotations

import re
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
