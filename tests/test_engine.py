from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from erde.runtime.core.engine import Engine, Prediction, exit_mask
from erde.runtime.core.sessions import make_session, session_options
from erde.runtime.common.errors import ErdeError, ManifestError, ModelFolderError
from erde.runtime.core.manifest import Calibration
from runtime_fixtures import make_model_folder, random_image, random_inputs

TESTS = Path(__file__).resolve().parent



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def eng(folder):
    return Engine.load(folder, threads=1)


X = random_inputs(48)


def reference(folder, x, criterion, t):
    """Exit decisions from full-batch runs of every segment, with an independent numpy rule (``t``: one threshold,
    or one per early exit)."""
    m = json.loads((folder / "manifest.json").read_text())
    probs, feed = [], x
    for seg in m["segments"]:
        sess = make_session(str(folder / seg["file"]), threads=1, shared_pool=False)
        names = [seg["probs_output"]] + ([seg["feature_output"]] if seg["feature_output"] else [])
        out = sess.run(names, {seg["inputs"][0]["name"]: feed})
        probs.append(out[0])
        feed = out[1] if len(out) > 1 else None
    result = []
    for i in range(len(x)):
        for k, p in enumerate(probs):
            p = p[i]  # float32, as the exit rule compares (t rounded to float32 for max-prob)
            t_k = t[min(k, len(t) - 1)] if isinstance(t, tuple) else t  # this exit's threshold
            if criterion == "max-prob":
                leave = p.max() >= np.float32(t_k)
            elif criterion == "margin":
                a, b = sorted(p.tolist())[-2:]
                leave = np.float32(b) - np.float32(a) >= np.float32(t_k)
            else:
                ent = -sum(float(v) * math.log(max(float(v), 1e-12)) for v in p) / math.log(len(p))
                leave = min(max(ent, 0.0), 1.0) <= t_k
            if leave or k == len(probs) - 1:
                result.append((int(p.argmax()), k, float(p.max())))
                break
    return result


def triples(preds):
    return [(p.class_index, p.exit_index, p.confidence) for p in preds]


@pytest.mark.parametrize("criterion, thresholds", [
    ("max-prob", [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]),
    ("entropy", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]),
    ("margin", [0.0, 0.2, 0.5, 0.7, 0.9, 1.0]),
])
def test_exits_match_numpy_reference(folder, eng, criterion, thresholds):
    mixed = False
    for t in thresholds:
        got = triples(eng.predict_array(X, t, criterion))
        assert got == reference(folder, X, criterion, t), (criterion, t)
        one_by_one = [triples(eng.predict_array(X[i:i + 1], t, criterion))[0] for i in range(len(X))]
        assert one_by_one == got, (criterion, t)  # the batch-1 path
        mixed |= len({e for _, e, _ in got}) == 3
    assert mixed, "the fixture model should send samples to all three exits at some threshold"


@pytest.mark.parametrize("criterion, t", [("max-prob", (0.95, 0.6)), ("max-prob", (0.5, 0.99)), ("margin", (0.9, 0.3)),
                                          ("entropy", (0.05, 0.5))])
def test_a_threshold_per_early_exit(folder, eng, criterion, t):
    """Each early exit compares with its own threshold, at batch 1 and in batches, as the numpy reference does."""
    want = reference(folder, X, criterion, t)
    assert len({k for _, k, _ in want}) == 3  # the pair sends images to every exit
    assert triples([eng.predict_array(X[i:i + 1], t, criterion)[0] for i in range(len(X))]) == want
    assert triples(eng.predict_array(X, list(t), criterion, batch_size=7)) == want
    assert triples(eng.predict_array(X, (0.9, 0.9), criterion)) == triples(eng.predict_array(X, 0.9, criterion))
    with pytest.raises(ErdeError, match="3 thresholds 0.5/0.6/0.7 for a model with 3 exits"):
        eng.predict_array(X[:1], (0.5, 0.6, 0.7), criterion)


