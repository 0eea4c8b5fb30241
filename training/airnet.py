"""The ``airnet`` family: airbench-style early-exit CNNs for 32x32 images.

After Keller Jordan's airbench (PyPI ``airbench``): a frozen 2x2 whitening convolution,
then three blocks of conv-maxpool-BN-act-conv-BN-act (widths w1, w2, w3); the final
exit is a 3x3 max pool, one Linear without bias and a fixed scale of 1/9. Backbone
BatchNorms have no learnt scale (only a shift), a fast running average and a tiny eps;
convolutions start as identities on their first input channels. Early exits are the
paper's heads (``net.ExitHead``) after chosen blocks.

    x [N,3,32,32] -> stem (whiten 2x2 + act) [N,c,31,31]   (c = whiten_channels, 24 by default)
      -> block 0 [N,w1,15,15] -> block 1 [N,w2,7,7] -> block 2 [N,w3,3,3] -> final [N,K]

The whitening weights come from the training images (``init_whitening``) and stay
frozen; the stem's bias trains for the recipe's first epochs only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import ClassVar, Tuple

import torch
from torch import nn

from erde.runtime.common.errors import ErdeError
from .net import EarlyExitNet, ExitHead, ModelConfig, register, register_family

WHITEN_KERNEL = 2
MAX_WHITEN_CHANNELS = 2 * 3 * WHITEN_KERNEL**2  # every eigenvector of the 2x2x3 patches, with both signs


@dataclass(frozen=True)
class AirNetConfig(ModelConfig):
    widths: Tuple[int, ...] = (64, 256, 256)  # channels of the three blocks
    activation: str = "relu"  # "relu" or "gelu"
    whiten_channels: int = 24  # the whitening stem's channels, 2 per leading eigenvector (at most 24)
    family: ClassVar[str] = "airnet"

    @property
    def num_blocks(self) -> int:
        return len(self.widths)


def _act(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU(inplace=True)


class _Norm(nn.BatchNorm2d):
    """BatchNorm with a fixed scale of 1 (only the shift learns), running-average momentum 0.4, eps 1e-12."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    return conv


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, activation: str):
        super().__init__()
        self.conv1, self.pool, self.norm1 = _conv(c_in, c_out), nn.MaxPool2d(2), _Norm(c_out)
        self.conv2, self.norm2, self.act = _conv(c_out, c_out), _Norm(c_out), _act(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class _FoldedConvGroup(nn.Module):
    """A ``ConvGroup`` as exported: norm1 folded into conv1 ahead of the max pool.

    Exact when norm1's scale is positive in every channel (a per-channel map x -> s*x + b with s > 0 commutes
    with max). ReLU then also moves ahead of the pool (it commutes with max), where onnxruntime fuses it into
    the convolution. Graphs lose one normalisation per block; in int8 it also spared each block a dequantize,
    float BatchNorm, quantize and two transposes.
    """

    def __init__(self, group: ConvGroup):
        super().__init__()
        norm, conv = group.norm1, group.conv1
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        self.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=True)
        with torch.no_grad():
            self.conv1.weight.copy_(conv.weight * scale[:, None, None, None])
            self.conv1.bias.copy_(norm.bias - norm.running_mean * scale)
        self.pool, self.conv2, self.norm2, self.act = group.pool, group.conv2, group.norm2, group.act
        self.relu_first = isinstance(group.act, nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.pool(self.act(x)) if self.relu_first else self.act(self.pool(x))
        return self.act(self.norm2(self.conv2(x)))


def _foldable(group: ConvGroup) -> bool:
    return bool((group.norm1.weight > 0).all())


class AirFinal(nn.Module):
    def __init__(self, channels: int, num_classes: int, scale: float = 1 / 9):
        super().__init__()
        self.pool, self.fc, self.scale = nn.MaxPool2d(3), nn.Linear(channels, num_classes, bias=False), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1)) * self.scale


