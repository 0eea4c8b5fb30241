"""Facts about this machine that records and latency profiles carry (never the host name or paths)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Optional


def cpu_model() -> str:
    """The CPU model (and the board, on ARM boards that name it), e.g. "AMD EPYC" or "Cortex-A72; Raspberry Pi 4"."""
    names = []
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            names.append(m.group(1).strip())
            break
    try:
        board = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
        if board and board not in names:
            names.append(board)
    except OSError:
        pass
    if not names:
        names.append(platform.processor() or platform.machine() or "unknown")
    return "; ".join(names)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def effective_threads(threads: Optional[int]) -> int:
    """The intra-op threads a session gets: ``threads``, or one per usable core (onnxruntime's default here)."""
    return int(threads) if threads else usable_cores()


def describe() -> str:
    """One line for reports: CPU, cores, OS and Python."""
    return (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