def test_batch1_max_prob_compares_in_float32(eng):
    # a threshold one double ulp above an image's exit-0 confidence rounds to it in float32: the image leaves there,
    # at batch 1 as in a batch (a comparison in doubles would keep it running)
    x = X[:1]
    confidence = eng.exit_probs(x)[0, 0].max()
    t = float(np.nextafter(np.float64(confidence), 2.0))
    assert t > float(confidence) and np.float32(t) == confidence
    assert eng.predict_array(x, t, "max-prob")[0].exit_index == 0
    assert eng.predict_array(np.repeat(x, 2, axis=0), t, "max-prob")[0].exit_index == 0


def test_threshold_edges(eng):
    assert {p.exit_index for p in eng.predict_array(X, 0.0, "max-prob")} == {0}
    assert {p.exit_index for p in eng.predict_array(X, 1.0, "entropy")} == {0}
    assert {p.exit_index for p in eng.predict_array(X, 0.0, "entropy")} == {2}  # no prediction is one-hot here
    for p in eng.predict_array(X, 1.0, "max-prob"):  # only a probability of exactly 1.0 leaves early
        assert p.exit_index == 2 or p.confidence == 1.0


@pytest.mark.parametrize("t", [-0.01, 1.01, float("nan"), float("inf"), "0.5", True])
def test_bad_thresholds(eng, t):
    with pytest.raises(ErdeError, match="not a number in \\[0, 1\\]"):
        eng.predict_array(X[:1], t, "max-prob")


def test_a_rule_kept_from_an_earlier_call_does_not_let_a_bad_one_through(eng):
    """predict_array keeps each resolved rule for the next call; True == 1 in a dict, but True is no threshold."""
    first = [triples(eng.predict_array(X[i:i + 1], 0.5, "max-prob")) for i in range(4)]
    assert [triples(eng.predict_array(X[i:i + 1], 0.5, "max-prob")) for i in range(4)] == first
    assert triples(eng.predict_array(X[:1], 1, "max-prob")) == triples(eng.predict_array(X[:1], 1.0, "max-prob"))
    for bad in (True, [0.5], np.array([0.5, 0.5, 0.5]), [0.5, "0.5"], [], float("nan")):
        with pytest.raises(ErdeError):
            eng.predict_array(X[:1], bad, "max-prob")
    assert [p.exit_index for p in eng.predict_array(X[:4], 0.0, "max-prob")] == [0] * 4
    assert [p.exit_index for p in eng.predict_array(X[:1], 0.0, "entropy")] == [2]


def test_unknown_criterion(eng):
    with pytest.raises(ErdeError, match="unknown exit criterion 'top-3'"):
        eng.predict_array(X[:1], 0.5, "top-3")
    with pytest.raises(ErdeError, match="unknown exit criterion"):
        exit_mask(np.full((1, 4), 0.25, np.float32), "top-3", 0.5)


def test_exit_mask_near_uniform_leaves_at_entropy_one():
    # float32 rounding can give H/log K slightly above 1 for near-uniform outputs; t = 1 must still let them leave
    z = np.random.default_rng(0).standard_normal((2000, 10)).astype(np.float32) * 1e-3
    p = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float32)
    assert exit_mask(p, "entropy", 1.0).all()


def test_max_prob_compares_in_float32():
    p = np.array([[0.9, 0.1]], np.float32)  # float32(0.9) < 0.9 as a double: t = 0.9 must still pass it
    assert exit_mask(p, "max-prob", 0.9).tolist() == [True]


def test_exit_mask_uniform_and_one_hot():
    p = np.array([[0.25] * 4, [1.0, 0, 0, 0]], np.float32)
    assert exit_mask(p, "entropy", 1.0).tolist() == [True, True]
    assert exit_mask(p, "entropy", 0.0).tolist() == [False, True]
    assert exit_mask(p, "max-prob", 0.25).tolist() == [True, True]
    assert exit_mask(p, "max-prob", 0.26).tolist() == [False, True]


@pytest.mark.parametrize("criterion, t", [("max-prob", 0.9), ("entropy", 0.2), ("margin", 0.7)])
def test_batch_equals_batch_size_one(eng, criterion, t):
    single = [eng.predict_array(X[i:i + 1], t, criterion)[0] for i in range(len(X))]
    assert len({p.exit_index for p in single}) == 3
    for bs in (2, 5, None):
        batched = eng.predict_array(X, t, criterion, batch_size=bs)
        assert triples(batched) == triples(single), bs
        assert [(p.macs, p.macs_fraction) for p in batched] == [(p.macs, p.macs_fraction) for p in single]


