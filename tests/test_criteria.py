"""The exit rule and the threshold sweep (runtime/criteria)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erde.runtime.core.criteria import exit_indices, sweep


def _probs(confidence):
    """One image per value: exit 1 says class 0 with that confidence; the last exit says class 1 surely."""
    n = len(confidence)
    p = np.zeros((2, n, 2), dtype=np.float32)
    p[0, :, 0] = confidence
    p[0, :, 1] = 1 - np.asarray(confidence)
    p[1, :, 1] = 1.0
    return p


def test_exit_indices_first_exit_that_passes():
    p = _probs([0.95, 0.6, 0.8])
    assert exit_indices(p, "max-prob", 0.7).tolist() == [0, 1, 0]
    assert exit_indices(p, "max-prob", 0.99).tolist() == [1, 1, 1]  # the last exit always answers


def test_sweep_accuracy_costs_and_paired_drop_stderr():
    p = _probs([0.95, 0.9, 0.6, 0.55])
    labels = np.array([0, 1, 1, 1])  # exit 1 is right on image 0 only; the last exit on images 1-3
    (strict, loose) = sweep(p, labels, [10, 100], 100, "max-prob", [0.99, 0.85])
    assert (strict.accuracy, strict.mean_macs, strict.exit_shares, strict.drop_stderr) == (0.75, 100.0, (0.0, 1.0), 0.0)
    # at 0.85 images 0 and 1 leave at exit 1: one gained, one lost; per image vs the last exit [-1, 1, 0, 0]
    assert loose.accuracy == 0.75 and loose.mean_macs == 55.0 and loose.exit_shares == (0.5, 0.5)
    d = np.array([-1.0, 1.0, 0.0, 0.0])
    assert loose.drop_stderr == pytest.approx(d.std(ddof=1) / math.sqrt(4))
    assert strict.accuracy - loose.accuracy == pytest.approx(d.mean())


def test_every_criterion_has_one_rule_in_numpy_floats_and_onnx():
    """Each registered criterion: the batch mask, the batch-1 float test and its ONNX nodes agree."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from erde.runtime.core.criteria import CRITERIA, get

    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.dirichlet(np.full(10, a), 200) for a in (0.1, 1.0, 10.0)]).astype(np.float32)
    for name in CRITERIA:
        c = get(name)
        specs, leave = c.onnx_nodes("r/", "probs", "t", 10)
        graph = helper.make_graph([helper.make_node(op, i, o, **a) for op, i, o, a in specs], name,
                                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10]),
                                   helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
                                  [helper.make_tensor_value_info(leave, TensorProto.BOOL, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        scores = c.score(probs)
        for t in np.quantile(scores, [0.1, 0.5, 0.9]).astype(np.float32):
            mask = c.passes(probs, float(t))
            test = c.scalar_test(float(t))
            assert [test([float(v) for v in p]) for p in probs] == mask.tolist(), name
            onnx_mask = [bool(sess.run(None, {"probs": p[None], "t": np.array(t)})[0].ravel()[0]) for p in probs]
            assert onnx_mask == mask.tolist(), name
            assert 0 < mask.mean() < 1, (name, t)  # the thresholds split the images
        assert c.passes(probs, c.always).all() and not c.passes(probs, c.never).any()
        for t in scores[:50]:  # thresholds on an image's own score: the float32 rounding decides
            test = c.scalar_test(float(t))
            assert [test([float(v) for v in p]) for p in probs[:50]] == c.passes(probs[:50], float(t)).tolist(), name
