#!/usr/bin/env bash
# The whole job in one command, on the corpus that ships in data/ (tiny Shakespeare):
#   a virtual environment, torch (CUDA where an NVIDIA GPU is present, else the CPU build) and the
#   requirements, token shards, a small GPT trained with progress and ETA, samples, and a plot.
#     bash quickstart.sh
# Run again, it reuses what is there: the environment, the shards, the finished run.
# Settings from the environment:
#   PYTHON=python3.12         the interpreter that makes the virtual environment (default: python3)
#   QUICKSTART_PYTHON=PATH    use this interpreter as it is: no virtual environment, no installs
#   QUICKSTART_STEPS=N        train N steps instead of configs/quickstart.toml's
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0  # the version .ci/run tests
LOG_DIR=log/quickstart
DATA_DIR=data/shakespeare

say() { printf '\n== %s\n' "$*"; }

if [ -n "${QUICKSTART_PYTHON:-}" ]; then
  py=$QUICKSTART_PYTHON
else
  if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment .venv"
    "${PYTHON:-python3}" -m venv .venv
  fi
  py=.venv/bin/python
  if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      say "installing torch $TORCH_VERSION with CUDA (an NVIDIA GPU is present)"
      "$py" -m pip install --disable-pip-version-check "torch==$TORCH_VERSION"
    else
      # No GPU: the CPU build, from PyTorch's CPU index (PyPI's Linux wheel would bring multi-GB CUDA
      # libraries); the +cpu build wins over PyPI's where both are reachable.
      say "installing the CPU build of torch $TORCH_VERSION (no NVIDIA GPU found)"
      "$py" -m pip install --disable-pip-version-check --retries 1 --timeout 20 "torch==$TORCH_VERSION" \
        --extra-index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  say "installing the requirements"
  "$py" -m pip install --disable-pip-version-check --quiet -r requirements.txt
fi

say "tokenizing data/tinyshakespeare.txt into $DATA_DIR/"
"$py" fineweb.py --input data/tinyshakespeare.txt --txt-paragraphs --out "$DATA_DIR" --prefix shakespeare \
  --val-tokens 32768 --shard-size 100000 --shuffle-seed 1337 --shuffle-val

say "training configs/quickstart.toml (logs in $LOG_DIR/)"
"$py" train_gpt2.py --config configs/quickstart.toml ${QUICKSTART_STEPS:+--max-steps "$QUICKSTART_STEPS"}

checkpoint=$(ls -d "$LOG_DIR"/checkpoints/step_* | tail -n 1)
say "sampling from $checkpoint"
"$py" sample.py -m "$checkpoint" -n 2 --max-new-tokens 80 --top-k 50 "ROMEO:"

say "plotting"
"$py" plot.py "$LOG_DIR"
say "done: $LOG_DIR/plot.png, $LOG_DIR/metrics.jsonl, and the checkpoint $checkpoint"
