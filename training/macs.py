"""MACs per exit, counted with fvcore.

A MAC is one multiply-accumulate; fvcore's "flop" is the same unit. We count the
Conv and Linear layers only (BatchNorm, ReLU, pooling and additions are left
out, as is usual for CNNs and as the manifest states). Counts are per image.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from .models import EarlyExitNet

COUNTED_OPS = ("conv", "linear", "addmm", "matmul", "bmm")


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Conv + Linear MACs of ``module(x)`` for one image (x has batch size 1)."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore traces with torch.jit, which warns that it is deprecated
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, (x,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    return int(sum(v for k, v in by_op.items() if k in COUNTED_OPS))


class _Backbone(nn.Module):
    def __init__(self, model: EarlyExitNet, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, stop = self.model.segment_bounds()[self.k]
        if self.k == 0:
            x = self.model.stem(x)
        for block in self.model.blocks[start:stop]:
            x = block(x)
        return x


@dataclass(frozen=True)
class ExitMacs:
    backbone: Tuple[int, ...]  # per segment: blocks (and stem) up to the exit
    head: Tuple[int, ...]  # per exit head (the last is the final classifier)

    @property
    def cumulative(self) -> Tuple[int, ...]:
        """MACs spent by an image that leaves at exit k (all earlier heads included)."""
        out, total = [], 0
        for b, h in zip(self.backbone, self.head):
            total += b + h
            out.append(total)
        return tuple(out)

    @property
    def full(self) -> int:
        """The static network: whole backbone and final classifier, no early-exit heads."""
        return sum(self.backbone) + self.head[-1]


@torch.no_grad()
def exit_macs(model: EarlyExitNet) -> ExitMacs:
    was_training = model.training
    model.eval()
    h, w = model.cfg.input_size
    x = torch.zeros(1, 3, h, w)
    backbone, head = [], []
    for k in range(model.cfg.num_exits):
        seg = _Backbone(model, k)
        backbone.append(count_macs(seg, x))
        x = seg(x)
        head.append(count_macs(model.heads[k] if k < len(model.heads) else model.final, x))
    model.train(was_training)
    return ExitMacs(tuple(backbone), tuple(head))
