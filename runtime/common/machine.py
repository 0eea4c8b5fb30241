"""Facts about this machine that records, latency profiles and verification results carry (never the host
name or paths).

The CPU's model name is not enough: "AMD EPYC" has named both a part with AVX-512 and VNNI and one with
AVX2 only, whose int8 kernels and speed differ. ``isa_flags`` reads the instruction-set features that
change onnxruntime's kernels from ``/proc/cpuinfo`` (Linux, x86 and ARM). No CPU-identification library
is used: py-cpuinfo, the maintained one, starts subprocesses and takes about a second, too slow for a
check on every ``erde-run``; elsewhere than Linux the flags are "unknown", and a fingerprint still
matches only itself.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple


def cpu_model() -> str:
    """The CPU model (and the board, on ARM boards that name it), e.g. "AMD EPYC" or "Cortex-A72; Raspberry Pi 4"."""
    names = []
    text = _cpuinfo()
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


#: Features that select onnxruntime's (MLAS) kernels: x86 AVX2 / AVX-512 / VNNI / AMX; ARM dot product, i8mm, SVE.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                "amx_int8", "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def isa_flags(text: Optional[str] = None) -> Tuple[str, ...]:
    """The kernel-relevant instruction-set features of this CPU, sorted (("unknown",) where not readable)."""
    text = _cpuinfo() if text is None else text
    m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    if not m:
        return ("unknown",)
    have = set(m.group(1).split())
    return tuple(sorted(f for f in KERNEL_FLAGS if f in have))


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
    return (f"{cpu_model()} [{' '.join(isa_flags())}], {os.cpu_count()} cores, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


@dataclass(frozen=True)
class MachineKey:
    """The machine fingerprint: a profile or a verification holds only where all of it is the same."""

    cpu: str
    cores: int
    threads: int
    onnxruntime: str
    flags: Tuple[str, ...] = ("unknown",)  # isa_flags(): the features that select the kernels
    arch: str = "unknown"  # platform.machine(): x86_64, aarch64 (an emulator shows the host's /proc/cpuinfo)

    @classmethod
    def here(cls, threads: Optional[int]) -> "MachineKey":
        import onnxruntime

        return cls(cpu_model(), usable_cores(), effective_threads(threads),
                   onnxruntime.__version__, isa_flags(), platform.machine() or "unknown")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.cpu} ({self.arch}) [{' '.join(self.flags)}], {self.cores} cores, {self.threads} "
                f"thread{'s' * (self.threads != 1)}, onnxruntime {self.onnxruntime}")
