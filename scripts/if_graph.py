"""Probe: the one-graph batch-1 path (early_exit.onnx, nested If nodes) against the segment chain.

    python scripts/if_graph.py --model DIR [--threads 1] [--calls 3000]

Copies the model folder, adds early_exit.onnx with the exporter's own builder
(``erde.export.early_exit_graph``), checks it against the chain, and times at batch 1, interleaved:
full.onnx, each path with every segment running, and each path leaving at exit 1. This is how
``erde-export --single-graph`` was judged (see the issue-12 notes); run it for your model and CPU.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

from erde.export.early_exit_graph import write_early_exit_graph
from erde.runtime.common.cli import POSITIVE, command, console_script, model_option
from erde.runtime.common.errors import ErdeError
from erde.runtime.core.engine import Engine
from erde.runtime.tools.run_cli import model_folder
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


@command("python scripts/if_graph.py")
@model_option
@click.option("--threads", type=POSITIVE, default=1, help="onnxruntime threads (default 1).")
@click.option("--calls", type=POSITIVE, default=3000, help="Timed calls per method (default 3000).")
def cli(**kw) -> None:
    """early_exit.onnx (one graph with If nodes) against the segment chain of a model folder."""
    args = SimpleNamespace(**kw)
    args.model_dir = model_folder(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(args.model_dir, folder)
        m = dataclasses.replace(load_manifest(folder), early_exit_graph=None)
        save_manifest(folder, dataclasses.replace(m, early_exit_graph=write_early_exit_graph(folder, m)))
        single = Engine.load(folder, threads=args.threads)
        chain = Engine.load(args.model_dir, threads=args.threads)
        if chain.single_graph:
            raise ErdeError(f"{args.model_dir} already has early_exit.onnx; pass a folder exported without it")
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


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
