"""The CIFAR-10 study: ERDE against KD and CE students, test accuracy against mean MACs.

One command runs it from data to report; every step that is already done is reused,
so the study can span several sessions (training steps resume from their checkpoints):

    python scripts/cifar10_study.py --data ../shared/datasets/cifar10 --budget cpu

Steps: train the teacher; choose beta (the entropy weight) on the validation split with
short ERDE runs; train four students with the same architecture, seed and schedule that
differ only in the loss (ce, kd, erde, and erde with beta = 0: masked KD without the entropy
term); export every model; evaluate each on the test split with the ONNX Runtime engine
at a grid of thresholds; write the report to benchmarks/results/cifar10/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from study_report import write_report
from erde.runtime.cliargs import Parser, positive_int, run_cli
from erde.runtime.criteria import exit_indices, sweep
from erde.runtime.datasets import cache_dir
from erde.runtime.errors import ErdeError
from erde.runtime.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = {
    "max-prob": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
    "entropy": (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001),
}


@dataclass(frozen=True)
class Budget:
    teacher_arch: str
    student_arch: str
    teacher_epochs: int
    student_epochs: int
    tune_epochs: int  # short ERDE runs that choose beta on the validation split
    tune_limit: int  # training images for those runs
    beta_grid: Tuple[float, ...]
    alpha: float = 1.0
    temperature: float = 4.0
    seed: int = 0


BUDGETS: Dict[str, Budget] = {
    # About 1.5-2 hours on 2 CPU cores.
    "cpu": Budget("resnet32_ee", "resnet20_w8_ee", teacher_epochs=10, student_epochs=8, tune_epochs=3,
                  tune_limit=10000, beta_grid=(0.25, 0.5, 1.0)),
    # A paper-length schedule, for a GPU (erde-train --device cuda).
    "full": Budget("resnet56_ee", "resnet20_ee", teacher_epochs=160, student_epochs=160, tune_epochs=30,
                   tune_limit=45000, beta_grid=(0.1, 0.25, 0.5, 1.0, 2.0)),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _finished(ckpt: Path, arch: str, epochs: int, seed: int) -> bool:
    """Whether ``ckpt`` is a finished run of this step; a finished run of other settings is an error."""
    if not ckpt.exists():
        return False
    import torch

    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not c.get("progress", {}).get("finished"):
        return False
    args = c.get("train_args", {})
    have = (args.get("arch"), args.get("train", {}).get("epochs"), args.get("train", {}).get("seed"))
    if have != (arch, epochs, seed):
        raise ErdeError(f"{ckpt}: a finished run of (arch, epochs, seed) = {have}, this budget wants "
                        f"{(arch, epochs, seed)}; use another --work folder or remove the file")
    return True


def train_seconds(ckpt: Path) -> float:
    """Training time summed over the epochs recorded in the checkpoint (whoever ran them)."""
    import torch

    history = torch.load(ckpt, map_location="cpu", weights_only=True).get("metrics", {}).get("history", [])
    return round(sum(h.get("epoch_seconds", 0.0) for h in history), 1)


def _erde(tool: str, *args) -> None:
    cmd = [str(Path(sys.executable).parent / tool), *map(str, args)]
    _log(" ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise ErdeError(f"step failed ({tool} exited {r.returncode}); fix the cause and rerun the study: "
                        "finished steps are reused and training resumes from its last epoch")


class Timings:
    """Wall time of each step, kept across sessions in the work folder."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, fn) -> None:
        t0 = time.time()
        fn()
        self.data[name] = round(self.data.get(name, 0.0) + time.time() - t0, 1)
        write_json_atomic(self.path, self.data)


def train_step(kind: str, out: Path, data: Path, arch: str, epochs: int, seed: int, extra: Sequence = ()) -> None:
    if _finished(out, arch, epochs, seed):
        _log(f"reusing {out}")
        return
    _erde("erde-train", kind, "--data", data, "--out", out, "--arch", arch, "--epochs", epochs, "--seed", seed,
          "--quiet", "--resume", *extra)


def student_args(budget: Budget, teacher: Path, loss: str, beta: float) -> List:
    return ["--teacher", teacher, "--loss", loss, "--alpha", budget.alpha, "--beta", beta,
            "--temperature", budget.temperature]


