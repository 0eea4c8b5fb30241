"""Parity check: ONNX Runtime must reproduce PyTorch on every exported graph.

Per exit, the largest absolute difference of the probabilities must stay under a
tolerance, and every sample must take the same exit at a spread of thresholds
(for both criteria). All failures are collected and reported together.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from erde.runtime.criteria import exit_indices, normalized_entropy
from erde.training.models import EarlyExitResNet

PROBS_ATOL = 1e-4


def _midpoints(values: np.ndarray, count: int) -> List[float]:
    """Thresholds halfway between distinct observed confidences, so no sample sits on one."""
    v = np.unique(np.clip(values, 0.0, 1.0))
    mids = ((v[1:] + v[:-1]) / 2)[np.diff(v) > 4 * PROBS_ATOL]
    if len(mids) == 0:
        return [0.5]
    pick = np.linspace(0, len(mids) - 1, min(count, len(mids))).round().astype(int)
    return sorted({float(m) for m in mids[pick]})


def check_parity(model: EarlyExitResNet, folder: Path, files: Sequence[str], full_file: str,
                 x: torch.Tensor) -> List[str]:
    """Compare ORT on the segment chain (and full graph) with PyTorch on input ``x``; return failures."""
    failures = []
    model.eval()
    with torch.no_grad():
        ref = np.stack([F.softmax(o, dim=1).numpy() for o in model(x)])  # [E,N,K]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    feed, got = x.numpy(), []
    for k, name in enumerate(files):
        sess = ort.InferenceSession(str(folder / name), opts, providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: feed})))
        got.append(outs[f"probs_{k}"])
        feed = outs.get(f"features_{k}")
    got = np.stack(got)
    for k in range(len(files)):
        diff = float(np.abs(got[k] - ref[k]).max())
        if not diff < PROBS_ATOL:
            failures.append(f"{files[k]}: probabilities differ from PyTorch by {diff:.2e} (tolerance {PROBS_ATOL:.0e})")
    sess = ort.InferenceSession(str(folder / full_file), opts, providers=["CPUExecutionProvider"])
    full = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(full - ref[-1]).max())
    if not diff < PROBS_ATOL:
        failures.append(f"{full_file}: probabilities differ from PyTorch by {diff:.2e} (tolerance {PROBS_ATOL:.0e})")
    early = ref[:-1]
    for criterion, conf in (("max-prob", early.max(-1)), ("entropy", normalized_entropy(early))):
        for t in _midpoints(conf.ravel(), 9):
            a, b = exit_indices(ref, criterion, t), exit_indices(got, criterion, t)
            if not np.array_equal(a, b):
                failures.append(f"{criterion} at threshold {t:.4g}: {int((a != b).sum())} of {len(a)} "
                                "samples take a different exit in ONNX Runtime than in PyTorch")
    return failures
