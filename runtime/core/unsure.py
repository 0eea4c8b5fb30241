"""An honest "unsure": a confidence floor at the answering exit, chosen on the validation split.

What a camera sees is mostly not one of the model's classes, and a softmax answers every image with one.
An answer whose confidence (the largest probability at the exit that answered) lies below the floor is
reported as "unsure"; its class stays available (``erde-run --json`` keeps it). The floor is chosen by
``erde-calibrate --unsure-coverage C`` (the share of validation images still answered) or
``--unsure-accuracy A`` (the accuracy on the answered validation images), at the calibrated threshold, and
stored in the manifest; it trades coverage for accuracy on what is answered, and is never tuned on test images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import criteria
from ..common.errors import ErdeError

TARGETS = ("coverage", "accuracy")


@dataclass(frozen=True)
class Unsure:
    floor: float  # answers with confidence below this are "unsure"
    target: str  # "coverage" or "accuracy"
    target_value: float
    val_coverage: float  # share of validation images answered (confidence >= floor)
    val_accuracy_answered: float  # accuracy on them

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def from_dict(d: Any, where: str = "manifest.unsure") -> Unsure:
    try:
        u = Unsure(float(d["floor"]), str(d["target"]), float(d["target_value"]), float(d["val_coverage"]),
                   float(d["val_accuracy_answered"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ErdeError(f"{where}: lacks or mistypes {e}; calibrate the folder again") from None
    if not 0.0 <= u.floor <= 1.0 or u.target not in TARGETS:
        raise ErdeError(f"{where}: floor {u.floor!r} not in [0, 1] or target {u.target!r} not one of {TARGETS}")
    return u


def answers(exit_probs: np.ndarray, criterion: str, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """(class, confidence) [N] of the exit each image takes at this threshold, from all exits' probabilities."""
    taken = criteria.exit_indices(exit_probs, criterion, threshold)
    p = exit_probs[taken, np.arange(exit_probs.shape[1])]
    return p.argmax(axis=1), p.max(axis=1)


def curve(confidence: np.ndarray, correct: np.ndarray, floors: Sequence[float]) -> List[Tuple[float, float, float]]:
    """(floor, coverage, accuracy on the answered images) at each floor; accuracy is nan when none is answered."""
    rows = []
    for f in floors:
        kept = confidence >= f
        acc = float(correct[kept].mean()) if kept.any() else float("nan")
        rows.append((float(f), float(kept.mean()), acc))
    return rows


def choose_floor(confidence: np.ndarray, correct: np.ndarray, target: str, value: float) -> Unsure:
    """The floor that meets ``target``: coverage -> the highest floor answering at least ``value`` of the
    images; accuracy -> the lowest floor whose answered images are at least ``value`` right."""
    if target not in TARGETS or not 0.0 < value <= 1.0:
        raise ErdeError(f"unsure target {target} {value!r}: give a fraction in (0, 1], e.g. --unsure-coverage 0.9")
    conf = np.sort(np.asarray(confidence, dtype=np.float64))
    n = len(conf)
    if n == 0:
        raise ErdeError("no validation images to choose the unsure floor on")
    if target == "coverage":
        floor = float(conf[max(0, n - int(np.ceil(value * n)))])
    else:
        order = np.argsort(confidence)
        right = np.asarray(correct, dtype=np.float64)[order]
        tail_acc = np.cumsum(right[::-1])[::-1] / np.arange(n, 0, -1)  # accuracy of images i.. (by confidence)
        ok = np.nonzero(tail_acc >= value)[0]
        if not len(ok):
            raise ErdeError(f"no floor reaches {value:.1%} accuracy on the answered validation images")
        floor = float(conf[ok[0]])
    (_, coverage, acc), = curve(confidence, correct, [floor])
    return Unsure(floor, target, float(value), coverage, acc)


def floor_of(manifest) -> Optional[float]:
    """The manifest's unsure floor, or None."""
    return None if manifest.unsure is None else manifest.unsure.floor
