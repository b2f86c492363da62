#!/usr/bin/env bash
# The tests in one command: install what they need, lint, run them. CI runs exactly this (.ci/run).
#   bash test.sh            # in .venv when quickstart.sh made one, else with the current `python`
set -euo pipefail
cd "$(dirname "$0")"
py=python
[ -x .venv/bin/python ] && py=.venv/bin/python

# torch first, only when missing: quickstart.sh picked the right build already; on a bare machine this
# is the CPU build where a local wheel exists, as on CI (an unpinned torch would pull a CUDA build).
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$py" -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

"$py" -m ruff check .
"$py" -m pytest -q
