"""erde-bench's cold start: process start to the first result of erde-run, and that process's peak RSS."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from erde.runtime.common.errors import ErdeError


# ----------------------------------------------------------------------------------------------------------
# Cold start and memory


def _rss_mb(maxrss: float) -> float:
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, KiB else


def peak_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:
        return None
    return _rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def erde_run_command() -> List[str]:
    script = Path(sys.executable).parent / ("erde-run.exe" if os.name == "nt" else "erde-run")
    return [str(script)] if script.exists() else [sys.executable, "-m", "erde.runtime.tools.run_cli"]


@dataclass(frozen=True)
class ColdStart:
    command: str
    times_ms: Tuple[float, ...]
    peak_rss_mb: Optional[float]  # the largest of the runs

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))


# Runs in a small launcher process: a child's peak RSS (ru_maxrss) starts at the RSS of the process that forked
# it, so erde-run is started from this small process, not from the benchmark (which holds models, maybe torch).
_LAUNCHER = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
first = p.stdout.readline()
ms = (time.perf_counter() - t0) * 1000.0
p.stdout.read()
err = p.stderr.read()
rss = None
if hasattr(os, "wait4"):
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
    rss = usage.ru_maxrss
else:
    p.wait()
print(json.dumps({"ms": ms, "first": first, "rc": p.returncode, "maxrss": rss, "err": err[-4000:]}))
"""


def cold_start(model_dir: Path, image: Path, threads: Optional[int], runs: int, timeout_s: float = 300.0) -> ColdStart:
    """Process start to the first result line of ``erde-run --json``, in fresh processes."""
    cmd = erde_run_command() + ["--model", str(model_dir), "--image", str(image), "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    times, rss = [], []
    for _ in range(runs):
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _LAUNCHER] + cmd, capture_output=True, text=True,
                                  timeout=timeout_s)
            res = json.loads(proc.stdout)
        except subprocess.TimeoutExpired:
            raise ErdeError(f"erde-run took more than {timeout_s:g} s in the cold-start run: {shlex.join(cmd)}") from None
        except ValueError:
            raise ErdeError(f"the cold-start launcher failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}") from None
        try:
            ok = res["rc"] == 0 and "exit_index" in json.loads(res["first"])
        except ValueError:
            ok = False
        if not ok:
            why = (res["err"].strip().splitlines() or [f"exit code {res['rc']}"])[-1]
            raise ErdeError(f"erde-run failed in the cold-start run ({why}): {shlex.join(cmd)}")
        times.append(float(res["ms"]))
        if res["maxrss"] is not None:
            rss.append(_rss_mb(res["maxrss"]))
    shown = ["erde-run"] + cmd[1:] if Path(cmd[0]).name.startswith("erde-run") else cmd  # no venv path in records
    return ColdStart(shlex.join(shown), tuple(times), max(rss) if rss else None)


