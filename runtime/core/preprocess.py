"""Image loading and preprocessing with Pillow and numpy only (no torch).

Pipeline: ``load_image`` (checked decode) -> ``to_rgb`` (any Pillow mode to
8-bit RGB) -> resize to ``Preprocessing.input_size`` (bilinear) -> float 0..1
-> channel order -> ``(x - mean) / std`` -> NCHW float32.

Transparent images are composited on a white background (not just stripped
of alpha: a transparent pixel's hidden colour is often black or garbage).
EXIF orientation is applied, so a photo is seen upright as a viewer shows it.
"""

from __future__ import annotations

import math
import io
import os
import sys
import warnings
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..common.errors import ImageError
from ..common.files import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, UnsafePathError, check_regular  # noqa: F401
from .manifest import RESIZE_RULES, Preprocessing

#: Largest image accepted, in pixels (width * height), checked from the header before decoding.
MAX_PIXELS = 40_000_000

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
_WHITE = (255, 255, 255)

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


STDIN = "-"  # an image path of "-" reads the image from standard input (a file named "-": pass ./-)


def load_image(path: Union[str, "os.PathLike[str]"]) -> Image.Image:
    """Open and fully decode an image file (or standard input for "-"); raise ImageError saying what is wrong."""
    if str(path) == STDIN:
        data = sys.stdin.buffer.read(MAX_IMAGE_BYTES + 1)
        if not data:
            raise ImageError("<stdin>: no data; pipe an image in, e.g. erde-run --image - < cat.png")
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"<stdin>: more than the {MAX_IMAGE_BYTES:,}-byte limit for an image")
        return _decode(io.BytesIO(data), "<stdin>")
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file (use --folder for a folder of images)")
    try:
        size = check_regular(path, MAX_IMAGE_BYTES, what="image file")
    except UnsafePathError as e:
        raise ImageError(str(e)) from None
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); re-copy or re-save the image")
    try:
        fh = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    with fh:
        return _decode(fh, path)


def _decode(fh, name) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh)
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(_too_big(name, width, height))
            img.load()  # decode now, inside the try: a truncated file fails here
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is too large for Pillow's decompression-bomb guard; resize it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"), SyntaxError, ...
        raise ImageError(f"{name}: truncated or corrupt image ({e}); re-copy or re-save it") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not lose the picture itself
        pass
    return img


def _too_big(path, width: int, height: int) -> str:
    return (f"{path}: image is {width}x{height} = {width * height / 1e6:.1f} megapixels, more than the "
            f"{MAX_PIXELS / 1e6:g}-megapixel limit (a decompression bomb?); resize it first")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited
    on white. 16-bit and 32-bit modes are scaled to 0..255, not clipped:
    ``I;16*`` maps 0..65535; ``I`` maps 0..255 as is, else 0..65535 (a 16-bit
    PNG read by older Pillow), else its own min..max; ``F`` maps 0..1 if it
    lies there, else 0..255 as is, else its own min..max.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _wide_to_uint8(np.asarray(img), mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert an image of mode {mode!r} to RGB ({e}); save it as 8-bit RGB") from None


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if a.size == 0:
        return a.astype(np.uint8)
    finite = a[np.isfinite(a)]
    if finite.size == 0:  # all NaN or infinite: nothing to show
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if mode.startswith("I;16"):
        scaled = a / 257.0  # 65535 -> 255
    elif mode == "I" and lo >= 0 and hi <= 255:
        scaled = a
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scaled = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scaled = a
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo and math.isfinite(hi - lo) else np.zeros_like(a)
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def _as_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ImageError(f"an image array must be HxWx3 (or HxW) uint8, got shape {image.shape} "
                             f"and dtype {image.dtype}; preprocessed float input goes to Engine.predict_array")
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise ImageError(f"expected a file path, a PIL image or a uint8 array, got {type(image).__name__}")


def resize(img: Image.Image, size: Sequence[int], rule: str = "stretch") -> Image.Image:
    """Resize to ``size`` = (height, width) with bilinear resampling.

    "stretch": straight to (height, width), ignoring the aspect ratio.
    "shorter-side-center-crop": scale keeping the aspect ratio so the image
    just covers (height, width) (for a square target: the shorter side becomes
    the target side), then cut the centre, as torchvision's Resize + CenterCrop.
    """
    height, width = int(size[0]), int(size[1])
    if rule == "stretch":
        return img if img.size == (width, height) else img.resize((width, height), _BILINEAR)
    if rule != "shorter-side-center-crop":
        raise ImageError(f"unknown resize rule {rule!r}; expected one of {RESIZE_RULES}")
    w, h = img.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, int(round(w * scale))), max(height, int(round(h * scale)))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _BILINEAR)
    left, top = int(round((new_w - width) / 2.0)), int(round((new_h - height) / 2.0))
    return img.crop((left, top, left + width, top + height))


def preprocess_one(image: ImageInput, pre: Preprocessing) -> np.ndarray:
    """One image (path, PIL image or HxWx3 uint8 array) -> float32 array [3, H, W]."""
    img = resize(to_rgb(_as_pil(image)), pre.input_size, pre.resize)
    x = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)  # H, W, 3 in RGB
    if pre.channel_order == "BGR":
        x = x[:, :, ::-1]
    mean = np.asarray(pre.mean, dtype=np.float32)
    inv_std = np.float32(1.0) / np.asarray(pre.std, dtype=np.float32)
    x = (x - mean) * inv_std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(images: Sequence[ImageInput], pre: Preprocessing) -> np.ndarray:
    """Images -> float32 array [N, 3, H, W], ready for ``Engine.predict_array``."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ImageError("no images given")
    return np.stack([preprocess_one(im, pre) for im in images])


def list_images(folder: Union[str, "os.PathLike[str]"], recursive: bool = False) -> List[Path]:
    """Image files in ``folder`` (by extension, any case; below it too with ``recursive``), sorted by path.

    Hidden files and folders (name starting with ".", e.g. macOS "._x.jpg") are skipped. Entries that are
    not folders are kept even if they are not regular files, so that reading them reports the problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "not a folder"
        raise ImageError(f"{folder}: {what}")
    try:
        entries = list(folder.rglob("*") if recursive else folder.iterdir())
    except OSError as e:
        raise ImageError(f"{folder}: cannot list ({e.strerror or e})") from None
    found = sorted((p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).parts)
    if not found:
        below = " or below" if recursive else ""
        raise ImageError(f"{folder}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder{below}")
    return found
