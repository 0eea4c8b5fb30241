"""erde-quantize: static INT8 versions of a model folder's graphs, calibrated on the validation split.

    erde-quantize [--model DIR] --data PATH --out DIR [--max-images 200]

Each segment (and full.onnx) is quantized with onnxruntime's static quantization: QDQ format,
per-channel int8 weights in the reduced range [-64, 64] (``reduce_range``), uint8 activations, MinMax
ranges (the ops in ``QUANTIZED_OPS``). The 7-bit weights make the graphs right on every CPU: x86 CPUs
without VNNI add pairs of uint8 x int8 products in int16, which 255 x 127 x 2 overflows (wrong
answers, silently) and 255 x 64 x 2 does not. ``saturation_risks`` reads that property back from a
graph, and the folder is written only if every graph has it. The calibration images are a seeded,
evenly spread sample of the validation split carved from the training data (never the test
split). Segment k is calibrated on the feature maps that the fp32 segments before it produce
from those images, so the features crossing a boundary get the same range on both sides (the
output of segment k and the input of segment k+1 see the same tensors).

Then ``int8_graphs.rewrite_chain`` makes its early exit cheap: segments hand on their uint8 NHWC feature maps,
and the exit heads run on them in integers (that module says how; the manifest gives the new feature types).

The output folder is a model folder like any other: the runtime runs it unchanged. Its manifest
records each graph's precision and the quantization settings; the fp32 calibration is dropped,
because quantization moves the confidences: run ``erde-calibrate`` on the new folder. Needs onnx
and onnxruntime, not torch (``pip install 'erde[quantize]'``). The input folder is only read: each
graph is copied into the tool's own temporary folder before onnxruntime's quantizer (which writes
beside its input) sees it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import click
import numpy as np

from erde.export.int8_graphs import WEIGHT_LIMIT, rewrite_chain
from erde.runtime.common.cli import PATH, POSITIVE, command, data_option, console_script, force_option, model_option
from erde.runtime.common.datasets import validation_files
from erde.runtime.common.errors import ErdeError
from erde.runtime.common.ownership import MODEL_TOOLS, build_folder, check_replaceable, sha256_file
from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import (Manifest, Segment, TensorSpec, default_val_fraction, load_manifest,
                                        save_manifest)
from erde.runtime.core.preprocess import load_image, preprocess_one
from erde.runtime.core.selftest import build_selftest
from erde.runtime.tools.run_cli import model_folder

DEFAULT_IMAGES = 200
#: The layers that carry the MACs, and the cheap ones between them (so that onnxruntime fuses whole int8 blocks,
#: faster than Conv and Gemm alone). Softmax stays fp32: uint8 probabilities would tie.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add", "Relu", "GlobalAveragePool", "AveragePool"]
#: int8 weights within [-64, 64] (onnxruntime's reduce_range for symmetric weights): a pair of uint8 x int8
#: products fits int16, 255 * 64 * 2 = 32640 <= 32767 (and -32640 >= -32768); 255 * 65 * 2 = 33150 does not.
SAFE_WEIGHT_RANGE = (-WEIGHT_LIMIT, WEIGHT_LIMIT)
SETTINGS = {"method": "onnxruntime static quantization", "format": "QDQ",
            "weights": "int8, per channel, reduced range [-64, 64] (reduce_range)", "activations": "uint8",
            "ranges": "MinMax", "ops": ", ".join(QUANTIZED_OPS),
            "safe_on": "every CPU: int16 pair sums cannot saturate on x86 without VNNI",
            "boundaries": "uint8 NHWC feature maps between segments (int8_graphs.pass_uint8)",
            "exit_heads": "integer: Max, MatMulInteger over the uint8 features (int8_graphs.integer_head)"}


class QuantizeError(ErdeError):
    """The model folder or the calibration data cannot be quantized."""


def calibration_images(data: Path, manifest: Manifest, count: int) -> np.ndarray:
    """``count`` validation images spread evenly over the split, preprocessed as erde-run does."""
    vd = validation_files(data, manifest.class_names, default_val_fraction(manifest))
    if not vd.files:
        raise QuantizeError(f"{data}: the validation split is empty; nothing to calibrate on")
    pick = np.unique(np.linspace(0, len(vd.files) - 1, min(count, len(vd.files))).round().astype(int))
    h, w = manifest.preprocessing.input_size
    arrays = []
    for i in pick:
        path = vd.files[i]
        with load_image(path) as img:
            if img.size != (w, h):
                raise QuantizeError(f"{path}: {img.size[0]}x{img.size[1]} pixels, the model takes {w}x{h}; "
                                    "calibrate on the images the model was trained on")
            arrays.append(preprocess_one(img, manifest.preprocessing))
    return np.stack(arrays)


def _segment_inputs(engine: Engine, x: np.ndarray) -> List[np.ndarray]:
    """The input of every segment when the fp32 chain runs on ``x``."""
    feeds, feed = [], x
    for segment in engine._segments:
        feeds.append(feed)
        outputs = engine._run_graph(segment, feed)
        feed = outputs[1] if len(outputs) > 1 else None
    return feeds


def _onnx():
    try:
        import onnx
        import onnxruntime.quantization  # noqa: F401 (needs onnx too)
    except ImportError as e:
        raise QuantizeError(f"erde-quantize needs onnx and onnxruntime's quantization tools ({e}); "
                            "install them with: pip install 'erde[quantize]'") from None
    return onnx


def saturation_risks(path: Path) -> List[str]:
    """Why the int8 graph at ``path`` could give wrong answers on an x86 CPU without VNNI ([] if it cannot).

    Those CPUs' u8s8 kernels add pairs of uint8 x int8 products in int16, so every int8 weight of the graph
    (every int8 initializer: what DequantizeLinear, MatMulInteger and the like read) must lie in
    ``SAFE_WEIGHT_RANGE`` (7-bit).
    """
    onnx = _onnx()
    from onnx import numpy_helper

    lo, hi = SAFE_WEIGHT_RANGE
    risks = []
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        if init.data_type != onnx.TensorProto.INT8:
            continue
        w = numpy_helper.to_array(init)
        if w.size and (int(w.min()) < lo or int(w.max()) > hi):
            risks.append(f"{init.name}: int8 weights in [{int(w.min())}, {int(w.max())}], beyond [{lo}, {hi}]")
    return risks


@contextlib.contextmanager
def _private_temp(folder: Path):
    """onnxruntime's quantizer writes its own temporary folders (``ort.quant.*``) into the default temporary
    folder, where a killed run leaves them for good: put them under ``folder``, which the tool owns."""
    folder.mkdir()
    old, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old
        shutil.rmtree(folder, ignore_errors=True)


def _quantize_graph(src: Path, dst: Path, input_name: str, x: np.ndarray, work: Path, batch: int = 16) -> None:
    """Quantize ``src`` into ``dst``; ``src`` is copied into ``work`` first (the quantizer writes beside its input)."""
    _onnx()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    copy = work / f"source-{src.name}"
    shutil.copyfile(src, copy)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([x[i:i + batch] for i in range(0, len(x), batch)])

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            b = next(self._batches, None)
            return None if b is None else {input_name: b}

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization advises pre-processing on every call
    try:
        quantize_static(str(copy), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANTIZED_OPS)
    except RuntimeError as e:
        if "global thread pool" not in str(e):
            raise
        raise QuantizeError("this process already runs models on onnxruntime's shared thread pool, which the "
                            "quantizer's own sessions cannot join; quantize in a fresh process (erde-quantize)") from None
    finally:
        copy.unlink(missing_ok=True)


def _rewrite_chain(model_dir: Path, tmp: Path, manifest: Manifest, report: Callable[[str], None]) -> List[Segment]:
    """uint8 boundaries and integer exit heads (``int8_graphs``) on the int8 segments in ``tmp``; the segments'
    manifest entries, with the uint8 NHWC feature maps where a boundary was rewritten."""
    onnx = _onnx()
    segs = manifest.segments
    int8 = [onnx.load(str(tmp / s.file)) for s in segs]
    lines = rewrite_chain(int8, [onnx.load(str(model_dir / s.file)) for s in segs],
                          [s.feature_output for s in segs[:-1]], [s.probs_output for s in segs[:-1]])
    specs = {}  # the new type and shape of each rewritten feature map
    for m, s in zip(int8, segs):
        onnx.save(m, str(tmp / s.file))
        for v in list(m.graph.input) + list(m.graph.output):
            if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
                specs[v.name] = TensorSpec(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                                           "uint8")
    for line in lines:
        report("  " + line)
    return [dataclasses.replace(s, sha256=sha256_file(tmp / s.file), precision="int8",
                                inputs=[specs.get(t.name, t) for t in s.inputs],
                                outputs=[specs.get(t.name, t) for t in s.outputs]) for s in segs]


def quantize_folder(model_dir: Path, data: Path, out: Path, images: int = DEFAULT_IMAGES, force: bool = False,
                    report: Callable[[str], None] = print) -> Manifest:
    model_dir, out = Path(model_dir), Path(out)
    manifest = load_manifest(model_dir)
    if manifest.quantization or any(s.precision != "fp32" for s in manifest.segments):
        raise QuantizeError(f"{model_dir}: already quantized ({manifest.quantization.get('method', 'int8')}); "
                            "quantize the fp32 folder it came from")
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise QuantizeError(f"{out}: would overwrite the input model folder {model_dir}; choose another --out")
    _onnx()
    check_replaceable(out, force, "erde-quantize", MODEL_TOOLS, protect=[model_dir])
    # Per-session pools: onnxruntime's calibrator opens sessions of its own, which a global pool would refuse.
    engine = Engine.load(model_dir, shared_pool=False)
    x = calibration_images(data, manifest, images)
    feeds = _segment_inputs(engine, x)
    report(f"calibrating on {len(x)} validation images of {data}")

    def build(tmp: Path) -> Manifest:
        with _private_temp(tmp / ".work") as work:
            for seg, feed in zip(manifest.segments, feeds):
                _quantize_graph(model_dir / seg.file, tmp / seg.file, seg.inputs[0].name, feed, work)
            segments = _rewrite_chain(model_dir, tmp, manifest, report)
            full = manifest.full
            if full is not None:
                _quantize_graph(model_dir / full.file, tmp / full.file, full.input_name, x, work)
                full = dataclasses.replace(full, sha256=sha256_file(tmp / full.file), precision="int8")
        for graph in [s.file for s in segments] + ([full.file] if full else []):
            risks = saturation_risks(tmp / graph)
            if risks:
                raise QuantizeError(f"{graph}: the int8 graph could saturate on x86 CPUs without VNNI ({risks[0]}); "
                                    "nothing was written")
        import onnxruntime

        settings = dict(SETTINGS, calibration_images=len(x), calibration_split="validation",
                        onnxruntime=onnxruntime.__version__, source_model=model_dir.name)
        new = dataclasses.replace(manifest, segments=segments, full=full, calibration=None, quantization=settings,
                                  early_exit_graph=None,  # the int8 folder runs the chain of int8 segments
                                  metrics={})
        save_manifest(tmp, new)
        _check_agreement(engine, Engine.load(tmp, shared_pool=False), x, report)
        report("  " + build_selftest(tmp, data))
        return new

    return build_folder(out, force, "erde-quantize", MODEL_TOOLS, build, protect=[model_dir])


def _check_agreement(fp32: Engine, int8: Engine, x: np.ndarray, report: Callable[[str], None],
                     margin: float = 0.1) -> None:
    """Top-1 agreement of every int8 exit with fp32 on the calibration images where fp32 is decided
    (top-2 probability margin >= ``margin``; a near tie may flip under any rounding)."""
    a, b = fp32.exit_probs(x), int8.exit_probs(x)
    for k in range(len(a)):
        top2 = np.sort(a[k], axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) >= margin
        same = a[k].argmax(1) == b[k].argmax(1)
        agree = float(same[decided].mean()) if decided.any() else 1.0
        diff = float(np.abs(a[k] - b[k]).max())
        report(f"  {'✓' if agree >= 0.9 else '✗'} exit {k + 1}: int8 agrees with fp32 on {100 * agree:.1f}% of the "
               f"{int(decided.sum())} calibration images fp32 is sure of (max |probability difference| {diff:.3f})")
        if agree < 0.9:
            raise QuantizeError(f"exit {k + 1}: the int8 graph agrees with fp32 on only {100 * agree:.1f}% of the "
                                "calibration images; nothing was written")


@command("erde-quantize")
@model_option
@data_option(True, "The image folder the model was trained on")
@click.option("--out", type=PATH, required=True, metavar="DIR", help="The int8 model folder to write.")
@click.option("--max-images", type=POSITIVE, default=DEFAULT_IMAGES, metavar="N",
              help=f"Calibrate on at most N validation images (default {DEFAULT_IMAGES}).")
@force_option
def cli(model: Optional[str], data: Path, out: Path, max_images: int, force: bool, debug: bool) -> int:
    """Static INT8 (QDQ, per-channel, weights in [-64, 64]) copy of a model folder, calibrated on the validation
    split."""
    m = quantize_folder(model_folder(model), Path(data), Path(out), max_images, force)
    print(f"wrote {out}/ ({m.model_name}, {m.num_exits} int8 segments"
          + (" and int8 full.onnx" if m.full else "") + "); calibrate its threshold: "
          f"erde-calibrate --model {out} --data {data}")
    return 0


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
