"""PyTorch evaluation: per-exit accuracy and accuracy / mean MACs at exit thresholds."""

from __future__ import annotations

import contextlib

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F


from .data import normalize
from .models import EarlyExitNet

from erde.runtime.core.criteria import REGISTRY

DEFAULT_THRESHOLDS: Dict[str, Tuple[float, ...]] = {name: c.report_thresholds for name, c in REGISTRY.items()}


@torch.no_grad()
def exit_probs(model: EarlyExitNet, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               batch_size: int = 500, dev=None) -> np.ndarray:
    """Softmax probabilities of every exit, in eval mode: uint8 images [N,3,H,W] (CPU) -> [E,N,K].

    ``dev`` (a ``train.DeviceConfig``) moves each batch to the model's device and applies autocast.
    """
    was_training = model.training
    model.eval()
    out = [[] for _ in range(model.cfg.num_exits)]
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size], mean, std)
        ctx = contextlib.nullcontext()
        if dev is not None:
            x, ctx = dev.place_images(x), dev.autocast()
        with ctx:
            logits = model(x)
        for k, lg in enumerate(logits):
            out[k].append(F.softmax(lg.float(), dim=1).cpu())
    model.train(was_training)
    return torch.stack([torch.cat(o) for o in out]).numpy()


def per_exit_accuracy(probs: np.ndarray, labels: np.ndarray) -> List[float]:
    return [float((p.argmax(1) == labels).mean()) for p in probs]


@torch.no_grad()
def dead_exits(model: EarlyExitNet, x: torch.Tensor) -> List[int]:
    """Early exits whose head passes nothing through its ReLU for a batch of images (eval mode).

    Such a head outputs its bias for every image and gets no gradient again: a dead exit.
    """
    was_training = model.training
    model.eval()
    dead = []
    for k, head in enumerate(model.heads):
        x, _ = model.run_segment(k, x)
        if not bool((head.bn(x) > 0).any()):
            dead.append(k)
    model.train(was_training)
    return dead
