"""Small datasets and checkpoints that the training and export tests make themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def class_images(label: int, count: int, seed: int) -> np.ndarray:
    """Learnable 32x32 images: a class colour plus noise and a random bright square."""
    rng = np.random.default_rng(seed * 100 + label)
    base = np.array(COLOURS[label % len(COLOURS)], dtype=np.float64)
    imgs = base + rng.normal(0, 30, size=(count, 32, 32, 3))
    for img in imgs:
        y, x = rng.integers(0, 24, size=2)
        img[y:y + 8, x:x + 8] += 60
    return np.clip(imgs, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, classes: Sequence[str] = ("red", "green", "blue"),
                      per_class: Sequence[int] = (40, 12)) -> Path:
    """root/{train,test}/<class>/*.png"""
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i, arr in enumerate(class_images(label, count, seed=0 if split == "train" else 1)):
                Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def train_cli(args):
    """Run ``erde-train`` in this process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from erde.training.cli import cli as main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
