"""Early-exit ResNets for 32x32 images, built from a small config that travels with the weights.

A CIFAR ResNet of depth 6n+2 has a 3x3 stem and three stages of n basic blocks
(widths w, 2w, 4w; stages 2 and 3 halve the resolution). Exit heads sit after
chosen blocks; the final exit is global average pooling + Linear. The network
is a chain of *segments*: segment k runs blocks up to exit k and that exit's
head, which is exactly how the exporter cuts it.

    x [N,3,32,32] -> stem [N,w,32,32] -> blocks ... -> exit k: probs [N,K]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from erde.runtime.common.errors import ErdeError


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (stored in every checkpoint)."""

    arch: str
    blocks_per_stage: int  # n in depth = 6n + 2
    base_width: int = 16  # channels of stage 1; stages 2 and 3 have 2x and 4x
    num_classes: int = 10
    exit_after: Tuple[int, ...] = ()  # early exits after these global block indices (0-based)
    input_size: Tuple[int, int] = (32, 32)
    head_dropout: float = 0.5
    widths: Tuple[int, ...] = ()  # channels of stages 1-3 when not (w, 2w, 4w); multiples of 16 suit x86 kernels
    family: str = "resnet"  # "resnet": CIFAR ResNet of basic blocks; "airnet": airbench-style (training/airnet.py)
    activation: str = "relu"  # "relu" or "gelu" (airnet only)
    whiten_channels: int = 24  # airnet only: the whitening stem's channels, 2 per leading eigenvector (at most 24)

    @property
    def depth(self) -> int:
        return 6 * self.blocks_per_stage + 2

    @property
    def stage_widths(self) -> Tuple[int, int, int]:
        w = self.base_width
        return tuple(self.widths) if self.widths else (w, 2 * w, 4 * w)  # type: ignore[return-value]

    @property
    def num_exits(self) -> int:
        return len(self.exit_after) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["exit_after"] = tuple(d.get("exit_after", ()))
        d["input_size"] = tuple(d.get("input_size", (32, 32)))
        d["widths"] = tuple(d.get("widths", ()))
        return cls(**d)