def test_predict_images_batch_equals_single(eng):
    images = [random_image(seed=s) for s in range(7)]
    one = eng.predict(images, 0.9, "max-prob", batch_size=1)
    three = eng.predict(images, 0.9, "max-prob", batch_size=3)
    assert triples(one) == triples(three)
    assert triples(eng.predict(images[0], 0.9, "max-prob")) == triples(one[:1])  # a single image, not a list
    assert eng.predict([], 0.9) == []


def test_prediction_fields(eng, folder):
    m = eng.manifest
    singles = [eng.predict_array(X[i:i + 1], 0.9, "max-prob")[0] for i in range(len(X))]
    for p in eng.predict_array(X, 0.9, "max-prob") + singles:
        assert isinstance(p, Prediction)
        assert p.num_exits == 3 and p.class_name == f"class{p.class_index}"
        assert p.macs == m.segments[p.exit_index].cumulative_macs
        assert p.macs_fraction == pytest.approx(p.macs / m.full.macs)
        assert len(p.segment_latency_ms) == p.exit_index + 1
        assert p.latency_ms == pytest.approx(sum(p.segment_latency_ms)) and p.latency_ms > 0
        for value in dataclasses.astuple(p):
            assert not isinstance(value, np.generic) and not isinstance(value, np.ndarray)
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.confidence = 0.0  # type: ignore[misc]
    d = p.to_dict()
    assert isinstance(d["segment_latency_ms"], list) and json.dumps(d)


def test_warmup_leaves_results_unchanged(eng):
    before = triples(eng.predict_array(X, 0.9))
    eng.warmup(4)
    assert triples(eng.predict_array(X, 0.9)) == before


def test_run_full_matches_last_exit(eng, folder):
    probs = eng.run_full(X)
    ref = reference(folder, X, "max-prob", 1.1)  # t > 1: everyone runs to the last exit
    assert probs.shape == (len(X), 4)
    assert [int(i) for i in probs.argmax(1)] == [c for c, _, _ in ref]
    np.testing.assert_allclose(probs.max(1), [c for _, _, c in ref], rtol=1e-5)


def test_run_full_without_full_graph(tmp_path):
    e = Engine.load(make_model_folder(tmp_path, with_full=False), threads=1)
    assert not e.has_full and e.manifest.full_macs == sum(s.backbone_macs for s in e.manifest.segments) + e.manifest.segments[-1].head_macs
    with pytest.raises(ErdeError, match="no full graph"):
        e.run_full(X)


def test_predict_array_checks_shape_and_casts(eng):
    with pytest.raises(ErdeError, match=r"expected a float32 array \[N, 3, 8, 8\]"):
        eng.predict_array(X[:, :, :4], 0.5)
    with pytest.raises(ErdeError, match="expected a float32 array"):
        eng.predict_array(X[0], 0.5)
    assert triples(eng.predict_array(X.astype(np.float64), 0.9)) == triples(eng.predict_array(X, 0.9))


def test_resolve_threshold_sources(tmp_path, eng):
    assert eng.resolve_threshold() == ("max-prob", 0.9, "manifest default")
    assert eng.resolve_threshold(0.5) == ("max-prob", 0.5, "given")
    assert eng.resolve_threshold(0.3, "entropy") == ("entropy", 0.3, "given")
    with pytest.raises(ErdeError, match="no threshold for criterion 'entropy'.*--threshold"):
        eng.resolve_threshold(None, "entropy")
    cal = Calibration("entropy", 0.25, "accuracy-drop", 0.01, 0.9, 1000.0)
    e = Engine.load(make_model_folder(tmp_path, calibration=cal), threads=1)
    assert e.resolve_threshold() == ("entropy", 0.25, "calibrated")
    assert e.resolve_threshold(None, "entropy") == ("entropy", 0.25, "calibrated")
    assert e.resolve_threshold(None, "max-prob") == ("max-prob", 0.9, "manifest default")
    assert e.resolve_threshold(0.1) == ("entropy", 0.1, "given")  # read with the calibrated criterion
    assert triples(e.predict_array(X)) == triples(e.predict_array(X, 0.25, "entropy"))


