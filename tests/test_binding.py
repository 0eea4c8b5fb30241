from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from erde.runtime.core.binding import BoundChain, PlainChain, bind_chain, run_until
from erde.runtime.core.engine import Engine
from erde.runtime.core.graphs import Graph
from runtime_fixtures import make_model_folder, random_inputs


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return Engine.load(make_model_folder(tmp_path_factory.mktemp("b")), threads=1)


def run_all(chain, x):
    chain.load(x)
    return [chain.run(k).copy() for k in range(len(chain.segments))]


def test_bound_chain_gives_the_answers_of_session_run(eng):
    bound = bind_chain(eng._segments, eng._input_shape, 4)
    assert isinstance(bound, BoundChain)
    plain = PlainChain(eng._segments)
    for x in random_inputs(6):
        got, want = run_all(bound, x[None]), run_all(plain, x[None])
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        assert got[0].shape == (1, 4)


def test_the_feature_buffer_is_the_next_stage_input(eng):
    bound = bind_chain(eng._segments, eng._input_shape, 4)
    bound.load(random_inputs(1))
    bound.run(0)
    feats = bound.feed(1).copy()
    assert feats.any()  # segment 0 wrote its features where segment 1 reads them
    direct = eng._segments[1].session.run(eng._segments[1].output_names, {eng._segments[1].input_name: feats})[0]
    assert np.array_equal(bound.run(1), direct)


class _NoBinding:
    """A session of an onnxruntime without IOBinding."""

    def __init__(self, outputs):
        self._outputs = outputs

    def get_outputs(self):
        return self._outputs


class _LooseShapes(_NoBinding):
    def io_binding(self):
        return SimpleNamespace(bind_input=lambda *a: None, bind_output=lambda *a: None)


@pytest.mark.parametrize("session_type", [_NoBinding, _LooseShapes])
def test_falls_back_to_session_run(session_type):
    outputs = [SimpleNamespace(name="p", shape=["batch", 4]), SimpleNamespace(name="f", shape=["batch", 4, "h", 8])]
    segments = [Graph(session_type(outputs), "x", ["p", "f"], "s0.onnx"),
              Graph(session_type(outputs[:1]), "f", ["p"], "s1.onnx")]
    assert isinstance(bind_chain(segments, (3, 8, 8), 4), PlainChain)


def test_each_thread_has_its_own_buffers(eng):
    xs = random_inputs(16, seed=5)
    want = [(p.class_index, p.exit_index, p.confidence) for p in
            (eng.predict_array(xs[i:i + 1], 0.9)[0] for i in range(len(xs)))]
    bad = []

    def work(offset):
        for r in range(30):
            i = (r + offset) % len(xs)
            p = eng.predict_array(xs[i:i + 1], 0.9)[0]
            if (p.class_index, p.exit_index, p.confidence) != want[i]:
                bad.append(i)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 7, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("make", [lambda eng: bind_chain(eng._segments, eng._input_shape, 4),
                                  lambda eng: PlainChain(eng._segments, 4)])
def test_run_until_stops_at_the_first_exit_that_lets_the_image_leave(eng, make):
    chain, x = make(eng), random_inputs(1)
    probs = [p.tolist()[0] for p in run_all(chain, x)]
    seen = []

    def leave_at_1(values):
        seen.append(values)
        return len(seen) == 2

    k, values, marks = run_until(chain, x, [leave_at_1] * (len(chain.segments) - 1))
    assert k == 1 and values == probs[1] and seen == probs[:2]
    assert len(marks) == 3 and marks == sorted(marks)  # the start, then one mark per segment that ran
    k, values, marks = run_until(chain, x, None)  # nobody leaves early: the last segment answers
    assert k == len(chain.segments) - 1 and values == probs[-1] and len(marks) == len(chain.segments) + 1
    k, _, marks = run_until(chain, x, None, last=0)
    assert k == 0 and len(marks) == 2


def test_a_plain_chain_refuses_probabilities_of_another_shape(eng):
    chain = PlainChain(eng._segments, 5)  # the graphs answer 4 classes
    with pytest.raises(ValueError, match=r"probabilities of shape \(1, 4\), expected \[1, 5\]"):
        run_until(chain, random_inputs(1), None)


def test_a_bound_call_goes_below_the_wrapper_only_where_onnxruntime_has_one():
    from erde.runtime.core.binding import _bound_call

    class Public:  # an onnxruntime whose Python API exposes no inner session
        def __init__(self):
            self.calls = []

        def run_with_iobinding(self, binding, run_options=None):
            self.calls.append(binding)

    s = Public()
    _bound_call(s, "b")()
    assert s.calls == ["b"]

    class Inner(Public):
        def __init__(self):
            super().__init__()
            self._sess = Public()

    class Binding:
        _iobinding = "inner-binding"

    s = Inner()
    _bound_call(s, Binding())()
    assert s.calls == [] and s._sess.calls == ["inner-binding"]