def choose_beta(budget: Budget, work: Path, data: Path, teacher: Path) -> Dict:
    """Short ERDE runs on the training split, scored on the validation split (never the test split)."""
    choice_file = work / "beta_choice.json"
    if choice_file.exists():
        return json.loads(choice_file.read_text())
    from erde.training.cli import evaluate_checkpoint

    curves = {}
    for beta in budget.beta_grid:
        out = work / "tune" / f"erde_beta{beta:g}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        train_step("student", out, data, budget.student_arch, budget.tune_epochs, budget.seed,
                   student_args(budget, teacher, "erde", beta) + ["--limit", budget.tune_limit])
        r = evaluate_checkpoint(out, data, "val", ["max-prob"], ",".join(map(str, THRESHOLDS["max-prob"])))
        curves[beta] = [(p["mean_macs"], p["accuracy"]) for p in r["sweeps"]["max-prob"]]
    lo = max(min(m for m, _ in c) for c in curves.values())
    hi = min(max(m for m, _ in c) for c in curves.values())
    scores = {str(b): mean_accuracy_over(c, lo, hi) for b, c in curves.items()}
    best = max(budget.beta_grid, key=lambda b: scores[str(b)])
    choice = {"beta": best, "scores": scores, "mac_range": [lo, hi],
              "rule": (f"ERDE students trained for {budget.tune_epochs} epochs on the first {budget.tune_limit} "
                       "training images for each beta; score = validation accuracy (max-prob criterion) averaged "
                       "over the range of mean MACs that every candidate reaches (linear interpolation); the "
                       "highest score wins. alpha and T are fixed (alpha=1, T=4)."),
              "curves": {str(b): c for b, c in curves.items()}}
    write_json_atomic(choice_file, choice)
    return choice


def mean_accuracy_over(curve: Sequence[Tuple[float, float]], lo: float, hi: float, steps: int = 50) -> float:
    """Average of the accuracy-vs-MACs curve between lo and hi MACs (linear interpolation)."""
    pts = sorted(curve)
    macs = np.array([m for m, _ in pts])
    acc = np.array([a for _, a in pts])
    if hi <= lo:
        return float(np.interp(lo, macs, acc))
    return float(np.mean(np.interp(np.linspace(lo, hi, steps), macs, acc)))


def test_split_exit_probs(model_dir: Path, images: List[Path], threads: int) -> np.ndarray:
    """Every exit's probabilities [E,N,K] on the test images, computed by ONNX Runtime segment graphs."""
    from erde.runtime.engine import Engine
    from erde.runtime.preprocess import preprocess

    engine = Engine.load(model_dir, threads=threads)
    pre = engine.manifest.preprocessing
    out = []
    for start in range(0, len(images), 500):
        x = preprocess(images[start:start + 500], pre)
        out.append(engine.exit_probs(x))
    probs = np.concatenate(out, axis=1)
    # The engine's own early-exit path must agree with the sweep computed from these probabilities.
    x = preprocess(images[:256], pre)
    for t in (0.5, 0.9):
        preds = engine.predict_array(x, threshold=t, criterion="max-prob")
        expected = exit_indices(probs[:, :256], "max-prob", t)
        if [p.exit_index for p in preds] != expected.tolist():
            raise ErdeError(f"{model_dir}: engine exits differ from the all-exit sweep at t={t}")
    return probs


def evaluate(model_dir: Path, name: str, test: Tuple[List[Path], np.ndarray], cache: Path,
             threads: int) -> Dict:
    if cache.exists():
        return json.loads(cache.read_text())
    from erde.runtime.manifest import load_manifest

    images, labels = test
    probs = test_split_exit_probs(model_dir, images, threads)
    m = load_manifest(model_dir)
    cum = [s.cumulative_macs for s in m.segments]
    result = {"method": name, "exit_accuracy": [float((p.argmax(1) == labels).mean()) for p in probs],
              "cumulative_macs": cum, "full_macs": m.full_macs,
              "points": [{"criterion": p.criterion, "threshold": p.threshold, "accuracy": p.accuracy,
                          "mean_macs": p.mean_macs, "exit_shares": list(p.exit_shares)}
                         for criterion, grid in THRESHOLDS.items()
                         for p in sweep(probs, labels, cum, m.full_macs, criterion, grid)]}
    write_json_atomic(cache, result)
    return result


