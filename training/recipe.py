"""Training recipes: the optimizer, learning-rate schedule, weight averaging and augmentation of a run.

``sgd`` (the original recipe): SGD with Nesterov momentum, a one-cycle learning rate
(linear warm-up, then linear decay to zero) peaking at ``lr`` for a global batch of 128,
weight decay on weights only, random crops from 4 pixels of zero padding and random flips.

``airbench`` (after airbench, PyPI ``airbench``): hyperparameters in decoupled form, so each
can be tuned alone. ``lr`` is the step size per 1024 images and ``weight_decay`` the decay
per 1024 images, both independent of the momentum. The schedule is a triangle: 0.2x the peak
at the start, the peak at 23% of the steps and 0.07x at the end. BatchNorm shifts learn 64x
faster. Every 5 steps the weights move to an average of themselves and the past (lookahead),
with a weight that rises as the cube of progress. Augmentation is translation by up to 2
pixels with reflected borders, and flips that alternate between epochs: each image is
flipped or not at random once, then every other epoch sees all images mirrored. The loss is
the mean over the batch; label smoothing comes with the loss config.

Both keep gradient-norm clipping (see training/train.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

RECIPES = ("sgd", "airbench")

# What each recipe means by default; the command line overrides single values.
RECIPE_DEFAULTS: Dict[str, Dict[str, float]] = {
    "sgd": {"epochs": 10, "batch_size": 128, "lr": 0.2, "weight_decay": 5e-4, "momentum": 0.9,
            "clip_grad_norm": 5.0, "label_smoothing": 0.0},
    "airbench": {"epochs": 10, "batch_size": 1024, "lr": 11.5, "weight_decay": 0.0153, "momentum": 0.85,
                 "clip_grad_norm": 5.0, "label_smoothing": 0.2},
}

BIAS_LR_SCALE = 64.0  # airbench: BatchNorm shifts of the backbone learn this much faster
HEAD_LR_SCALE = 0.1  # early-exit heads: their wide Linear layers diverge at the backbone's rate
LOOKAHEAD_EVERY = 5
WHITEN_BIAS_EPOCHS = 3


@dataclass(frozen=True)
class Augment:
    pad: int = 4
    pad_mode: str = "constant"  # "constant" (zeros) or "reflect"
    alternate_flip: bool = False  # flip all images every other epoch, on top of one random flip per image


def augment_of(recipe: str) -> Augment:
    return Augment(2, "reflect", True) if recipe == "airbench" else Augment()


def _scaled_shifts(model: nn.Module) -> List[nn.Parameter]:
    """Trainable shifts of BatchNorms without a learnt scale (the airnet backbone)."""
    return [m.bias for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad]


def make_optimizer(model: nn.Module, cfg, world_size: int = 1) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; parameter groups and their base rates (``initial_lr``) per recipe."""
    params = list(model.parameters())  # frozen ones never get a gradient, and SGD skips them
    if cfg.recipe != "airbench":
        peak = cfg.lr * cfg.batch_size * world_size / 128
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "initial_lr": peak},
                  {"params": no_decay, "weight_decay": 0.0, "initial_lr": peak}]
        return torch.optim.SGD(groups, lr=peak, momentum=cfg.momentum, nesterov=True)
    batch = cfg.batch_size * world_size
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))  # Nesterov's step is this much larger than one gradient
    lr = cfg.lr / kilostep * batch  # for the batch-mean loss
    decay_per_step = cfg.weight_decay * batch / kilostep
    shifts = {id(p) for p in _scaled_shifts(model)}
    heads = {id(p) for p in model.heads.parameters()} if hasattr(model, "heads") else set()
    fast = [p for p in params if id(p) in shifts]
    slow = [p for p in params if id(p) in heads]
    rest = [p for p in params if id(p) not in shifts and id(p) not in heads]
    head_lr = lr * HEAD_LR_SCALE
    groups = [{"params": fast, "initial_lr": lr * BIAS_LR_SCALE, "weight_decay": decay_per_step / (lr * BIAS_LR_SCALE)},
              {"params": slow, "initial_lr": head_lr, "weight_decay": decay_per_step / head_lr},
              {"params": rest, "initial_lr": lr, "weight_decay": decay_per_step / lr}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


def lr_factor(step: int, total: int, cfg) -> float:
    """Multiplier of each group's base rate at ``step`` of ``total``."""
    if cfg.recipe == "airbench":
        peak = int(0.23 * total)
        if step < peak:
            return 0.2 + 0.8 * step / max(1, peak)
        return 1.0 + (0.07 - 1.0) * (step - peak) / max(1, total - peak)
    warm = max(1, int(total * cfg.warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor


class Lookahead:
    """airbench's weight averaging: every few steps, average := lerp(average, weights) and weights := average."""

    def __init__(self, model: nn.Module, state: Dict[str, torch.Tensor] | None = None):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        if state:
            for k, v in state.items():
                self.average[k].copy_(v)

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total: int, last: bool = False) -> None:
        """Call after optimizer step ``step`` (1-based); ``last`` copies the average into the model for good."""
        if not last and step % LOOKAHEAD_EVERY:
            return
        keep = 1.0 if last else 0.95**LOOKAHEAD_EVERY * (step / total) ** 3
        for k, v in model.state_dict().items():
            if k in self.average:
                self.average[k].lerp_(v, 1 - keep)
                v.copy_(self.average[k])

    def state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.average.items()}


def freeze_stem_bias(model: nn.Module, epoch: int, cfg) -> None:
    """airbench: the whitening layer's bias trains for the first epochs only. Call after backward: dropping
    the gradient (SGD then skips the tensor) rather than switching requires_grad keeps DDP's buckets valid."""
    stem = getattr(model, "stem", None)
    if cfg.recipe != "airbench" or epoch < WHITEN_BIAS_EPOCHS or stem is None:
        return
    conv = stem[0]
    if isinstance(conv, nn.Conv2d) and conv.bias is not None and not conv.weight.requires_grad:
        conv.bias.grad = None
