"""Exit criteria: the one home of the rule that decides where an image leaves (numpy only, no onnx).

Each ``Criterion`` carries its name and rule, the thresholds calibration tries, the benchmark's default
thresholds, a score per image, and the direction in which an image leaves:

- ``max-prob``: an image leaves at exit k when its largest softmax probability is >= t;
- ``entropy``: when the normalised entropy H(p) / log(K) is <= t;
- ``margin``: when the largest probability exceeds the second largest by >= t.

Every path uses it: the engine's batch mask and batch-1 test, the single graph's ONNX nodes (``onnx_nodes``:
plain node specs the exporter turns into ONNX), calibration, parity, the sweep, the benchmark and the CLIs'
``--criterion`` choices. A new criterion is one more entry in ``REGISTRY`` (and its test). Thresholds lie in
[0, 1]; the last exit always answers.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..common.errors import ErdeError

#: An ONNX node as plain data: (op_type, inputs, outputs, attributes); the exporter makes it an ONNX node.
NodeSpec = Tuple[str, List[str], List[str], Dict[str, object]]


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """H(p) / log(K) over the last axis, in [0, 1]."""
    p = np.clip(probs, 1e-12, 1.0)
    return np.clip(-(probs * np.log(p)).sum(axis=-1) / math.log(probs.shape[-1]), 0.0, 1.0)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Largest minus second largest probability over the last axis, in [0, 1]."""
    top = np.partition(probs, probs.shape[-1] - 2, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


def _max_prob_nodes(pre: str, probs: str, t: str, num_classes: int) -> Tuple[List[NodeSpec], str]:
    return [("ReduceMax", [probs], [pre + "max"], {"axes": [1], "keepdims": 0}),
            ("GreaterOrEqual", [pre + "max", t], [pre + "leave"], {})], pre + "leave"


def _entropy_nodes(pre: str, probs: str, t: str, num_classes: int) -> Tuple[List[NodeSpec], str]:
    return [("Constant", [], [pre + "tiny"], {"value_float": 1e-12}),
            ("Constant", [], [pre + "one"], {"value_float": 1.0}),
            ("Constant", [], [pre + "log_k"], {"value_float": math.log(num_classes)}),
            ("Constant", [], [pre + "axis"], {"value_ints": [1]}),
            ("Clip", [probs, pre + "tiny", pre + "one"], [pre + "clipped"], {}),
            ("Log", [pre + "clipped"], [pre + "log"], {}),
            ("Mul", [probs, pre + "log"], [pre + "plogp"], {}),
            ("ReduceSum", [pre + "plogp", pre + "axis"], [pre + "neg_h"], {"keepdims": 0}),
            ("Neg", [pre + "neg_h"], [pre + "h"], {}),
            ("Div", [pre + "h", pre + "log_k"], [pre + "h_norm"], {}),
            ("LessOrEqual", [pre + "h_norm", t], [pre + "leave"], {})], pre + "leave"


def _margin_nodes(pre: str, probs: str, t: str, num_classes: int) -> Tuple[List[NodeSpec], str]:
    return [("Constant", [], [pre + "two"], {"value_ints": [2]}),
            ("TopK", [probs, pre + "two"], [pre + "top2", pre + "top2_at"], {"axis": 1}),
            ("ReduceMax", [pre + "top2"], [pre + "first"], {"axes": [1], "keepdims": 0}),
            ("ReduceMin", [pre + "top2"], [pre + "second"], {"axes": [1], "keepdims": 0}),
            ("Sub", [pre + "first", pre + "second"], [pre + "margin"], {}),
            ("GreaterOrEqual", [pre + "margin", t], [pre + "leave"], {})], pre + "leave"


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as numpy's float32 arithmetic rounds its exact result)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _grid(lo: float, hi: float) -> Tuple[float, ...]:
    return tuple(round(lo + i / 1000.0, 3) for i in range(int(round((hi - lo) * 1000)) + 1))


@dataclass(frozen=True)
class Criterion:
    name: str
    rule: str  # "leave when ... t", for help texts and errors
    score: Callable[[np.ndarray], np.ndarray]  # probabilities [..., K] -> [...]
    leaves_above: bool  # True: leave when score >= t; False: when score <= t
    grid: Tuple[float, ...]  # the thresholds erde-calibrate tries
    report_thresholds: Tuple[float, ...]  # the default list of erde-bench and erde-train eval
    onnx_nodes: Callable[[str, str, str, int], Tuple[List[NodeSpec], str]]  # (prefix, probs, t, K) -> (nodes, bool)

    def passes(self, probs: np.ndarray, threshold: float) -> np.ndarray:
        """Boolean mask [N]: which rows of probs [N, K] may leave at this exit."""
        s = self.score(probs)
        return s >= threshold if self.leaves_above else s <= threshold

    def passes_each(self, probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
        """``passes`` at every threshold at once: a boolean mask [T, N] (the thresholds compared in float32, as
        ``passes`` compares a Python float with float32 scores)."""
        s = self.score(probs)[None, :]
        t = np.asarray(thresholds, dtype=np.float32)[:, None]
        return s >= t if self.leaves_above else s <= t

    def scalar_test(self, threshold: float) -> Callable[[Sequence[float]], bool]:
        """``passes`` for one image's probabilities as Python floats (the engine's batch-1 loop). The threshold is
        rounded to float32 once, so the comparison stays the one ``passes`` makes on float32 probabilities."""
        t32 = float(np.float32(threshold))
        if self.name == "max-prob":  # the common case, without numpy: less work per segment
            return lambda values: max(values) >= t32
        if self.name == "margin":  # without numpy too; the difference rounded to float32 as top2_margin's is
            def margin_test(values: Sequence[float]) -> bool:
                second, first = sorted(values)[-2:]
                d = first - second  # float32 inputs: the double difference is exact
                # rounding to float32 moves d in [0, 1] by at most 3e-8: only near t32 can it change the answer
                return d >= t32 if abs(d - t32) > 1e-6 else _float32(d) >= t32

            return margin_test
        return lambda values: bool(self.passes(np.asarray(values, dtype=np.float32)[None, :], t32)[0])

    @property
    def never(self) -> float:
        """A threshold no image passes (nobody leaves early)."""
        return 2.0 if self.leaves_above else -1.0

    @property
    def always(self) -> float:
        """A threshold every image passes."""
        return -1.0 if self.leaves_above else 2.0

    def strictness(self, threshold: "Threshold") -> float:
        """Larger = fewer images leave early (per-exit thresholds: their mean)."""
        t = float(np.mean(threshold))
        return t if self.leaves_above else -t


REGISTRY: Dict[str, Criterion] = {c.name: c for c in (
    Criterion("max-prob", "leave when max probability >= t", lambda p: p.max(axis=-1), True, _grid(0.3, 0.999),
              (0.5, 0.8, 0.9, 0.95, 0.99), _max_prob_nodes),
    Criterion("entropy", "leave when normalised entropy <= t", normalized_entropy, False, _grid(0.001, 0.9),
              (0.5, 0.3, 0.2, 0.1, 0.05), _entropy_nodes),
    Criterion("margin", "leave when the top two probabilities differ by >= t", top2_margin, True,
              _grid(0.001, 0.999), (0.2, 0.4, 0.6, 0.8, 0.95), _margin_nodes),
)}
CRITERIA = tuple(REGISTRY)
RULES = {name: f"{name}: {c.rule}" for name, c in REGISTRY.items()}


def get(criterion: object) -> Criterion:
    if criterion not in REGISTRY:
        raise ErdeError(f"unknown exit criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    return REGISTRY[criterion]  # type: ignore[index]


def check_criterion(criterion: object) -> str:
    return get(criterion).name


#: A rule's threshold: one number for every early exit, or one per early exit (exit 1 first).
Threshold = Union[float, Tuple[float, ...]]


def _check_number(criterion: str, threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(threshold)) or not 0.0 <= float(threshold) <= 1.0:
        raise ErdeError(f"threshold {threshold!r} is not a number in [0, 1] ({RULES[criterion]})")
    return float(threshold)


def check_threshold(criterion: str, threshold: object, num_exits: Optional[int] = None) -> Threshold:
    """The one threshold check of every path (batch, batch 1, the single graph): a real number in [0, 1] (not a
    string or bool), or a sequence of them, one per early exit (``num_exits - 1`` of them when given). A sequence
    of equal numbers is that number."""
    check_criterion(criterion)
    if isinstance(threshold, (list, tuple, np.ndarray)) and np.ndim(threshold) == 1:
        values = tuple(_check_number(criterion, t) for t in threshold)
        if not values or (num_exits is not None and len(values) != num_exits - 1):
            want = "one per early exit" if num_exits is None else f"{num_exits - 1}, one per early exit"
            raise ErdeError(f"{len(values)} thresholds {show(values)} for a model with {num_exits} exits; give one "
                            f"number for every exit or {want}")
        return values[0] if len(set(values)) == 1 else values
    return _check_number(criterion, threshold)


def per_exit(threshold: Threshold, num_exits: int) -> Tuple[float, ...]:
    """The threshold of each early exit (``num_exits - 1`` of them)."""
    return tuple(threshold) if isinstance(threshold, tuple) else (float(threshold),) * (num_exits - 1)


def show(threshold: Threshold) -> str:
    """A threshold as people read it: ``0.436``, or ``0.66/0.5`` (exit 1, exit 2, ...)."""
    return "/".join(f"{t:g}" for t in threshold) if isinstance(threshold, tuple) else f"{threshold:g}"


def check_rule(criterion: object, threshold: object, num_exits: int) -> Tuple[str, Threshold]:
    """A whole exit rule checked for a model of ``num_exits`` exits: (criterion, threshold)."""
    return check_criterion(criterion), check_threshold(criterion, threshold, num_exits)


def exit_tests(criterion: str, threshold: Threshold, num_exits: int) -> Tuple[Callable[[Sequence[float]], bool], ...]:
    """The batch-1 test of each early exit (``Criterion.scalar_test`` at its threshold)."""
    rule = get(criterion)
    return tuple(rule.scalar_test(t) for t in per_exit(threshold, num_exits))


def passes(probs: np.ndarray, criterion: str, threshold: float) -> np.ndarray:
    """Boolean mask [N]: which rows of probs [N,K] may leave at this exit (the exit rule of every path)."""
    return get(criterion).passes(probs, threshold)


def exit_indices(exit_probs: np.ndarray, criterion: str, threshold: Threshold) -> np.ndarray:
    """Exit taken by each image, from all exits' probabilities [E,N,K] -> [N] ints."""
    num_exits, n = exit_probs.shape[:2]
    thresholds = per_exit(check_threshold(criterion, threshold, num_exits), num_exits)
    taken = np.full(n, num_exits - 1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    for k in range(num_exits - 1):
        leave = open_ & passes(exit_probs[k], criterion, thresholds[k])
        taken[leave] = k
        open_ &= ~leave
    return taken


@dataclass(frozen=True)
class SweepPoint:
    """Accuracy and cost of one (criterion, threshold) over a set of labelled images."""

    criterion: str
    threshold: Threshold
    accuracy: float  # in [0, 1]
    mean_macs: float  # per image
    macs_fraction: float  # mean_macs / MACs of the static network
    exit_shares: Tuple[float, ...]  # share of images leaving at each exit
    drop_stderr: float = 0.0  # standard error of (final exit's accuracy - accuracy), paired over the images

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(exit_probs: np.ndarray, labels: np.ndarray, cumulative_macs: Sequence[int], full_macs: int,
          criterion: str, thresholds: Sequence[Threshold]) -> List[SweepPoint]:
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
        points.append(SweepPoint(criterion, check_threshold(criterion, t), float(right.mean()), mean_macs,
                                 mean_macs / full_macs,
                                 tuple(float(v) for v in np.bincount(taken, minlength=len(cum)) / n), stderr))
    return points
