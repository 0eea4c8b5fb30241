"""Choose the CIFAR-10 student by validation accuracy at matched *measured* latency (issue 12).

    python scripts/choose_student.py --data ../shared/datasets/cifar10 --threads 1 \
        runs/cand/resnet8_ee.pt runs/cand/resnet20_w8_ee.pt runs/cand/resnet14_ee_x13.pt

For each candidate checkpoint: export it (erde-export, into --work), measure
its latency profile on this machine (erde-profile: every segment and
full.onnx at batch 1), run every exit over the validation split carved from
the training data, and sweep the max-prob threshold. Each threshold gives a
point (expected latency in ms, validation accuracy); each candidate's static
``full.onnx`` gives one more. The choice: the candidate whose early-exit curve
(upper envelope) has the highest mean validation accuracy over the latency
range every candidate covers. The test split is read only for the report's
final check, after the choice. Run it on a quiet machine: it times.

With ``--int8`` every candidate is compared as its static INT8 copy instead
(erde-quantize of the exported folder, calibrated on validation images): the
choice for a board that runs int8.

Writes --out/{README.md, curves.csv, choice.json, plot.png}.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import click
import numpy as np

from erde.export.exporter import export_checkpoint, sha256_file
from erde.runtime.common.cli import PATH, POSITIVE, command, command_line, console_script, data_option
from erde.runtime.tools import calibrate as cal
from erde.runtime.common import machine
from erde.runtime.common.datasets import image_folder_split, validation_files
from erde.runtime.core.engine import Engine
from erde.benchmarks.bench_report import figure_png
from erde.runtime.common.files import write_atomic
from erde.runtime.core.manifest import default_val_fraction, load_manifest
from erde.runtime.core.sessions import session_options
from erde.runtime.tools.profile import ProfileError, find_profile, measure, save_profile

REPO = Path(__file__).resolve().parents[1]


def candidate(spec: str, work: Path, data: Path, threads: int, calls: int, int8: bool = False) -> Dict:
    """``spec``: a checkpoint, or ``CHECKPOINT:I,J`` to export it with only the early exits after blocks I, J.
    ``int8``: measure the folder's int8 copy (``erde-quantize``) instead of the fp32 graphs."""
    path, _, exits = spec.partition(":")
    ckpt = Path(path)
    keep = tuple(int(v) for v in exits.split(",")) if exits else None
    name = ckpt.stem + (f"_x{''.join(map(str, keep))}" if keep else "")
    folder = work / (name + "_onnx")
    sha = sha256_file(ckpt)
    if not holds(folder, sha):
        export_checkpoint(ckpt, folder, force=True, exits=keep)
    if int8:
        folder = quantized(folder, work / (name + "_int8_onnx"), data, sha)
    engine = Engine.load(folder, threads=threads)
    m = engine.manifest
    try:
        prof = find_profile(folder, m, threads)
    except ProfileError:
        prof = measure(engine, calls=calls)
        save_profile(folder, prof)
    vd = validation_files(data, m.class_names, default_val_fraction(m))
    val = cal.validation_probs(engine, vd.files)
    test_folder = image_folder_split(data, "test")
    test = cal.validation_probs(engine, test_folder.files)
    cum = [s.cumulative_macs for s in m.segments]
    out = {"name": name, "arch": m.model_name, "training": training(ckpt), "exits": len(cum),
           "cumulative_macs": cum, "full_macs": m.full_macs, "segment_ms": list(prof.segment_ms),
           "cumulative_ms": list(prof.cumulative_ms),
           "full_ms": prof.full_ms, "chain_over_full": prof.cumulative_ms[-1] / prof.full_ms,
           "profile": prof.machine.describe(), "folder": str(folder.relative_to(REPO) if folder.is_relative_to(REPO)
                                                            else folder.name)}
    for split, probs, labels in (("val", val, vd.labels), ("test", test, test_folder.labels)):
        rows = cal.threshold_table(probs, labels, cum, m.full_macs, "max-prob")
        out[split] = {"exit_accuracy": [float((p.argmax(1) == labels).mean()) for p in probs],
                      "curve": [{"threshold": r.threshold, "accuracy": r.accuracy, "mean_macs": r.mean_macs,
                                 "expected_ms": prof.expected_ms(r.exit_shares), "exit_shares": list(r.exit_shares)}
                                for r in rows]}
    return out


def holds(folder: Path, checkpoint_sha256: str) -> bool:
    """Whether ``folder`` is a model folder already made from the checkpoint with this hash (then it is reused)."""
    return (folder / "manifest.json").exists() and \
        load_manifest(folder).source.get("checkpoint_sha256") == checkpoint_sha256


def quantized(folder: Path, out: Path, data: Path, checkpoint_sha256: str) -> Path:
    """``out``, the int8 copy of ``folder``, written by erde-quantize unless it already holds that checkpoint's.
    In a child process: onnxruntime's calibrator opens sessions of its own, which this process's shared thread
    pool would refuse."""
    if not holds(out, checkpoint_sha256):
        subprocess.run([sys.executable, "-m", "erde.export.quantize", "--model", str(folder), "--data", str(data),
                        "--out", str(out), "--force"], check=True, stdout=subprocess.DEVNULL)
    return out


