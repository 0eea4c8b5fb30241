"""Exit criteria in numpy, shared by the runtime engine and the PyTorch evaluation.

- ``max-prob``: an image leaves at exit k when max softmax >= t.
- ``entropy``: it leaves when the normalised entropy H(p) / log(K) <= t.
Both thresholds lie in [0, 1]; the last exit always answers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

import numpy as np

from .errors import ErdeError

CRITERIA = ("max-prob", "entropy")


RULES = {"max-prob": "max-prob: leave when max probability >= t",
         "entropy": "entropy: leave when normalised entropy <= t"}


def check_criterion(criterion: object) -> str:
    if criterion not in CRITERIA:
        raise ErdeError(f"unknown exit criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    return criterion  # type: ignore[return-value]


def check_threshold(criterion: str, threshold: object) -> float:
    """The one threshold check of every stage: a real number in [0, 1] (not a string or bool)."""
    check_criterion(criterion)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(threshold)) or not 0.0 <= float(threshold) <= 1.0:
        raise ErdeError(f"threshold {threshold!r} is not a number in [0, 1] ({RULES[criterion]})")
    return float(threshold)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """H(p) / log(K) over the last axis, in [0, 1]."""
    p = np.clip(probs, 1e-12, 1.0)
    return np.clip(-(probs * np.log(p)).sum(axis=-1) / math.log(probs.shape[-1]), 0.0, 1.0)


def passes(probs: np.ndarray, criterion: str, threshold: float) -> np.ndarray:
    """Boolean mask [N]: which rows of probs [N,K] may leave at this exit (the exit rule of every stage)."""
    if criterion == "max-prob":
        return probs.max(axis=-1) >= threshold
    return normalized_entropy(probs) <= threshold


def exit_indices(exit_probs: np.ndarray, criterion: str, threshold: float) -> np.ndarray:
    """Exit taken by each image, from all exits' probabilities [E,N,K] -> [N] ints."""
    threshold = check_threshold(criterion, threshold)
    num_exits, n = exit_probs.shape[:2]
    taken = np.full(n, num_exits - 1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    for k in range(num_exits - 1):
        leave = open_ & passes(exit_probs[k], criterion, threshold)
        taken[leave] = k
        open_ &= ~leave
    return taken


@dataclass(frozen=True)
class SweepPoint:
    """Accuracy and cost of one (criterion, threshold) over a set of labelled images."""

    criterion: str
    threshold: float
    accuracy: float  # in [0, 1]
    mean_macs: float  # per image
    macs_fraction: float  # mean_macs / MACs of the static network
    exit_shares: Tuple[float, ...]  # share of images leaving at each exit
    drop_stderr: float = 0.0  # standard error of (final exit's accuracy - accuracy), paired over the images

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(exit_probs: np.ndarray, labels: np.ndarray, cumulative_macs: Sequence[int], full_macs: int,
          criterion: str, thresholds: Sequence[float]) -> List[SweepPoint]:
    """Where each image leaves at each threshold, from every exit's probabilities [E,N,K]."""
    cum = np.asarray(cumulative_macs, dtype=np.float64)
    n = exit_probs.shape[1]
    correct = exit_probs.argmax(axis=2) == np.asarray(labels)[None, :]  # [E,N]
    points = []
    for t in thresholds:
        taken = exit_indices(exit_probs, criterion, t)
        mean_macs = float(cum[taken].mean())
        right = correct[taken, np.arange(n)]
        drop = correct[-1].astype(np.float64) - right  # per image: -1, 0 or 1
        stderr = float(drop.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        points.append(SweepPoint(criterion, float(t), float(right.mean()), mean_macs, mean_macs / full_macs,
                                 tuple(float(v) for v in np.bincount(taken, minlength=len(cum)) / n), stderr))
    return points
