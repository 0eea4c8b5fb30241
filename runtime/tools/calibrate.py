"""erde-calibrate: choose the exit threshold on the validation split and store it in the manifest.

The validation split is the one training held out: the same image folder
``PATH/train/<class>/*``, the same stratified split (``datasets.split_indices``,
seed 0, ``--val-fraction``). The model folder runs once over those images
(every exit's probabilities, ``Engine.exit_probs``); then, for a fine grid of
thresholds, ``criteria.exit_indices`` gives the exit each image takes, hence
the accuracy and the mean MACs (``cumulative_macs`` of the exits taken).

Two targets:
- ``--max-drop P`` (accuracy-drop, the default, P = 0.5 points): the threshold
  with the fewest mean MACs whose accuracy is at least the final exit's minus
  P percentage points, with ``--confidence C`` (default 0.9): the drop's
  one-sided upper confidence bound at level C, a normal bound on the per-image
  differences from the final exit (paired), must stay within P, so the promise
  holds on images the calibration did not see; C = 0.5 takes the point estimate;
- ``--mac-budget F`` (mac-budget): the most accurate threshold whose mean MACs
  are at most F x the full model's MACs.

Ties go to the safer threshold for the target (the stricter one for an
accuracy drop, the more permissive one for a MAC budget). With a latency profile of this
machine (``erde-profile``), accuracy-drop minimises the expected latency instead
of the MACs, and ``--budget-ms MS`` (latency-budget) takes the most accurate
threshold whose expected latency is at most MS. The choice goes into
``manifest.calibration`` and the whole table into ``calibration.csv`` beside
the manifest, both written atomically (the table first). ``erde-run`` then
uses the calibrated threshold when ``--threshold`` is not given.

The command line is ``erde.runtime.tools.calibrate_cli``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import statistics

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core import criteria
from ..common.datasets import ValidationData, validation_files
from ..common.files import write_atomic
from ..common.ownership import check_updatable, record_files
from ..common.errors import ErdeError
from ..core.manifest import CRITERIA, MANIFEST_NAME, Calibration, Manifest, default_val_fraction, save_manifest
from .profile import LatencyProfile, ProfileError, find_profile
from ..core.unsure import answers, choose_floor

TABLE_NAME = "calibration.csv"
MODES = ("accuracy-drop", "mac-budget", "latency-budget")
DEFAULT_MAX_DROP_POINTS = 0.5
DEFAULT_CONFIDENCE = 0.9  # accuracy-drop: level of the one-sided bound on the drop (0.5: the point estimate)
MAX_MAC_BUDGET = 1.5
BATCH_SIZE = 64

EXIT_OK, EXIT_NOT_MET, EXIT_USAGE = 0, 1, 2

def threshold_grid(criterion: str) -> List[float]:
    """The thresholds tried (``Criterion.grid``: max-prob 0.300..0.999, entropy 0.001..0.900, margin
    0.001..0.999, in steps of 0.001)."""
    return list(criteria.get(criterion).grid)

# ----------------------------------------------------------------------------------------------------------
# The table

ThresholdRow = criteria.SweepPoint  # one row of the calibration table

def threshold_table(exit_probs: np.ndarray, labels: np.ndarray, cumulative_macs: Sequence[int], full_macs: int,
                    criterion: str, thresholds: Optional[Sequence[float]] = None) -> List[ThresholdRow]:
    """Accuracy, mean MACs and exit shares at each threshold, from every exit's probabilities [E, N, K]."""
    if exit_probs.ndim != 3 or exit_probs.shape[1] != len(labels) or exit_probs.shape[1] == 0:
        raise ErdeError(f"expected exit probabilities [E, N, K] for {len(labels)} labels, got {exit_probs.shape}")
    if exit_probs.shape[0] != len(cumulative_macs):
        raise ErdeError(f"{exit_probs.shape[0]} exits of probabilities but {len(cumulative_macs)} MAC counts")
    thresholds = threshold_grid(criterion) if thresholds is None else thresholds
    return criteria.sweep(exit_probs, labels, cumulative_macs, full_macs, criterion, thresholds)

Cost = Callable[[ThresholdRow], float]


def _macs(row: ThresholdRow) -> float:
    return row.mean_macs


def latency_cost(profile: LatencyProfile) -> Cost:
    """Expected batch-1 latency (ms) of a row on the machine the profile describes."""
    return lambda row: profile.expected_ms(row.exit_shares)


def _strictness(row: ThresholdRow) -> float:
    """Larger = fewer images leave early."""
    return criteria.get(row.criterion).strictness(row.threshold)

