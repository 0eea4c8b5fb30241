"""Per-exit training losses: ``ce``, ``kd`` and ``erde``.

For every exit i (weight w_i), with student logits s_i, teacher logits t_i and labels y:

    ce   : w_i * CE(s_i, y)
    kd   : w_i * (CE(s_i, y) + alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)))
    erde : w_i * (CE(s_i, y) + alpha * T^2 * KL(...) * [t_i right]
                             - beta * H(softmax(s_i)) / log K * [t_i wrong])

where "[t_i right]" means argmax t_i == y. The masked terms are averaged over the
whole batch (not over the masked subset), so ``erde`` equals ``kd`` exactly when
the teacher is right everywhere, and beta means the same for 10 or 100 classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from erde.runtime.common.errors import ErdeError

LOSSES = ("ce", "kd", "erde")


@dataclass(frozen=True)
class LossConfig:
    name: str = "erde"
    alpha: float = 1.0  # weight of the distillation (KL) term
    beta: float = 0.5  # weight of the entropy term (erde only)
    temperature: float = 4.0
    exit_weights: Tuple[float, ...] = ()  # one per exit; empty means 1.0 for every exit
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ErdeError(f"unknown loss {self.name!r}; choose one of {', '.join(LOSSES)}")
        if self.temperature <= 0 or self.alpha < 0 or self.beta < 0:
            raise ErdeError("loss options: need temperature > 0, alpha >= 0 and beta >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ErdeError(f"label smoothing {self.label_smoothing} must be in [0, 1)")

    @property
    def needs_teacher(self) -> bool:
        return self.name != "ce"

    def weights(self, num_exits: int) -> Tuple[float, ...]:
        if not self.exit_weights:
            return (1.0,) * num_exits
        if len(self.exit_weights) != num_exits:
            raise ErdeError(f"{len(self.exit_weights)} exit weights given for a model with {num_exits} exits")
        return tuple(self.exit_weights)

    def to_dict(self) -> dict:
        return asdict(self)


def kd_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) per sample: [N,K] x2 -> [N]."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2


def entropy_per_sample(logits: torch.Tensor) -> torch.Tensor:
    """Normalised entropy H(softmax(logits)) / log K per sample: [N,K] -> [N], in [0, 1]."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1) / math.log(logits.shape[1])


def teacher_right(teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mask [N] of the images this teacher exit classifies correctly."""
    return teacher.argmax(dim=1) == targets


def exit_losses(
    student: Sequence[torch.Tensor],
    targets: torch.Tensor,
    cfg: LossConfig,
    teacher: Optional[Sequence[torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss over all exits and a dict of its parts (for logging)."""
    if cfg.needs_teacher and (teacher is None or len(teacher) != len(student)):
        raise ErdeError(f"loss {cfg.name!r} needs the teacher's logits at each of the {len(student)} exits")
    total = student[0].new_zeros(())
    parts = {"ce": 0.0, "kd": 0.0, "entropy": 0.0}
    for i, (w, s) in enumerate(zip(cfg.weights(len(student)), student)):
        ce = F.cross_entropy(s, targets, label_smoothing=cfg.label_smoothing)
        loss = ce
        parts["ce"] += w * ce.item()
        if cfg.name in ("kd", "erde"):
            t = teacher[i].detach().float()
            kd = kd_per_sample(s, t, cfg.temperature)
            if cfg.name == "erde":
                right = teacher_right(t, targets).float()
                kd = kd * right
                ent = -(entropy_per_sample(s) * (1.0 - right)).mean()  # minimising it raises entropy
                loss = loss + cfg.beta * ent
                parts["entropy"] += w * ent.item()
            kd = kd.mean()
            loss = loss + cfg.alpha * kd
            parts["kd"] += w * kd.item()
        total = total + w * loss
    return total, parts
