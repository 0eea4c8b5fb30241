"""What every early-exit network family shares: the config base, the exit head, the segment chain, and the two
registries (families, and one small builder per architecture).

A network is a chain of *segments*: segment k runs the blocks up to exit k and that exit's head, which is exactly
how the exporter cuts it. A family (``resnet``, ``airnet``) registers its config class and its network class
here; ``training/models.py`` imports the families, so that every architecture is registered on import.

    x [N,3,H,W] -> stem -> blocks ... -> exit k: logits [N,K]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from torch import nn
import torch.nn.functional as F

from erde.runtime.common.errors import ErdeError


@dataclass(frozen=True)
class ModelConfig:
    """What every family's config holds; a family adds its own fields. Stored in every checkpoint, with the
    family's name, and rebuilt by ``config_from_dict``."""

    arch: str
    num_classes: int = 10
    exit_after: Tuple[int, ...] = ()  # early exits after these global block indices (0-based)
    input_size: Tuple[int, int] = (32, 32)
    head_dropout: float = 0.5
    family: ClassVar[str] = ""

    @property
    def num_exits(self) -> int:
        return len(self.exit_after) + 1

    @property
    def num_blocks(self) -> int:
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), family=self.family)


# ---- families ---------------------------------------------------------------------------------------------

_FAMILIES: Dict[str, Tuple[Type[ModelConfig], Callable[[Any], "EarlyExitNet"]]] = {}
# Fields of the one config class that checkpoints before the per-family configs stored for every family.
_SHARED_BEFORE = {"blocks_per_stage", "base_width", "widths", "activation", "whiten_channels"}


def register_family(config: Type[ModelConfig], build: Callable[[Any], "EarlyExitNet"]) -> None:
    _FAMILIES[config.family] = (config, build)


def config_from_dict(d: Dict[str, Any]) -> ModelConfig:
    """A checkpoint's ``model_args`` back to its family's config (also those written before the per-family
    configs, which held every family's fields)."""
    d = dict(d)
    family = d.pop("family", "resnet")
    if family not in _FAMILIES:
        raise ErdeError(f"model family {family!r} is not known to this version of erde; upgrade erde")
    cls = _FAMILIES[family][0]
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names - _SHARED_BEFORE
    if unknown:
        raise ErdeError(f"model config fields {sorted(unknown)} are not known to this version of erde; upgrade erde")
    kept = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kept)


def build_model(cfg: ModelConfig) -> "EarlyExitNet":
    if cfg.family not in _FAMILIES:
        raise ErdeError(f"model family {cfg.family!r} is not known to this version of erde; upgrade erde")
    return _FAMILIES[cfg.family][1](cfg)


# ---- architectures: one small builder per variant ---------------------------------------------------------

_ARCHS: Dict[str, Callable[..., ModelConfig]] = {}


def register(fn: Callable[..., ModelConfig]) -> Callable[..., ModelConfig]:
    _ARCHS[fn.__name__] = fn
    return fn


def list_archs() -> List[str]:
    return sorted(_ARCHS)


def model_config(arch: str, num_classes: int = 10, exit_after: Optional[Tuple[int, ...]] = None) -> ModelConfig:
    """The registered config of ``arch``; ``exit_after`` moves or drops its early exits (checked here)."""
    if arch not in _ARCHS:
        raise ErdeError(f"unknown architecture {arch!r}; choose one of {', '.join(list_archs())}")
    cfg = _ARCHS[arch](num_classes=num_classes)
    if exit_after is not None:
        cfg = replace(cfg, exit_after=tuple(exit_after))
        blocks = cfg.num_blocks
        if any(not 0 <= i < blocks - 1 for i in cfg.exit_after) or list(cfg.exit_after) != sorted(set(cfg.exit_after)):
            raise ErdeError(f"exits {list(cfg.exit_after)}: {arch} takes increasing block indices from 0 to "
                            f"{blocks - 2} (an exit after the last block is the final exit)")
    return cfg


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



# ---- the network --------------------------------------------------------------------------------------------

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
