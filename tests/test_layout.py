"""Where things live: every module of core/ is named in core/__init__.py and in the README's "What is
where", so that a newcomer finds it from the file names alone."""

from __future__ import annotations

import re

import core
from tests.data_paths import ROOT


def test_every_core_module_is_listed() -> None:
    modules = sorted(path.stem for path in (ROOT / "core").glob("*.py") if path.stem != "__init__")
    readme = (ROOT / "README.md").read_text()
    what_is_where = readme[readme.index("## What is where"):readme.index("\n## ", readme.index("## What is where") + 1)]
    assert [name for name in modules if f"`{name}`" not in core.__doc__] == []
    assert [name for name in modules if f"`{name}`" not in what_is_where] == []


def test_every_relative_link_of_the_docs_resolves() -> None:
    """README.md sends depth to docs/: a moved file must break the suite, not a reader's click."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250  # a newcomer's first page
