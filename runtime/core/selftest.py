"""The self-test a model folder carries, and its check on the machine at hand (``erde-verify``).

A model folder is built on one machine and run on others. ``selftest.npz`` (numpy arrays, no pickle),
written by erde-export and erde-quantize, holds:

    images     uint8 [N, H, W, 3]  validation images at the model's input size (RGB)
    labels     int64 [N]           their classes (-1 where not known)
    probs      float32 [E, N, K]   every exit's probabilities, computed by the machine that built the folder
    full_probs float32 [N, K]      full.onnx's (absent without full.onnx)
    machine    str                 that machine's fingerprint

``verify`` runs the images here and compares, at the folder's threshold: the answered class, the exit
taken, and the largest probability difference, against tolerances that fit the folder's precision
(fp32 differs between CPUs by rounding only; int8 kernels may round requantization differently).
An int8 graph that saturates on this CPU, or an altered weight, moves far beyond them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import criteria
from ..common.errors import EXIT_MISMATCH, ErdeError
from ..common.files import read_capped, write_atomic

SELFTEST_NAME = "selftest.npz"
SELFTEST_IMAGES = 24  # few enough for a check of some tens of milliseconds (docs/reference.md, erde-verify)
MAX_SELFTEST_BYTES = 8 << 20


@dataclass(frozen=True)
class Tolerance:
    min_class_agreement: float
    min_exit_agreement: float
    max_prob_diff: float


#: By precision, for 24 images. fp32: rounding only; one near-tie may flip. int8: the integer sums are exact,
#: the requantization and the fp32 parts around it may round differently on other kernels; two near-ties may
#: flip. A saturating kernel agrees far less (the measured figures are in the README and FACTS).
TOLERANCES = {"fp32": Tolerance(0.95, 0.90, 1e-3), "int8": Tolerance(0.90, 0.85, 0.10)}


class SelfTestError(ErdeError):
    """The self-test is missing, unreadable or made for another model."""


class MismatchError(ErdeError):
    """This machine's answers differ from those the model folder was built with."""

    exit_code = EXIT_MISMATCH


@dataclass(frozen=True)
class Golden:
    images: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    full_probs: Optional[np.ndarray]
    machine: str


@dataclass(frozen=True)
class Check:
    name: str  # "class agreement", "exit agreement", "largest probability difference"
    value: float
    limit: float
    ok: bool

    def line(self) -> str:
        shown = f"{self.value:.1%} (at least {self.limit:.0%})" if "agreement" in self.name else \
            f"{self.value:.2e} (at most {self.limit:.0e})"
        return f"{'✓' if self.ok else '✗'} {self.name}: {shown}"


@dataclass(frozen=True)
class Verdict:
    checks: Tuple[Check, ...]
    images: int
    precision: str
    built_on: str

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        """One line: what disagreed (or that all agreed)."""
        bad = [c for c in self.checks if not c.ok]
        what = "; ".join(c.line()[2:] for c in (bad or self.checks))
        return (f"{'passed' if not bad else 'FAILED'} on {self.images} images ({self.precision}): {what}"
                + ("" if not bad else f"; the folder was built on {self.built_on}"))


# ---- writing ------------------------------------------------------------------------------------


def write_golden(folder: Path, engine, images: np.ndarray, labels: Sequence[int], machine: str) -> None:
    """Run ``images`` (uint8 [N,H,W,3] at the input size) through ``engine`` here and store the answers."""
    from .preprocess import preprocess

    x = preprocess(list(images), engine.manifest.preprocessing)
    arrays = {"images": np.asarray(images, dtype=np.uint8), "labels": np.asarray(labels, dtype=np.int64),
              "probs": engine.exit_probs(x), "machine": np.array(machine)}
    if engine.has_full:
        arrays["full_probs"] = engine.run_full(x)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic(Path(folder) / SELFTEST_NAME, buf.getvalue())


