"""Datasets from local files: an image-folder tree, CIFAR-10/100 python batches, SVHN .mat.

Every loader returns a ``Dataset`` of decoded uint8 images in memory, so an epoch
is never bound by JPEG decoding; decoded image folders are cached as .npy files
(written atomically) under ``$ERDE_CACHE`` (default ``~/.cache/erde``).
Nothing is downloaded: pass a local path.

Recognised layouts for ``--data PATH``:
- image folder: ``PATH/{train,test}/<class>/*.{jpg,png,...}``
- CIFAR-10: ``PATH`` = ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta),
  its parent, or ``cifar-10-python.tar.gz``
- CIFAR-100: ``cifar-100-python/`` (train, test, meta), its parent, or ``cifar-100-python.tar.gz``
- SVHN: a folder with ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 means digit 0)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from erde.runtime.common.datasets import SPLITS, DataError, cache_dir, list_image_folder, split_indices
from erde.runtime.common.progress import step

from .recipe import Augment


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # [N,H,W,3] uint8
    labels: np.ndarray  # [N] int64
    class_names: Tuple[str, ...]
    source: str  # layout it was read from, e.g. "image-folder", "cifar10", "svhn"
    flip: bool = True  # horizontal flips are a valid augmentation (not for digits)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Dataset":
        return replace(self, images=self.images[idx], labels=self.labels[idx])


# ---- image folder ----------------------------------------------------------------------------

def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decode(path: Path, size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e}); remove or replace the file") from None


def load_image_folder(root: Path, size: Tuple[int, int] = (32, 32), cache: bool = True) -> Dataset:
    """``root/<class>/<image>``; classes are the sorted sub-folder names."""
    folder = list_image_folder(root)
    files = folder.files
    key = hashlib.sha256(repr((str(root.resolve()), size, [(p.name, p.stat().st_size) for p in files])).encode())
    cache_file = cache_dir() / f"images-{key.hexdigest()[:20]}.npy"
    images = None
    if cache and cache_file.exists():
        try:
            images = np.load(cache_file)
        except (OSError, ValueError):
            images = None  # a bad cache file is rebuilt
        if images is not None and images.shape != (len(files), size[0], size[1], 3):
            images = None
    if images is None:
        images = np.empty((len(files), size[0], size[1], 3), dtype=np.uint8)
        with step(f"decoding {root} into {cache_file if cache else 'memory'} (once)", total=len(files)) as tick:
            for i, p in enumerate(files):
                images[i] = _decode(p, size)
                if i % 256 == 0:
                    tick(i)
        if cache:
            _save_npy_atomic(cache_file, images)
    return Dataset(images, folder.labels, folder.class_names, "image-folder")


# ---- CIFAR python batches --------------------------------------------------------------------

_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


def _unpickle_cifar(fh) -> dict:
    # The CIFAR batches are pickles of dicts, lists and numpy arrays. Allow only what rebuilds
    # those, so a hostile file cannot run code.
    class _Safe(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _CIFAR_PICKLE_GLOBALS:
                return super().find_class(module, name)
            raise DataError(f"refusing to load pickled object {module}.{name}: not a CIFAR batch")

    try:
        return _Safe(fh, encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # pickle raises many types on garbage
        raise DataError(f"not a CIFAR python batch ({type(e).__name__}: {e})") from None


def _cifar_members(path: Path) -> Tuple[str, dict]:
    """Return (variant, {member name: loader}) for a CIFAR folder or tarball."""
    def from_dir(d: Path) -> dict:
        return {p.name: (lambda p=p: p.open("rb")) for p in d.iterdir() if p.is_file()}

    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            tar = tarfile.open(path)
            members = {Path(m.name).name: (lambda m=m: tar.extractfile(m)) for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable tar archive ({e})") from None
    elif path.is_dir():
        members = from_dir(path)
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (path / sub).is_dir():
                members = from_dir(path / sub)
    else:
        return "", {}
    if "data_batch_1" in members:
        return "cifar10", members
    if "train" in members and "meta" in members:
        return "cifar100", members
    return "", {}


def load_cifar(path: Path, split: str) -> Dataset:
    variant, members = _cifar_members(path)
    if variant == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        names = ["train"] if split == "train" else ["test"]
        meta_name, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    xs, ys = [], []
    for name in names:
        if name not in members:
            raise DataError(f"{path}: missing CIFAR file {name!r}")
        with members[name]() as fh:
            d = _unpickle_cifar(fh)
        try:
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}: malformed CIFAR batch {name!r} ({e})") from None
    if meta_name in members:
        with members[meta_name]() as fh:
            class_names = tuple(_unpickle_cifar(fh).get(names_key, []))
    else:
        class_names = ()
    images, labels = np.concatenate(xs), np.concatenate(ys)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(class_names) < num_classes:
        class_names = tuple(str(i) for i in range(num_classes))
    return Dataset(images, labels, class_names, variant)


# ---- SVHN ------------------------------------------------------------------------------------

def load_svhn(path: Path, split: str) -> Dataset:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN .mat files needs scipy: pip install scipy") from None
    mat = path / f"{split}_32x32.mat"
    try:
        d = loadmat(str(mat))
        images = np.ascontiguousarray(np.asarray(d["X"], dtype=np.uint8).transpose(3, 0, 1, 2))  # [32,32,3,N] -> [N,32,32,3]
        labels = np.asarray(d["y"], dtype=np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
    except FileNotFoundError:
        raise DataError(f"{mat}: not found") from None
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise DataError(f"{mat}: not an SVHN *_32x32.mat file ({e})") from None
    if len(images) != len(labels):
        raise DataError(f"{mat}: {len(images)} images but {len(labels)} labels")
    return Dataset(images, labels, tuple(str(i) for i in range(10)), "svhn", flip=False)


# ---- entry point -----------------------------------------------------------------------------

def load_split(path, split: str, input_size: Tuple[int, int] = (32, 32)) -> Dataset:
    """Load the train or test split of the dataset at ``path`` (layout detected)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or test")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass --data PATH (or set ERDE_DATA)")
    try:
        if path.is_dir() and (path / f"{split}_32x32.mat").exists():
            ds = load_svhn(path, split)
        elif _cifar_members(path)[0]:
            ds = load_cifar(path, split)
        elif path.is_dir() and (path / split).is_dir():
            ds = load_image_folder(path / split, input_size)
        else:
            raise DataError(
                f"{path}: not a dataset this tool reads; expected {split}/<class>/*.jpg, "
                "CIFAR python batches (folder or .tar.gz) or SVHN *_32x32.mat"
            )
    except PermissionError as e:
        raise DataError(f"{e.filename}: permission denied") from None
    if len(ds) == 0:
        raise DataError(f"{path}: the {split} split is empty")
    if ds.images.shape[1:3] != tuple(input_size):
        raise DataError(f"{path}: images are {ds.images.shape[1:3]}, the model expects {tuple(input_size)}")
    return ds


