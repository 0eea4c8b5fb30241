"""The training loop shared by teacher and student runs.

Recipes (``training/recipe.py``): ``sgd``, a one-cycle SGD, or ``airbench``, a fast
recipe with decoupled hyperparameters and lookahead weight averaging. Both clip
the gradient norm. Clipping matters: distilling into early-exit heads
without it let the features under a head's BatchNorm grow without bound and the
early exits collapse. After every epoch the per-exit validation accuracy is
measured in eval mode and dead exit heads (nothing passes their ReLU) are
reported and revived by resetting their BatchNorm scale and shift.

Epoch e uses seeds derived from (seed, e) for data order, augmentation and
dropout, so a run resumed from its end-of-epoch checkpoint continues exactly as
an uninterrupted run would.

Devices (``DeviceConfig``): the model and teacher sit on the CPU or a GPU; batches
are made on the CPU and copied over (pinned memory, channels-last on CUDA); with
``amp`` the student's and the teacher's forward passes run under autocast (the
teacher in eval mode under inference mode), fp16 with a gradient scaler.
Several processes (torchrun, see ``distributed``): each takes every
world_size-th batch of the same per-epoch order, DDP averages the gradients, and
the learning rate follows the global batch (``lr_at``). Checkpoints hold CPU
tensors only, so a GPU run's checkpoint loads and exports on a CPU.
"""

from __future__ import annotations

import math

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from erde.runtime.common.errors import ErdeError

