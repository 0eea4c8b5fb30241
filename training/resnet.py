"""The ``resnet`` family: CIFAR ResNets of depth 6n+2 with early exits.

A 3x3 stem and three stages of n basic blocks (widths w, 2w, 4w; stages 2 and 3 halve the resolution). Exit
heads (``net.ExitHead``) sit after chosen blocks; the final exit is global average pooling + Linear.

    x [N,3,32,32] -> stem [N,w,32,32] -> blocks ... -> exit k: logits [N,K]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from erde.runtime.common.errors import ErdeError

from .net import EarlyExitNet, ExitHead, ModelConfig, register, register_family


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    blocks_per_stage: int = 3  # n in depth = 6n + 2
    base_width: int = 16  # channels of stage 1; stages 2 and 3 have 2x and 4x
    widths: Tuple[int, ...] = ()  # channels of stages 1-3 when not (w, 2w, 4w); multiples of 16 suit x86 kernels
    family: ClassVar[str] = "resnet"

    @property
    def depth(self) -> int:
        return 6 * self.blocks_per_stage + 2

    @property
    def stage_widths(self) -> Tuple[int, int, int]:
        w = self.base_width
        return tuple(self.widths) if self.widths else (w, 2 * w, 4 * w)  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return 3 * self.blocks_per_stage


def default_exits(n: int) -> Tuple[int, ...]:
    """Three early exits: end of stage 1, inside stage 2, end of stage 2 (two exits, at the stage ends, if n = 1)."""
    if n < 1:
        raise ErdeError(f"blocks_per_stage={n}: need at least 1 block per stage")
    if n == 1:
        return (0, 1)
    return (n - 1, n + (n - 1) // 2, 2 * n - 1)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FinalHead(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EarlyExitResNet(EarlyExitNet):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        n, widths = cfg.blocks_per_stage, cfg.stage_widths
        w = widths[0]
        h, wd = cfg.input_size
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        blocks, shapes, c_in = [], [], w
        for stage, c in enumerate(widths):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(c_in, c, stride))
                c_in = c
                shapes.append((c, h >> stage, wd >> stage))
        self.blocks = nn.ModuleList(blocks)
        self.check_exits(len(blocks))
        self.heads = nn.ModuleList(
            ExitHead(shapes[i][0], shapes[i][1:], cfg.num_classes, cfg.head_dropout) for i in cfg.exit_after
        )
        self.final = FinalHead(c_in, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


register_family(ResNetConfig, EarlyExitResNet)


def _resnet(arch: str, n: int, width: int, num_classes: int) -> ResNetConfig:
    return ResNetConfig(arch=arch, blocks_per_stage=n, base_width=width, num_classes=num_classes, exit_after=default_exits(n))


@register
def resnet56_ee(num_classes: int = 10) -> ResNetConfig:
    return _resnet("resnet56_ee", 9, 16, num_classes)


@register
def resnet32_ee(num_classes: int = 10) -> ResNetConfig:
    return _resnet("resnet32_ee", 5, 16, num_classes)


@register
def resnet20_ee(num_classes: int = 10) -> ResNetConfig:
    return _resnet("resnet20_ee", 3, 16, num_classes)


@register
def resnet20_w8_ee(num_classes: int = 10) -> ResNetConfig:
    """ResNet-20 at half width (8, 16, 32 channels): about 4x fewer MACs than ResNet-20."""
    return _resnet("resnet20_w8_ee", 3, 8, num_classes)


@register
def resnet8_ee(num_classes: int = 10) -> ResNetConfig:
    """ResNet-8 (16, 32, 64 channels), exits at the ends of stages 1 and 2: widths ORT's x86 kernels run well."""
    return _resnet("resnet8_ee", 1, 16, num_classes)


@register
def resnet8w_ee(num_classes: int = 10) -> ResNetConfig:
    """ResNet-8 with a wide last stage (16, 32, 128 channels): the exit after stage 2 costs about 40% of the
    MACs, so an image that leaves there saves more of the time."""
    return replace(_resnet("resnet8w_ee", 1, 16, num_classes), widths=(16, 32, 128))


@register
def resnet14_ee(num_classes: int = 10) -> ResNetConfig:
    return _resnet("resnet14_ee", 2, 16, num_classes)


@register
def tiny_ee(num_classes: int = 10) -> ResNetConfig:
    """ResNet-14 at width 4: for tests and smoke runs only."""
    return _resnet("tiny_ee", 2, 4, num_classes)
