"""core/distributed.py under a real torchrun: what its process group leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.stages import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parents[1]

# Each rank joins the group, imports torch._dynamo (as loading a model or compiling does) and gathers
# once, then leaves; it writes the native threads running inside the run and after it to a file of its
# own (the ranks' prints can interleave within a line). gloo's are named gloo_tcp_loop and pt_gloo_runloop.
RANK_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from core.distributed import distributed_run

def thread_names() -> str:
    tasks, names = f"/proc/{os.getpid()}/task", []
    for task in os.listdir(tasks):
        try:
            names.append(open(f"{tasks}/{task}/comm").read().strip())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return ",".join(sorted(names))

with distributed_run("cpu"):
    import torch._dynamo  # noqa: F401
    gathered = [None, None]
    dist.all_gather_object(gathered, os.environ["RANK"])
    during = thread_names()
after = thread_names()
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.txt"), "w") as report:
    report.write(f"{during}\\n{after}\\n")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_closing_the_run_ends_gloos_threads(tmp_path: Path) -> None:
    """destroy_process_group() must free the group: if anything still holds it (torch.distributed.nn's
    default arguments did, when imported after the group was made), gloo's threads run on into
    interpreter shutdown, where they sometimes abort the process."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(ROOT), str(tmp_path)], capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        during, after = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert "gloo" in during, during  # the names this test looks for are gloo's
        assert "gloo" not in after, after