def golden_images(files: Sequence[Path], manifest, count: int = SELFTEST_IMAGES) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` of ``files``, spread evenly, as uint8 [N,H,W,3] at the model's input size, and their positions."""
    from .preprocess import load_image, resize, to_rgb

    pick = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    pre = manifest.preprocessing
    out = []
    for i in pick:
        with load_image(files[i]) as img:
            out.append(np.asarray(resize(to_rgb(img), pre.input_size, pre.resize), dtype=np.uint8))
    return np.stack(out), pick


def build_selftest(folder: Path, data: Optional[Path] = None, count: int = SELFTEST_IMAGES) -> str:
    """Write ``folder``'s self-test: ``count`` validation images of ``data`` (the split training carved), or,
    without data, seeded smooth random images (labels -1). Returns a line saying which."""
    from ..common.datasets import validation_files
    from .manifest import default_val_fraction
    from .engine import Engine
    from ..common.machine import MachineKey

    engine = Engine.load(folder)  # the process's pool as it is (the exporter's parity check may have made it)
    m = engine.manifest
    if data is not None:
        vd = validation_files(data, m.class_names, default_val_fraction(m))
        if not vd.files:
            raise SelfTestError(f"{data}: the validation split is empty; nothing to build the self-test from")
        images, pick = golden_images(vd.files, m, count)
        labels, what = vd.labels[pick], f"{len(images)} validation images of {data}"
    else:
        h, w = m.preprocessing.input_size
        rng = np.random.default_rng(0)
        coarse = rng.integers(0, 256, (count, max(h // 4, 1), max(w // 4, 1), 3)).astype(np.float32)
        images = np.stack([_upscale(c, h, w) for c in coarse])
        labels, what = np.full(count, -1), f"{count} seeded random images (no --data: pass it for real ones)"
    write_golden(folder, engine, images, labels, MachineKey.here(1).describe())
    return f"self-test: {what}, answers of {MachineKey.here(1).describe()}"


def _upscale(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.uint8)


# ---- reading and checking -----------------------------------------------------------------------


def load_golden(folder: Path) -> Golden:
    path = Path(folder) / SELFTEST_NAME
    if not path.exists():
        raise SelfTestError(f"{path}: no self-test in this model folder; re-export it (erde-export, erde-quantize) "
                            "with this erde version, or skip the check with --no-verify")
    try:
        with np.load(io.BytesIO(read_capped(path, MAX_SELFTEST_BYTES, inside=folder, what="self-test")),
                     allow_pickle=False) as z:
            g = Golden(z["images"], z["labels"], z["probs"], z["full_probs"] if "full_probs" in z else None,
                       str(z["machine"]))
    except (ValueError, KeyError, OSError) as e:
        raise SelfTestError(f"{path}: unreadable self-test ({e}); re-export the model folder") from None
    if g.images.dtype != np.uint8 or g.images.ndim != 4 or g.probs.ndim != 3 or g.probs.shape[1] != len(g.images):
        raise SelfTestError(f"{path}: malformed self-test arrays; re-export the model folder")
    return g


def verify(engine, golden: Optional[Golden] = None, criterion: Optional[str] = None,
           threshold: Optional[float] = None) -> Verdict:
    """Run the folder's self-test on this machine; the Verdict says what agreed, within the tolerances."""
    from .preprocess import preprocess

    g = golden or load_golden(engine.folder)
    m = engine.manifest
    h, w = m.preprocessing.input_size
    if g.images.shape[1:] != (h, w, 3) or g.probs.shape[0] != engine.num_exits or g.probs.shape[2] != len(m.class_names):
        raise SelfTestError(f"{engine.folder / SELFTEST_NAME}: made for another model (images {g.images.shape[1:]}, "
                            f"{g.probs.shape[0]} exits); re-export the model folder")
    criterion, threshold, _ = engine.resolve_threshold(threshold, criterion)
    x = preprocess(list(g.images), m.preprocessing)
    here = engine.exit_probs(x)
    exits_ref = criteria.exit_indices(g.probs, criterion, threshold)
    exits_here = criteria.exit_indices(here, criterion, threshold)
    n = np.arange(len(g.images))
    class_ref, class_here = g.probs[exits_ref, n].argmax(1), here[exits_here, n].argmax(1)
    diffs: List[float] = [float(np.abs(here - g.probs).max())]
    same_class = [class_ref == class_here]
    if g.full_probs is not None and engine.has_full:
        full = engine.run_full(x)
        diffs.append(float(np.abs(full - g.full_probs).max()))
        same_class.append(full.argmax(1) == g.full_probs.argmax(1))
    precision = "int8" if any(s.precision == "int8" for s in m.segments) else "fp32"
    tol = TOLERANCES[precision]
    class_agreement = float(min(s.mean() for s in same_class))
    exit_agreement = float((exits_ref == exits_here).mean())
    diff = max(diffs)
    checks = (Check("class agreement", class_agreement, tol.min_class_agreement,
                    class_agreement >= tol.min_class_agreement),
              Check("exit agreement", exit_agreement, tol.min_exit_agreement, exit_agreement >= tol.min_exit_agreement),
              Check("largest probability difference", diff, tol.max_prob_diff, diff <= tol.max_prob_diff))
    return Verdict(checks, len(g.images), precision, g.machine)


# ---- once per machine: the cached check that the commands make --------------------------------


def _cache_file(engine, threads: Optional[int]) -> Tuple[Path, dict]:
    import hashlib
    import json

    from ..common.datasets import cache_dir
    from ..common.machine import MachineKey
    from .manifest import model_sha256
    from ..common.ownership import sha256_file

    key = {"machine": MachineKey.here(threads).to_dict(), "model_sha256": model_sha256(engine.manifest),
           "selftest_sha256": sha256_file(engine.folder / SELFTEST_NAME)}
    text = json.dumps(key, sort_keys=True)
    name = hashlib.sha256(text.encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{name}.json", json.loads(text)


def remember(engine, threads: Optional[int], verdict: Verdict) -> None:
    """Keep the verdict for this machine fingerprint and model in the per-user folder (never in the package)."""
    import json

    from ..common.files import write_json_atomic

    try:
        path, key = _cache_file(engine, threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, dict(key, passed=verdict.passed, summary=verdict.summary()))
    except OSError:
        pass  # no per-user folder: the check runs again next time


def require_verified(engine, threads: Optional[int]) -> Optional[Verdict]:
    """Refuse (MismatchError) a folder whose self-test fails on this machine; the verdict is cached per machine
    fingerprint and model, so only the first run here pays for it (None when it came from the cache)."""
    import json

    if not (engine.folder / SELFTEST_NAME).exists():
        raise SelfTestError(f"{engine.folder / SELFTEST_NAME}: no self-test, so nothing shows that this machine "
                            "gives the answers the folder was built with; re-export it with this erde version "
                            "(erde-export, erde-quantize), or pass --no-verify")
    path, key = _cache_file(engine, threads)
    try:
        cached = json.loads(path.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("passed"), bool):
            if not cached["passed"]:
                raise MismatchError(f"{engine.folder}: this machine's answers differ from the model folder's "
                                    f"self-test ({cached.get('summary', '')}); do not use it here: rebuild it "
                                    "here, or pass --no-verify to run it anyway")
            return None
    except (OSError, ValueError):
        pass
    verdict = verify(engine)
    remember(engine, threads, verdict)
    if not verdict.passed:
        raise MismatchError(f"{engine.folder}: this machine's answers differ from the model folder's self-test "
                            f"({verdict.summary()}); do not use it here: rebuild it here, or pass --no-verify "
                            "to run it anyway")
    return verdict
