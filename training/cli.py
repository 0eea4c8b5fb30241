"""``erde-train``: train an early-exit teacher, distil a student, evaluate a checkpoint."""

from __future__ import annotations

import tempfile
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click
import torch

from erde.runtime.criteria import CRITERIA, sweep
from erde.runtime.errors import ErdeError
from erde.runtime.manifest import write_json_atomic

from . import distributed
from .checkpoint import CheckpointError, load_model, read_checkpoint
from .cliutil import debug_option, friendly_errors, run_click
from .data import Dataset, channel_stats, load_split, to_tensor, train_val_split
from .evaluate import DEFAULT_THRESHOLDS, exit_probs, per_exit_accuracy
from .losses import LOSSES, LossConfig
from .macs import exit_macs
from .models import build_model, list_archs, model_config, parse_exits
from .train import AMP_MODES, DeviceConfig, RunInfo, TrainConfig, TrainData, steps_per_epoch, train, train_config_dict

# Arguments that must not change when a run is resumed.
_RESUME_KEYS = ("arch", "exits", "data", "limit", "val_fraction", "train", "loss", "teacher")


def _data_options(fn):
    for opt in reversed([
        click.option("--data", "data_path", envvar="ERDE_DATA", required=True, type=click.Path(path_type=Path),
                     help="Dataset: image folder with train/ and test/, CIFAR python batches, or SVHN .mat folder "
                          "(env ERDE_DATA)."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (.pt)."),
        click.option("--exits", default=None,
                     help="Early exits after these 0-based block indices, comma-separated (default: the arch's own); "
                          "move or drop an exit that does not pay for its latency."),
        click.option("--epochs", default=10, show_default=True, type=int),
        click.option("--batch-size", default=128, show_default=True, type=int,
                     help="Images per step, per process (the global batch is this times the number of processes)."),
        click.option("--lr", default=0.2, show_default=True, type=float,
                     help="Peak learning rate for a global batch of 128; scaled linearly with the global batch "
                          "(peak = LR x batch-size x processes / 128)."),
        click.option("--weight-decay", default=5e-4, show_default=True, type=float),
        click.option("--clip-grad", default=5.0, show_default=True, type=float, help="Gradient-norm clip (0: off)."),
        click.option("--label-smoothing", default=0.0, show_default=True, type=float),
        click.option("--limit", type=click.IntRange(min=1), help="Train on the first N training images only."),
        click.option("--val-fraction", default=0.1, show_default=True, type=float,
                     help="Share of the training data held out for validation (deterministic, stratified)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--threads", type=click.IntRange(min=1),
                     help="CPU threads for torch (default: all cores, shared out among the processes on a node)."),
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train early-exit CNNs with Entropy-Regularized Distillation (ERDE)."""


def load_train_val(path: Path, input_size, val_fraction: float, limit: Optional[int]) -> Tuple[Dataset, Dataset]:
    train_ds, val_ds = train_val_split(load_split(path, "train", input_size), val_fraction)
    if limit is not None:
        train_ds = train_ds.subset(slice(0, limit))
    return train_ds, val_ds


def _check_out(out: Path, resume: bool, force: bool, train_args: Dict[str, Any]):
    """Decide where the run starts; refuse to clobber a checkpoint by accident."""
    if out.suffix != ".pt":
        raise ErdeError(f"{out}: the checkpoint name must end in .pt")
    if not out.parent.is_dir():
        raise ErdeError(f"{out.parent}: output folder does not exist; create it first")
    try:
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError:
        raise ErdeError(f"{out.parent}: output folder is not writable") from None
    if not out.exists():
        return None
    if resume:
        ckpt = read_checkpoint(out)
        old = ckpt.get("train_args", {})
        changed = [k for k in _RESUME_KEYS if old.get(k) != train_args.get(k)]
        if changed:
            raise ErdeError(f"{out}: cannot resume: {', '.join(changed)} differ from the run that wrote it; "
                            "use the same options, or --force to start over")
        if ckpt.get("progress", {}).get("finished"):
            raise ErdeError(f"{out}: this run already finished; nothing to resume (use --force to retrain)")
        return ckpt
    if not force:
        raise ErdeError(f"{out}: already exists; pass --resume to continue it or --force to overwrite it")
    return None


def _run(kind: str, arch: str, data_path: Path, out: Path, train_args: Dict[str, Any], tcfg: TrainConfig,
         lcfg: LossConfig, teacher_path: Optional[Path], limit: Optional[int], val_fraction: float,
         resume: bool, force: bool, threads: Optional[int], quiet: bool, dist=None,
         dev: DeviceConfig = DeviceConfig(), sync_bn: bool = False) -> None:
    """One training run; with ``dist`` (a torchrun job) every rank calls it with the same arguments."""
    if threads:
        torch.set_num_threads(threads)
    elif dist:
        torch.set_num_threads(distributed.threads_per_process())
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    log = (lambda msg: click.echo(msg, err=True)) if rank == 0 else (lambda msg: None)
    # Rank 0 alone looks at --out; an error on any rank below stops every rank, and rank 0 reports it.
    previous = distributed.on_rank0(dist, lambda: _check_out(out, resume, force, train_args))
    # Local rank 0 decodes the images first and fills the cache; the others then read it.
    train_ds, val_ds = distributed.local_rank0_first(
        dist, lambda: load_train_val(data_path, (32, 32), val_fraction, limit))
    with distributed.agreed(dist):
        teacher = t_ckpt = None
        if teacher_path is not None:
            t_ckpt = read_checkpoint(teacher_path)
        num_classes = len(train_ds.class_names)
        cfg = model_config(arch, num_classes, train_args.get("exits"))
        if t_ckpt is not None:
            _check_teacher(teacher_path, t_ckpt, cfg, train_ds)
            teacher, _ = load_model(teacher_path, t_ckpt)
            mean, std = tuple(t_ckpt["preprocessing"]["mean"]), tuple(t_ckpt["preprocessing"]["std"])
        else:
            mean, std = channel_stats(train_ds)
        steps_per_epoch(len(train_ds), tcfg, world)  # refuses more processes than the data has batches
        lcfg.weights(cfg.num_exits)  # refuses --exit-weights of the wrong length here, on every rank
        torch.manual_seed(tcfg.seed)  # weight initialisation
        model = build_model(cfg)
        start_epoch, opt_state, scaler_state, history = 0, None, None, []
        if previous is not None:
            if previous.get("progress", {}).get("world_size", 1) != world:
                raise ErdeError(f"{out}: written by {previous['progress'].get('world_size', 1)} process(es), "
                                f"resumed with {world}; resume with the same number of processes "
                                "(torchrun --nproc_per_node/--nnodes), or --force to start over")
            model, _ = load_model(out, previous)
            start_epoch = previous["progress"]["epoch"]
            opt_state = previous["training_state"].get("optimizer")
            scaler_state = previous["training_state"].get("grad_scaler")
            history = list(previous.get("metrics", {}).get("history", []))
            log(f"resuming {out} after epoch {start_epoch}/{tcfg.epochs}")
    tx, ty = to_tensor(train_ds)
    vx, vy = to_tensor(val_ds)
    data = TrainData(tx, ty, vx, vy, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32),
                     flip=train_ds.flip)
    macs = exit_macs(model)
    log(f"{kind} {arch}: {len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes, "
        f"{cfg.num_exits} exits, MACs to each exit {list(macs.cumulative)}")
    preprocessing = {"input_size": list(cfg.input_size), "mean": list(mean), "std": list(std),
                     "channel_order": "RGB", "resize": "stretch"}
    info = RunInfo(kind, list(train_ds.class_names), preprocessing, train_args, str(out), rank, world, history)
    if world > 1 or dev.device.type != "cpu" or dev.amp != "off":
        log(f"{world} process(es) on {dev.device.type}, amp {dev.amp}, per-process batch {tcfg.batch_size}, "
            f"global batch {tcfg.batch_size * world}, peak lr {tcfg.lr * tcfg.batch_size * world / 128:g}")
    model = dev.place_model(model)
    if teacher is not None:
        teacher = dev.place_model(teacher)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same keys in the checkpoint
    ddp_model = dist.wrap(model) if dist else None
    train(model, data, tcfg, lcfg, info, teacher, start_epoch, opt_state, log, progress=not quiet,
          ddp_model=ddp_model, reduce_metrics=dist.all_reduce_sum if dist else None, dev=dev,
          sync_buffers=dist.sync_buffers if dist else None, scaler_state=scaler_state)
    log(f"wrote {out}")


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


def _check_teacher(path: Path, ckpt: Dict[str, Any], cfg, train_ds: Dataset) -> None:
    t_cfg = ckpt["model_args"]
    problems = []
    if len(t_cfg.get("exit_after", ())) + 1 != cfg.num_exits:
        problems.append(f"the teacher has {len(t_cfg.get('exit_after', ())) + 1} exits, the student {cfg.num_exits}")
    if list(ckpt["class_names"]) != list(train_ds.class_names):
        problems.append("its classes differ from the dataset's")
    if tuple(t_cfg.get("input_size", ())) != tuple(cfg.input_size):
        problems.append(f"its input size {t_cfg.get('input_size')} differs from {list(cfg.input_size)}")
    if problems:
        raise CheckpointError(f"{path}: teacher does not match the student: {'; '.join(problems)}")


def _train_args(kind: str, arch: str, exits: Optional[str], data_path: Path, limit, val_fraction, tcfg, lcfg,
                teacher) -> Dict[str, Any]:
    return {"kind": kind, "arch": arch, "exits": list(parse_exits(exits)) if exits else None, "data": str(Path(data_path).resolve()), "limit": limit,
            "val_fraction": val_fraction, "train": train_config_dict(tcfg), "loss": lcfg.to_dict(),
            "teacher": str(Path(teacher).resolve()) if teacher else None}


@main.command()
@click.option("--arch", default="resnet56_ee", show_default=True, type=click.Choice(list_archs()))
@_data_options
@friendly_errors
@distributed.errors_from_rank0
def teacher(arch, data_path, out, exits, epochs, batch_size, lr, weight_decay, clip_grad, label_smoothing, limit,
            val_fraction, seed, threads, device, amp, sync_bn, dist_timeout, resume, force, quiet, dist=None):
    """Train an early-exit teacher with cross-entropy at every exit.

    Under torchrun (torchrun --nproc_per_node N -m erde.training.cli teacher ...) it trains with
    DistributedDataParallel, one process per GPU (or CPU share); rank 0 writes the checkpoint.
    """
    with distributed.same_on_every_rank():
        tcfg = TrainConfig(epochs, batch_size, lr, weight_decay=weight_decay, clip_grad_norm=clip_grad, seed=seed)
        lcfg = LossConfig("ce", label_smoothing=label_smoothing)
        args = _train_args("teacher", arch, exits, data_path, limit, val_fraction, tcfg, lcfg, None)
        dev = _device_config(device, amp, sync_bn)
    with distributed.joined(dev.device, dist_timeout, dist) as dist:
        _run("teacher", arch, data_path, out, args, tcfg, lcfg, None, limit, val_fraction, resume, force, threads,
             quiet, dist, dev, sync_bn)


def _parse_weights(text: Optional[str]) -> Tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ErdeError(f"--exit-weights {text!r}: expected numbers separated by commas, e.g. 1,1,1,1") from None


@main.command()
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
@friendly_errors
@distributed.errors_from_rank0
def student(teacher_path, loss, arch, alpha, beta, temperature, exit_weights, data_path, out, exits, epochs, batch_size, lr,
            weight_decay, clip_grad, label_smoothing, limit, val_fraction, seed, threads, device, amp, sync_bn,
            dist_timeout, resume, force, quiet, dist=None):
    """Train an early-exit student from a teacher with the ce, kd or erde loss (torchrun: as for teacher)."""
    with distributed.same_on_every_rank():
        tcfg = TrainConfig(epochs, batch_size, lr, weight_decay=weight_decay, clip_grad_norm=clip_grad, seed=seed)
        lcfg = LossConfig(loss, alpha, beta, temperature, _parse_weights(exit_weights), label_smoothing)
        args = _train_args("student", arch, exits, data_path, limit, val_fraction, tcfg, lcfg, teacher_path)
        dev = _device_config(device, amp, sync_bn)
    # The ce student needs no teacher outputs, but still checks that the teacher matches.
    with distributed.joined(dev.device, dist_timeout, dist) as dist:
        _run("student", arch, data_path, out, args, tcfg, lcfg, teacher_path, limit, val_fraction, resume, force,
             threads, quiet, dist, dev, sync_bn)


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


@main.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", "data_path", envvar="ERDE_DATA", required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="val: the held-out part of train used for tuning; test: only for final numbers.")
@click.option("--criterion", type=click.Choice(list(CRITERIA) + ["both"]), default="both", show_default=True)
@click.option("--thresholds", default=None, help="Comma-separated thresholds (default: a standard list).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results to this JSON file.")
@debug_option
@friendly_errors
def eval_cmd(checkpoint, data_path, split, criterion, thresholds, json_out):
    """Per-exit accuracy and accuracy / mean MACs at exit thresholds (PyTorch)."""
    criteria = list(CRITERIA) if criterion == "both" else [criterion]
    r = evaluate_checkpoint(checkpoint, data_path, split, criteria, thresholds)
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
    if json_out:
        write_json_atomic(json_out, r)
        click.echo(f"wrote {json_out}")


def entry(argv=None) -> int:
    """Console script: the one-line error contract for click's own usage errors too."""
    return run_click(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
