"""One line that says what a benchmark ran on, printed by every script in bench/."""

from __future__ import annotations

import os
import platform

import torch

from core.devices import cpu_name


def describe_hardware() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    malloc = [f"{name}={os.environ[name]}" for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
              if name in os.environ]  # glibc's reuse of freed memory (quickstart.sh sets it): steps run faster
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{device}, Python {platform.python_version()}" + (f", {' '.join(malloc)}" if malloc else ""))
