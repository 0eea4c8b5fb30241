"""export/int8_graphs.py: uint8 boundaries and integer exit heads on a quantized segment chain."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from erde.export.int8_graphs import WEIGHT_LIMIT, _folded, fp32_head, integer_head, pass_uint8, rewrite_chain
from erde.export.quantize import _quantize_graph, _segment_inputs, saturation_risks
from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import load_manifest


@pytest.fixture(scope="module")
def plain(exported, tmp_path_factory):
    """The fixture model's segments as onnxruntime's quantizer writes them (QDQ, float boundaries), with the
    fp32 graphs and some images."""
    folder = exported[0]
    m = load_manifest(folder)
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    work = tmp_path_factory.mktemp("plain")
    feeds = _segment_inputs(Engine.load(folder, threads=1, shared_pool=False), x)
    for seg, feed in zip(m.segments, feeds):
        _quantize_graph(folder / seg.file, work / seg.file, seg.inputs[0].name, feed, work)
    return m, [onnx.load(str(work / s.file)) for s in m.segments], [onnx.load(str(folder / s.file)) for s in
                                                                   m.segments], x


def _copies(models):
    return [onnx.ModelProto.FromString(m.SerializeToString()) for m in models]


def _run_chain(models, x):
    """Every exit's probabilities and every feature map handed on, through onnxruntime."""
    probs, features, feed = [], [], x
    for k, m in enumerate(models):
        so = ort.SessionOptions()
        so.use_per_session_threads = True
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: feed})))
        probs.append(out[f"probs_{k}"])
        feed = out.get(f"features_{k}")
        if feed is not None:
            features.append(feed)
    return probs, features


def test_boundaries_hand_on_uint8_nhwc_with_the_same_values_and_heads_agree(plain, tmp_path):
    m, int8, fp32, x = plain
    new = _copies(int8)
    n = len(new)
    lines = rewrite_chain(new, fp32, [f"features_{k}" for k in range(n - 1)], [f"probs_{k}" for k in range(n - 1)])
    assert all("uint8 NHWC" in s and "integer head" in s for s in lines), lines
    (p0, f0), (p1, f1) = _run_chain(int8, x), _run_chain(new, x)
    for k, (a, b) in enumerate(zip(f0, f1)):
        assert b.dtype == np.uint8 and b.shape == (len(x),) + a.shape[2:] + a.shape[1:2]
        init = {i.name: numpy_helper.to_array(i) for i in int8[k].graph.initializer}
        s, z = float(init[f"features_{k}_scale"]), int(init[f"features_{k}_zero_point"])
        np.testing.assert_allclose((b.astype(np.float32) - z) * s, a.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(p0[-1], p1[-1])  # the last exit sees bit-identical features
    for a, b in zip(p0[:-1], p1[:-1]):  # the integer heads: the same function up to half a quantization step
        assert np.abs(a - b).max() < 0.05
        assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    for k, model in enumerate(new):
        onnx.save(model, str(tmp_path / f"{k}.onnx"))
        assert saturation_risks(tmp_path / f"{k}.onnx") == []


def test_a_boundary_whose_scales_differ_is_left_alone(plain):
    m, int8, fp32, x = plain
    a, b = _copies(int8[:2])
    for init in b.graph.initializer:
        if init.name == "features_0_scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    before = a.SerializeToString(), b.SerializeToString()
    assert pass_uint8(a, b, "features_0") is None
    assert (a.SerializeToString(), b.SerializeToString()) == before


def test_a_head_with_a_negative_batchnorm_scale_keeps_its_qdq_nodes(plain):
    m, int8, fp32, x = plain
    a, b = _copies(int8[:2])
    boundary = pass_uint8(a, b, "features_0")
    head = fp32_head(fp32[0].graph, "features_0", "probs_0")
    assert boundary is not None and head is not None
    flipped = type(head)(np.where(np.arange(len(head.a)) == 0, -head.a, head.a), head.b, head.pool, head.weight,
                         head.bias)
    assert _folded(flipped, boundary) is None
    before = a.SerializeToString()
    assert not integer_head(a.graph, flipped, boundary, "probs_0")
    assert a.SerializeToString() == before
    assert integer_head(a.graph, head, boundary, "probs_0")


def test_the_folded_weights_stay_within_seven_bits(plain):
    m, int8, fp32, x = plain
    a, b = _copies(int8[:2])
    boundary = pass_uint8(a, b, "features_0")
    f = _folded(fp32_head(fp32[0].graph, "features_0", "probs_0"), boundary)
    assert f.weight.dtype == np.int8 and np.abs(f.weight).max() == WEIGHT_LIMIT and np.all(f.scale > 0)
    assert f.shift.dtype == np.uint8 and f.shift_scale > 0


def test_saturation_risks_reads_every_int8_initializer(plain, tmp_path):
    """Not only what DequantizeLinear reads: a MatMulInteger weight of 100 would saturate without VNNI."""
    m, int8, fp32, x = plain
    model = _copies(int8[:1])[0]
    model.graph.initializer.append(numpy_helper.from_array(np.full((4, 2), 100, np.int8), "too_wide"))
    model.graph.node.append(helper.make_node("MatMulInteger", ["too_wide", "too_wide"], ["unused"]))
    path = tmp_path / "wide.onnx"
    onnx.save(model, str(path))
    risks = saturation_risks(path)
    assert risks and risks[0].startswith("too_wide: int8 weights in [100, 100]")


def test_the_folded_head_computes_the_float_head_whatever_the_thresholds():
    """Channels whose ReLU never clips (t < 0) or always does (t > 255) included: the integer head's logits, as
    QLinearAdd and MatMulInteger compute them, match BatchNorm-ReLU-pool-Linear in float64."""
    from erde.export.int8_graphs import Boundary, _Head

    rng = np.random.default_rng(0)
    c, h, w, k = 6, 5, 5, 3
    s, z = 0.05, 0
    a = rng.uniform(0.5, 2.0, c)
    t_wanted = np.array([-40.0, -3.0, 0.0, 17.5, 120.0, 300.0])  # in units of u
    b = (z - t_wanted) * a * s
    head = _Head(a, b, (2, 2), rng.standard_normal((k, c * 2 * 2)), rng.standard_normal(k))
    f = _folded(head, Boundary("features_0", s, z, (c, h, w)))
    u = rng.integers(0, 256, (8, h, w, c)).astype(np.float64)
    x = np.maximum(a * s * (u - z) + b, 0).transpose(0, 3, 1, 2)  # [N, C, H, W]
    pooled = x[:, :, :4, :4].reshape(8, c, 2, 2, 2, 2).mean(axis=(3, 5))
    want = pooled.reshape(8, -1) @ head.weight.T + head.bias
    q = np.clip(np.round(u - (255 - f.shift.astype(np.float64)) * f.shift_scale), 0, 255)
    have = (q.reshape(8, -1) @ f.weight.astype(np.float64)) * f.scale + f.bias
    assert np.abs(have - want).max() < 0.02 * np.abs(want).max()
