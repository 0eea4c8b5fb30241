"""One training run of erde-train: its typed spec, the checks before it starts, and the run itself.

``RunSpec`` is what defines the run; it is stored in the checkpoint (``train_args``) and compared
field by field on ``--resume``. ``RunOptions`` is how to run it and may change between runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click
import torch

from erde.runtime.common.errors import ErdeError
from erde.runtime.core.manifest import Preprocessing

from . import distributed
from .airnet import init_whitening
from .checkpoint import CheckpointError, load_model, read_checkpoint
from .data import Dataset, channel_stats, load_split, normalize, to_tensor, train_val_split
from .losses import LossConfig
from .macs import exit_macs
from .models import build_model, model_config
from .recipe import RECIPE_DEFAULTS
from .train import DeviceConfig, Hooks, Resume, RunInfo, TrainConfig, TrainData, steps_per_epoch, train


@dataclass(frozen=True)
class RunSpec:
    kind: str  # "teacher" or "student"
    arch: str
    exits: Optional[Tuple[int, ...]]  # early exits after these block indices; None: the arch's own
    data: str  # the dataset path, resolved
    limit: Optional[int]
    val_fraction: float
    train: TrainConfig
    loss: LossConfig
    teacher: Optional[str]  # the teacher checkpoint, resolved

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "exits": list(self.exits) if self.exits is not None else None,
                "data": self.data, "limit": self.limit, "val_fraction": self.val_fraction,
                "train": asdict(self.train), "loss": self.loss.to_dict(), "teacher": self.teacher}

    def differences(self, stored: Dict[str, Any]) -> List[str]:
        """Fields (kind aside) whose stored value in a checkpoint differs from this spec's."""
        mine = self.to_dict()
        return [k for k in mine if k != "kind" and stored.get(k) != mine[k]]


@dataclass(frozen=True)
class RunOptions:
    out: Path
    resume: bool = False
    force: bool = False
    threads: Optional[int] = None
    quiet: bool = False
    dev: DeviceConfig = DeviceConfig()
    sync_bn: bool = False


def train_config(recipe: str, seed: int, **given) -> Tuple[TrainConfig, float]:
    """The recipe's defaults with the values given (None: the default); returns label smoothing apart,
    for the loss config."""
    values = dict(RECIPE_DEFAULTS[recipe])
    values.update({k: v for k, v in given.items() if v is not None})
    smoothing = values.pop("label_smoothing")
    return TrainConfig(int(values.pop("epochs")), int(values.pop("batch_size")), seed=seed, recipe=recipe,
                       **values), smoothing


def load_train_val(path: Path, input_size, val_fraction: float, limit: Optional[int]) -> Tuple[Dataset, Dataset]:
    train_ds, val_ds = train_val_split(load_split(path, "train", input_size), val_fraction)
    if limit is not None:
        train_ds = train_ds.subset(slice(0, limit))
    return train_ds, val_ds


def _check_out(out: Path, resume: bool, force: bool, spec: "RunSpec"):
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
        changed = spec.differences(ckpt.get("train_args", {}))
        if changed:
            raise ErdeError(f"{out}: cannot resume: {', '.join(changed)} differ from the run that wrote it; "
                            "use the same options, or --force to start over")
        if ckpt.get("progress", {}).get("finished"):
            raise ErdeError(f"{out}: this run already finished; nothing to resume (use --force to retrain)")
        return ckpt
    if not force:
        raise ErdeError(f"{out}: already exists; pass --resume to continue it or --force to overwrite it")
    return None


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


def run(spec: RunSpec, opts: RunOptions, dist=None) -> None:
    """One training run; with ``dist`` (a torchrun job) every rank calls it with the same arguments."""
    kind, arch, out, tcfg, lcfg = spec.kind, spec.arch, opts.out, spec.train, spec.loss
    threads, dev, sync_bn = opts.threads, opts.dev, opts.sync_bn
    teacher_path = Path(spec.teacher) if spec.teacher else None
    if threads:
        torch.set_num_threads(threads)
    elif dist:
        torch.set_num_threads(distributed.threads_per_process())
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    log = (lambda msg: click.echo(msg, err=True)) if rank == 0 else (lambda msg: None)
    # Rank 0 alone looks at --out; an error on any rank below stops every rank, and rank 0 reports it.
    previous = distributed.on_rank0(dist, lambda: _check_out(out, opts.resume, opts.force, spec))
    # Local rank 0 decodes the images first and fills the cache; the others then read it.
    train_ds, val_ds = distributed.local_rank0_first(
        dist, lambda: load_train_val(Path(spec.data), (32, 32), spec.val_fraction, spec.limit))
    with distributed.agreed(dist):
        teacher = t_ckpt = None
        if teacher_path is not None:
            t_ckpt = read_checkpoint(teacher_path)
        num_classes = len(train_ds.class_names)
        cfg = model_config(arch, num_classes, spec.exits)
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
        if cfg.family == "airnet":  # replaced by the stored weights on --resume
            init_whitening(model, normalize(to_tensor(train_ds)[0][:5000], torch.tensor(mean), torch.tensor(std)))
        resume, history = Resume(), []
        if previous is not None:
            if previous.get("progress", {}).get("world_size", 1) != world:
                raise ErdeError(f"{out}: written by {previous['progress'].get('world_size', 1)} process(es), "
                                f"resumed with {world}; resume with the same number of processes "
                                "(torchrun --nproc_per_node/--nnodes), or --force to start over")
            model, _ = load_model(out, previous)
            state = previous["training_state"]
            resume = Resume(previous["progress"]["epoch"], state.get("optimizer"), state.get("grad_scaler"),
                            state.get("lookahead"))
            history = list(previous.get("metrics", {}).get("history", []))
            log(f"resuming {out} after epoch {resume.start_epoch}/{tcfg.epochs}")
    tx, ty = to_tensor(train_ds)
    vx, vy = to_tensor(val_ds)
    data = TrainData(tx, ty, vx, vy, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32),
                     flip=train_ds.flip)
    macs = exit_macs(model)
    log(f"{kind} {arch}: {len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes, "
        f"{cfg.num_exits} exits, MACs to each exit {list(macs.cumulative)}")
    pre = asdict(Preprocessing(tuple(cfg.input_size), tuple(mean), tuple(std)))  # the manifest's own dataclass
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}
    info = RunInfo(kind, list(train_ds.class_names), preprocessing, spec.to_dict(), str(out), rank, world, history)
    if world > 1 or dev.device.type != "cpu" or dev.amp != "off":
        log(f"{world} process(es) on {dev.device.type}, amp {dev.amp}, per-process batch {tcfg.batch_size}, "
            f"global batch {tcfg.batch_size * world}, peak lr {tcfg.lr * tcfg.batch_size * world / 128:g}")
    if cfg.family == "airnet" and not dev.channels_last:
        dev = replace(dev, channels_last=True)  # faster training on the CPU (docs/reference.md)
    model = dev.place_model(model)
    if teacher is not None:
        teacher = dev.place_model(teacher)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same keys in the checkpoint
    ddp_model = dist.wrap(model) if dist else None
    hooks = Hooks(log, not opts.quiet, ddp_model, dist.all_reduce_sum if dist else None,
                  dist.sync_buffers if dist else None)
    train(model, data, tcfg, lcfg, info, teacher, resume, hooks, dev)
    log(f"wrote {out}")


