"""ERDE runtime: torch-free early-exit inference with onnxruntime, numpy and Pillow.

    from erde.runtime import Engine, bundled_model
    engine = Engine.load(bundled_model("cifar10"))          # or any folder written by erde-export
    for p in engine.predict(["cat.png"]):
        print(p.class_name, p.confidence, p.exit_index + 1, p.latency_ms)

The names below load on first use, so importing this package (or running a command's ``--help``) does
not start onnxruntime.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, List

_PUBLIC = {"Engine": "core.engine", "Prediction": "core.graphs", "ErdeError": "common.errors",
           "MismatchError": "core.selftest", "verify": "core.selftest", "preprocess": "core.preprocess"}
BUNDLED_MODELS = Path(__file__).resolve().parent / "models"

__all__ = sorted(_PUBLIC) + ["bundled_model", "bundled_models"]


def bundled_models() -> List[str]:
    """Names of the model folders shipped with the package (e.g. "cifar10", "cifar10-int8")."""
    if not BUNDLED_MODELS.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / "manifest.json").is_file())


def bundled_model(name: str = "cifar10") -> Path:
    """The folder of a bundled model, by name; ErdeError naming the bundled ones if there is no such model."""
    from .common.errors import ErdeError

    if name not in bundled_models():
        raise ErdeError(f"no bundled model {name!r}; bundled: {', '.join(bundled_models()) or 'none'}")
    return BUNDLED_MODELS / name


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