def default_exits(n: int) -> Tuple[int, ...]:
    """Three early exits: end of stage 1, inside stage 2, end of stage 2 (two exits, at the stage ends, if n = 1)."""
    if n < 1:
        raise ErdeError(f"blocks_per_stage={n}: need at least 1 block per stage")
    if n == 1:
        return (0, 1)
    return (n - 1, n + (n - 1) // 2, 2 * n - 1)


def parse_exits(text: str) -> Tuple[int, ...]:
    """``--exits 1,3`` -> (1, 3): early exits after these 0-based block indices (checked by the model);
    ``--exits none`` -> (): no early exit, a static network."""
    if text.strip().lower() == "none":
        return ()
    try:
        exits = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ErdeError(f"--exits {text!r}: expected block indices separated by commas, e.g. 1,3") from None
    if not exits:
        raise ErdeError("--exits: give at least one block index")
    return exits


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


class ExitHead(nn.Module):
    """The paper's exit branch: BatchNorm, ReLU, 2x2 average pool, Dropout 0.5, one Linear."""

    def __init__(self, channels: int, size: Tuple[int, int], num_classes: int, dropout: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * (size[0] // 2) * (size[1] // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(x)))  # [N,C,H/2,W/2]
        return self.fc(self.drop(torch.flatten(x, 1)))  # [N,K]


class FinalHead(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EarlyExitNet(nn.Module):
    """A chain of segments: ``stem``, ``blocks``, one head per early exit (``heads``) and ``final``."""

    cfg: ModelConfig

    def check_exits(self, num_blocks: int) -> None:
        bad = [i for i in self.cfg.exit_after if not 0 <= i < num_blocks - 1]
        if bad or list(self.cfg.exit_after) != sorted(set(self.cfg.exit_after)):
            raise ErdeError(f"exit_after={self.cfg.exit_after}: exits must be increasing block indices below "
                            f"{num_blocks - 1}")

    def segment_bounds(self) -> List[Tuple[int, int]]:
        """Block ranges [start, stop) of each segment, one per exit."""
        cuts = [i + 1 for i in self.cfg.exit_after] + [len(self.blocks)]
        return list(zip([0] + cuts[:-1], cuts))

    def run_segment(self, k: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Segment k: image (k=0) or features in -> (features out, exit-k logits)."""
        start, stop = self.segment_bounds()[k]
        if k == 0:
            x = self.stem(x)
        for block in self.blocks[start:stop]:
            x = block(x)
        head = self.heads[k] if k < len(self.heads) else self.final
        return x, head(x)

    def for_export(self) -> "EarlyExitNet":
        """The network the ONNX graphs are traced from: the same answers, rearranged for inference where a
        family can (``AirNet``); the trained module itself otherwise."""
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """All exits' logits, [N,K] each, early exits first and the final exit last."""
        logits = []
        for k in range(self.cfg.num_exits):
            x, out = self.run_segment(k, x)
            logits.append(out)
        return logits


class EarlyExitResNet(EarlyExitNet):
    def __init__(self, cfg: ModelConfig):
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


def keep_exits(model: EarlyExitNet, blocks: Tuple[int, ...]) -> EarlyExitNet:
    """The same network with only the early exits after ``blocks`` (a subset of the trained ones).

    An exit that does not pay for its latency can be dropped at export without retraining: the
    backbone and the kept heads keep their weights.
    """
    have = tuple(model.cfg.exit_after)
    missing = [b for b in blocks if b not in have]
    if missing or list(blocks) != sorted(set(blocks)):
        raise ErdeError(f"exits {list(blocks)}: keep an increasing subset of the trained early exits {list(have)}")
    cfg = replace(model.cfg, exit_after=tuple(blocks))
    new = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    for j, b in enumerate(blocks):
        i = have.index(b)
        state.update({f"heads.{j}.{k[len(f'heads.{i}.'):]}": v for k, v in model.state_dict().items()
                      if k.startswith(f"heads.{i}.")})
    new.load_state_dict(state)
    return new.eval() if not model.training else new


# ---- registry: one small builder per variant -------------------------------------------------

_REGISTRY: Dict[str, Callable[..., ModelConfig]] = {}


def register(fn: Callable[..., ModelConfig]) -> Callable[..., ModelConfig]:
    _REGISTRY[fn.__name__] = fn
    return fn


def _resnet(arch: str, n: int, width: int, num_classes: int) -> ModelConfig:
    return ModelConfig(arch=arch, blocks_per_stage=n, base_width=width, num_classes=num_classes, exit_after=default_exits(n))


@register
def resnet56_ee(num_classes: int = 10) -> ModelConfig:
    return _resnet("resnet56_ee", 9, 16, num_classes)


@register
def resnet32_ee(num_classes: int = 10) -> ModelConfig:
    return _resnet("resnet32_ee", 5, 16, num_classes)


@register
def resnet20_ee(num_classes: int = 10) -> ModelConfig:
    return _resnet("resnet20_ee", 3, 16, num_classes)


@register
def resnet20_w8_ee(num_classes: int = 10) -> ModelConfig:
    """ResNet-20 at half width (8, 16, 32 channels): about 4x fewer MACs than ResNet-20."""
    return _resnet("resnet20_w8_ee", 3, 8, num_classes)


@register
def resnet8_ee(num_classes: int = 10) -> ModelConfig:
    """ResNet-8 (16, 32, 64 channels), exits at the ends of stages 1 and 2: widths ORT's x86 kernels run well."""
    return _resnet("resnet8_ee", 1, 16, num_classes)


@register
def resnet8w_ee(num_classes: int = 10) -> ModelConfig:
    """ResNet-8 with a wide last stage (16, 32, 128 channels): the exit after stage 2 costs about 40% of the
    MACs, so an image that leaves there saves more of the time."""
    return replace(_resnet("resnet8w_ee", 1, 16, num_classes), widths=(16, 32, 128))


@register
def resnet14_ee(num_classes: int = 10) -> ModelConfig:
    return _resnet("resnet14_ee", 2, 16, num_classes)


@register
def tiny_ee(num_classes: int = 10) -> ModelConfig:
    """ResNet-14 at width 4: for tests and smoke runs only."""
    return _resnet("tiny_ee", 2, 4, num_classes)


def _airnet(arch: str, widths: Tuple[int, int, int], activation: str, num_classes: int) -> ModelConfig:
    return ModelConfig(arch=arch, blocks_per_stage=1, num_classes=num_classes, exit_after=(0, 1), widths=widths,
                       family="airnet", activation=activation)


@register
def air94_ee(num_classes: int = 10) -> ModelConfig:
    """airbench94's network (64, 256, 256 channels, GELU) with exits after blocks 1 and 2: the teacher."""
    return _airnet("air94_ee", (64, 256, 256), "gelu", num_classes)


@register
def air32_ee(num_classes: int = 10) -> ModelConfig:
    """A small airnet (32, 64, 128 channels, ReLU, which onnxruntime fuses into the convolutions): the student.
    About 6x fewer MACs and 5x less time on an AMD EPYC than air94_ee."""
    return _airnet("air32_ee", (32, 64, 128), "relu", num_classes)


@register
def air32w_ee(num_classes: int = 10) -> ModelConfig:
    """air32_ee's first block with wide later blocks (32, 128, 256 channels, ReLU): its first exit costs about a
    quarter of its time on an AMD EPYC (air32_ee's: over half), so early exits can pay in milliseconds."""
    return _airnet("air32w_ee", (32, 128, 256), "relu", num_classes)


@register
def air32w16_ee(num_classes: int = 10) -> ModelConfig:
    """air32w_ee with a 16-channel whitening stem (the 8 leading eigenvectors of the 2x2x3 patches, both signs):
    24 channels run padded to 32 in onnxruntime's x86 NCHWc kernels; with 16 its first exit answers in 0.076
    against 0.115 ms on an AMD EPYC at 1 thread (benchmarks/results/student-choice-v5)."""
    return replace(_airnet("air32w16_ee", (32, 128, 256), "relu", num_classes), whiten_channels=16)


def list_archs() -> List[str]:
    return sorted(_REGISTRY)


def model_config(arch: str, num_classes: int = 10, exit_after: Optional[Tuple[int, ...]] = None) -> ModelConfig:
    """The registered config of ``arch``; ``exit_after`` moves or drops its early exits (checked here)."""
    if arch not in _REGISTRY:
        raise ErdeError(f"unknown architecture {arch!r}; choose one of {', '.join(list_archs())}")
    cfg = _REGISTRY[arch](num_classes=num_classes)
    if exit_after is not None:
        cfg = replace(cfg, exit_after=tuple(exit_after))
        blocks = 3 * cfg.blocks_per_stage
        if any(not 0 <= i < blocks - 1 for i in cfg.exit_after) or list(cfg.exit_after) != sorted(set(cfg.exit_after)):
            raise ErdeError(f"exits {list(cfg.exit_after)}: {arch} takes increasing block indices from 0 to "
                            f"{blocks - 2} (an exit after the last block is the final exit)")
    return cfg


def build_model(cfg: ModelConfig) -> EarlyExitNet:
    if cfg.family == "airnet":
        from .airnet import AirNet

        return AirNet(cfg)
    if cfg.family != "resnet":
        raise ErdeError(f"model family {cfg.family!r} is not known to this version of erde; upgrade erde")
    return EarlyExitResNet(cfg)
