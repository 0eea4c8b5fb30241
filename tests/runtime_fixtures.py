"""Tiny early-exit model folders built with onnx.helper, for runtime tests.

``make_model_folder(tmp_path)`` writes a folder as erde-export would: one ONNX
graph per segment (Conv 3x3 + ReLU for the features; Flatten, a linear
layer and Softmax for the exit), optionally ``full.onnx`` (the whole
chain with only the last exit), and ``manifest.json`` with real sha256s and
MAC counts. Later exits get larger logit scales, so random images leave at
different exits.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from erde.runtime.core.manifest import (
    Calibration, FullGraph, Manifest, Preprocessing, Segment, TensorSpec, save_manifest,
)

OPSET = 17


def _conv_nodes(prefix: str, x: str, y: str, w: np.ndarray, b: np.ndarray, inits: list) -> list:
    inits += [numpy_helper.from_array(w, f"{prefix}_w"), numpy_helper.from_array(b, f"{prefix}_b")]
    return [helper.make_node("Conv", [x, f"{prefix}_w", f"{prefix}_b"], [f"{prefix}_conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{prefix}_conv"], [y])]


def _head_nodes(prefix: str, x: str, y: str, w: np.ndarray, b: np.ndarray, inits: list) -> list:
    inits += [numpy_helper.from_array(w, f"{prefix}_hw"), numpy_helper.from_array(b, f"{prefix}_hb")]
    return [helper.make_node("Flatten", [x], [f"{prefix}_flat"], axis=1),
            helper.make_node("Gemm", [f"{prefix}_flat", f"{prefix}_hw", f"{prefix}_hb"], [f"{prefix}_logits"]),
            helper.make_node("Softmax", [f"{prefix}_logits"], [y], axis=1)]


def _model_bytes(name: str, nodes: list, inits: list, inputs: list, outputs: list) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="erde-tests")
    model.ir_version = 8  # readable by older onnxruntime on boards
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _vi(name: str, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def make_model_folder(tmp_path: Path, num_exits: int = 3, num_classes: int = 4,
                      input_size: Tuple[int, int] = (8, 8), channels: int = 4, with_full: bool = True,
                      calibration: Optional[Calibration] = None, default_threshold: float = 0.9,
                      default_criterion: str = "max-prob", resize: str = "stretch", seed: int = 0,
                      name: str = "model", class_names: Optional[List[str]] = None,
                      head_scales: Optional[Sequence[float]] = None, with_selftest: bool = True) -> Path:
    """Write a tiny early-exit model folder under ``tmp_path / name`` and return its path."""
    rng = np.random.default_rng(seed)
    folder = Path(tmp_path) / name
    folder.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    k_cls = num_classes
    conv_w = [(rng.standard_normal((channels, 3 if i == 0 else channels, 3, 3)) * 0.4).astype(np.float32)
              for i in range(num_exits)]
    conv_b = [(rng.standard_normal(channels) * 0.1).astype(np.float32) for _ in range(num_exits)]
    scales = list(head_scales) if head_scales is not None else [2.0 * (i + 1) for i in range(num_exits)]
    flat = channels * h * w
    head_w = [(rng.standard_normal((flat, k_cls)) * scales[i] / np.sqrt(flat)).astype(np.float32)
              for i in range(num_exits)]
    head_b = [(rng.standard_normal(k_cls) * 0.1).astype(np.float32) for _ in range(num_exits)]
    conv_macs = [channels * (3 if i == 0 else channels) * 9 * h * w for i in range(num_exits)]
    head_macs = channels * h * w * k_cls

    segments = []
    cum = 0
    for i in range(num_exits):
        last = i == num_exits - 1
        in_name = "image" if i == 0 else f"features{i - 1}"
        in_shape = ["batch", 3 if i == 0 else channels, h, w]
        feat = f"features{i}"
        probs = f"probs{i}"
        inits: list = []
        nodes = _conv_nodes(f"s{i}", in_name, feat, conv_w[i], conv_b[i], inits)
        nodes += _head_nodes(f"s{i}", feat, probs, head_w[i], head_b[i], inits)
        outs = [_vi(probs, ["batch", k_cls])] + ([] if last else [_vi(feat, ["batch", channels, h, w])])
        data = _model_bytes(f"segment{i}", nodes, inits, [_vi(in_name, in_shape)], outs)
        file = f"segment{i}.onnx"
        (folder / file).write_bytes(data)
        cum += conv_macs[i]
        segments.append(Segment(
            file=file, sha256=hashlib.sha256(data).hexdigest(),
            inputs=[TensorSpec(in_name, in_shape)],
            outputs=[TensorSpec(probs, ["batch", k_cls])] + ([] if last else [TensorSpec(feat, ["batch", channels, h, w])]),
            probs_output=probs, feature_output=None if last else feat,
            backbone_macs=conv_macs[i], head_macs=head_macs, cumulative_macs=cum + head_macs))

    full = None
    if with_full:
        inits = []
        nodes = []
        x = "image"
        for i in range(num_exits):
            nodes += _conv_nodes(f"s{i}", x, f"features{i}", conv_w[i], conv_b[i], inits)
            x = f"features{i}"
        nodes += _head_nodes("full", x, "probs", head_w[-1], head_b[-1], inits)
        data = _model_bytes("full", nodes, inits, [_vi("image", ["batch", 3, h, w])], [_vi("probs", ["batch", k_cls])])
        (folder / "full.onnx").write_bytes(data)
        full = FullGraph("full.onnx", hashlib.sha256(data).hexdigest(), "image", "probs", sum(conv_macs) + head_macs)

    manifest = Manifest(
        model_name=name,
        class_names=list(class_names or [f"class{i}" for i in range(k_cls)]),
        preprocessing=Preprocessing((h, w), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "RGB", "NCHW", resize),
        segments=segments, full=full, default_criterion=default_criterion,
        default_threshold=default_threshold, calibration=calibration,
        metrics={"test_accuracy": 0.5}, source={"tool": "tests/runtime_fixtures.py"},
    )
    save_manifest(folder, manifest)
    if with_selftest:
        from erde.runtime.core.selftest import build_selftest

        build_selftest(folder, count=16)
    return folder


def make_train_folder(root: Path, count: int, size: int, classes: int = 4) -> Path:
    """``root/train/class<k>/NNN.png``: ``count`` random size x size images spread over ``classes`` classes."""
    from PIL import Image

    for i in range(count):
        d = Path(root) / "train" / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(size, size, seed=i)).save(d / f"{i:03d}.png")
    return Path(root)


def random_inputs(n: int, input_size: Tuple[int, int] = (8, 8), seed: int = 1) -> np.ndarray:
    """Preprocessed-looking input [n, 3, H, W] float32."""
    return np.random.default_rng(seed).standard_normal((n, 3) + tuple(input_size)).astype(np.float32)


def random_image(height: int = 12, width: int = 10, seed: int = 2) -> np.ndarray:
    """An HxWx3 uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def torch_blocked_env(tmp_path: Path) -> dict:
    """Environment in which ``import torch`` (and onnx) fails, as on a board with the runtime only."""
    blocked = Path(tmp_path) / "blocked"
    for name in ("torch", "onnx"):
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def console_command(script: str, module: str) -> List[str]:
    """The installed console script, or ``python -m module`` when it is not installed."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]