class AirNet(EarlyExitNet):
    def __init__(self, cfg: AirNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths
        c_in = cfg.whiten_channels
        if not (isinstance(c_in, int) and 2 <= c_in <= MAX_WHITEN_CHANNELS and c_in % 2 == 0):
            raise ErdeError(f"whiten_channels={c_in!r}: need an even number from 2 to {MAX_WHITEN_CHANNELS}")
        whiten = nn.Conv2d(3, c_in, WHITEN_KERNEL, padding=0, bias=True)
        whiten.weight.requires_grad_(False)
        with torch.no_grad():
            whiten.bias.zero_()
        self.stem = nn.Sequential(whiten, _act(cfg.activation))
        h = cfg.input_size[0] - WHITEN_KERNEL + 1
        blocks, shapes = [], []
        for c in widths:
            blocks.append(ConvGroup(c_in, c, cfg.activation))
            h, c_in = h // 2, c
            shapes.append((c, h, h))
        self.blocks = nn.ModuleList(blocks)
        self.check_exits(len(blocks))
        self.heads = nn.ModuleList(
            ExitHead(shapes[i][0], shapes[i][1:], cfg.num_classes, cfg.head_dropout) for i in cfg.exit_after)
        self.final = AirFinal(c_in, cfg.num_classes)

    def for_export(self) -> "AirNet":
        """A copy for the ONNX graphs, with each block's first BatchNorm folded through its max pool (the
        blocks whose norm has a scale <= 0 somewhere, which training never makes, stay as they are)."""
        view = copy.deepcopy(self).eval()
        for i, group in enumerate(view.blocks):
            if _foldable(group):
                view.blocks[i] = _FoldedConvGroup(group)
        return view


@torch.no_grad()
def init_whitening(model: AirNet, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the frozen stem conv to the ZCA-like whitening of the 2x2 patches of ``images`` (normalised [N,3,H,W]):
    its leading eigenvectors, as many as half the stem's channels, with both signs."""
    conv = model.stem[0]
    k = conv.weight.shape[-1]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k)
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # largest first
    keep = conv.weight.shape[0] // 2
    filters = (eigenvectors[:keep] / torch.sqrt(eigenvalues[:keep] + eps)[:, None]).reshape(-1, 3, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]))


register_family(AirNetConfig, AirNet)


def _airnet(arch: str, widths: Tuple[int, int, int], activation: str, num_classes: int) -> AirNetConfig:
    return AirNetConfig(arch=arch, num_classes=num_classes, exit_after=(0, 1), widths=widths, activation=activation)


@register
def air94_ee(num_classes: int = 10) -> AirNetConfig:
    """airbench94's network (64, 256, 256 channels, GELU) with exits after blocks 1 and 2: the teacher."""
    return _airnet("air94_ee", (64, 256, 256), "gelu", num_classes)


@register
def air32_ee(num_classes: int = 10) -> AirNetConfig:
    """A small airnet (32, 64, 128 channels, ReLU, which onnxruntime fuses into the convolutions): the student.
    Several times fewer MACs than air94_ee."""
    return _airnet("air32_ee", (32, 64, 128), "relu", num_classes)


@register
def air32w_ee(num_classes: int = 10) -> AirNetConfig:
    """air32_ee's first block with wide later blocks (32, 128, 256 channels, ReLU): its first exit costs a
    smaller share of its time than air32_ee's does, so early exits can pay in milliseconds."""
    return _airnet("air32w_ee", (32, 128, 256), "relu", num_classes)


@register
def air32w16_ee(num_classes: int = 10) -> AirNetConfig:
    """air32w_ee with a 16-channel whitening stem (the 8 leading eigenvectors of the 2x2x3 patches, both signs):
    24 channels run padded to 32 in onnxruntime's x86 NCHWc kernels, so 16 make its first exit answer sooner
    (benchmarks/results/student-choice-v5)."""
    return replace(_airnet("air32w16_ee", (32, 128, 256), "relu", num_classes), whiten_channels=16)
