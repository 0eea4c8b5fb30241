"""erde-bench's measurements: timed series of calls, their summary rows, inputs and the methods timed."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from erde.runtime.core import criteria
from erde.runtime.common.errors import ErdeError

DEFAULT_THRESHOLDS: Dict[str, Tuple[float, ...]] = {
    name: c.report_thresholds for name, c in criteria.REGISTRY.items()
}
ENGINE, ENGINE_ALL, FULL, TORCH = "engine", "engine-all-segments", "full-onnx", "torch-eager"
ENGINE_CMP, FULL_CMP = "compare-engine", "compare-full-onnx"  # --compare DIR: e.g. the int8 folder


# ----------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Series:
    """Timed calls of one (method, threshold, batch size)."""

    method: str
    threshold: Optional[criteria.Threshold]
    batch: int
    run: Callable[[np.ndarray], List[int]]  # input -> exit index per image (-1: no exits, e.g. full.onnx)
    threshold_source: str = ""
    times_ms: List[float] = field(default_factory=list)  # one per call
    exits: List[int] = field(default_factory=list)  # one per image


@dataclass(frozen=True)
class Row:
    method: str
    threshold: Optional[criteria.Threshold]
    threshold_source: str
    batch: int
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float
    mean_macs: float
    macs_fraction: float
    exit_shares: Tuple[float, ...]  # empty for full.onnx
    exit_mean_ms: Tuple[float, ...]  # mean latency per exit taken (batch 1); nan where no image left there
    accuracy: float = math.nan  # on every loaded image whose folder names its class; nan without labels


def _timed(series: Sequence[Series], inputs: Sequence[np.ndarray], warmup: int, repeats: int,
           rounds: int = 5) -> None:
    """Warm up every series, then time ``repeats`` calls of each, in rounds, on the same inputs. The inputs are
    taken in one seeded shuffled order, so fewer calls than inputs time a sample of all of them (an image folder
    lists its classes one after the other, and the exits taken depend on the class)."""
    n = len(inputs)
    order = np.random.default_rng(0).permutation(n)
    for s in series:
        for i in range(warmup):
            s.run(inputs[order[i % n]])
    rounds = max(1, min(rounds, repeats))
    bounds = [round(repeats * r / rounds) for r in range(rounds + 1)]
    clock = time.perf_counter
    for r in range(rounds):
        for s in series:
            for i in range(bounds[r], bounds[r + 1]):
                x = inputs[order[i % n]]
                t0 = clock()
                exits = s.run(x)
                s.times_ms.append((clock() - t0) * 1000.0)
                s.exits.extend(exits)


def summarize(s: Series, cum_macs: Sequence[int], full_macs: int) -> Row:
    t = np.asarray(s.times_ms, dtype=np.float64)
    ex = np.asarray(s.exits, dtype=np.int64)
    num_exits = len(cum_macs)
    if len(ex) and ex.min() >= 0:
        mean_macs = float(np.asarray(cum_macs, dtype=np.float64)[ex].mean())
        shares = tuple(float(v) for v in np.bincount(ex, minlength=num_exits) / len(ex))
    else:
        mean_macs, shares = float(full_macs), ()
    per_exit: Tuple[float, ...] = ()
    if s.batch == 1 and shares:
        per_exit = tuple(float(t[ex == k].mean()) if (ex == k).any() else math.nan for k in range(num_exits))
    p50, p95, p99 = (float(v) for v in np.percentile(t, [50, 95, 99]))
    return Row(s.method, s.threshold, s.threshold_source, s.batch, len(t), p50, p95, p99, float(t.mean()),
               s.batch * len(t) / (t.sum() / 1000.0), mean_macs, mean_macs / full_macs, shares, per_exit)


# ----------------------------------------------------------------------------------------------------------
# Inputs


def find_images(folder: Union[str, Path]) -> List[Path]:
    """Image files under ``folder`` (recursively), hidden ones skipped, sorted by path."""
    from erde.runtime.core.preprocess import list_images

    try:
        return list_images(folder, recursive=True)
    except ErdeError as e:
        raise ErdeError(f"{e}; pass --images DIR, a folder of images") from None


def load_inputs(files: Sequence[Path], pre, max_images: int) -> Tuple[np.ndarray, List[Path], List[str]]:
    """Preprocess up to ``max_images`` files (a seeded sample across the whole folder).

    Returns (array [N, 3, H, W], the files used, one line per unreadable file)."""
    from erde.runtime.core.preprocess import preprocess_one

    files = list(files)
    if len(files) > max_images:
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:max_images])
        files = [files[i] for i in keep]
    arrays, used, bad = [], [], []
    for p in files:
        try:
            arrays.append(preprocess_one(p, pre))
            used.append(p)
        except ErdeError as e:
            bad.append(str(e))
    if not arrays:
        raise ErdeError(f"none of the {len(files)} image files could be read (first: {bad[0]})")
    return np.stack(arrays), used, bad


def _batches(x: np.ndarray, batch: int) -> List[np.ndarray]:
    """Batches of ``batch`` images cut from x (views where possible; x is cycled if it is smaller)."""
    n = len(x)
    if n < batch:
        return [np.ascontiguousarray(x[np.arange(batch) % n])]
    return [x[s:s + batch] for s in range(0, n - batch + 1, batch)]


# ----------------------------------------------------------------------------------------------------------
# Methods


def engine_series(engine, thresholds: Sequence[Tuple[float, str]], criterion: str, batch: int) -> List[Series]:
    out = []
    for t, source in thresholds:
        def run(x: np.ndarray, t: float = t) -> List[int]:
            return [p.exit_index for p in engine.predict_array(x, t, criterion)]
        out.append(Series(ENGINE, t, batch, run, source))
    return out


def torch_eager(checkpoint: Path, manifest, threads: Optional[int], criterion: str, sample: np.ndarray
                ) -> Tuple[Callable[[float], Callable[[np.ndarray], List[int]]], Dict[str, str], np.ndarray]:
    """The PyTorch eager early-exit loop over the checkpoint's student.

    Returns (threshold -> run function, facts for the summary, every exit's
    probabilities [E, N, K] for ``sample``, to compare with the ONNX graphs).
    Raises ImportError without torch, ErdeError for a checkpoint that does not
    match the model folder."""
    import torch

    from erde.training.checkpoint import load_model

    model, ckpt = load_model(checkpoint)
    if model.cfg.num_exits != manifest.num_exits or list(ckpt["class_names"]) != list(manifest.class_names):
        raise ErdeError(f"{checkpoint}: {model.cfg.num_exits} exits and classes {ckpt['class_names']} do not match "
                        f"the model folder ({manifest.num_exits} exits); pass the checkpoint it was exported from")
    if threads is not None:
        torch.set_num_threads(threads)
    last = manifest.num_exits - 1
    facts = {"torch": str(torch.__version__), "torch_threads": str(torch.get_num_threads())}
    want = manifest.source.get("checkpoint_sha256", "")
    have = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    if want and want != have:
        facts["warning"] = (f"{checkpoint} is not the checkpoint this model folder was exported from "
                            "(sha256 differs from manifest source.checkpoint_sha256)")

    def make(t: float) -> Callable[[np.ndarray], List[int]]:
        def run(x_np: np.ndarray) -> List[int]:
            x = torch.from_numpy(x_np)
            with torch.inference_mode():
                for k in range(last + 1):
                    x, logits = model.run_segment(k, x)
                    if k == last:
                        return [k]
                    p = torch.softmax(logits, dim=1).numpy()
                    if criteria.passes(p, criterion, criteria.per_exit(t, last + 1)[k]).all():
                        return [k]
            return [last]
        return run

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(sample))
        probs = []
        for k in range(last + 1):
            x, logits = model.run_segment(k, x)
            probs.append(torch.softmax(logits, dim=1).numpy())
    return make, facts, np.stack(probs)


def labels_of(files: Sequence[Path], class_names: Sequence[str]) -> Optional[np.ndarray]:
    """Labels from the images' folder names (``<class>/<image>``), or None unless every image has one."""
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index.get(p.parent.name) for p in files]
    return None if any(v is None for v in labels) else np.asarray(labels, dtype=np.int64)


def accuracies(engine, x: np.ndarray, labels: np.ndarray, criterion: str,
               thresholds: Sequence[criteria.Threshold]) -> Tuple[Dict[criteria.Threshold, float], float]:
    """Accuracy of the engine at each threshold, and of the final exit (= full.onnx), on every image."""
    probs = engine.exit_probs(x, batch_size=256)
    correct = probs.argmax(axis=2) == labels[None, :]
    at = {}
    for t in thresholds:
        taken = criteria.exit_indices(probs, criterion, t)
        at[t] = float(correct[taken, np.arange(len(labels))].mean())
    return at, float(correct[-1].mean())