from .checkpoint import make_checkpoint, save_checkpoint
from .data import alternating_flips, batches, normalize
from .evaluate import dead_exits, exit_probs, per_exit_accuracy
from .losses import LossConfig, exit_losses
from .models import EarlyExitNet
from .recipe import RECIPES, Lookahead, augment_of, freeze_stem_bias, lr_factor, make_optimizer, set_lr


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # per process
    lr: float = 0.2  # peak learning rate for a global batch of 128; scaled linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2
    clip_grad_norm: float = 5.0  # 0 disables clipping
    seed: int = 0
    recipe: str = "sgd"  # see training/recipe.py; "airbench" reads lr and weight_decay per 1024 images

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not math.isfinite(self.lr) or self.lr <= 0:
            raise ErdeError(f"need --epochs >= 1, --batch-size >= 1 and a finite --lr > 0 (got {self.lr})")
        if self.recipe not in RECIPES:
            raise ErdeError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if not 0 <= self.momentum < 1:
            raise ErdeError(f"momentum {self.momentum} must be in [0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            raise ErdeError(f"warm-up fraction {self.warmup_fraction} must be in [0, 1)")


AMP_MODES = ("off", "bf16", "fp16")


@dataclass(frozen=True)
class DeviceConfig:
    """Where a run computes and in which precision.

    ``amp``: ``bf16`` or ``fp16`` run forward passes (student and teacher) under autocast;
    ``fp16`` adds a gradient scaler and needs CUDA (the command line also refuses ``bf16`` on
    the CPU, where it is slow). Weights and optimizer stay float32.
    ``channels_last`` stores images and convolution weights NHWC (faster on GPUs, and for airnet on CPUs).
    """

    device: torch.device = torch.device("cpu")
    amp: str = "off"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ErdeError(f"--amp {self.amp}: choose one of {', '.join(AMP_MODES)}")
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ErdeError("--amp fp16 needs a CUDA GPU (float16 training with a gradient scaler is CUDA-only); "
                            "on the CPU use --amp off")

    def autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def place_model(self, model: nn.Module) -> nn.Module:
        if self.channels_last:
            return model.to(self.device, memory_format=torch.channels_last)
        return model.to(self.device)

    def place_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class TrainData:
    """Uint8 tensors and the normalisation the model was trained with."""

    train_x: torch.Tensor  # [N,3,H,W] uint8
    train_y: torch.Tensor  # [N] int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: torch.Tensor  # [3]
    std: torch.Tensor  # [3]
    flip: bool = True


@dataclass
class RunInfo:
    """What goes into the checkpoint besides the weights."""

    kind: str
    class_names: List[str]
    preprocessing: Dict[str, Any]
    train_args: Dict[str, Any]
    out: str
    rank: int = 0
    world_size: int = 1
    history: List[Dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, total: int, cfg: TrainConfig, world_size: int = 1) -> float:
    """The ``sgd`` recipe's learning rate at ``step``: its peak follows the global batch."""
    return cfg.lr * cfg.batch_size * world_size / 128 * lr_factor(step, total, cfg)


def steps_per_epoch(num_images: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps per epoch (the same on every rank); refuses data smaller than one global batch."""
    steps = num_images // (cfg.batch_size * world_size)
    if steps == 0:
        raise ErdeError(
            f"{num_images} training images are fewer than one batch of {cfg.batch_size}"
            f" x {world_size} process(es); lower --batch-size, start fewer processes or use more data"
        )
    return steps


def revive_heads(model: EarlyExitNet, exits: List[int]) -> None:
    for k in exits:
        bn = model.heads[k].bn
        with torch.no_grad():
            bn.weight.fill_(1.0)
            bn.bias.zero_()


@dataclass
class Hooks:
    """Logging, and under torchrun the distributed entry point's hooks (all None in one process).

    ``ddp_model``: a DistributedDataParallel wrapper of the model; ``reduce_metrics``: a sum over
    ranks; ``sync_buffers``: rank 0's buffers to every rank.
    """

    log: Callable[[str], None] = print
    progress: bool = True
    ddp_model: Optional[nn.Module] = None
    reduce_metrics: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    sync_buffers: Optional[Callable[[nn.Module], None]] = None


@dataclass(frozen=True)
class Resume:
    """Where a resumed run continues: the epochs done and the optimizer (and grad scaler) state."""

    start_epoch: int = 0
    optimizer_state: Optional[Dict[str, Any]] = None
    scaler_state: Optional[Dict[str, Any]] = None
    lookahead_state: Optional[Dict[str, Any]] = None


def train(model: EarlyExitNet, data: TrainData, cfg: TrainConfig, loss_cfg: LossConfig, info: RunInfo,
          teacher: Optional[EarlyExitNet] = None, resume: Resume = Resume(), hooks: Hooks = Hooks(),
          dev: DeviceConfig = DeviceConfig()) -> Dict[str, Any]:
    """Train ``model`` from ``resume.start_epoch`` to ``cfg.epochs``, writing ``info.out`` after each epoch.

    ``model`` and ``teacher`` must already be on ``dev.device`` (``dev.place_model``).
    """
    from tqdm import tqdm

    log, reduce_metrics, sync_buffers = hooks.log, hooks.reduce_metrics, hooks.sync_buffers
    net = hooks.ddp_model or model
    opt = make_optimizer(model, cfg, info.world_size)
    lookahead = Lookahead(model, resume.lookahead_state) if cfg.recipe == "airbench" else None
    aug = augment_of(cfg.recipe)
    if resume.optimizer_state:
        opt.load_state_dict(resume.optimizer_state)
    scaler = torch.amp.GradScaler(dev.device.type, enabled=dev.amp == "fp16")
    if resume.scaler_state and scaler.is_enabled():
        scaler.load_state_dict(resume.scaler_state)
    if teacher is not None:
        teacher.eval()
    steps = steps_per_epoch(len(data.train_y), cfg, info.world_size)
    total = steps * cfg.epochs
    metrics: Dict[str, Any] = {}
    for epoch in range(resume.start_epoch, cfg.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100003 + epoch * 7919 + info.rank)  # dropout
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # data order and augmentation
        model.train()
        flip_mask = alternating_flips(len(data.train_y), cfg.seed, epoch) if aug.alternate_flip else None
        seen = correct = 0
        loss_sum = 0.0
        it = batches(data.train_x, data.train_y, cfg.batch_size, data.mean, data.std, gen,
                     train=True, flip=data.flip, rank=info.rank, world_size=info.world_size, aug=aug,
                     flip_mask=flip_mask)
        bar = tqdm(it, total=steps, desc=f"{info.kind} epoch {epoch + 1}/{cfg.epochs}",
                   disable=True if not hooks.progress or info.rank != 0 else None,  # None: only on a terminal
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps + i
            set_lr(opt, lr_factor(step, total, cfg))
            x, y = dev.place_images(x), y.to(dev.device, non_blocking=True)
            t_logits = None
            if teacher is not None and loss_cfg.needs_teacher:
                with torch.inference_mode(), dev.autocast():
                    t_logits = [t.float().clone() for t in teacher(x)]
            with dev.autocast():
                logits = net(x)
                loss, _ = exit_losses(logits, y, loss_cfg, t_logits)
            if not torch.isfinite(loss):
                raise ErdeError(f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            freeze_stem_bias(model, epoch, cfg)
            if cfg.clip_grad_norm > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            if lookahead is not None:
                lookahead.step(model, step + 1, total, last=step + 1 == total)
            seen += len(y)
            correct += int((logits[-1].argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        train_time = time.time() - t0
        stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
        if reduce_metrics is not None:
            stats = reduce_metrics(stats)
        if sync_buffers is not None:
            sync_buffers(model)  # every rank validates and checks exits with rank 0's BatchNorm statistics
        val_acc = evaluate_val(model, data, reduce_metrics, info, dev)
        dead = dead_exits(model, _first_val_batch(data).to(dev.device))
        if reduce_metrics is not None:  # revive on every rank or on none, so the replicas stay equal
            flags = torch.zeros(len(model.heads), dtype=torch.float64)
            flags[dead] = 1.0
            dead = [k for k, f in enumerate(reduce_metrics(flags).tolist()) if f > 0]
        if dead:
            revive_heads(model, dead)
            log(f"warning: exit(s) {', '.join(str(k + 1) for k in dead)} died (nothing passes the head's ReLU); "
                "reset their BatchNorm scale to 1 and shift to 0")
        record = {
            "epoch": epoch + 1,
            "train_loss": float(stats[0] / stats[2]),
            "train_acc_final": float(stats[1] / stats[2]),
            "val_exit_accuracy": val_acc,
            "dead_exits": [k + 1 for k in dead],
            "epoch_seconds": round(train_time, 2),
        }
        info.history.append(record)
        log(f"{info.kind} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.3f}, "
            f"train acc {record['train_acc_final']:.3f}, val acc per exit "
            f"[{', '.join(f'{a:.3f}' for a in val_acc)}], {train_time:.0f}s"
            + (f", dead exits {record['dead_exits']}" if dead else ""))
        metrics = {"val_exit_accuracy": val_acc, "history": list(info.history)}
        if info.rank == 0:
            save_checkpoint(make_checkpoint(
                model, kind=info.kind, class_names=info.class_names, preprocessing=info.preprocessing,
                train_args=info.train_args, metrics=metrics,
                progress={"epoch": epoch + 1, "epochs": cfg.epochs, "finished": epoch + 1 == cfg.epochs,
                          "world_size": info.world_size},
                training_state=_training_state(opt, scaler, lookahead),
            ), info.out)
    return metrics


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _training_state(opt: torch.optim.Optimizer, scaler: "torch.amp.GradScaler",
                    lookahead: Optional[Lookahead]) -> Dict[str, Any]:
    """What --resume needs, as CPU tensors (a GPU run's checkpoint loads anywhere)."""
    state = {"optimizer": _to_cpu(opt.state_dict())}
    if lookahead is not None:
        state["lookahead"] = lookahead.state()
    if scaler.is_enabled():
        state["grad_scaler"] = _to_cpu(scaler.state_dict())
    return state


def _first_val_batch(data: TrainData) -> torch.Tensor:
    return normalize(data.val_x[:256], data.mean, data.std)


@torch.no_grad()
def evaluate_val(model: EarlyExitNet, data: TrainData, reduce_metrics, info: RunInfo,
                 dev: DeviceConfig = DeviceConfig()) -> List[float]:
    """Per-exit validation accuracy; with several processes each scores a shard and the counts are summed."""
    shard = slice(info.rank, None, info.world_size)
    probs = exit_probs(model, data.val_x[shard], data.mean, data.std, dev=dev)
    labels = data.val_y[shard].numpy()
    counts = torch.tensor([round(a * len(labels)) for a in per_exit_accuracy(probs, labels)] + [len(labels)],
                          dtype=torch.float64)
    if reduce_metrics is not None:
        counts = reduce_metrics(counts)
    return [round(float(c / counts[-1]), 6) for c in counts[:-1]]
