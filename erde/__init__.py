"""ERDE: early-exit image classifiers that answer faster on edge CPUs. The public Python API:

    from erde import Engine, bundled_model

    engine = Engine.load(bundled_model("cifar10"))          # or any folder written by erde-export
    for p in engine.predict(["cat.png"]):
        print(p.class_name, p.confidence, p.exit_index + 1, p.latency_ms)

Everything here is torch-free (the ``erde.runtime`` package; training and export live in ``erde.training`` and
``erde.export``), and loads on first use, so ``import erde`` does not start onnxruntime.

``erde`` is a regular package (this file), so a folder named ``erde`` in the current directory, such as a clone
of this repository, does not shadow the installed copy. In a checkout the sub-packages sit beside this folder
(pyproject.toml maps them in); the line below lets a checkout import them the same way.
"""

from pathlib import Path as _Path

if not (_Path(__file__).parent / "runtime").is_dir():
    __path__.append(str(_Path(__file__).resolve().parent.parent))  # noqa: F821 (a package's __path__)

from .runtime import __all__, bundled_model, bundled_models  # noqa: E402,F401


def __getattr__(name: str):
    if name == "__version__":
        from .runtime.common.cli import erde_version

        return erde_version()
    from . import runtime

    return getattr(runtime, name)
