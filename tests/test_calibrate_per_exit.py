"""runtime/tools/calibrate_per_exit.py: a threshold per early exit, from the best single one."""

import numpy as np
import pytest

from erde.runtime.tools import calibrate as cal_mod
from erde.runtime.tools.calibrate import threshold_grid
from erde.runtime.tools.calibrate_per_exit import exit_sweep, refine_per_exit


def test_refining_never_makes_the_choice_worse():
    """Exit 1 is right on half the images (confidence 0.7..1) and unsure on the rest; exit 2 is confidently wrong.
    One threshold must stay above exit 2's 0.9, so exit 1 keeps only its surest images; a pair takes them all."""
    rng = np.random.default_rng(0)
    n, k = 400, 5
    labels = rng.integers(0, k, n)
    onehot = np.eye(k, dtype=np.float32)[labels]
    wrong = np.eye(k, dtype=np.float32)[(labels + 1) % k]
    right1 = np.arange(n) < n // 2
    conf1 = rng.uniform(0.7, 1.0, n).astype(np.float32)[:, None]
    p1 = np.where(right1[:, None], conf1 * onehot + (1 - conf1) * wrong, 0.45 * wrong + 0.35 * onehot + 0.05)
    p2 = 0.9 * wrong + 0.1 * onehot
    probs = np.stack([p1, p2, onehot]).astype(np.float32)
    cum, full = [10, 20, 30], 30
    rows = cal_mod.threshold_table(probs, labels, cum, full, "max-prob")
    single = cal_mod.choose(rows, "accuracy-drop", 0.0, 1.0, full, confidence=0.5)
    refined, tried = refine_per_exit(probs, labels, cum, full, single)
    assert single.met and single.row.threshold > 0.9
    assert refined.met and tried and refined.row is tried[-1] and refined.row.accuracy == 1.0
    t1, t2 = refined.row.threshold
    assert 0.45 < t1 <= conf1[right1].min() and t2 > 0.9 and refined.row.exit_shares == (0.5, 0.0, 0.5)
    assert refined.row.mean_macs == 20 < single.row.mean_macs
    again, more = refine_per_exit(probs, labels, cum, full, refined)
    assert again.row == refined.row and not more  # a fixed point


@pytest.mark.parametrize("criterion", ["max-prob", "entropy", "margin"])
def test_the_one_exit_sweep_gives_the_rows_of_the_full_table(criterion):
    """exit_sweep's sums over a mask are the same rows threshold_table computes image by image."""
    rng = np.random.default_rng(3)
    n, k, e = 300, 6, 4
    probs = rng.dirichlet(np.full(k, 0.3), (e, n)).astype(np.float32)
    labels = rng.integers(0, k, n)
    cum, full = [10, 25, 40, 60], 60
    grid = threshold_grid(criterion)[::37]
    rule = (0.3, 0.6, 0.45) if criterion != "entropy" else (0.5, 0.3, 0.4)
    for exit_k in range(e - 1):
        fast = exit_sweep(probs, labels, cum, full, criterion, rule, exit_k, grid)
        rules = [rule[:exit_k] + (t,) + rule[exit_k + 1:] for t in grid]
        slow = cal_mod.threshold_table(probs, labels, cum, full, criterion, rules)
        for a, b in zip(fast, slow):
            assert a.threshold == b.threshold and a.accuracy == pytest.approx(b.accuracy)
            assert a.mean_macs == pytest.approx(b.mean_macs) and a.exit_shares == pytest.approx(b.exit_shares)
            assert a.drop_stderr == pytest.approx(b.drop_stderr)
