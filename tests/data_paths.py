"""Where the tests find their data: public files in the repository (tests/data/, and the quickstart's
corpus in data/), and the research-use Story Cloze files, which only `../shared` beside the checkout has."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"  # sources, licenses and sha256 sums in its README.md
HELLASWAG = TEST_DATA / "hellaswag" / "hellaswag_val_1000.jsonl"
FINEWEB_DOCS = TEST_DATA / "text" / "fineweb_edu_150docs.jsonl"
HF_TINY_GPT2 = TEST_DATA / "hf_tiny_gpt2"
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
STORY_CLOZE = ROOT.parent / "shared" / "data" / "storycloze"
