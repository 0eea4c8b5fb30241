"""Parity check through the runtime the folder ships to (optimum's validation step).

The written model folder is loaded with ``Engine.load``, exactly as a board
loads it (manifest, hashes, tensor names), and must reproduce PyTorch:
- per graph (each segment and full.onnx), the largest absolute difference of
  the probabilities stays under ``PROBS_ATOL``;
- per criterion, every sample takes the same exit at a spread of thresholds,
  run one image at a time through the engine's batch-1 path.
Each check gives one ✓/✗ line with the measured difference; every failure is
collected and reported together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from erde.runtime.core.criteria import CRITERIA, exit_indices, get
from erde.runtime.core.engine import Engine
from erde.training.models import EarlyExitNet

PROBS_ATOL = 1e-4


@dataclass(frozen=True)
class Check:
    name: str  # a graph file, or "exits (criterion)"
    ok: bool
    detail: str  # the measured difference

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.name}: {self.detail}"


def _midpoints(values: np.ndarray, count: int) -> List[float]:
    """Thresholds halfway between distinct observed confidences, so no sample sits on one."""
    v = np.unique(np.clip(values, 0.0, 1.0))
    mids = ((v[1:] + v[:-1]) / 2)[np.diff(v) > 4 * PROBS_ATOL]
    if len(mids) == 0:
        return [0.5]
    pick = np.linspace(0, len(mids) - 1, min(count, len(mids))).round().astype(int)
    return sorted({float(m) for m in mids[pick]})


def parity_checks(model: EarlyExitNet, folder: Path, x: torch.Tensor) -> List[Check]:
    """Every check of the folder against PyTorch on input ``x``, through ``Engine.load``."""
    model.eval()
    with torch.no_grad():
        ref = np.stack([F.softmax(o, dim=1).numpy() for o in model(x)])  # [E,N,K]
    engine = Engine.load(folder)  # the process's pool policy, whatever ran before (a notebook, say)
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    got = engine.exit_probs(xs)
    checks = []
    files = [s.file for s in engine.manifest.segments]
    for k, file in enumerate(files):
        diff = float(np.abs(got[k] - ref[k]).max())
        checks.append(Check(file, diff < PROBS_ATOL, f"max |probability difference| {diff:.1e} "
                                                     f"(tolerance {PROBS_ATOL:.0e})"))
    if engine.has_full:
        diff = float(np.abs(engine.run_full(xs) - ref[-1]).max())
        checks.append(Check(engine.manifest.full.file, diff < PROBS_ATOL,
                            f"max |probability difference| {diff:.1e} (tolerance {PROBS_ATOL:.0e})"))
    if engine.single_graph:
        diffs, wrong = [], 0
        for i in range(min(8, len(xs))):
            for k in range(engine.num_exits):
                probs, taken = engine.single_graph_probs(xs[i:i + 1], k)
                diffs.append(float(np.abs(probs[0] - ref[k, i]).max()))
                wrong += taken != k
        diff = max(diffs)
        checks.append(Check(engine.manifest.early_exit_graph.file, diff < PROBS_ATOL and not wrong,
                            f"max |probability difference| {diff:.1e} at every forced exit"
                            + (f"; {wrong} answers from the wrong exit" if wrong else "")))
    early = ref[:-1]
    for criterion in CRITERIA:
        conf = get(criterion).score(early)
        thresholds = _midpoints(conf.ravel(), 9)
        wrong = []
        for t in thresholds:
            want = exit_indices(ref, criterion, t)
            have = np.array([p.exit_index for p in engine.predict_array(xs, t, criterion, batch_size=1)])
            if not np.array_equal(want, have):
                wrong.append(f"{int((want != have).sum())} of {len(want)} samples at threshold {t:.4g}")
        checks.append(Check(f"exits ({criterion})", not wrong,
                            "; ".join(wrong) + " take another exit than in PyTorch" if wrong else
                            f"same exit for all {len(xs)} samples at {len(thresholds)} thresholds"))
    return checks


def check_parity(model: EarlyExitNet, folder: Path, x: torch.Tensor,
                 report: Optional[Callable[[str], None]] = None) -> List[str]:
    """The failures of ``parity_checks`` (empty when all pass); ``report`` gets each ✓/✗ line."""
    checks = parity_checks(model, folder, x)
    for c in checks:
        if report is not None:
            report(c.line())
    return [f"{c.name}: {c.detail}" for c in checks if not c.ok]
