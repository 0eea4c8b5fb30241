"""Against what a user would run instead: the bundled student on onnxruntime (erde's engine and the static
full.onnx, fp32 and int8), on OpenVINO (the same full.onnx, and the same segment chain with the same exit
rule), and in PyTorch eager mode (the static network and the early-exit loop), batch 1, same test images.

    python scripts/peer_bench.py --data ../shared/datasets/cifar10 --threads 1,2 --out benchmarks/results/peers-epyc

One fresh process per thread count (onnxruntime's thread pool is fixed per process). In each, every method runs
every image once, in interleaved rounds of 500 images per method; latency is the wall time of one call (the
image already preprocessed), accuracy is over the same calls. OpenVINO is compiled as its documentation advises
for latency (PERFORMANCE_HINT LATENCY, one stream, INFERENCE_NUM_THREADS), with f32 inference precision so
that its fp32 answers are fp32 (on CPUs with bf16 its default may be bf16). earlyon's staged execution
(``earlyon_methods``) runs the same trained weights and heads. Needs openvino, earlyon (``pip install --no-deps
earlyon==0.3.0``: its torchvision models are not used) and torch; run it on a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Tuple

import numpy as np

import click

from erde.runtime.common.cli import PATH, POSITIVE, command, command_line, console_script, data_option

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "benchmarks" / "results" / "bundle-student" / "student_w16_erde40_seed1.pt"
Method = Callable[[np.ndarray], Tuple[int, int]]  # image [1,3,H,W] -> (class, exit index)


def ort_methods(threads: int) -> Dict[str, Method]:
    from erde.runtime import Engine, bundled_model
    out: Dict[str, Method] = {}
    for name, tag in (("cifar10", "fp32"), ("cifar10-int8", "int8")):
        e = Engine.load(bundled_model(name), threads=threads)
        last = e.num_exits - 1
        out[f"onnxruntime {tag} full.onnx"] = lambda x, e=e, last=last: (int(e.run_full(x)[0].argmax()), last)

        def engine(x, e=e):
            p = e.predict_array(x)[0]
            return p.class_index, p.exit_index
        out[f"onnxruntime {tag} erde engine"] = engine
    return out


def openvino_methods(threads: int) -> Dict[str, Method]:
    import openvino as ov

    from erde.runtime import bundled_model
    from erde.runtime.core import criteria
    from erde.runtime.core.manifest import load_manifest

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
              "INFERENCE_PRECISION_HINT": "f32"}
    out: Dict[str, Method] = {}
    for name, tag in (("cifar10", "fp32"), ("cifar10-int8", "int8")):
        folder = bundled_model(name)
        m = load_manifest(folder)
        last = m.num_exits - 1
        full = core.compile_model(str(folder / m.full.file), "CPU", config).create_infer_request()

        def run_full(x, req=full, last=last):
            req.infer({0: x})
            return int(req.get_output_tensor(0).data[0].argmax()), last
        out[f"OpenVINO {tag} full.onnx"] = run_full
        stages = []
        for seg in m.segments:
            compiled = core.compile_model(str(folder / seg.file), "CPU", config)
            stages.append((compiled.create_infer_request(), compiled.output(seg.probs_output),
                           compiled.output(seg.feature_output) if seg.feature_output else None))
        rule = criteria.get(m.calibration.criterion)
        tests = [rule.scalar_test(t) for t in criteria.per_exit(m.calibration.threshold, m.num_exits)]

        def run_chain(x, stages=stages, tests=tests, last=last):
            feed = x
            for k, (req, probs_out, feat_out) in enumerate(stages):
                req.infer({0: feed})
                probs = req.get_tensor(probs_out).data[0]
                if k == last or tests[k](probs.tolist()):
                    return int(probs.argmax()), k
                feed = req.get_tensor(feat_out).data
            raise AssertionError("unreachable")
        out[f"OpenVINO {tag} segment chain, same exit rule"] = run_chain
    return out


def torch_methods(threads: int) -> Dict[str, Method]:
    import torch

    from erde.export.segments import FullPath
    from erde.runtime import bundled_model
    from erde.runtime.core import criteria
    from erde.runtime.core.manifest import load_manifest
    from erde.training.checkpoint import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(CHECKPOINT)
    model.eval()
    static = FullPath(model.for_export()).eval()
    cal = load_manifest(bundled_model("cifar10")).calibration
    last = model.cfg.num_exits - 1
    tests = [criteria.get(cal.criterion).scalar_test(t) for t in criteria.per_exit(cal.threshold, last + 1)]

    def run_static(x):
        with torch.inference_mode():
            return int(static(torch.from_numpy(x))[0].argmax()), last

    def run_loop(x):
        with torch.inference_mode():
            h = torch.from_numpy(x)
            for k in range(last + 1):
                h, logits = model.run_segment(k, h)
                p = torch.softmax(logits, dim=1)[0]
                if k == last or tests[k](p.tolist()):
                    return int(p.argmax()), k
    return {"PyTorch eager static": run_static, "PyTorch eager early-exit loop": run_loop}


def earlyon_methods(threads: int) -> Dict[str, Method]:
    """earlyon 0.3.0's staged execution (``earlyon.staged``) on the same trained weights and heads.

    Its splitter takes a backbone that is a literal ``nn.Sequential`` with the exits at top-level children, and
    the final classifier inside it: the student's stem, three blocks and final head are exactly that, in order,
    and its trained exit heads (after blocks 1 and 2) stand in for earlyon's own. ``staged_model`` checks the
    split against earlyon's eager wrapper before it returns. Its rule is earlyon's "confidence" routing (softmax
    maximum >= threshold, temperature 1), the same as the bundle's max-prob criterion at its threshold.
    """
    import torch
    from torch import nn
    from earlyon.core.types import EarlyExitConfig, ExitPoint
    from earlyon.core.wrappers import EarlyExitWrapper
    from earlyon.staged import staged_model

    from erde.runtime import bundled_model
    from erde.runtime.core import criteria
    from erde.runtime.core.manifest import load_manifest
    from erde.training.checkpoint import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(CHECKPOINT)
    model.eval()
    cal = load_manifest(bundled_model("cifar10")).calibration
    if cal.criterion != "max-prob":
        raise ValueError(f"earlyon's confidence rule is max-prob; the bundle is calibrated for {cal.criterion}")
    backbone = nn.Sequential(model.stem, *model.blocks, model.final)  # children "0" (stem), "1".."3", "4"
    after = list(model.cfg.exit_after)
    points = [ExitPoint(f"e{i}", str(b + 1), model.cfg.widths[b]) for i, b in enumerate(after)]
    config = EarlyExitConfig(backbone="custom", num_classes=model.cfg.num_classes, exit_points=points,
                             confidence_thresholds=list(criteria.per_exit(cal.threshold, len(points) + 1)),
                             routing_policy="confidence")
    wrapper = EarlyExitWrapper(backbone, {f"e{i}": model.heads[i] for i in range(len(points))}, lambda h: h, config,
                               input_shape=(1, 3) + tuple(model.cfg.input_size))
    with warnings.catch_warnings():  # its FLOPs estimate cannot attribute the blocks' shared activation modules
        warnings.simplefilter("ignore", RuntimeWarning)
        staged = staged_model(wrapper.eval()).eval()
    last = model.cfg.num_exits - 1

    def run(x):
        r = staged.infer(torch.from_numpy(x))
        return int(r.prediction[0].argmax()), last if r.exit_taken < 0 else r.exit_taken
    return {"earlyon 0.3.0 staged (PyTorch eager)": run}


def measure(data: Path, threads: int, images: int, block: int = 500) -> dict:
    """Every method on every image, in interleaved rounds of ``block`` images; this process's one thread count."""
    from erde.runtime import bundled_model
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.core.manifest import load_manifest
    from erde.runtime.core.preprocess import preprocess_one

    test = image_folder_split(data, "test")
    pick = np.linspace(0, len(test.files) - 1, min(images, len(test.files))).round().astype(int)
    pre = load_manifest(bundled_model("cifar10")).preprocessing
    xs = [preprocess_one(test.files[i], pre)[None] for i in pick]
    labels = test.labels[pick]
    methods = {**ort_methods(threads), **openvino_methods(threads), **torch_methods(threads),
               **earlyon_methods(threads)}
    for run in methods.values():  # warm-up
        for x in xs[:20]:
            run(x)
    times = {name: [] for name in methods}
    answers = {name: [] for name in methods}
    clock = time.perf_counter
    for start in range(0, len(xs), block):
        for name, run in methods.items():
            for x in xs[start:start + block]:
                t0 = clock()
                answers[name].append(run(x))
                times[name].append((clock() - t0) * 1000.0)
    out = {}
    for name in methods:
        t = np.asarray(times[name])
        cls = np.array([a[0] for a in answers[name]])
        exits = np.array([a[1] for a in answers[name]])
        out[name] = {"mean_ms": float(t.mean()), "p50_ms": float(np.percentile(t, 50)),
                     "p95_ms": float(np.percentile(t, 95)), "accuracy": float((cls == labels).mean()),
                     "exit_shares": [float((exits == k).mean()) for k in range(int(exits.max()) + 1)]}
    return out


