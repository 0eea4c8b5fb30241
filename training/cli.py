"""``erde-train``: train an early-exit teacher, distil a student, evaluate a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click
import torch

from erde.runtime.core.criteria import CRITERIA, sweep
from erde.runtime.common.cli import POSITIVE, console_script, debug_option, group, json_option
from erde.runtime.common.errors import ErdeError

from . import distributed
from .checkpoint import compact, load_model, read_checkpoint, save_checkpoint
from .data import load_split, to_tensor
from .evaluate import DEFAULT_THRESHOLDS, exit_probs, per_exit_accuracy
from .losses import LOSSES, LossConfig
from .macs import exit_macs
from .models import list_archs, parse_exits
from .run import RunOptions, RunSpec, load_train_val, run, train_config
from .recipe import RECIPES
from .train import AMP_MODES, DeviceConfig



def _data_options(fn):
    for opt in reversed([
        click.option("--data", "data_path", envvar="ERDE_DATA", required=True, type=click.Path(path_type=Path),
                     help="Dataset: image folder with train/ and test/, CIFAR python batches, or SVHN .mat folder "
                          "(env ERDE_DATA)."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (.pt)."),
        click.option("--exits", default=None,
                     help="Early exits after these 0-based block indices, comma-separated (default: the arch's own); "
                          "move or drop an exit that does not pay for its latency; 'none': no early exit."),
        click.option("--recipe", type=click.Choice(RECIPES), default="sgd", show_default=True,
                     help="sgd: one-cycle SGD (defaults: 10 epochs, batch 128, lr 0.2, weight decay 5e-4); "
                          "airbench: the fast recipe of training/recipe.py (defaults: 10 epochs, batch 1024, lr 11.5 "
                          "and weight decay 0.0153 per 1024 images, label smoothing 0.2). Options below override."),
        click.option("--epochs", type=int, help="Default: the recipe's."),
        click.option("--batch-size", type=int,
                     help="Images per step, per process (the global batch is this times the number of processes)."),
        click.option("--lr", type=float,
                     help="sgd: peak learning rate for a global batch of 128, scaled linearly with the global batch "
                          "(peak = LR x batch-size x processes / 128); airbench: step size per 1024 images."),
        click.option("--weight-decay", type=float),
        click.option("--clip-grad", type=float, help="Gradient-norm clip (0: off; default 5)."),
        click.option("--label-smoothing", type=float),
        click.option("--limit", type=click.IntRange(min=1), help="Train on the first N training images only."),
        click.option("--val-fraction", default=0.1, show_default=True, type=float,
                     help="Share of the training data held out for validation (deterministic, stratified)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--threads", type=POSITIVE, metavar="N",
                     help="torch threads (default: one per core, shared out among the processes on a node)."),
        click.option("--device", type=click.Choice(distributed.DEVICE_CHOICES), default="auto", show_default=True,
                     help="auto: the GPU when CUDA is available, else the CPU. Under torchrun each process "
                          "takes GPU LOCAL_RANK."),
        click.option("--amp", type=click.Choice(AMP_MODES), default="off", show_default=True,
                     help="Mixed precision on CUDA for student and teacher: bf16, or fp16 with a gradient scaler. "
                          "Refused on the CPU."),
        click.option("--sync-bn", is_flag=True,
                     help="BatchNorm statistics over the global batch across processes (SyncBatchNorm; CUDA only)."),
        click.option("--dist-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Minutes a process waits for the others (under torchrun) before the job fails."),
        click.option("--resume", is_flag=True, help="Continue the unfinished run in --out (starts anew if none)."),
        click.option("--force", is_flag=True, help="Overwrite an existing --out."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        debug_option,
    ]):
        fn = opt(fn)
    return fn


@group("erde-train")
def cli() -> None:
    """Train early-exit CNNs with Entropy-Regularized Distillation (ERDE)."""


def _device_config(device: str, amp: str, sync_bn: bool) -> DeviceConfig:
    """Check --device, --amp and --sync-bn against this machine (before any process group exists)."""
    env = distributed.torchrun_env()
    dev = distributed.resolve_device(device, env[1] if env else 0)
    if sync_bn and dev.type != "cuda":
        raise ErdeError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; drop --sync-bn on the CPU "
                        "(there each process's BatchNorm uses its own per-process batch)")
    if amp == "bf16" and dev.type != "cuda":
        raise ErdeError("--amp bf16 is refused on the CPU: CPUs without bfloat16 units run it many times slower "
                        "than float32; use --amp off on the CPU (mixed precision is for CUDA GPUs)")
    return DeviceConfig(dev, amp, channels_last=dev.type == "cuda")


@cli.command()
@click.option("--arch", default="resnet56_ee", show_default=True, type=click.Choice(list_archs()))
@_data_options
@distributed.errors_from_rank0
def teacher(arch, data_path, out, exits, recipe, epochs, batch_size, lr, weight_decay, clip_grad, label_smoothing,
            limit, val_fraction, seed, threads, device, amp, sync_bn, dist_timeout, resume, force, quiet, debug=False, dist=None):
    """Train an early-exit teacher with cross-entropy at every exit.

    Under torchrun (torchrun --nproc_per_node N -m erde.training.cli teacher ...) it trains with
    DistributedDataParallel, one process per GPU (or CPU share); rank 0 writes the checkpoint.
    """
    with distributed.same_on_every_rank():
        tcfg, label_smoothing = train_config(recipe, seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                              weight_decay=weight_decay, clip_grad_norm=clip_grad,
                                              label_smoothing=label_smoothing)
        lcfg = LossConfig("ce", label_smoothing=label_smoothing)
        spec = _spec("teacher", arch, exits, data_path, limit, val_fraction, tcfg, lcfg, None)
        opts = RunOptions(out, resume, force, threads, quiet, _device_config(device, amp, sync_bn), sync_bn)
    with distributed.joined(opts.dev.device, dist_timeout, dist) as dist:
        run(spec, opts, dist)


def _spec(kind: str, arch: str, exits: Optional[str], data_path: Path, limit, val_fraction, tcfg, lcfg,
          teacher) -> RunSpec:
    return RunSpec(kind, arch, parse_exits(exits) if exits else None, str(Path(data_path).resolve()), limit,
                   val_fraction, tcfg, lcfg, str(Path(teacher).resolve()) if teacher else None)


def _parse_weights(text: Optional[str]) -> Tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ErdeError(f"--exit-weights {text!r}: expected numbers separated by commas, e.g. 1,1,1,1") from None


@cli.command()
@click.option("--teacher", "teacher_path", required=True, type=click.Path(path_type=Path),
              help="Teacher checkpoint from 'erde-train teacher'.")
@click.option("--loss", type=click.Choice(LOSSES), default="erde", show_default=True)
@click.option("--arch", default="resnet20_ee", show_default=True, type=click.Choice(list_archs()))
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Weight of the distillation (KL) term.")
@click.option("--beta", default=0.5, show_default=True, type=float,
              help="Weight of the entropy term on teacher-wrong images (erde).")
@click.option("--temperature", default=4.0, show_default=True, type=float, help="Distillation temperature T.")
@click.option("--exit-weights", default=None, help="Comma-separated loss weight per exit (default: 1 each).")
@_data_options
@distributed.errors_from_rank0
def student(teacher_path, loss, arch, alpha, beta, temperature, exit_weights, data_path, out, exits, recipe, epochs,
            batch_size, lr, weight_decay, clip_grad, label_smoothing, limit, val_fraction, seed, threads, device, amp,
            sync_bn, dist_timeout, resume, force, quiet, debug=False, dist=None):
    """Train an early-exit student from a teacher with the ce, kd or erde loss (torchrun: as for teacher)."""
    with distributed.same_on_every_rank():
        tcfg, label_smoothing = train_config(recipe, seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                              weight_decay=weight_decay, clip_grad_norm=clip_grad,
                                              label_smoothing=label_smoothing)
        lcfg = LossConfig(loss, alpha, beta, temperature, _parse_weights(exit_weights), label_smoothing)
        spec = _spec("student", arch, exits, data_path, limit, val_fraction, tcfg, lcfg, teacher_path)
        opts = RunOptions(out, resume, force, threads, quiet, _device_config(device, amp, sync_bn), sync_bn)
    # The ce student needs no teacher outputs, but still checks that the teacher matches.
    with distributed.joined(opts.dev.device, dist_timeout, dist) as dist:
        run(spec, opts, dist)


def _parse_thresholds(text: Optional[str], criterion: str) -> Tuple[float, ...]:
    if not text:
        return DEFAULT_THRESHOLDS[criterion]
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ErdeError(f"--thresholds {text!r}: expected numbers separated by commas") from None


def evaluate_checkpoint(path: Path, data_path: Path, split: str, criteria: List[str],
                        thresholds: Optional[str] = None) -> Dict[str, Any]:
    model, ckpt = load_model(path)
    pre = ckpt["preprocessing"]
    if split == "val":
        _, ds = load_train_val(data_path, tuple(pre["input_size"]), ckpt["train_args"].get("val_fraction", 0.1), None)
    else:
        ds = load_split(data_path, "test", tuple(pre["input_size"]))
    if list(ds.class_names) != list(ckpt["class_names"]):
        raise ErdeError(f"{data_path}: its classes differ from the checkpoint's {ckpt['class_names']}")
    x, y = to_tensor(ds)
    probs = exit_probs(model, x, torch.tensor(pre["mean"]), torch.tensor(pre["std"]))
    labels = y.numpy()
    macs = exit_macs(model)
    result = {"checkpoint": str(path), "split": split, "images": len(labels),
              "exit_accuracy": per_exit_accuracy(probs, labels), "cumulative_macs": list(macs.cumulative),
              "full_macs": macs.full, "sweeps": {}}
    for crit in criteria:
        points = sweep(probs, labels, macs.cumulative, macs.full, crit, _parse_thresholds(thresholds, crit))
        result["sweeps"][crit] = [p.to_dict() for p in points]
    return result


@cli.command("compact")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing OUT.")
@debug_option
def compact_cmd(checkpoint, out, force, debug):
    """A finished checkpoint in a form to commit: float16 weights, no optimizer state (a few MB at most)."""
    if out.suffix != ".pt":
        raise ErdeError(f"{out}: the checkpoint name must end in .pt")
    if out.exists() and not force:
        raise ErdeError(f"{out}: already exists; pass --force to overwrite it")
    if out.resolve() == Path(checkpoint).resolve():
        raise ErdeError(f"{out}: is the input checkpoint; write the compact copy elsewhere")
    save_checkpoint(compact(read_checkpoint(checkpoint)), out)
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", "data_path", envvar="ERDE_DATA", required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="val: the held-out part of train used for tuning; test: only for final numbers.")
@click.option("--criterion", type=click.Choice(list(CRITERIA) + ["all"]), default="all", show_default=True)
@click.option("--thresholds", default=None, help="Comma-separated thresholds (default: a standard list).")
@json_option("the results")
@debug_option
def eval_cmd(checkpoint, data_path, split, criterion, thresholds, as_json, debug):
    """Per-exit accuracy and accuracy / mean MACs at exit thresholds (PyTorch)."""
    criteria = list(CRITERIA) if criterion == "all" else [criterion]
    r = evaluate_checkpoint(checkpoint, data_path, split, criteria, thresholds)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"{checkpoint} on {split} ({r['images']} images); MACs = multiply-accumulates per image")
    click.echo("exit  accuracy  cumulative MACs")
    for k, (a, m) in enumerate(zip(r["exit_accuracy"], r["cumulative_macs"])):
        click.echo(f"{k + 1:>4}  {a * 100:7.2f}%  {m:>15,}")
    click.echo(f"static network (no early exits): {r['full_macs']:,} MACs")
    for crit, points in r["sweeps"].items():
        click.echo(f"\n{crit:>9}  accuracy  mean MACs   of full  exits taken (share per exit)")
        for p in points:
            shares = " ".join(f"{s:.2f}" for s in p["exit_shares"])
            click.echo(f"{p['threshold']:>9g}  {p['accuracy'] * 100:7.2f}%  {p['mean_macs'] / 1e6:7.2f}M  "
                       f"{p['macs_fraction'] * 100:6.1f}%   {shares}")


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
