"""Image-folder listing and the train/validation split, in numpy only (no torch).

Training (``erde.training.data``) and calibration (``erde-calibrate``) must see
the same validation images, so both take the file list and the split indices
from here:

- ``list_image_folder(root)``: ``root/<class>/<image>``; classes are the sorted
  sub-folder names (hidden ones skipped), files are sorted per class and kept
  by extension (any case). Labels are class positions.
- ``split_indices(labels, val_fraction, seed=0)``: stratified; for each class
  in label order, ``round(count * val_fraction)`` images drawn by one
  ``numpy.random.default_rng(seed)``; then the training indices in a seeded
  shuffled order (so a prefix covers every class), the validation indices sorted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

from .errors import ErdeError
from .files import IMAGE_EXTENSIONS

SPLITS = ("train", "test")
DEFAULT_VAL_FRACTION = 0.1  # erde-train's default


def cache_dir() -> Path:
    """Where ERDE keeps what it can rebuild (decoded images, the study's work): ``$ERDE_CACHE``, else ~/.cache/erde."""
    return Path(os.environ.get("ERDE_CACHE", Path.home() / ".cache" / "erde"))


class DataError(ErdeError):
    """A dataset path is missing, unreadable, empty or malformed."""


@dataclass(frozen=True)
class ImageFolder:
    """The files of one split of an image folder and their labels (nothing decoded)."""

    root: Path
    files: List[Path]
    labels: np.ndarray  # [N] int64, positions in class_names
    class_names: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)


def list_image_folder(root: Union[str, Path]) -> ImageFolder:
    """``root/<class>/<image>``: every image file and its label; raise DataError if none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {'no such folder' if not root.exists() else 'not a folder'}; "
                        f"expected {root}/<class>/<image>.png")
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: List[Path] = []
        labels: List[int] = []
        for label, name in enumerate(classes):
            found = [p for p in sorted((root / name).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
            files += found
            labels += [label] * len(found)
    except PermissionError as e:
        raise DataError(f"{e.filename or root}: permission denied") from None
    except OSError as e:
        raise DataError(f"{e.filename or root}: cannot list ({e.strerror or e})") from None
    if not files:
        raise DataError(f"{root}: no images found; expected {root}/<class>/<image>.png "
                        f"(extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder; need at least 2")
    return ImageFolder(root, files, np.asarray(labels, dtype=np.int64), tuple(classes))


def image_folder_split(path: Union[str, Path], split: str = "train") -> ImageFolder:
    """The ``split`` ("train" or "test") of the image folder ``path`` = ``PATH/{train,test}/<class>/*``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or test")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass --data PATH, an image folder {path}/{split}/<class>/*.png")
    if not (path.is_dir() and (path / split).is_dir()):
        raise DataError(f"{path}: not an image folder; this tool reads only PATH/{split}/<class>/*.png "
                        "(CIFAR python batches or SVHN .mat files need torch's loaders: convert them to an "
                        "image folder, or use the image folder the model was trained on)")
    return list_image_folder(path / split)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices in seeded shuffled order, validation indices sorted) for ``labels`` [N].

    Identical to ``erde.training.data.train_val_split`` for the same labels, fraction and seed.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) \
            or not 0 < val_fraction < 1:
        raise DataError(f"validation fraction {val_fraction} must be in (0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = int(round(len(idx) * val_fraction))
        val_idx.append(rng.permutation(idx)[:take])
    val_mask = np.zeros(len(labels), dtype=bool)
    if val_idx:
        val_mask[np.concatenate(val_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~val_mask))
    if len(train_idx) == 0 or not val_mask.any():
        raise DataError(f"{len(labels)} images are too few to carve a validation split of {val_fraction:.0%}")
    return train_idx, np.flatnonzero(val_mask)


@dataclass(frozen=True)
class ValidationData:
    files: List[Path]
    labels: np.ndarray  # [N] int64, positions in the manifest's class_names
    class_names: Tuple[str, ...]
    train_images: int  # images in the train split before carving the validation part
    val_fraction: float

def validation_files(data: Union[str, os.PathLike], class_names: Sequence[str],
                     val_fraction: float = DEFAULT_VAL_FRACTION) -> ValidationData:
    """The validation images of the image folder ``data`` (``data/train/<class>/*``), as training carved them."""
    folder = image_folder_split(data, "train")
    if tuple(folder.class_names) != tuple(class_names):
        raise DataError(f"{folder.root}: class folders {list(folder.class_names)} differ from the model's classes "
                        f"{list(class_names)}; pass the image folder the model was trained on")
    _, val_idx = split_indices(folder.labels, val_fraction, seed=0)
    return ValidationData([folder.files[i] for i in val_idx], folder.labels[val_idx], folder.class_names,
                          len(folder), float(val_fraction))
