"""Test-split accuracy of a model folder at its calibrated threshold, per exit and of full.onnx, on this CPU.

    python scripts/test_accuracy.py MODEL_DIR --data ../shared/datasets/cifar10

Torch-free. Under an emulator it tells whether a CPU kind gives the answers the folder was built with, e.g. an
x86 CPU without VNNI: ``qemu-x86_64 -cpu Haswell-noTSX .venv/bin/python scripts/test_accuracy.py ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from erde.runtime.common.cli import Parser, run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = Parser(prog="python scripts/test_accuracy.py", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="image folder with test/<class>/*")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), argv)


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