def train_val_split(ds: Dataset, val_fraction: float, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """Deterministic, stratified split; the training part comes back in a seeded shuffled order,
    so that ``--limit N`` (its first N images) covers every class."""
    train_idx, val_idx = split_indices(ds.labels, val_fraction, seed)
    return ds.subset(train_idx), ds.subset(val_idx)


def channel_stats(ds: Dataset) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of 0..1 pixel values."""
    x = ds.images.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-3)) for v in x.std(0))


# ---- batches ---------------------------------------------------------------------------------

def to_tensor(ds: Dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,3,H,W] and int64 labels [N], as torch tensors (no copy of labels)."""
    return torch.from_numpy(np.ascontiguousarray(ds.images.transpose(0, 3, 1, 2))), torch.from_numpy(ds.labels)


def normalize(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_u8.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(x: torch.Tensor, flip, generator: torch.Generator, pad: int = 4, pad_mode: str = "constant") -> torch.Tensor:
    """Random crop from ``pad`` pixels of padding (zeros or reflected borders), then flips.

    ``flip``: True flips each image at random; a bool mask [N] flips exactly those; False: no flips.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=pad_mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if isinstance(flip, torch.Tensor):
        mask = flip
    else:
        mask = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    out[mask] = out[mask].flip(3)
    return out


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """airbench's flips: a fixed random half of the images (by ``seed``), all inverted in odd epochs."""
    base = torch.rand(n, generator=torch.Generator().manual_seed(seed + 7)) < 0.5
    return base ^ bool(epoch % 2)


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    train: bool = False,
    flip: bool = True,
    rank: int = 0,
    world_size: int = 1,
    aug: Augment = Augment(),
    flip_mask: Optional[torch.Tensor] = None,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches; ``train`` shuffles, augments (``aug``) and drops the last partial batch.

    ``flip_mask`` [N] (by image index) replaces random flips when given (``alternating_flips``).

    With ``world_size`` > 1 each rank takes every world_size-th batch of the same shuffled order,
    so ranks see disjoint data and all ranks make the same number of steps.
    """
    n = len(labels)
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    stop = n - n % (batch_size * world_size) if train else n
    for b, start in enumerate(range(0, stop, batch_size)):
        if b % world_size != rank:
            continue
        idx = order[start:start + batch_size]
        x = normalize(images[idx], mean, std)
        if train:
            x = augment(x, flip and (flip_mask[idx] if flip_mask is not None else True), generator,
                        aug.pad, aug.pad_mode)
        yield x, labels[idx]
