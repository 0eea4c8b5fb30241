"""The CIFAR-10 study: ERDE against KD and CE students, test accuracy against latency and MACs.

One command runs it from data to report; every step that is already done is reused,
so the study can span several sessions (training steps resume from their checkpoints):

    python scripts/cifar10_study.py --data ../shared/datasets/cifar10 --budget airbench

Steps: train the teacher; choose beta (the entropy weight) on the validation split with
short ERDE runs; train four students per seed with the same architecture and schedule that
differ only in the loss (ce, kd, erde, and erde with beta = 0: masked KD without the entropy
term); export every model; measure each model's latency profile (batch 1, ``--profile-threads``);
evaluate each on the test split with the ONNX Runtime engine at a grid of thresholds; write
the report to benchmarks/results/<budget's folder>/.

Finished runs are kept in the results folder as compact checkpoints (``study_checkpoints``):
a fresh clone reuses those whose hash, config and teacher match, and trains the rest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from study_checkpoints import CommittedCheckpoints, defining_args, sha256
from study_eval import REPO, THRESHOLDS, evaluate, git_commit, latency_profile, load_test_split, machine
from study_report import write_report
import click

from erde.runtime.common.cli import PATH, POSITIVE, command, command_line, console_script, data_option
from erde.runtime.common.datasets import cache_dir
from erde.runtime.common.errors import ErdeError
from erde.runtime.common.files import write_json_atomic


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
    recipe: str = "sgd"  # erde-train --recipe
    results: str = "cifar10"  # folder under benchmarks/results
    seeds: Tuple[int, ...] = (0,)  # student seeds when --seeds is not given
    batch_size: Optional[int] = None  # None: the recipe's
    teacher_results: Optional[str] = None  # another study's results folder whose committed teacher this one shares


BUDGETS: Dict[str, Budget] = {
    # Study v1: about 1.5-2 hours on 2 CPU cores.
    "cpu": Budget("resnet32_ee", "resnet20_w8_ee", teacher_epochs=10, student_epochs=8, tune_epochs=3,
                  tune_limit=10000, beta_grid=(0.25, 0.5, 1.0)),
    # Study v2: the airbench recipe; teacher about 35 minutes, each distilled student about 12, on 2 CPU cores.
    "airbench": Budget("air94_ee", "air32_ee", teacher_epochs=15, student_epochs=10, tune_epochs=3,
                       tune_limit=45000, beta_grid=(0.25, 0.5, 1.0), recipe="airbench", results="cifar10-v2",
                       seeds=(0, 1)),
    # Study v3: v2's teacher; the student chosen by measured latency (student-choice-v3): 7-12 minutes each here.
    "airbench-wide": Budget("air94_ee", "air32w_ee", teacher_epochs=15, student_epochs=10, tune_epochs=3,
                            tune_limit=45000, beta_grid=(0.25, 0.5, 1.0), recipe="airbench", results="cifar10-v3",
                            seeds=(0, 1), teacher_results="cifar10-v2"),
    # A paper-length schedule, for a GPU (erde-train --device cuda).
    "full": Budget("resnet56_ee", "resnet20_ee", teacher_epochs=160, student_epochs=160, tune_epochs=30,
                   tune_limit=45000, beta_grid=(0.1, 0.25, 0.5, 1.0, 2.0)),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Step:
    """One training run of the study: what erde-train is told, and so what its checkpoint must record."""

    kind: str  # "teacher" or "student"
    arch: str
    epochs: int
    seed: int
    recipe: str
    loss: str = "ce"
    alpha: float = 1.0
    beta: float = 0.0
    temperature: float = 4.0
    limit: Optional[int] = None
    batch_size: Optional[int] = None  # None: the recipe's

    def args(self) -> Dict:
        """The defining train_args erde-train will store (see study_checkpoints.DEFINING)."""
        from erde.training.losses import LossConfig
        from erde.training.run import train_config

        tcfg, smoothing = train_config(self.recipe, self.seed, epochs=self.epochs, batch_size=self.batch_size)
        if self.kind == "teacher":
            lcfg = LossConfig("ce", label_smoothing=smoothing)
        else:
            lcfg = LossConfig(self.loss, self.alpha, self.beta, self.temperature, (), smoothing)
        return defining_args({"kind": self.kind, "arch": self.arch, "exits": None, "limit": self.limit,
                              "val_fraction": 0.1, "train": asdict(tcfg), "loss": lcfg.to_dict()})

    def command(self, data: Path, out: Path, teacher: Optional[Path]) -> List:
        cmd = [self.kind, "--data", data, "--out", out, "--arch", self.arch, "--recipe", self.recipe,
               "--epochs", self.epochs, "--seed", self.seed, "--quiet", "--resume"]
        if self.kind == "student":
            cmd += ["--teacher", teacher, "--loss", self.loss, "--alpha", self.alpha, "--beta", self.beta,
                    "--temperature", self.temperature]
        if self.limit:
            cmd += ["--limit", self.limit]
        if self.batch_size:
            cmd += ["--batch-size", self.batch_size]
        return cmd


def _finished(ckpt: Path, want: Dict) -> bool:
    """Whether ``ckpt`` is a finished run of this step; a finished run of other settings is an error."""
    if not ckpt.exists():
        return False
    import torch

    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    have = defining_args(c.get("train_args", {}))
    if c.get("progress", {}).get("finished") and have != want:
        changed = [k for k in want if have.get(k) != want[k]]
        raise ErdeError(f"{ckpt}: a finished run whose {', '.join(changed)} differ from this study's; "
                        "use another --work folder or remove the file")
    return bool(c.get("progress", {}).get("finished"))


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


def train_step(step: Step, out: Path, data: Path, teacher: Optional[Path] = None) -> None:
    if _finished(out, step.args()):
        _log(f"reusing {out}")
        return
    _erde("erde-train", *step.command(data, out, teacher))


def obtain(store: Optional[CommittedCheckpoints], work: Path, name: str, step: Step, data: Path,
           teacher: Optional[Path]) -> Path:
    """The finished checkpoint of ``step``: committed and matching, or trained (resuming) and then committed."""
    final = work / f"{name}.pt"
    t_sha = sha256(teacher) if teacher else None
    want = step.args()
    if store is None:
        train_step(step, final, data, teacher)
        return final
    if store.reuse(name, want, t_sha, final):
        return final
    run = work / "runs" / f"{name}.pt"
    run.parent.mkdir(parents=True, exist_ok=True)
    train_step(step, run, data, teacher)
    committed = store.folder / f"{name}.pt"
    store.folder.mkdir(parents=True, exist_ok=True)
    _erde("erde-train", "compact", run, committed, "--force")
    store.commit(name, committed, want, t_sha)
    shutil.copyfile(committed, final)
    return final


def choose_beta(budget: Budget, work: Path, data: Path, teacher: Path, results: Path) -> Dict:
    """Short ERDE runs on the training split, scored on the validation split (never the test split).

    The choice is kept in the results folder with the teacher's sha256 and the tuning settings, and
    reused only when both match.
    """
    choice_file = results / "beta_choice.json"
    settings = {"teacher_sha256": sha256(teacher), "tune_epochs": budget.tune_epochs,
                "tune_limit": budget.tune_limit, "beta_grid": list(budget.beta_grid), "recipe": budget.recipe,
                "student_arch": budget.student_arch}
    if choice_file.exists():
        choice = json.loads(choice_file.read_text())
        if choice.get("settings") == settings:
            return choice
        _log(f"not reusing {choice_file}: it was made with other settings or another teacher; choosing again")
    from erde.training.cli import evaluate_checkpoint

    curves = {}
    for beta in budget.beta_grid:
        out = work / "tune" / f"erde_beta{beta:g}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        step = Step("student", budget.student_arch, budget.tune_epochs, budget.seed, budget.recipe, "erde",
                    budget.alpha, beta, budget.temperature, budget.tune_limit, budget.batch_size)
        train_step(step, out, data, teacher)
        r = evaluate_checkpoint(out, data, "val", ["max-prob"], ",".join(map(str, THRESHOLDS["max-prob"])))
        curves[beta] = [(p["mean_macs"], p["accuracy"]) for p in r["sweeps"]["max-prob"]]
    lo = max(min(m for m, _ in c) for c in curves.values())
    hi = min(max(m for m, _ in c) for c in curves.values())
    scores = {str(b): mean_accuracy_over(c, lo, hi) for b, c in curves.items()}
    best = max(budget.beta_grid, key=lambda b: scores[str(b)])
    choice = {"beta": best, "scores": scores, "mac_range": [lo, hi], "settings": settings,
              "rule": (f"ERDE students trained for {budget.tune_epochs} epochs on the first {budget.tune_limit} "
                       "training images for each beta; score = validation accuracy (max-prob criterion) averaged "
                       "over the range of mean MACs that every candidate reaches (linear interpolation); the "
                       f"highest score wins. alpha and T are fixed (alpha={budget.alpha:g}, "
                       f"T={budget.temperature:g})."),
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


def _budget(name: str) -> str:
    if name not in BUDGETS:
        raise click.BadParameter(f"{name!r} is not one of {', '.join(sorted(BUDGETS))}")
    return name


def _seed_list(text: str) -> List[int]:
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise ErdeError(f"{text!r}: give seeds as comma-separated integers, e.g. 0,1") from None
    if len(set(seeds)) != len(seeds) or any(v < 0 for v in seeds):
        raise ErdeError(f"{text!r}: seeds must be distinct non-negative integers")
    return seeds


def student_name(method: str, seed: int, budget: Budget) -> str:
    """File stem of a student; the budget's own seed keeps the plain name, so earlier runs are reused."""
    return method if seed == budget.seed else f"{method}_seed{seed}"