@dataclass(frozen=True)
class Choice:
    """The outcome for one target: the chosen row, or None and the closest row."""

    mode: str
    target: float  # points of accuracy (accuracy-drop) or a fraction of full MACs (mac-budget)
    final_accuracy: float  # accuracy of the last exit alone
    row: Optional[ThresholdRow]
    closest: ThresholdRow
    confidence: float = 0.5  # accuracy-drop: level of the bound on the drop (0.5: the point estimate)

    @property
    def met(self) -> bool:
        return self.row is not None

def check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1.0:
        raise ErdeError(f"--confidence {confidence!r} is out of range; give a level in [0.5, 1), e.g. 0.9 "
                        "(0.5: the point estimate of the drop)")
    return float(confidence)


def drop_bound(row: ThresholdRow, final_accuracy: float, confidence: float) -> float:
    """Upper bound (a fraction) of the accuracy lost against the final exit, at one-sided level ``confidence``."""
    z = statistics.NormalDist().inv_cdf(check_confidence(confidence)) if confidence > 0.5 else 0.0
    return final_accuracy - row.accuracy + z * row.drop_stderr


def choose(rows: Sequence[ThresholdRow], mode: str, target: float, final_accuracy: float,
           full_macs: float, cost: Optional[Cost] = None, confidence: float = DEFAULT_CONFIDENCE) -> Choice:
    """Pick a row for the target; rows may mix criteria.

    ``cost`` is what accuracy-drop minimises: mean MACs by default, the expected
    latency with a profile; latency-budget needs it (``target`` in ms). ``confidence``
    (accuracy-drop only) is the level of the upper bound on the drop that must meet the target.
    """
    if not rows:
        raise ErdeError("no thresholds to choose from")
    eps = 1e-9
    cost = cost or _macs
    if mode == "accuracy-drop":
        ok = [r for r in rows if drop_bound(r, final_accuracy, confidence) <= target / 100.0 + eps]
        best = min(ok, key=lambda r: (cost(r), -r.accuracy, -_strictness(r))) if ok else None
        closest = max(rows, key=lambda r: (r.accuracy, -cost(r)))
    elif mode == "latency-budget":
        if cost is _macs:
            raise ErdeError("a latency budget needs a latency profile of this machine (erde-profile)")
        ok = [r for r in rows if cost(r) <= target]
        best = max(ok, key=lambda r: (r.accuracy, -cost(r), -_strictness(r))) if ok else None
        closest = min(rows, key=lambda r: (cost(r), -r.accuracy))
    elif mode == "mac-budget":
        budget = target * full_macs
        ok = [r for r in rows if r.mean_macs <= budget * (1 + eps)]
        best = max(ok, key=lambda r: (r.accuracy, -r.mean_macs, -_strictness(r))) if ok else None
        closest = min(rows, key=lambda r: (r.mean_macs, -r.accuracy))
    else:
        raise ErdeError(f"unknown calibration mode {mode!r}; expected one of {', '.join(MODES)}")
    level = float(confidence) if mode == "accuracy-drop" else 0.5
    return Choice(mode, float(target), float(final_accuracy), best, best or closest, level)

def choose_best(choices: Sequence[Choice], cost: Optional[Cost] = None) -> Choice:
    """Among per-criterion choices: those that meet the target win; then the lower cost (accuracy-drop)
    or higher accuracy (budgets); if none meets it, the closest of the closest."""
    cost = cost or _macs
    met = [c for c in choices if c.met]
    if met:
        if met[0].mode == "accuracy-drop":
            return min(met, key=lambda c: (cost(c.row), -c.row.accuracy))
        return max(met, key=lambda c: (c.row.accuracy, -cost(c.row)))
    if choices[0].mode == "accuracy-drop":
        return max(choices, key=lambda c: (c.closest.accuracy, -cost(c.closest)))
    return min(choices, key=lambda c: (cost(c.closest), -c.closest.accuracy))

# ----------------------------------------------------------------------------------------------------------
# Data and model


