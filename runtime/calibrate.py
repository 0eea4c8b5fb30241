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
  P percentage points;
- ``--mac-budget F`` (mac-budget): the most accurate threshold whose mean MACs
  are at most F x the full model's MACs.

Ties go to the safer threshold for the target (the stricter one for an
accuracy drop, the more permissive one for a MAC budget). The choice goes into
``manifest.calibration`` and the whole table into ``calibration.csv`` beside
the manifest, both written atomically (the table first). ``erde-run`` then
uses the calibrated threshold when ``--threshold`` is not given.

Exit codes: 0 calibrated; 1 no threshold meets the target (nothing written;
the closest threshold is named); 2 nothing could run (bad option, model
folder or data).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np

from . import criteria
from .datasets import DataError, image_folder_split, split_indices
from .cliargs import Parser, UsageError, finite_number, positive_int, run_cli
from .files import write_atomic
from .errors import ErdeError
from .manifest import CRITERIA, MANIFEST_NAME, Calibration, Manifest, save_manifest

TABLE_NAME = "calibration.csv"
MODES = ("accuracy-drop", "mac-budget")
DEFAULT_MAX_DROP_POINTS = 0.5
DEFAULT_VAL_FRACTION = 0.1
MAX_MAC_BUDGET = 1.5
BATCH_SIZE = 64

EXIT_OK, EXIT_NOT_MET, EXIT_USAGE = 0, 1, 2

def threshold_grid(criterion: str) -> List[float]:
    """The thresholds tried: max-prob 0.300..0.999, entropy 0.001..0.900, in steps of 0.001."""
    if criterion == "max-prob":
        return [round(0.3 + i / 1000.0, 3) for i in range(700)]
    if criterion == "entropy":
        return [round((i + 1) / 1000.0, 3) for i in range(900)]
    raise ErdeError(f"unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")

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

def _strictness(row: ThresholdRow) -> float:
    """Larger = fewer images leave early."""
    return row.threshold if row.criterion == "max-prob" else -row.threshold

@dataclass(frozen=True)
class Choice:
    """The outcome for one target: the chosen row, or None and the closest row."""

    mode: str
    target: float  # points of accuracy (accuracy-drop) or a fraction of full MACs (mac-budget)
    final_accuracy: float  # accuracy of the last exit alone
    row: Optional[ThresholdRow]
    closest: ThresholdRow

    @property
    def met(self) -> bool:
        return self.row is not None

def choose(rows: Sequence[ThresholdRow], mode: str, target: float, final_accuracy: float,
           full_macs: float) -> Choice:
    """Pick a row for the target; rows may mix criteria."""
    if not rows:
        raise ErdeError("no thresholds to choose from")
    eps = 1e-9
    if mode == "accuracy-drop":
        floor = final_accuracy - target / 100.0
        ok = [r for r in rows if r.accuracy >= floor - eps]
        best = min(ok, key=lambda r: (r.mean_macs, -r.accuracy, -_strictness(r))) if ok else None
        closest = max(rows, key=lambda r: (r.accuracy, -r.mean_macs))
    elif mode == "mac-budget":
        budget = target * full_macs
        ok = [r for r in rows if r.mean_macs <= budget * (1 + eps)]
        best = max(ok, key=lambda r: (r.accuracy, -r.mean_macs, -_strictness(r))) if ok else None
        closest = min(rows, key=lambda r: (r.mean_macs, -r.accuracy))
    else:
        raise ErdeError(f"unknown calibration mode {mode!r}; expected one of {', '.join(MODES)}")
    return Choice(mode, float(target), float(final_accuracy), best, best or closest)

def choose_best(choices: Sequence[Choice]) -> Choice:
    """Among per-criterion choices: those that meet the target win; then fewer MACs (accuracy-drop)
    or higher accuracy (mac-budget); if none meets it, the closest of the closest."""
    met = [c for c in choices if c.met]
    if met:
        if met[0].mode == "accuracy-drop":
            return min(met, key=lambda c: (c.row.mean_macs, -c.row.accuracy))
        return max(met, key=lambda c: (c.row.accuracy, -c.row.mean_macs))
    if choices[0].mode == "accuracy-drop":
        return max(choices, key=lambda c: (c.closest.accuracy, -c.closest.mean_macs))
    return min(choices, key=lambda c: (c.closest.mean_macs, -c.closest.accuracy))

# ----------------------------------------------------------------------------------------------------------
# Data and model

@dataclass(frozen=True)
class ValidationData:
    files: List[Path]
    labels: np.ndarray  # [N] int64, positions in the manifest's class_names
    class_names: Tuple[str, ...]
    train_images: int  # images in the train split before carving the validation part
    val_fraction: float

