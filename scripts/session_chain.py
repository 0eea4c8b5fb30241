"""How much does cutting a model into chained ONNX Runtime sessions cost, per thread-pool policy?

    python scripts/session_chain.py MODEL_DIR [--threads 1 2] [--repeats 2000]

For each policy (one shared global pool; per-session pools without spinning; per-session pools
with onnxruntime's default spinning) and thread count, each in a fresh process (the global pool is
process-wide), it times at batch 1 the bare segment chain (plain ``session.run`` calls, no exit
test, no engine) against ``full.onnx``, and prints the median latencies and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from erde.runtime.common.cli import Parser, positive_int, run_cli
from erde.runtime.common.errors import ErdeError
from erde.runtime.core.manifest import load_manifest

POLICIES = ("global", "no-spin", "spin")


def measure(model_dir: Path, policy: str, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    manifest = json.loads((model_dir / "manifest.json").read_text())
    if policy == "global":
        ort.set_global_thread_pool_sizes(threads, 1)

    def session(name: str):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if policy == "global":
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            if policy == "no-spin":
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(model_dir / name), so, providers=["CPUExecutionProvider"])

    chain = [(session(s["file"]), s["inputs"][0]["name"], s["feature_output"] or s["probs_output"])
             for s in manifest["segments"]]
    full = session(manifest["full"]["file"])
    h, w = manifest["preprocessing"]["input_size"]
    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)

    def run_chain():
        feed = x
        for sess, name, out in chain:
            feed = sess.run([out], {name: feed})[0]

    def median_us(fn) -> float:
        for _ in range(min(200, repeats)):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e6)

    full_us = median_us(lambda: full.run(None, {manifest["full"]["input_name"]: x}))
    chain_us = median_us(run_chain)
    return {"policy": policy, "threads": threads, "full_us": full_us, "chain_us": chain_us,
            "ratio": chain_us / full_us}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = Parser(prog="python scripts/session_chain.py", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=positive_int, default=2000)
    ap.add_argument("--one", nargs=2, metavar=("POLICY", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return run_cli(lambda: _run(ap.parse_args(argv)), argv)


def _run(args: argparse.Namespace) -> int:
    if args.one:
        print(json.dumps(measure(args.model_dir, args.one[0], int(args.one[1]), args.repeats)))
        return 0
    load_manifest(args.model_dir)  # a bad folder: one clear error here, not in every child process
    print(f"{'policy':8} threads  full.onnx (p50)  segment chain (p50)  chain / full")
    for policy in POLICIES:
        for t in args.threads:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(args.model_dir),
                                   "--repeats", str(args.repeats), "--one", policy, str(t)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ErdeError(f"{args.model_dir}: the {policy} measurement with {t} threads failed ({last})")
            r = json.loads(proc.stdout)
            print(f"{policy:8} {t:>7}  {r['full_us']:>11.0f} us  {r['chain_us']:>15.0f} us  {r['ratio']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
