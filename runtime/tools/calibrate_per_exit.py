"""erde-calibrate's second step: a threshold per early exit (``refine_per_exit``), from the best single one.

One exit at a time, every threshold of the criterion's grid with the others fixed, the same ``calibrate.choose``
among them and the current rule, until a pass changes nothing. ``exit_sweep`` computes those rows in one pass:
the images that reach exit k, and where each goes if it does not leave there, do not depend on exit k's
threshold, so every row is a sum over a mask [T, N].
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..core import criteria
from .calibrate import Choice, Cost, ThresholdRow, choose, threshold_grid


def exit_sweep(exit_probs: np.ndarray, labels: np.ndarray, cumulative_macs: Sequence[int], full_macs: int,
               criterion: str, rule: Sequence[float], k: int, thresholds: Sequence[float]) -> List[ThresholdRow]:
    """``threshold_table`` of the rules that are ``rule`` (one threshold per early exit) with exit ``k``'s threshold
    replaced by each of ``thresholds``, in one pass: the images that reach exit k, and where each of them goes if
    it does not leave there, do not depend on exit k's threshold, so every row is a sum over a mask [T, N]."""
    c = criteria.get(criterion)
    num_exits, n = exit_probs.shape[:2]
    labels = np.asarray(labels)
    correct = exit_probs.argmax(axis=2) == labels[None, :]  # [E, N]
    cum = np.asarray(cumulative_macs, dtype=np.float64)
    taken = criteria.exit_indices(exit_probs, criterion, tuple(rule))  # where each image goes now
    reach = taken >= k  # the images that get to exit k
    later = np.full(n, num_exits - 1)  # where an image goes if it does not leave at exit k
    open_ = np.ones(n, dtype=bool)
    for j in range(k + 1, num_exits - 1):
        leave = open_ & c.passes(exit_probs[j], rule[j])
        later[leave], open_ = j, open_ & ~leave
    leaves = c.passes_each(exit_probs[k], thresholds) & reach[None, :]  # [T, N]
    right_later = correct[later, np.arange(n)].astype(np.float64)
    right_fixed = np.where(reach, right_later, correct[taken, np.arange(n)]).astype(np.float64)  # nobody leaves at k
    gain = np.where(reach, correct[k] - right_later, 0.0)  # leaving at k instead
    final = correct[-1].astype(np.float64)
    right = right_fixed.sum() + leaves @ gain  # [T]
    final_and_right = (final * right_fixed).sum() + leaves @ (final * gain)
    macs = np.where(reach, cum[later], cum[taken]).sum() + leaves @ np.where(reach, cum[k] - cum[later], 0.0)
    counts = np.stack([np.bincount(np.where(reach, later, taken), minlength=num_exits)] * len(thresholds)).astype(float)
    for j in range(num_exits):  # an image that leaves at k no longer counts where it would have gone
        counts[:, j] -= leaves @ (reach & (later == j)).astype(np.float64)
    counts[:, k] += leaves.sum(axis=1)
    drop_sum = final.sum() - right  # per image d = final - right in {-1, 0, 1}: d^2 = final + right - 2 final right
    drop_sq = final.sum() + right - 2 * final_and_right
    var = (drop_sq - drop_sum ** 2 / n) / (n - 1) if n > 1 else np.zeros_like(right)
    rows = []
    for i, t in enumerate(thresholds):
        new_rule = criteria.check_threshold(criterion, tuple(rule[:k]) + (float(t),) + tuple(rule[k + 1:]))
        rows.append(ThresholdRow(criterion, new_rule, float(right[i] / n), float(macs[i] / n),
                                 float(macs[i] / n / full_macs), tuple(float(v) for v in counts[i] / n),
                                 float(math.sqrt(max(var[i], 0.0)) / math.sqrt(n)) if n > 1 else 0.0))
    return rows


def refine_per_exit(exit_probs: np.ndarray, labels: np.ndarray, cumulative_macs: Sequence[int], full_macs: int,
                    choice: Choice, cost: Optional[Cost] = None, passes: int = 3) -> Tuple[Choice, List[ThresholdRow]]:
    """From a met choice of one threshold for every exit, give each early exit its own threshold: one exit at a
    time, every threshold of the criterion's grid with the others fixed (``exit_sweep``), the same ``choose``
    among them and the current rule, until a pass changes nothing (at most ``passes``). The choice never gets
    worse by its own measure; returns it with the rows it tried that ``choose`` took."""
    num_exits = exit_probs.shape[0]
    if not choice.met or num_exits < 3:
        return choice, []
    row = choice.row
    taken: List[ThresholdRow] = []
    for _ in range(passes):
        changed = False
        for k in range(num_exits - 1):
            rule = criteria.per_exit(row.threshold, num_exits)
            rows = exit_sweep(exit_probs, labels, cumulative_macs, full_macs, row.criterion, rule, k,
                              threshold_grid(row.criterion))
            new = choose([row] + rows, choice.mode, choice.target, choice.final_accuracy, full_macs, cost,
                         choice.confidence)
            if new.row is not row:
                row, changed = new.row, True
                taken.append(row)
        if not changed:
            break
    return dataclasses.replace(choice, row=row, closest=row), taken
