"""How much does cutting a model into chained ONNX Runtime sessions cost, per thread-pool policy?

    python scripts/session_chain.py --model DIR [--threads 1,2] [--repeats 2000]

For each policy (one shared global pool; per-session pools without spinning; per-session pools
with onnxruntime's default spinning) and thread count, each in a fresh process (the global pool is
process-wide), it times at batch 1 the bare segment chain (plain ``session.run`` calls, no exit
test, no engine) against ``full.onnx``, and prints the median latencies and their ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import click

from erde.runtime.common.cli import POSITIVE, UsageError, command, console_script, model_option
from erde.runtime.tools.run_cli import model_folder
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


@command("python scripts/session_chain.py")
@model_option
@click.option("--threads", default="1,2", help="Thread counts, comma-separated (default 1,2).")
@click.option("--repeats", type=POSITIVE, default=2000, help="Timed calls (default 2000).")
@click.option("--one", nargs=2, default=None, hidden=True)  # POLICY THREADS: one measurement's child process
def cli(**kw) -> int:
    """The segment chain against full.onnx under each session policy, one process per measurement."""
    args = SimpleNamespace(**kw)
    args.model_dir = model_folder(args.model)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
        if min(args.threads) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--threads {args.threads!r}: expected comma-separated integers, e.g. 1,2") from None
    return _run(args)


main = console_script(cli)


def _run(args) -> int:
    if args.one:
        print(json.dumps(measure(args.model_dir, args.one[0], int(args.one[1]), args.repeats)))
        return 0
    load_manifest(args.model_dir)  # a bad folder: one clear error here, not in every child process
    print(f"{'policy':8} threads  full.onnx (p50)  segment chain (p50)  chain / full")
    for policy in POLICIES:
        for t in args.threads:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--model", str(args.model_dir),
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