@command("python scripts/cifar10_study.py")
@data_option(False, "CIFAR-10 image folder with train/ and test/")
@click.option("--budget", default="airbench", callback=lambda ctx, param, v: _budget(v),
              help="The study's size: " + ", ".join(sorted(BUDGETS)) + " (default airbench).")
@click.option("--work", type=PATH, default=None,
              help="Checkpoints and model folders (default $ERDE_CACHE/study/cifar10-BUDGET, outside the checkout "
                   "so that a fresh checkout can resume the study).")
@click.option("--results", type=PATH, default=None,
              help="Report and committed checkpoints (default benchmarks/results/<the budget's folder>).")
@click.option("--threads", type=POSITIVE, default=2, help="onnxruntime threads for the evaluation.")
@click.option("--profile-threads", type=POSITIVE, default=1,
              help="Threads of the latency profiles (batch 1) behind the milliseconds of the report.")
@click.option("--seeds", default=None,
              help="Student seeds, comma-separated, e.g. 0,1 (default: the budget's); every student is trained once "
                   "per seed from the one teacher, and the report shows the spread.")
def cli(**kw) -> int:
    """Teacher, CE, KD and ERDE students on CIFAR-10, exported and measured: the study's report."""
    args = SimpleNamespace(**kw)
    args.seeds = _seed_list(args.seeds) if args.seeds else None
    if args.data is None or not (Path(args.data) / "train").is_dir():
        raise ErdeError(f"--data {args.data}: not a CIFAR-10 image folder with train/ and test/")
    run_study(args, command_line())
    return 0