def training(ckpt: Path) -> str:
    """How the checkpoint was trained, from its own record: loss, recipe and epochs."""
    from erde.training.checkpoint import read_checkpoint

    args = read_checkpoint(ckpt).get("train_args") or {}
    train, loss = args.get("train") or {}, args.get("loss") or {}
    return ", ".join(str(v) for v in (loss.get("name", args.get("kind", "?")), train.get("recipe", "sgd"),
                                      f"{train.get('epochs', '?')} epochs"))


def envelope(curve: List[Dict], budgets: np.ndarray, static: Optional[Dict] = None) -> np.ndarray:
    """Best accuracy with expected latency <= each budget (nan where nothing fits); ``static``, the
    candidate's full.onnx point ({"expected_ms", "accuracy"}), counts as one more way to deploy it."""
    points = list(curve) + ([static] if static else [])
    ms = np.array([p["expected_ms"] for p in points])
    acc = np.array([p["accuracy"] for p in points])
    return np.array([acc[ms <= b].max() if (ms <= b).any() else np.nan for b in budgets])


def static_point(c: Dict, split: str) -> Dict:
    return {"expected_ms": c["full_ms"], "accuracy": c[split]["exit_accuracy"][-1]}


def choose(cands: List[Dict], split: str = "val", points: int = 40) -> Dict:
    """The candidate with the highest mean accuracy over latency budgets from the fastest point every
    candidate reaches to the slowest point any candidate needs; each deploys its best way (early exit at
    some threshold, or its static full.onnx) within each budget."""
    lo = max(min(p["expected_ms"] for p in c[split]["curve"]) for c in cands)
    hi = max(max(max(p["expected_ms"] for p in c[split]["curve"]), c["full_ms"]) for c in cands)
    budgets = np.linspace(lo, hi, points)
    scores = {c["name"]: float(np.nanmean(envelope(c[split]["curve"], budgets, static_point(c, split))))
              for c in cands}
    best = max(scores, key=scores.get)
    return {"split": split, "budgets_ms": budgets.tolist(), "scores": scores, "chosen": best,
            "rule": (f"mean {split} accuracy of each candidate's best deployment (early exit at a max-prob "
                     f"threshold, or its static full.onnx) within each of {points} latency budgets from {lo:.3f} "
                     f"to {hi:.3f} ms (from the fastest point every candidate reaches to the slowest any needs); "
                     "highest wins")}


