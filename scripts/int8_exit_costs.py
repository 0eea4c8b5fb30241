"""Where an early-exit model folder's time goes at batch 1: each segment split into its trunk (up to the
features it hands on) and its exit head, against full.onnx, with the exit shares of the test images.

    python scripts/int8_exit_costs.py --model runtime/models/cifar10-int8 --data ../shared/datasets/cifar10 \\
        --threads 1 --out benchmarks/results/int8-exits-epyc

Every graph runs in one process through the engine's session options, in interleaved rounds of consecutive
calls (as erde-profile times). The trunk and head graphs are cut from the shipped segment graphs with
onnx.utils.extract_model (the head reads the features tensor the segment hands on), so they are the same
nodes onnxruntime runs in the segment. From them:

- expected graph time of the engine = sum over exits k of share_k x (segments 1..k);
- the same with free heads (trunks only, the final exit's head kept: full.onnx has it too);
- the engine's measured mean (``predict_array`` over the test images at the folder's threshold) and that of its
  segment chain alone (``binding.run_until``): their difference is the engine's Python work around the chain,
  and the chain's difference from the expected graph time is what one image after another costs beyond the
  graphs' medians on one repeated image (the calls, the exit tests, the caches).

Needs onnx (erde[quantize]); prints a table and, with --out, writes README.md and results.json there.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

from erde.runtime.common.cli import PATH, POSITIVE, command, command_line, console_script, data_option, model_option
from erde.runtime.tools.run_cli import model_folder


def _cut(src: Path, dst: Path, inputs, outputs) -> Path:
    import onnx.utils

    onnx.utils.extract_model(str(src), str(dst), list(inputs), list(outputs))
    return dst


def _timed(series, calls: int, rounds: int = 5):
    """{name: median ms} of ``series`` ({name: zero-argument call}), each in blocks of consecutive calls."""
    clock = time.perf_counter
    per = max(1, calls // rounds)
    seen = {name: [] for name in series}
    for fn in series.values():
        for _ in range(50):
            fn()
    for _ in range(rounds):
        for name, fn in series.items():
            for _ in range(per):
                t0 = clock()
                fn()
                seen[name].append((clock() - t0) * 1000.0)
    return {name: statistics.median(v) for name, v in seen.items()}


def measure(model: Path, data: Path, threads: int, calls: int, images: int):
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.core.engine import Engine
    from erde.runtime.core.preprocess import preprocess_one
    from erde.runtime.core.sessions import make_session

    engine = Engine.load(model, threads=threads)
    m = engine.manifest
    criterion, threshold, _ = engine.resolve_threshold()
    test = image_folder_split(data, "test")
    files = test.files[:: max(1, len(test.files) // images)][:images]
    x = np.stack([preprocess_one(f, m.preprocessing) for f in files])
    exits = np.array([p.exit_index for p in engine.predict_array(x, threshold, criterion)])
    shares = [float((exits == k).mean()) for k in range(engine.num_exits)]

    one = x[:1]
    series, feeds = {}, one
    with tempfile.TemporaryDirectory() as tmp:
        for k, seg in enumerate(m.segments):
            src = Path(model) / seg.file
            sess = make_session(str(src), threads)
            names = [o.name for o in sess.get_outputs()]
            inp = sess.get_inputs()[0].name
            series[f"segment {k + 1}"] = (lambda s=sess, i=inp, f=feeds: s.run(None, {i: f}))
            if k < len(m.segments) - 1:
                feat = next(n for n in names if n.startswith("features"))
                probs = next(n for n in names if n.startswith("probs"))
                trunk = make_session(str(_cut(src, Path(tmp) / f"trunk{k}.onnx", [inp], [feat])), threads)
                head = make_session(str(_cut(src, Path(tmp) / f"head{k}.onnx", [feat], [probs])), threads)
                out = sess.run([feat], {inp: feeds})[0]
                series[f"trunk {k + 1}"] = (lambda s=trunk, i=inp, f=feeds: s.run(None, {i: f}))
                series[f"head {k + 1}"] = (lambda s=head, i=feat, f=out: s.run(None, {i: f}))
                feeds = out
        full = make_session(str(Path(model) / m.full.file), threads)
        series["full.onnx"] = (lambda s=full, i=full.get_inputs()[0].name: s.run(None, {i: one}))
        ms = _timed(series, calls)
    from erde.runtime.core.binding import run_until

    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    blocks = [order[i:i + 100] for i in range(0, len(order), 100)]
    chain, tests = engine._chain(), engine._rule(threshold, criterion)[2]
    calls = {"engine": lambda xi: engine.predict_array(xi, threshold, criterion),
             "chain": lambda xi: run_until(chain, xi, tests), "full": lambda xi: engine.run_full(xi)}
    clock = time.perf_counter
    seen = {name: 0.0 for name in calls}
    for r in range(3):  # the test images in blocks of 100, each block through each way in turn
        for b, block in enumerate(blocks):
            for name in (list(calls) if (r + b) % 2 == 0 else list(calls)[::-1]):
                call, t0 = calls[name], clock()
                for i in block:
                    call(x[i:i + 1])
                seen[name] += clock() - t0
    engine_ms, chain_ms, full_ms = (seen[k] * 1000.0 / (3 * len(x)) for k in ("engine", "chain", "full"))
    n = len(m.segments)
    seg = [ms[f"segment {k + 1}"] for k in range(n)]
    trunk = [ms[f"trunk {k + 1}"] for k in range(n - 1)] + [seg[-1]]
    expected = sum(s * sum(seg[:k + 1]) for k, s in enumerate(shares))
    free_heads = sum(s * sum(trunk[:k + 1]) for k, s in enumerate(shares))
    # No heads, boundaries or extra calls at all: each exit costs its trunks' share of full.onnx's time.
    bound = sum(s * sum(trunk[:k + 1]) / sum(trunk) for k, s in enumerate(shares)) * ms["full.onnx"]
    return {"model": str(model), "threads": threads, "criterion": criterion, "threshold": threshold,
            "images": len(x), "exit_shares": shares, "graph_ms": ms,
            "engine_mean_ms": engine_ms, "chain_mean_ms": chain_ms, "full_mean_ms": full_ms,
            "expected_graph_ms": expected, "expected_free_heads_ms": free_heads, "bound_no_overhead_ms": bound,
            "chain_all_segments_ms": sum(seg), "chain_all_trunks_ms": sum(trunk)}


def report(r, command: str) -> str:
    from erde.runtime.common import machine
    from erde.runtime.core.criteria import show

    full = r["graph_ms"]["full.onnx"]
    lines = [f"# Where the early-exit time goes: `{Path(r['model']).name}`, batch 1, {r['threads']} thread(s)", "",
             f"`{command}`", "", f"Machine: {machine.describe()}. {r['images']} test images; exits at "
             f"{r['criterion']} {show(r['threshold'])}, shares " + " / ".join(f"{100 * s:.1f}%" for s in r["exit_shares"])
             + ". Graphs: medians of 5 interleaved rounds of one image. Engine, chain and full.onnx: means over the "
             "images, 3 passes in blocks of 100 images taken by each in turn.", "",
             "| graph | ms | of full.onnx |", "|---|---:|---:|"]
    for name, v in r["graph_ms"].items():
        lines.append(f"| {name} | {v:.4f} | {v / full:.2f}x |")
    lines += ["", "| what | ms | full.onnx / it |", "|---|---:|---:|",
              f"| full.onnx, measured through the engine | {r['full_mean_ms']:.4f} | 1.00x |",
              f"| early exit, measured (`predict_array`) | {r['engine_mean_ms']:.4f} | "
              f"{r['full_mean_ms'] / r['engine_mean_ms']:.2f}x |",
              f"| the segment chain alone, measured (`binding.run_until`, no Python around it) | "
              f"{r['chain_mean_ms']:.4f} | {r['full_mean_ms'] / r['chain_mean_ms']:.2f}x |",
              f"| early exit, expected from the graphs | {r['expected_graph_ms']:.4f} | "
              f"{full / r['expected_graph_ms']:.2f}x |",
              f"| the same with free heads (trunks only) | {r['expected_free_heads_ms']:.4f} | "
              f"{full / r['expected_free_heads_ms']:.2f}x |",
              f"| no heads, boundaries or extra calls (trunk shares of full.onnx) | {r['bound_no_overhead_ms']:.4f} | "
              f"{full / r['bound_no_overhead_ms']:.2f}x |",
              f"| every segment in a row | {r['chain_all_segments_ms']:.4f} | {full / r['chain_all_segments_ms']:.2f}x |",
              f"| every trunk in a row (+ the last segment) | {r['chain_all_trunks_ms']:.4f} | "
              f"{full / r['chain_all_trunks_ms']:.2f}x |", ""]
    return "\n".join(lines)


@command("python scripts/int8_exit_costs.py")
@model_option
@data_option(True, "Image folder with test/<class>/*")
@click.option("--threads", type=POSITIVE, default=1, help="onnxruntime threads (default 1).")
@click.option("--calls", type=POSITIVE, default=3000, help="Timed calls per graph (default 3000).")
@click.option("--max-images", type=POSITIVE, default=10000, help="Test images for the shares and the means.")
@click.option("--out", type=PATH, help="Record folder to write.")
def cli(**kw) -> int:
    """Each segment's trunk and head against full.onnx, and the early-exit floor they set."""
    args = SimpleNamespace(**kw)
    r = measure(model_folder(args.model), Path(args.data), args.threads, args.calls, args.max_images)
    text = report(r, command_line())
    if args.out:
        from erde.runtime.common.ownership import write_record

        write_record(args.out, {"README.md": text, "results.json": json.dumps(r, indent=1)})
    print(text)
    return 0


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
