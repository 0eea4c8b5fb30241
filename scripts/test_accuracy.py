"""Test-split accuracy of a model folder at its calibrated threshold, per exit and of full.onnx, on this CPU.

    python scripts/test_accuracy.py --model DIR --data ../shared/datasets/cifar10

Torch-free. Under an emulator it tells whether a CPU kind gives the answers the folder was built with, e.g. an
x86 CPU without VNNI: ``qemu-x86_64 -cpu Haswell-noTSX .venv/bin/python scripts/test_accuracy.py ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np


from erde.runtime.common.cli import command, console_script, data_option, model_option
from erde.runtime.tools.run_cli import model_folder


@command("python scripts/test_accuracy.py")
@model_option
@data_option(True, "Image folder with test/<class>/*")
def cli(**kw) -> int:
    """Accuracy of a model folder on all test images at its own threshold (one JSON object on stdout)."""
    args = SimpleNamespace(**kw)
    args.model_dir = model_folder(args.model)
    return _run(args)


main = console_script(cli)


def _run(args) -> int:
    from erde.runtime.core import criteria
    from erde.runtime.tools.calibrate import validation_probs
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.core.engine import Engine
    from erde.runtime.common.machine import describe

    engine = Engine.load(args.model_dir, threads=1)
    crit, threshold, source = engine.resolve_threshold()
    test = image_folder_split(args.data, "test")
    probs = validation_probs(engine, test.files)  # [E, N, K], every exit
    exits = criteria.exit_indices(probs, crit, threshold)
    answered = probs[exits, np.arange(len(exits))].argmax(1)
    out = {"model_dir": str(args.model_dir), "images": len(test.files), "machine": describe(),
           "criterion": crit, "threshold": threshold, "threshold_source": source,
           "accuracy_at_threshold": float((answered == test.labels).mean()),
           "accuracy_per_exit": [float((p.argmax(1) == test.labels).mean()) for p in probs],
           "exit_shares": [float((exits == k).mean()) for k in range(engine.num_exits)]}
    if engine.has_full:
        from erde.runtime.core.preprocess import preprocess_one

        full = np.concatenate([engine.run_full(np.stack([preprocess_one(f, engine.manifest.preprocessing)
                                                          for f in test.files[i:i + 256]]))
                               for i in range(0, len(test.files), 256)])
        out["accuracy_full_onnx"] = float((full.argmax(1) == test.labels).mean())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
