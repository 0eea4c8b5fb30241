"""PyTorch views of an early-exit model, cut the way the ONNX graphs are.

Segment k: image [N,3,H,W] (k = 0) or features_{k-1} -> (features_k, probs_k);
the last segment returns only probs. Probabilities, not logits, leave each
graph, so the runtime only compares them with the threshold.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from erde.training.models import EarlyExitNet


class Segment(nn.Module):
    def __init__(self, model: EarlyExitNet, k: int):
        super().__init__()
        self.model, self.k = model, k
        self.last = k == model.cfg.num_exits - 1

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        features, logits = self.model.run_segment(self.k, x)
        probs = F.softmax(logits, dim=1)
        return probs if self.last else (features, probs)


class FullPath(nn.Module):
    """The static network: every block and the final exit, no early-exit heads."""

    def __init__(self, model: EarlyExitNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.stem(x)
        for block in self.model.blocks:
            x = block(x)
        return F.softmax(self.model.final(x), dim=1)


def input_names(num_exits: int) -> List[str]:
    return ["image"] + [f"features_{k}" for k in range(num_exits - 1)]


def output_names(k: int, num_exits: int) -> List[str]:
    return [f"probs_{k}"] if k == num_exits - 1 else [f"features_{k}", f"probs_{k}"]
