"""Where things live: every module of core/ is named in core/__init__.py and in the README's "What is
where", so that a newcomer finds it from the file names alone."""

from __future__ import annotations

import core
from tests.data_paths import ROOT


def test_every_core_module_is_listed() -> None:
    modules = sorted(path.stem for path in (ROOT / "core").glob("*.py") if path.stem != "__init__")
    readme = (ROOT / "README.md").read_text()
    what_is_where = readme[readme.index("## What is where"):readme.index("\n## ", readme.index("## What is where") + 1)]
    assert [name for name in modules if f"`{name}`" not in core.__doc__] == []
    assert [name for name in modules if f"`{name}`" not in what_is_where] == []