def validation_files(data: Union[str, os.PathLike], class_names: Sequence[str],
                     val_fraction: float = DEFAULT_VAL_FRACTION) -> ValidationData:
    """The validation images of the image folder ``data`` (``data/train/<class>/*``), as training carved them."""
    folder = image_folder_split(data, "train")
    if tuple(folder.class_names) != tuple(class_names):
        raise DataError(f"{folder.root}: class folders {list(folder.class_names)} differ from the model's classes "
                        f"{list(class_names)}; pass the image folder the model was trained on")
    _, val_idx = split_indices(folder.labels, val_fraction, seed=0)
    return ValidationData([folder.files[i] for i in val_idx], folder.labels[val_idx], folder.class_names,
                          len(folder), float(val_fraction))

def validation_probs(engine, files: Sequence[Path], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Preprocess the files as erde-run does and return every exit's probabilities [E, N, K]."""
    from .preprocess import preprocess_one

    pre = engine.manifest.preprocessing
    parts = []
    for start in range(0, len(files), batch_size):
        x = np.stack([preprocess_one(p, pre) for p in files[start:start + batch_size]])
        parts.append(engine.exit_probs(x))
    return np.concatenate(parts, axis=1)

# ----------------------------------------------------------------------------------------------------------
# Writing

def table_csv(rows: Sequence[ThresholdRow], num_exits: int, chosen: Optional[ThresholdRow] = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["criterion", "threshold", "val_accuracy", "mean_macs", "macs_fraction"]
               + [f"exit_{k + 1}_share" for k in range(num_exits)] + ["chosen"])
    for r in rows:
        w.writerow([r.criterion, f"{r.threshold:.6g}", f"{r.accuracy:.6f}", f"{r.mean_macs:.1f}",
                    f"{r.macs_fraction:.6f}"] + [f"{s:.6f}" for s in r.exit_shares] + [int(r == chosen)])
    return buf.getvalue()

def store(folder: Union[str, Path], manifest: Manifest, choice: Choice, rows: Sequence[ThresholdRow],
          data: Optional[ValidationData] = None) -> Manifest:
    """Write the table, then the manifest with ``calibration`` set; return the new manifest."""
    if choice.row is None:
        raise ErdeError("refusing to store a calibration that does not meet its target")
    folder = Path(folder)
    r = choice.row
    try:
        write_atomic(folder / TABLE_NAME, table_csv(rows, manifest.num_exits, r))
    except OSError as e:
        raise ErdeError(f"{folder / TABLE_NAME}: cannot write ({e.strerror or e}); nothing was changed") from None
    cal = Calibration(criterion=r.criterion, threshold=r.threshold, mode=choice.mode, target=choice.target,
                      val_accuracy=r.accuracy, val_mean_macs=r.mean_macs, table_file=TABLE_NAME)
    metrics = dict(manifest.metrics)
    if data is not None:
        metrics["calibration_val_images"] = len(data.files)
        metrics["calibration_val_fraction"] = data.val_fraction
    metrics["calibration_val_accuracy_final_exit"] = choice.final_accuracy
    new = dataclasses.replace(manifest, calibration=cal, metrics=metrics)
    try:
        save_manifest(folder, new)
    except OSError as e:
        raise ErdeError(f"{folder / MANIFEST_NAME}: cannot write ({e.strerror or e}); the manifest is unchanged, "
                        f"{TABLE_NAME} holds the new table") from None
    return new

# ----------------------------------------------------------------------------------------------------------
# The whole job

@dataclass(frozen=True)
class Result:
    choice: Choice
    per_criterion: Dict[str, Choice]
    rows: List[ThresholdRow]
    data: ValidationData
    manifest: Manifest  # as written (unchanged if the target was not met)

def calibrate(model_dir: Union[str, os.PathLike], data: Union[str, os.PathLike], criterion: str = "both",
              mode: str = "accuracy-drop", target: float = DEFAULT_MAX_DROP_POINTS,
              val_fraction: Optional[float] = None, threads: Optional[int] = None, write: bool = True,
              batch_size: int = BATCH_SIZE) -> Result:
    """Run the model over the validation split, choose a threshold and (if met and ``write``) store it."""
    from .engine import Engine

    check_target(mode, target)
    crits = list(CRITERIA) if criterion == "both" else [criterion]
    for c in crits:
        if c not in CRITERIA:
            raise ErdeError(f"unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}, both")
    engine = Engine.load(model_dir, threads=threads)
    m = engine.manifest
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
        per[c] = choose(part, mode, target, final_acc, m.full_macs)
        rows += part
    best = choose_best(list(per.values()))
    manifest = m
    if best.met and write:
        manifest = store(engine.folder, m, best, rows, vd)
    return Result(best, per, rows, vd, manifest)

def check_target(mode: str, target: float) -> float:
    if mode not in MODES:
        raise ErdeError(f"unknown calibration mode {mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ErdeError(f"calibration target {target!r} is not a number")
    if mode == "accuracy-drop" and not 0.0 <= target <= 100.0:
        raise ErdeError(f"--max-drop {target:g} is out of range; give accuracy points in [0, 100], e.g. 0.5")
    if mode == "mac-budget" and not 0.0 < target <= MAX_MAC_BUDGET:
        raise ErdeError(f"--mac-budget {target:g} is out of range; give a fraction of the full model's MACs "
                        f"in (0, {MAX_MAC_BUDGET:g}], e.g. 0.6")
    return float(target)

def default_val_fraction(manifest: Manifest) -> float:
    """The manifest's ``source.val_fraction`` if the exporter recorded one, else 0.1 (erde-train's default)."""
    try:
        v = float(manifest.source.get("val_fraction", DEFAULT_VAL_FRACTION))
    except (TypeError, ValueError):
        return DEFAULT_VAL_FRACTION
    return v if 0 < v < 1 else DEFAULT_VAL_FRACTION

# ----------------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="erde-calibrate",
                description="Choose the exit threshold of a model folder on the validation split of its training "
                            "data, and store it in the manifest (erde-run uses it when --threshold is not given).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by erde-export")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="the image folder the model was trained on: PATH/train/<class>/*.png")
    p.add_argument("--criterion", choices=CRITERIA + ("both",), default="both",
                   help="exit rule to calibrate; both: calibrate each, keep the better (default both)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--max-drop", type=finite_number, metavar="P",
                        help="fewest MACs with val accuracy >= final exit's - P points (default 0.5)")
    target.add_argument("--mac-budget", type=finite_number, metavar="F",
                        help="most accurate threshold with mean MACs <= F x full MACs, F in (0, 1.5]")
    p.add_argument("--val-fraction", type=finite_number, default=None, metavar="F",
                   help="validation fraction used in training (default: the manifest's, else 0.1)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="onnxruntime threads (default: one per physical core)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p

def _pct(v: float) -> str:
    return f"{100.0 * v:.2f}%"

def _describe(r: ThresholdRow) -> str:
    return (f"{r.criterion} {r.threshold:g}: val accuracy {_pct(r.accuracy)}, "
            f"{100.0 * r.macs_fraction:.1f}% of full MACs")

def _target_text(c: Choice) -> str:
    if c.mode == "accuracy-drop":
        return (f"val accuracy within {c.target:g} points of the final exit's {_pct(c.final_accuracy)} "
                f"(at least {_pct(c.final_accuracy - c.target / 100.0)})")
    return f"mean MACs at most {100.0 * c.target:g}% of the full model's"

def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.mac_budget is not None:
        mode, target = "mac-budget", args.mac_budget
    else:
        mode, target = "accuracy-drop", DEFAULT_MAX_DROP_POINTS if args.max_drop is None else args.max_drop
    check_target(mode, target)
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction {args.val_fraction:g} must be in (0, 1)")
    res = calibrate(args.model_dir, args.data, args.criterion, mode, target, args.val_fraction, args.threads)
    c = res.choice
    folder = Path(args.model_dir)
    if not c.met:
        raise _NotMet(f"no threshold meets the target ({_target_text(c)}); closest: {_describe(c.closest)}; "
                      "nothing was written")
    r = c.row
    if args.json:
        d = {"model_dir": str(folder), "data": str(args.data), "val_images": len(res.data.files),
             "val_fraction": res.data.val_fraction, "final_exit_val_accuracy": c.final_accuracy,
             "calibration": dataclasses.asdict(res.manifest.calibration),
             "macs_fraction": r.macs_fraction, "exit_shares": list(r.exit_shares),
             "per_criterion": {k: (dataclasses.asdict(v.row) if v.met else None) for k, v in res.per_criterion.items()},
             "manifest": str(folder / MANIFEST_NAME), "table": str(folder / TABLE_NAME)}
        print(json.dumps(d), file=out)
        return EXIT_OK
    print(f"validation split: {len(res.data.files)} of {res.data.train_images} images in {args.data}/train "
          f"(fraction {res.data.val_fraction:g}, seed 0); final exit: {_pct(c.final_accuracy)}", file=out)
    print(f"target: {_target_text(c)}", file=out)
    for k, v in res.per_criterion.items():
        print("  " + (_describe(v.row) if v.met else f"{k}: none meets it (closest {_describe(v.closest)})"), file=out)
    shares = ", ".join(f"{100.0 * s:.0f}%" for s in r.exit_shares)
    print(f"chosen: {_describe(r)} (exits: {shares})", file=out)
    print(f"wrote {folder / MANIFEST_NAME} (calibration) and {folder / TABLE_NAME} ({len(res.rows)} thresholds)",
          file=out)
    return EXIT_OK

class _NotMet(ErdeError):
    pass

def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(lambda: _run(build_parser().parse_args(argv), sys.stdout), argv, {_NotMet: EXIT_NOT_MET})

if __name__ == "__main__":
    sys.exit(main())
