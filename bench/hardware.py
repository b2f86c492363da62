"""One line that says what a benchmark ran on, printed by every script in bench/."""

from __future__ import annotations

import os
import platform

import torch

from core.cpu_speedups import caller_malloc_settings
from core.devices import cpu_name


def describe_hardware() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    malloc = [f"{name}={value}" for name, value in caller_malloc_settings().items()]  # they change step times
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{device}, Python {platform.python_version()}" + (f", {' '.join(malloc)}" if malloc else ""))