@command("python scripts/peer_bench.py")
@data_option(True, "CIFAR-10 image folder")
@click.option("--threads", default="1,2", help="Thread counts, one fresh process each (default 1,2).")
@click.option("--images", type=POSITIVE, default=10000, help="Test images (default 10000).")
@click.option("--out", type=PATH, help="Record folder to write (all thread counts).")
@click.option("--one", type=POSITIVE, default=None, hidden=True)  # one thread count's child process
def cli(**kw) -> int:
    """onnxruntime, OpenVINO and PyTorch eager on the same graphs, weights and exit rule."""
    return _run(SimpleNamespace(**kw), command_line())


main = console_script(cli)


def _run(args, command: str) -> int:
    if args.one:  # the child process of one thread count: JSON on stdout
        print(json.dumps(measure(args.data, args.one, args.images)))
        return 0
    from erde.runtime.common import machine
    from erde.runtime.common.errors import ErdeError
    from erde.runtime.common.ownership import write_record

    results = {}
    for t in [int(v) for v in args.threads.split(",")]:
        r = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--images", str(args.images),
                            "--one", str(t)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ErdeError(f"the {t}-thread run failed: {r.stderr.strip()[-500:]}")
        results[t] = json.loads(r.stdout.splitlines()[-1])
    import onnxruntime
    import openvino
    import torch

    lines = ["# Peers: the same student on what a user could run instead", "",
             f"`{command}`", "",
             f"Machine: {machine.describe()}; onnxruntime {onnxruntime.__version__}, OpenVINO "
             f"{openvino.__version__.split('-')[0]}, torch {torch.__version__}. Batch 1, {args.images} CIFAR-10 test "
             "images (preprocessed once), every method on every image, interleaved rounds of 500; early exit at "
             "each bundle's calibrated threshold. Milliseconds per image: mean (p95).", ""]
    for t, res in results.items():
        lines += [f"## {t} thread{'s' * (t != 1)}", "", "| method | accuracy | mean ms | p95 ms | exits |",
                  "|---|---:|---:|---:|---|"]
        for name, d in sorted(res.items(), key=lambda kv: kv[1]["mean_ms"]):
            exits = " / ".join(f"{100 * s:.0f}%" for s in d["exit_shares"]) if len(d["exit_shares"]) > 1 else "-"
            lines.append(f"| {name} | {100 * d['accuracy']:.2f}% | {d['mean_ms']:.3f} | {d['p95_ms']:.3f} | {exits} |")
        lines.append("")
    text = "\n".join(lines)

    if args.out:
        write_record(args.out, {"README.md": text, "results.json": json.dumps(results, indent=1)})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