def load_test_split(data: Path) -> Tuple[List[Path], np.ndarray, List[str]]:
    """The test split of an image folder: files, labels and class names (``datasets.image_folder_split``)."""
    from erde.runtime.datasets import image_folder_split

    test = image_folder_split(data, "test")
    return list(test.files), test.labels, list(test.class_names)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _seed_list(text: str) -> List[int]:
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as comma-separated integers, e.g. 0,1") from None
    if len(set(seeds)) != len(seeds) or any(v < 0 for v in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct non-negative integers")
    return seeds


def student_name(method: str, seed: int, budget: Budget) -> str:
    """File stem of a student; the budget's own seed keeps the plain name, so earlier runs are reused."""
    return method if seed == budget.seed else f"{method}_seed{seed}"


def main(argv: Sequence[str] = None) -> int:
    ap = Parser(prog="python scripts/cifar10_study.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=os.environ.get("ERDE_DATA"),
                    help="CIFAR-10 image folder with train/ and test/ (env ERDE_DATA)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--work", type=Path, default=None,
                    help="checkpoints and model folders (default $ERDE_CACHE/study/cifar10-BUDGET, "
                         "outside the checkout so that a fresh checkout can resume the study)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "cifar10")
    ap.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime threads for the evaluation")
    ap.add_argument("--seeds", type=_seed_list, default=None,
                    help="student seeds, comma-separated, e.g. 0,1 (default: the budget's seed); every student "
                         "is trained once per seed from the one teacher, and the report shows the spread")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")

    def run() -> int:
        args = ap.parse_args(argv)
        if args.data is None or not (Path(args.data) / "train").is_dir():
            raise ErdeError(f"--data {args.data}: not a CIFAR-10 image folder with train/ and test/")
        run_study(args, " ".join(["python scripts/cifar10_study.py"] + list(argv or sys.argv[1:])))
        return 0

    return run_cli(run, argv)


def run_study(args, command: str) -> None:
    budget = BUDGETS[args.budget]
    data = Path(args.data).resolve()
    work = (args.work or cache_dir() / "study" / f"cifar10-{args.budget}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings = Timings(work / "timings.json")
    teacher = work / "teacher.pt"
    timings.run("train teacher", lambda: train_step("teacher", teacher, data, budget.teacher_arch,
                                                    budget.teacher_epochs, budget.seed))
    choice = {}
    timings.run("choose beta (validation)", lambda: choice.update(choose_beta(budget, work, data, teacher)))
    _log(f"beta = {choice['beta']} (validation scores {choice['scores']})")
    students = {
        "ce": student_args(budget, teacher, "ce", 0.0),
        "kd": student_args(budget, teacher, "kd", 0.0),
        "erde": student_args(budget, teacher, "erde", choice["beta"]),
        "erde_beta0": student_args(budget, teacher, "erde", 0.0),
    }
    seeds = args.seeds or [budget.seed]
    models = {"teacher": ("teacher", budget.seed, teacher)}  # stem: (method, seed, checkpoint)
    for seed in seeds:
        for method, extra in students.items():
            stem = student_name(method, seed, budget)
            ckpt = work / f"student_{stem}.pt"
            timings.run(f"train student {stem}", lambda c=ckpt, e=extra, sd=seed: train_step(
                "student", c, data, budget.student_arch, budget.student_epochs, sd, e))
            models[stem] = (method, seed, ckpt)
    for stem, (_, _, ckpt) in models.items():
        out = work / f"{stem}_onnx"
        if not (out / "manifest.json").exists():
            timings.run(f"export {stem}", lambda c=ckpt, o=out: _erde("erde-export", c, "--out", o))
    images, labels, _ = load_test_split(data)
    results = []
    for stem, (method, seed, _) in models.items():
        timings.run(f"evaluate {stem} (test, ONNX Runtime)", lambda s=stem, m=method: results.append(
            evaluate(work / f"{s}_onnx", m, (images, labels), work / f"eval_{s}.json", args.threads)))
        results[-1]["seed"] = seed
    meta = {"budget": args.budget, "budget_config": asdict(budget), "beta_choice": choice, "machine": machine(),
            "git_commit": git_commit(), "command": command, "timings_s": timings.data,
            "train_seconds_from_checkpoints": {s: train_seconds(c) for s, (_, _, c) in models.items()},
            "test_images": int(len(labels)), "seeds": seeds}
    write_report(args.results, results, meta)
    _log(f"report written to {args.results}")


if __name__ == "__main__":
    sys.exit(main())
