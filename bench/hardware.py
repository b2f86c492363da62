"""One line that says what a benchmark ran on, printed by every script in bench/."""

from __future__ import annotations

import os
import platform

import torch


def describe_hardware() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{device}, Python {platform.python_version()}")