def curves_csv(cands: List[Dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["candidate", "split", "threshold", "accuracy", "expected_ms", "mean_macs"])
    for c in cands:
        for split in ("val", "test"):
            for p in c[split]["curve"][::10]:
                w.writerow([c["name"], split, f"{p['threshold']:.3f}", f"{p['accuracy']:.4f}",
                            f"{p['expected_ms']:.4f}", f"{p['mean_macs']:.0f}"])
            w.writerow([c["name"], split, "static", f"{c[split]['exit_accuracy'][-1]:.4f}", f"{c['full_ms']:.4f}",
                        c["full_macs"]])
    return buf.getvalue()


def plot(cands: List[Dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, unit in ((axes[0], "expected_ms", "expected latency per image (ms, batch 1)"),
                          (axes[1], "mean_macs", "mean MACs per image")):
        for i, c in enumerate(cands):
            col = f"C{i}"
            curve = c["test"]["curve"]
            ax.plot([p[key] for p in curve], [100 * p["accuracy"] for p in curve], color=col, label=c["name"])
            static_x = c["full_ms"] if key == "expected_ms" else c["full_macs"]
            ax.plot([static_x], [100 * c["test"]["exit_accuracy"][-1]], "s", color=col, ms=8)
        ax.set_xlabel(unit)
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Early exit (lines) vs static full.onnx (squares)")
    axes[0].legend()
    fig.tight_layout()
    write_atomic(path, figure_png(fig, dpi=110))
    return True


def readme(cands: List[Dict], choice: Dict, machine_line: str, threads: int, cmd: str,
           bundled: Optional[Dict] = None, int8: bool = False) -> str:
    L = ["# Choosing the CIFAR-10 student by measured latency" + (", as int8 copies" if int8 else ""), "",
         f"Machine: {machine_line}; onnxruntime, batch 1, {threads} thread(s). Command:", "", f"    {cmd}", ""]
    if int8:
        L += ["Every graph below is the candidate's static INT8 copy (`erde-quantize`: QDQ, per-channel int8 "
              "weights, uint8 activations, calibrated on 200 validation images), profiled and swept as it is.", ""]
    L += ["Each candidate's training (loss, recipe, epochs: from its checkpoint) is in the table; the "
          "comparison holds only as far as those match. Each is exported, profiled on this machine "
          "(`erde-profile`), and swept over max-prob thresholds on the validation split carved from the training "
          "data. Expected latency = sum over exits of (share of images leaving there) x (measured cumulative "
          "latency of that exit).", "",
          f"**Rule:** {choice['rule']}. **Chosen: `{choice['chosen']}`.**", "",
          "| candidate | training | exits | full MACs | full.onnx ms | all segments / full.onnx | val acc per exit | "
          "score (val) |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for c in cands:
        acc = " / ".join(f"{100 * a:.1f}" for a in c["val"]["exit_accuracy"])
        L.append(f"| `{c['name']}` ({c['arch']}) | {c.get('training', '?')} | {c['exits']} | "
                 f"{c['full_macs'] / 1e6:.1f} M | {c['full_ms']:.3f} | {c['chain_over_full']:.2f}x | {acc} | "
                 f"{100 * choice['scores'][c['name']]:.2f}% |")
    L += ["", "Per exit: cumulative latency (ms) and MACs, from each candidate's profile:", ""]
    for c in cands:
        L.append(f"- `{c['name']}`: " + ", ".join(f"exit {k + 1} {ms:.3f} ms / {macs / 1e6:.1f} M"
                                                    for k, (ms, macs) in enumerate(zip(c["cumulative_ms"],
                                                                                       c["cumulative_macs"]))))
    L += ["", "Test split, read only after the choice: static full.onnx of each candidate against the chosen "
          "student's early-exit curve (the best test accuracy it reaches at or below that latency):", "",
          "| static point | full.onnx ms | test acc | chosen student, best test acc at <= that latency |",
          "|---|---:|---:|---:|"]
    chosen = next(c for c in cands if c["name"] == choice["chosen"])
    for c in cands:
        env = envelope(chosen["test"]["curve"], np.array([c["full_ms"]]))[0]
        L.append(f"| `{c['name']}` | {c['full_ms']:.3f} | {100 * c['test']['exit_accuracy'][-1]:.2f}% | "
                 + ("none (slower)" if np.isnan(env) else f"{100 * env:.2f}%") + " |")
    if bundled is not None:
        acc = " / ".join(f"{100 * a:.1f}" for a in bundled["val"]["exit_accuracy"])
        L += ["", f"The student trained for the choice, `{bundled['name']}` (val accuracy per exit {acc}; full.onnx "
              f"{bundled['full_ms']:.3f} ms), against every candidate's static point on the test split:", "",
              "| static point | full.onnx ms | test acc | this student, best test acc at <= that latency | above? |",
              "|---|---:|---:|---:|---|"]
        for c in cands:
            env = envelope(bundled["test"]["curve"], np.array([c["full_ms"]]))[0]
            static = c["test"]["exit_accuracy"][-1]
            L.append(f"| `{c['name']}` | {c['full_ms']:.3f} | {100 * static:.2f}% | "
                     + ("none (slower)" if np.isnan(env) else f"{100 * env:.2f}%")
                     + f" | {'yes' if not np.isnan(env) and env > static else 'no'} |")
    L += ["", "Files: `curves.csv` (every 10th threshold and the static points), `choice.json`, `plot.png`."]
    return "\n".join(L) + "\n"


@command("python scripts/choose_student.py")
@click.argument("checkpoints", nargs=-1, required=True)
@data_option(True, "CIFAR-10 image folder")
@click.option("--threads", type=POSITIVE, default=1, help="onnxruntime threads (default 1).")
@click.option("--calls", type=POSITIVE, default=3000, help="Timed calls per graph (default 3000).")
@click.option("--bundled", help="The student trained for the chosen candidate (CHECKPOINT[:I]): reported against every "
                                "candidate's static point, not part of the choice.")
@click.option("--int8", is_flag=True, help="Compare the candidates' int8 copies (erde-quantize).")
@click.option("--work", type=PATH, default=REPO / "runs" / "choice")
@click.option("--out", type=PATH, default=REPO / "benchmarks" / "results" / "student-choice")
def cli(**kw) -> int:
    """Choose the student to bundle: CHECKPOINTS (CHECKPOINT:I keeps only the early exit after block I) exported,
    measured and compared on accuracy against latency."""
    args = SimpleNamespace(**kw)
    session_options(threads=args.threads)  # the process's shared pool at the measured thread count, before exports
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cands = [candidate(c, args.work, args.data, args.threads, args.calls, args.int8) for c in args.checkpoints]
    choice = choose(cands)
    bundled = (candidate(args.bundled, args.work, args.data, args.threads, args.calls, args.int8)
               if args.bundled else None)
    cmd = command_line()
    write_atomic(args.out / "choice.json", json.dumps({"choice": choice, "candidates": [
        {k: v for k, v in c.items() if k not in ("val", "test")} | {"val_exit_accuracy": c["val"]["exit_accuracy"],
                                                                     "test_exit_accuracy": c["test"]["exit_accuracy"]}
        for c in cands]}, indent=2) + "\n")
    write_atomic(args.out / "curves.csv", curves_csv(cands))
    plot(cands, args.out / "plot.png")
    write_atomic(args.out / "README.md", readme(cands, choice, machine.describe(), args.threads, cmd, bundled, args.int8))
    print(f"chosen: {choice['chosen']} ({json.dumps(choice['scores'])}); wrote {args.out}")
    return 0


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