def validation_probs(engine, files: Sequence[Path], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Preprocess the files as erde-run does and return every exit's probabilities [E, N, K]."""
    from ..core.preprocess import preprocess_one

    from ..common.progress import step

    pre = engine.manifest.preprocessing
    parts = []
    with step(f"images through {engine.num_exits} exits", total=len(files)) as tick:
        for start in range(0, len(files), batch_size):
            x = np.stack([preprocess_one(p, pre) for p in files[start:start + batch_size]])
            parts.append(engine.exit_probs(x))
            tick(start + len(x))
    return np.concatenate(parts, axis=1)

# ----------------------------------------------------------------------------------------------------------
# Writing

def table_csv(rows: Sequence[ThresholdRow], num_exits: int, chosen: Optional[ThresholdRow] = None,
              profile: Optional[LatencyProfile] = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["criterion", "threshold", "val_accuracy", "val_drop_stderr", "mean_macs", "macs_fraction"]
               + [f"exit_{k + 1}_share" for k in range(num_exits)] + ["chosen"] + ["expected_ms"] * bool(profile))
    for r in rows:
        w.writerow([r.criterion, _threshold_text(r.threshold), f"{r.accuracy:.6f}", f"{r.drop_stderr:.6f}", f"{r.mean_macs:.1f}",
                    f"{r.macs_fraction:.6f}"] + [f"{s:.6f}" for s in r.exit_shares] + [int(r == chosen)]
                   + ([f"{profile.expected_ms(r.exit_shares):.4f}"] if profile else []))
    return buf.getvalue()

def _threshold_text(threshold: criteria.Threshold) -> str:
    """A threshold in the table: ``0.436``, or ``0.66/0.5`` for one per early exit."""
    return "/".join(f"{t:.6g}" for t in threshold) if isinstance(threshold, tuple) else f"{threshold:.6g}"


def _read_threshold(text: str) -> criteria.Threshold:
    values = tuple(float(v) for v in text.split("/"))
    return values if len(values) > 1 else values[0]


def store(folder: Union[str, Path], manifest: Manifest, choice: Choice, rows: Sequence[ThresholdRow],
          data: Optional[ValidationData] = None, profile: Optional[LatencyProfile] = None) -> Manifest:
    """Write the table, then the manifest with ``calibration`` set; return the new manifest."""
    if choice.row is None:
        raise ErdeError("refusing to store a calibration that does not meet its target")
    folder = Path(folder)
    r = choice.row
    try:
        write_atomic(folder / TABLE_NAME, table_csv(rows, manifest.num_exits, r, profile))
    except OSError as e:
        raise ErdeError(f"{folder / TABLE_NAME}: cannot write ({e.strerror or e}); nothing was changed") from None
    cal = Calibration(criterion=r.criterion, threshold=r.threshold, mode=choice.mode, target=choice.target,
                      val_accuracy=r.accuracy, val_mean_macs=r.mean_macs, table_file=TABLE_NAME,
                      val_expected_ms=profile.expected_ms(r.exit_shares) if profile else None,
                      profile=profile.machine.describe() if profile else "", confidence=choice.confidence)
    metrics = dict(manifest.metrics)
    if data is not None:
        metrics["calibration_val_images"] = len(data.files)
        metrics["calibration_val_fraction"] = data.val_fraction
    metrics["calibration_val_accuracy_final_exit"] = choice.final_accuracy
    new = dataclasses.replace(manifest, calibration=cal, metrics=metrics)
    try:
        save_manifest(folder, new)
        record_files(folder, "erde-calibrate", [TABLE_NAME, MANIFEST_NAME])
    except OSError as e:
        raise ErdeError(f"{folder / MANIFEST_NAME}: cannot write ({e.strerror or e}); the manifest is unchanged, "
                        f"{TABLE_NAME} holds the new table") from None
    return new


def check_may_store(folder: Union[str, Path]) -> None:
    """Before the validation run: may erde-calibrate write its table and manifest into ``folder``?"""
    def is_table(path: Path) -> bool:  # the header erde writes, and rows it can read
        try:
            with open(path, encoding="utf-8") as fh:
                if not fh.readline().startswith("criterion,threshold,val_accuracy,"):
                    return False
            read_table(path.parent, 1)
        except (OSError, UnicodeDecodeError, ErdeError):
            return False
        return True

    check_updatable(folder, {TABLE_NAME: is_table, MANIFEST_NAME: lambda p: True}, "erde-calibrate",
                    "pass --out DIR to write a calibrated copy of the model folder there")

# ----------------------------------------------------------------------------------------------------------
# The whole job

@dataclass(frozen=True)
class Result:
    choice: Choice
    per_criterion: Dict[str, Choice]
    rows: List[ThresholdRow]
    data: ValidationData
    manifest: Manifest  # as written (unchanged if the target was not met)
    profile: Optional[LatencyProfile] = None  # the latency profile used (None: the cost was MACs)
    profile_note: str = ""  # why no profile was used

def calibrate(model_dir: Union[str, os.PathLike], data: Union[str, os.PathLike], criterion: str = "all",
              mode: str = "accuracy-drop", target: float = DEFAULT_MAX_DROP_POINTS,
              val_fraction: Optional[float] = None, threads: Optional[int] = None, write: bool = True,
              batch_size: int = BATCH_SIZE, confidence: float = DEFAULT_CONFIDENCE, verify: bool = True,
              unsure: Optional[Tuple[str, float]] = None, per_exit: bool = True) -> Result:
    """Run the model over the validation split, choose a threshold and (if met and ``write``) store it.
    ``verify``: first refuse a folder whose self-test fails on this machine (``selftest.require_verified``).
    ``unsure``: (target, value) of the "unsure" floor to choose at the threshold (``erde.runtime.core.unsure``);
    without it, a floor the manifest already has is chosen again for its own target. ``per_exit``: then give
    each early exit its own threshold (``refine_per_exit``); False keeps one threshold for every exit."""
    from ..core.engine import Engine
    from ..core.selftest import require_verified

    check_target(mode, target)
    check_confidence(confidence)
    crits = list(CRITERIA) if criterion == "all" else [criterion]
    for c in crits:
        if c not in CRITERIA:
            raise ErdeError(f"unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}, all")
    engine = Engine.load(model_dir, threads=threads)
    if write:
        check_may_store(engine.folder)
    if verify:
        require_verified(engine, threads)
    m = engine.manifest
    profile, note = None, ""
    try:
        profile = find_profile(engine.folder, m, threads)
    except ProfileError as e:
        if mode == "latency-budget":
            raise
        note = str(e)
    cost = latency_cost(profile) if profile else None
    if val_fraction is None:
        val_fraction = default_val_fraction(m)
    vd = validation_files(data, m.class_names, val_fraction)
    probs = validation_probs(engine, vd.files, batch_size)
    cum = [s.cumulative_macs for s in m.segments]
    final_acc = float((probs[-1].argmax(axis=1) == vd.labels).mean())
    rows: List[ThresholdRow] = []
    per: Dict[str, Choice] = {}
    for c in crits:
        part = threshold_table(probs, vd.labels, cum, m.full_macs, c)
        per[c] = choose(part, mode, target, final_acc, m.full_macs, cost, confidence)
        rows += part
        if per_exit:
            from .calibrate_per_exit import refine_per_exit

            per[c], tried = refine_per_exit(probs, vd.labels, cum, m.full_macs, per[c], cost)
            rows += tried
    best = choose_best(list(per.values()), cost)
    target = unsure or ((m.unsure.target, m.unsure.target_value) if m.unsure else None)
    if best.met and target:
        classes, conf = answers(probs, best.row.criterion, best.row.threshold)
        m = dataclasses.replace(m, unsure=choose_floor(conf, classes == vd.labels, *target))
    manifest = m
    if best.met and write:
        manifest = store(engine.folder, m, best, rows, vd, profile)
    return Result(best, per, rows, vd, manifest, profile, note)

def check_target(mode: str, target: float) -> float:
    if mode not in MODES:
        raise ErdeError(f"unknown calibration mode {mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ErdeError(f"calibration target {target!r} is not a number")
    if mode == "accuracy-drop" and not 0.0 <= target <= 100.0:
        raise ErdeError(f"--max-drop {target:g} is out of range; give accuracy points in [0, 100], e.g. 0.5")
    if mode == "latency-budget" and not target > 0.0:
        raise ErdeError(f"--budget-ms {target:g} is out of range; give milliseconds per image > 0, e.g. 0.3")
    if mode == "mac-budget" and not 0.0 < target <= MAX_MAC_BUDGET:
        raise ErdeError(f"--mac-budget {target:g} is out of range; give a fraction of the full model's MACs "
                        f"in (0, {MAX_MAC_BUDGET:g}], e.g. 0.6")
    return float(target)

def read_table(folder: Union[str, Path], num_exits: int) -> List[ThresholdRow]:
    """The rows of a model folder's calibration.csv ([] if it has none); ErdeError if it is corrupt."""
    from ..common.files import MAX_MANIFEST_BYTES, read_capped

    path = Path(folder) / TABLE_NAME
    if not path.exists():
        return []
    try:
        text = read_capped(path, 8 * MAX_MANIFEST_BYTES, inside=folder, what="calibration table").decode("utf-8")
        rows = []
        for d in csv.DictReader(io.StringIO(text)):
            shares = tuple(float(d[f"exit_{k + 1}_share"]) for k in range(num_exits))
            rows.append(ThresholdRow(d["criterion"], _read_threshold(d["threshold"]), float(d["val_accuracy"]),
                                     float(d["mean_macs"]), float(d["macs_fraction"]), shares,
                                     float(d.get("val_drop_stderr") or 0.0)))
        return rows
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ErdeError(f"{path}: corrupt calibration table ({e}); run erde-calibrate again") from None


def row_at(rows: Sequence[ThresholdRow], criterion: str, threshold: criteria.Threshold) -> Optional[ThresholdRow]:
    """The row of ``criterion`` nearest to ``threshold`` (every early exit's within 0.001), or None."""
    same = [r for r in rows if r.criterion == criterion]
    if not same:
        return None
    exits = len(same[0].exit_shares)
    want = np.asarray(criteria.per_exit(threshold, exits))

    def distance(r: ThresholdRow) -> float:
        return float(np.abs(np.asarray(criteria.per_exit(r.threshold, exits)) - want).max())

    best = min(same, key=distance)
    return best if distance(best) <= 1e-3 + 1e-9 else None
