"""Plot a training run from its LOG_DIR/metrics.jsonl: losses on the left, HellaSwag on the right.

    python plot.py log/                      # -> log/plot.png
    python plot.py log/tiny --out tiny.png

The left panel has train loss (faint, and smoothed) and val loss against steps; the right one has
HellaSwag acc_norm with two reference lines, measured by build-nanogpt's method (the one
hellaswag.py uses): OpenAI GPT-2 124M at 0.2955 and GPT-3 Small at 0.337. A run that scored CORE
(core_interval) gets a third panel, with OpenAI GPT-2 124M's 0.1139 and 1.5B's 0.2565 as references.
"""

from __future__ import annotations

from pathlib import Path

from core.cli import StageParser, check_output_file
from core.errors import exit_on_user_error
from core.plotting import plot_run
from core.runlog import METRICS_FILE


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("log_dir", type=Path, help="a training run's LOG_DIR (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: LOG_DIR/plot.png)")
    args = parser.parse_args(argv)
    if args.out:
        check_output_file(args.out, "--out", [args.log_dir / METRICS_FILE])
    print(f"wrote {plot_run(args.log_dir, args.out or args.log_dir / 'plot.png')}")


if __name__ == "__main__":
    exit_on_user_error(main)
