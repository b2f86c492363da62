"""tests/data/: every shipped file is listed in its README with its sha256, and matches it."""

from __future__ import annotations

import hashlib
import re

from tests.data_paths import FINEWEB_DOCS, HELLASWAG, HF_TINY_GPT2, SHAKESPEARE, TEST_DATA


def test_shipped_test_data_matches_the_sums_in_its_readme() -> None:
    readme = (TEST_DATA / "README.md").read_text()
    listed = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.MULTILINE)}
    shipped = sorted(str(path.relative_to(TEST_DATA)) for path in TEST_DATA.rglob("*")
                     if path.is_file() and path.name != "README.md")
    assert sorted(listed) == shipped  # nothing unlisted, nothing missing
    for name in shipped:
        assert hashlib.sha256((TEST_DATA / name).read_bytes()).hexdigest() == listed[name], name
    for path in (HELLASWAG, FINEWEB_DOCS, HF_TINY_GPT2 / "model.safetensors", SHAKESPEARE):
        assert path.is_file(), path  # the paths the tests use
