"""core/distributed.py under a real torchrun: what its process group leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.stages import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parents[1]

# Each rank joins the group, imports torch._dynamo (as loading a model or compiling does) and gathers
# once, then leaves; it prints the native threads still running. gloo's are named gloo_tcp_loop and
# pt_gloo_runloop.
RANK_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from core.distributed import distributed_run

with distributed_run("cpu"):
    import torch._dynamo  # noqa: F401
    gathered = [None, None]
    dist.all_gather_object(gathered, os.environ["RANK"])
tasks = f"/proc/{os.getpid()}/task"
names = [open(f"{tasks}/{task}/comm").read().strip() for task in os.listdir(tasks)]
print("threads after close:", ",".join(sorted(names)))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_closing_the_run_ends_gloos_threads(tmp_path: Path) -> None:
    """destroy_process_group() must free the group: if anything still holds it (torch.distributed.nn's
    default arguments did, when imported after the group was made), gloo's threads run on into
    interpreter shutdown, where they sometimes abort the process."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(ROOT)], capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("threads after close:")]
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert "gloo" not in line, line
