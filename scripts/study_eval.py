"""Evaluation steps of the CIFAR-10 study: the engine on the test split, latency profiles, the machine.

Every model is evaluated through the ONNX Runtime engine on its exported folder. Its latency
profile (``erde-profile``'s measure, batch 1) turns each threshold's exit shares into the
expected milliseconds per image on this machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from erde.runtime.core.criteria import exit_indices, sweep
from erde.runtime.common.errors import ErdeError
from erde.runtime.common.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = {
    "max-prob": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
    "entropy": (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001),
}


def test_split_exit_probs(model_dir: Path, images: List[Path], threads: int) -> np.ndarray:
    """Every exit's probabilities [E,N,K] on the test images, computed by ONNX Runtime segment graphs."""
    from erde.runtime.core.engine import Engine
    from erde.runtime.core.preprocess import preprocess

    engine = Engine.load(model_dir, threads=threads)
    pre = engine.manifest.preprocessing
    out = []
    for start in range(0, len(images), 500):
        x = preprocess(images[start:start + 500], pre)
        out.append(engine.exit_probs(x))
    probs = np.concatenate(out, axis=1)
    # The engine's own early-exit path must agree with the sweep computed from these probabilities.
    x = preprocess(images[:256], pre)
    for t in (0.5, 0.9):
        preds = engine.predict_array(x, threshold=t, criterion="max-prob")
        expected = exit_indices(probs[:, :256], "max-prob", t)
        if [p.exit_index for p in preds] != expected.tolist():
            raise ErdeError(f"{model_dir}: engine exits differ from the all-exit sweep at t={t}")
    return probs


def latency_profile(model_dir: Path, threads: int, calls: int = 1000):
    """The model's latency profile for this machine at ``threads``: the stored one, or measured now (erde-profile
    in a fresh process: one process holds one onnxruntime pool size) and stored."""
    import sys

    from erde.runtime.core.manifest import load_manifest
    from erde.runtime.tools.profile import ProfileError, find_profile

    try:
        return find_profile(model_dir, load_manifest(model_dir), threads)
    except ProfileError:
        pass
    r = subprocess.run([sys.executable, "-m", "erde.runtime.tools.profile_cli", "--model", str(model_dir), "--threads", str(threads),
                        "--calls", str(calls)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ErdeError(f"erde-profile {model_dir} --threads {threads} failed: {r.stderr.strip()}")
    return find_profile(model_dir, load_manifest(model_dir), threads)


def evaluate(model_dir: Path, name: str, test: Tuple[List[Path], np.ndarray], cache: Path,
             threads: int, profile=None) -> Dict:
    """Exit accuracies and the threshold sweeps on the test split; with a latency profile, milliseconds too."""
    if cache.exists():
        return json.loads(cache.read_text())
    from erde.runtime.core.manifest import load_manifest

    images, labels = test
    probs = test_split_exit_probs(model_dir, images, threads)
    m = load_manifest(model_dir)
    cum = [s.cumulative_macs for s in m.segments]
    result = {"method": name, "exit_accuracy": [float((p.argmax(1) == labels).mean()) for p in probs],
              "cumulative_macs": cum, "full_macs": m.full_macs,
              "points": [{"criterion": p.criterion, "threshold": p.threshold, "accuracy": p.accuracy,
                          "mean_macs": p.mean_macs, "exit_shares": list(p.exit_shares)}
                         for criterion, grid in THRESHOLDS.items()
                         for p in sweep(probs, labels, cum, m.full_macs, criterion, grid)]}
    if profile is not None:
        result["cumulative_ms"] = list(profile.cumulative_ms)
        result["full_ms"] = profile.full_ms
        result["latency_machine"] = profile.machine.describe()
        for p in result["points"]:
            p["mean_ms"] = profile.expected_ms(p["exit_shares"])
    write_json_atomic(cache, result)
    return result


def load_test_split(data: Path) -> Tuple[List[Path], np.ndarray, List[str]]:
    """The test split of an image folder: files, labels and class names (``datasets.image_folder_split``)."""
    from erde.runtime.common.datasets import image_folder_split

    test = image_folder_split(data, "test")
    return list(test.files), test.labels, list(test.class_names)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