main = console_script(cli)


def results_folder(name: str) -> Path:
    """A study's committed results: benchmarks/results/NAME."""
    return REPO / "benchmarks" / "results" / name


def run_study(args, command: str) -> None:
    budget = BUDGETS[args.budget]
    data = Path(args.data).resolve()
    work = (args.work or cache_dir() / "study" / f"cifar10-{args.budget}").resolve()
    results = args.results or results_folder(budget.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    store = CommittedCheckpoints(results / "checkpoints", _log)
    teacher_store = (CommittedCheckpoints(results_folder(budget.teacher_results) / "checkpoints", _log)
                     if budget.teacher_results else store)
    timings = Timings(work / "timings.json")
    t_step = Step("teacher", budget.teacher_arch, budget.teacher_epochs, budget.seed, budget.recipe,
                  batch_size=budget.batch_size)
    found: Dict[str, Path] = {}
    timings.run("train teacher",
                lambda: found.update(teacher=obtain(teacher_store, work, "teacher", t_step, data, None)))
    teacher = found["teacher"]
    choice = {}
    timings.run("choose beta (validation)",
                lambda: choice.update(choose_beta(budget, work, data, teacher, results)))
    _log(f"beta = {choice['beta']} (validation scores {choice['scores']})")
    betas = {"ce": ("ce", 0.0), "kd": ("kd", 0.0), "erde": ("erde", choice["beta"]), "erde_beta0": ("erde", 0.0)}
    seeds = args.seeds or list(budget.seeds)
    models = {"teacher": ("teacher", budget.seed, teacher)}  # stem: (method, seed, checkpoint)
    for seed in seeds:
        for method, (loss, beta) in betas.items():
            stem = student_name(method, seed, budget)
            step = Step("student", budget.student_arch, budget.student_epochs, seed, budget.recipe, loss,
                        budget.alpha, beta, budget.temperature, batch_size=budget.batch_size)
            timings.run(f"train student {stem}", lambda n=f"student_{stem}", st=step: found.update(
                {n: obtain(store, work, n, st, data, teacher)}))
            models[stem] = (method, seed, found[f"student_{stem}"])
    images, labels, _ = load_test_split(data)
    evaluated = []
    for stem, (method, seed, ckpt) in models.items():
        tag = f"{stem}_{sha256(ckpt)[:12]}"  # a changed checkpoint never meets an old export or evaluation
        out = work / f"{tag}_onnx"
        if not (out / "manifest.json").exists():
            timings.run(f"export {stem}", lambda c=ckpt, o=out: _erde("erde-export", c, "--out", o, "--force"))
        profile = latency_profile(out, args.profile_threads)
        timings.run(f"evaluate {stem} (test, ONNX Runtime)", lambda t=tag, o=out, m=method, p=profile: evaluated.append(
            evaluate(o, m, (images, labels), work / f"eval_{t}.json", args.threads, p)))
        evaluated[-1]["seed"] = seed
    meta = {"budget": args.budget, "budget_config": asdict(budget), "beta_choice": choice, "machine": machine(),
            "git_commit": git_commit(), "command": command, "timings_s": timings.data,
            "train_seconds_from_checkpoints": {s: train_seconds(c) for s, (_, _, c) in models.items()},
            "test_images": int(len(labels)), "seeds": seeds, "profile_threads": args.profile_threads}
    write_report(results, evaluated, meta)
    _log(f"report written to {results}")


if __name__ == "__main__":
    sys.exit(main())
