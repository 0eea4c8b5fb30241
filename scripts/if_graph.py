"""Probe: the one-graph batch-1 path (early_exit.onnx, nested If nodes) against the segment chain.

    python scripts/if_graph.py MODEL_DIR [--threads 1] [--calls 3000]

Copies the model folder, adds early_exit.onnx with the exporter's own builder
(``erde.export.early_exit_graph``), checks it against the chain, and times at batch 1, interleaved:
full.onnx, each path with every segment running, and each path leaving at exit 1. This is how
``erde-export --single-graph`` was judged (see the issue-12 notes); run it for your model and CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from erde.export.early_exit_graph import write_early_exit_graph
from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import load_manifest, save_manifest


def _time(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - t0) / calls * 1e6)
    return min(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(args.model_dir, folder)
        m = dataclasses.replace(load_manifest(folder), early_exit_graph=None)
        save_manifest(folder, dataclasses.replace(m, early_exit_graph=write_early_exit_graph(folder, m)))
        single = Engine.load(folder, threads=args.threads)
        chain = Engine.load(args.model_dir, threads=args.threads)
        if chain.single_graph:
            raise SystemExit(f"{args.model_dir} already has early_exit.onnx; pass a folder exported without it")
        x = np.random.default_rng(0).standard_normal((1,) + chain._input_shape).astype(np.float32)
        probs, k = single.single_graph_probs(x, single.num_exits - 1)
        diff = float(np.abs(probs - chain.exit_probs(x)[-1]).max())
        print(f"early_exit.onnx vs the chain, last exit: max |probability difference| {diff:.1e}, exit {k + 1}")
        full = _time(lambda: chain.run_full(x), args.calls)
        rows = [("full.onnx", full),
                ("one graph, every segment", _time(lambda: single.predict_array(x, early_exit=False), args.calls)),
                ("chain, every segment", _time(lambda: chain.predict_array(x, early_exit=False), args.calls)),
                ("one graph, leaving at exit 1", _time(lambda: single.predict_array(x, 0.0), args.calls)),
                ("chain, leaving at exit 1", _time(lambda: chain.predict_array(x, 0.0), args.calls))]
        for name, us in rows:
            print(f"{name:30s} {us:8.1f} us  {us / full:5.2f}x full.onnx")


if __name__ == "__main__":
    main()
