"""The exit rule and the threshold sweep (runtime/criteria)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erde.runtime.criteria import exit_indices, sweep


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
