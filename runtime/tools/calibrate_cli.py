"""erde-calibrate: the command line of ``erde.runtime.tools.calibrate`` (see there for the method).

Exit codes: 0 calibrated; 1 no threshold meets the target (nothing written;
the closest threshold is named); 2 nothing could run (bad option, model
folder, data, or a latency budget without a profile of this machine).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import click

from .calibrate import (DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP_POINTS, EXIT_NOT_MET, EXIT_OK, TABLE_NAME, Choice,
                        Result, ThresholdRow, calibrate, check_confidence, check_target, latency_cost)
from ..common.cli import (FINITE, PATH, UsageError, command, data_option, console_script, exclusive, force_option, json_option,
                          model_option, no_verify_option, threads_option)
from .run_cli import model_folder
from ..common.errors import ErdeError
from ..core.criteria import RULES, show
from ..core.manifest import CRITERIA, MANIFEST_NAME, load_manifest
from ..common.ownership import MODEL_TOOLS, build_folder, check_replaceable
from ..core.selftest import SELFTEST_NAME


@command("erde-calibrate")
@model_option
@data_option(True, "The image folder the model was trained on (PATH/train/<class>/*)")
@click.option("--criterion", type=click.Choice(CRITERIA + ("all",)), default="all",
              help="Exit rule to calibrate (" + "; ".join(RULES.values()) + "); all: calibrate each, keep the best "
                   "(default all).")
@click.option("--max-drop", type=FINITE, metavar="P",
              help="Lowest cost (expected latency with a profile, else MACs) losing at most P points of val accuracy "
                   "against the final exit (default 0.5), at --confidence.")
@click.option("--mac-budget", type=FINITE, metavar="F",
              help="Most accurate threshold with mean MACs <= F x full MACs, F in (0, 1.5].")
@click.option("--budget-ms", type=FINITE, metavar="MS",
              help="Most accurate threshold whose expected batch-1 latency on this machine is at most MS "
                   "milliseconds (needs a latency profile: erde-profile --model DIR --threads N).")
@click.option("--confidence", type=FINITE, default=DEFAULT_CONFIDENCE, metavar="C",
              help="With --max-drop: the drop's one-sided upper bound at level C (paired over the validation images) "
                   f"must stay within P; 0.5 = the point estimate (default {DEFAULT_CONFIDENCE:g}).")
@click.option("--same-threshold", is_flag=True,
              help="Keep one threshold for every early exit (default: then give each early exit its own, where "
                   "that lowers the cost within the target; shown as exit 1/exit 2/...).")
@click.option("--val-fraction", type=FINITE, default=None, metavar="F",
              help="Validation fraction used in training (default: the manifest's, else 0.1).")
@threads_option
@click.option("--unsure-coverage", type=FINITE, metavar="C",
              help="Also choose a confidence floor below which erde-run answers \"unsure\": the highest one that "
                   "still answers a share C of the validation images, e.g. 0.9.")
@click.option("--unsure-accuracy", type=FINITE, metavar="A",
              help="The same, as the lowest floor whose answered validation images are at least A right.")
@click.option("--out", type=PATH, metavar="DIR", help="Write a calibrated copy of the model folder there instead of "
              "changing it (needed for the bundled model and for read-only folders).")
@force_option
@json_option("the result")
@no_verify_option
def cli(**kw) -> int:
    """Choose the exit threshold of a model folder on the validation split of its training data, and store it in
    the manifest (erde-run uses it when --threshold is not given)."""
    exclusive(max_drop=kw["max_drop"], mac_budget=kw["mac_budget"], budget_ms=kw["budget_ms"])
    exclusive(unsure_coverage=kw["unsure_coverage"], unsure_accuracy=kw["unsure_accuracy"])
    args = SimpleNamespace(**kw)
    args.json = args.as_json
    return _run(args, sys.stdout)


def _pct(v: float) -> str:
    return f"{100.0 * v:.2f}%"

def _describe(r: ThresholdRow, profile=None) -> str:
    ms = f", expected {latency_cost(profile)(r):.3f} ms" if profile else ""
    return (f"{r.criterion} {show(r.threshold)}: val accuracy {_pct(r.accuracy)}, "
            f"{100.0 * r.macs_fraction:.1f}% of full MACs{ms}")

def _target_text(c: Choice) -> str:
    if c.mode == "accuracy-drop":
        bound = "" if c.confidence == 0.5 else f", the drop's {c.confidence:g} upper confidence bound"
        return (f"val accuracy within {c.target:g} points of the final exit's {_pct(c.final_accuracy)} "
                f"(at least {_pct(c.final_accuracy - c.target / 100.0)}{bound})")
    if c.mode == "latency-budget":
        return f"expected latency at most {c.target:g} ms per image"
    return f"mean MACs at most {100.0 * c.target:g}% of the full model's"

def _run(args: SimpleNamespace, out: TextIO) -> int:
    if args.mac_budget is not None:
        mode, target = "mac-budget", args.mac_budget
    elif args.budget_ms is not None:
        mode, target = "latency-budget", args.budget_ms
    else:
        mode, target = "accuracy-drop", DEFAULT_MAX_DROP_POINTS if args.max_drop is None else args.max_drop
    check_target(mode, target)
    check_confidence(args.confidence)
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction {args.val_fraction:g} must be in (0, 1)")
    def run(folder) -> Result:
        return calibrate(folder, args.data, args.criterion, mode, target, args.val_fraction, args.threads,
                         confidence=args.confidence, verify=not args.no_verify, unsure=unsure,
                         per_exit=not args.same_threshold)

    unsure = (("coverage", args.unsure_coverage) if args.unsure_coverage is not None else
              ("accuracy", args.unsure_accuracy) if args.unsure_accuracy is not None else None)
    if unsure is not None and not 0 < unsure[1] <= 1:
        raise UsageError(f"--unsure-{unsure[0]} {unsure[1]:g} must be a fraction in (0, 1], e.g. 0.9")
    folder = model_folder(args.model)
    if args.out is None:
        res = run(folder)
    else:
        res = calibrated_copy(folder, Path(args.out), args.force, run)
        folder = Path(args.out)
    c = res.choice
    if not c.met:
        raise _NotMet(f"no threshold meets the target ({_target_text(c)}); closest: {_describe(c.closest, res.profile)}; "
                      "nothing was written")
    r = c.row
    if args.json:
        d = {"model_dir": str(folder), "data": str(args.data), "val_images": len(res.data.files),
             "val_fraction": res.data.val_fraction, "final_exit_val_accuracy": c.final_accuracy,
             "calibration": dataclasses.asdict(res.manifest.calibration),
             "unsure": res.manifest.unsure.to_dict() if res.manifest.unsure else None,
             "macs_fraction": r.macs_fraction, "exit_shares": list(r.exit_shares),
             "per_criterion": {k: (dataclasses.asdict(v.row) if v.met else None) for k, v in res.per_criterion.items()},
             "manifest": str(folder / MANIFEST_NAME), "table": str(folder / TABLE_NAME),
             "profile": res.profile.machine.describe() if res.profile else None, "profile_note": res.profile_note}
        print(json.dumps(d), file=out)
        return EXIT_OK
    print(f"validation split: {len(res.data.files)} of {res.data.train_images} images in {args.data}/train "
          f"(fraction {res.data.val_fraction:g}, seed 0); final exit: {_pct(c.final_accuracy)}", file=out)
    print(f"target: {_target_text(c)}", file=out)
    if res.profile:
        print(f"cost: expected latency from the profile of {res.profile.machine.describe()}", file=out)
    else:
        print(f"cost: mean MACs ({res.profile_note})", file=out)
    for k, v in res.per_criterion.items():
        print("  " + (_describe(v.row, res.profile) if v.met
                      else f"{k}: none meets it (closest {_describe(v.closest, res.profile)})"), file=out)
    shares = ", ".join(f"{100.0 * s:.0f}%" for s in r.exit_shares)
    print(f"chosen: {_describe(r, res.profile)} (exits: {shares})", file=out)
    u = res.manifest.unsure
    if u is not None:
        print(f"unsure below confidence {u.floor:.3f} ({u.target} target {u.target_value:g}): validation images "
              f"answered {_pct(u.val_coverage)}, accuracy on them {_pct(u.val_accuracy_answered)}", file=out)
    print(f"wrote {folder / MANIFEST_NAME} (calibration) and {folder / TABLE_NAME} ({len(res.rows)} thresholds)",
          file=out)
    return EXIT_OK

def calibrated_copy(model_dir: Path, out: Path, force: bool, run) -> Result:
    """``run(folder)`` (a calibration) on a copy of the model folder's files, written to ``out`` only if it
    met its target; the source folder is only read."""
    m = load_manifest(model_dir)
    check_replaceable(out, force, "erde-calibrate", MODEL_TOOLS, protect=[model_dir])
    names = [s.file for s in m.segments] + ([m.full.file] if m.full else [])
    names += [m.early_exit_graph.file] if m.early_exit_graph else []
    names += [n for n in (MANIFEST_NAME, "latency_profile.json", SELFTEST_NAME) if (Path(model_dir) / n).is_file()]

    class Unmet(Exception):  # nothing is written when the target is not met
        pass

    def build(tmp: Path) -> Result:
        for name in names:
            shutil.copyfile(Path(model_dir) / name, tmp / name)
        res = run(tmp)
        if not res.choice.met:
            raise Unmet(res)
        return res

    try:
        return build_folder(out, force, "erde-calibrate", MODEL_TOOLS, build, protect=[model_dir])
    except Unmet as e:
        return e.args[0]


class _NotMet(ErdeError):
    exit_code = EXIT_NOT_MET

main = console_script(cli)

if __name__ == "__main__":
    sys.exit(main())
