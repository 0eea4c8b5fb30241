"""scripts/choose_student.py: the choice by validation accuracy at matched measured latency."""

import numpy as np

from erde.runtime.core.manifest import load_manifest

import choose_student


def _cand(name, points, full_ms=1.0, acc=(0.5, 0.8)):
    curve = [{"threshold": t, "accuracy": a, "expected_ms": ms, "mean_macs": 1, "exit_shares": [0.5, 0.5]}
             for t, (ms, a) in enumerate(points)]
    split = {"exit_accuracy": list(acc), "curve": curve}
    return {"name": name, "arch": name, "exits": 2, "cumulative_macs": [1, 2], "full_macs": 2, "segment_ms": [0.5, 0.5],
            "cumulative_ms": [0.5, 1.0], "full_ms": full_ms, "chain_over_full": 1.0, "profile": "cpu",
            "folder": name, "val": split, "test": split}


def test_envelope_is_the_best_accuracy_within_each_budget():
    c = _cand("a", [(0.2, 0.6), (0.5, 0.7), (0.4, 0.75), (1.0, 0.8)])
    env = choose_student.envelope(c["val"]["curve"], np.array([0.1, 0.45, 0.5, 2.0]))
    assert np.isnan(env[0]) and env[1:].tolist() == [0.75, 0.75, 0.8]


def test_the_faster_curve_wins_at_matched_latency():
    slow = _cand("slow", [(0.5, 0.70), (1.0, 0.80)])
    fast = _cand("fast", [(0.3, 0.72), (0.6, 0.81), (1.0, 0.82)])
    choice = choose_student.choose([slow, fast])
    assert choice["chosen"] == "fast" and choice["scores"]["fast"] > choice["scores"]["slow"]
    text = choose_student.readme([slow, fast], choice, "cpu", 1, "python scripts/choose_student.py ...")
    assert "Chosen: `fast`" in text and "| `slow` |" in text


def test_the_report_says_how_each_candidate_was_trained(tiny_student):
    assert choose_student.training(tiny_student).endswith(" epochs")
    a, b = _cand("a", [(0.5, 0.7)]), _cand("b", [(0.4, 0.7)])
    a["training"], b["training"] = "erde, airbench, 20 epochs", "ce, sgd, 10 epochs"
    text = choose_student.readme([a, b], choose_student.choose([a, b]), "cpu", 1, "cmd")
    assert "| `a` (a) | erde, airbench, 20 epochs |" in text and "| `b` (b) | ce, sgd, 10 epochs |" in text
    assert "same schedule" not in text


def test_int8_candidates_are_quantized_once_and_reused(exported, tiny_data, tmp_path):
    sha = load_manifest(exported[0]).source["checkpoint_sha256"]
    out = choose_student.quantized(exported[0], tmp_path / "q", tiny_data, sha)
    m = load_manifest(out)
    assert all(s.precision == "int8" for s in m.segments) and m.source["checkpoint_sha256"] == sha
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert choose_student.quantized(exported[0], out, tiny_data, sha) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # the same checkpoint: not quantized again
    a = _cand("a", [(0.5, 0.7)])
    text = choose_student.readme([a], choose_student.choose([a]), "cpu", 1, "cmd", int8=True)
    assert text.startswith("# Choosing the CIFAR-10 student by measured latency, as int8 copies")
    assert "static INT8 copy" in text