# --- model folder checks -------------------------------------------------------------------------------


def test_missing_segment(tmp_path):
    folder = make_model_folder(tmp_path)
    (folder / "segment1.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"segment1\.onnx: listed in manifest\.json but missing"):
        Engine.load(folder)


def test_altered_segment(tmp_path):
    folder = make_model_folder(tmp_path)
    data = bytearray((folder / "segment2.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "segment2.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=r"segment2\.onnx: sha256 does not match"):
        Engine.load(folder)


def test_altered_full_graph(tmp_path):
    folder = make_model_folder(tmp_path)
    (folder / "full.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFolderError, match=r"full\.onnx: sha256"):
        Engine.load(folder)


def test_extra_onnx_file(tmp_path):
    folder = make_model_folder(tmp_path)
    (folder / "old_segment3.onnx").write_bytes(b"x")
    (folder / "notes.txt").write_text("other files are fine")
    with pytest.raises(ModelFolderError, match=r"old_segment3\.onnx: \.onnx file not listed"):
        Engine.load(folder)


def test_bad_folder_and_manifest(tmp_path):
    with pytest.raises(ModelFolderError, match="no such folder"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(ManifestError, match="no manifest"):
        Engine.load(tmp_path)


def test_graph_not_matching_manifest(tmp_path):
    folder = make_model_folder(tmp_path)
    d = json.loads((folder / "manifest.json").read_text())
    d["class_names"].append("extra")  # the graphs return 4 probabilities, the manifest names 5 classes
    (folder / "manifest.json").write_text(json.dumps(d))
    e = Engine.load(folder, threads=1)
    with pytest.raises(ModelFolderError, match=r"segment0\.onnx: probabilities of shape \(1, 4\), expected \[1, 5\]"):
        e.predict_array(X[:1], 0.5)
    d["class_names"].pop()
    d["segments"][1]["inputs"][0]["name"] = "renamed"
    (folder / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ModelFolderError, match=r"segment1\.onnx: graph inputs \['features0'\]"):
        Engine.load(folder, threads=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"threads": 0}, "threads must be a positive integer"),
    ({"threads": 1.5}, "threads must be a positive integer"),
    ({"providers": ["NoSuchExecutionProvider"]}, "not available here"),
])
def test_bad_load_options(folder, kwargs, match):
    with pytest.raises(ErdeError, match=match):
        Engine.load(folder, **kwargs)


def test_bad_batch_size(eng):
    with pytest.raises(ErdeError, match="batch size must be a positive integer"):
        eng.predict([random_image()], 0.5, batch_size=0)


def test_per_session_options_do_not_spin():
    so = session_options(threads=2, shared_pool=False)
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.use_per_session_threads


def test_global_pool_in_fresh_process(folder):
    """The default policy (shared global pool) in a process of its own."""
    code = textwrap.dedent(f"""
        import sys
        import onnxruntime as ort
        from erde.runtime.core.engine import Engine
        from erde.runtime.core.sessions import session_options
        from erde.runtime.common.errors import ErdeError
        from runtime_fixtures import random_inputs
        assert hasattr(ort, "set_global_thread_pool_sizes")
        a = Engine.load({str(folder)!r}, threads=1)
        b = Engine.load({str(folder)!r})  # None reuses the pool
        assert not session_options().use_per_session_threads
        try:
            Engine.load({str(folder)!r}, threads=2)
        except ErdeError as e:
            print("REFUSED", e)
        x = random_inputs(16)
        ra = [(p.class_index, p.exit_index, p.confidence) for p in a.predict_array(x, 0.9)]
        rb = [(p.class_index, p.exit_index, p.confidence) for p in b.predict_array(x, 0.9, batch_size=1)]
        print("SAME", ra == rb)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED this process already runs models on a shared onnxruntime thread pool of 1 threads" in proc.stdout
    assert "pass threads=1" in proc.stdout
    assert "SAME True" in proc.stdout
