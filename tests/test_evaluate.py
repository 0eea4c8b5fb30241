import numpy as np
import torch

from erde.runtime.core.criteria import sweep
from erde.training.evaluate import dead_exits, per_exit_accuracy
from erde.training.models import build_model, model_config


def test_sweep_on_hand_made_probabilities():
    # 2 exits, 3 images, 2 classes
    probs = np.array([
        [[0.95, 0.05], [0.6, 0.4], [0.2, 0.8]],
        [[0.9, 0.1], [0.1, 0.9], [0.3, 0.7]],
    ])
    labels = np.array([0, 1, 1])
    assert per_exit_accuracy(probs, labels) == [2 / 3, 1.0]
    (p,) = sweep(probs, labels, [10, 30], 25, "max-prob", [0.75])
    # image 0 and 2 leave at exit 0 (0.95, 0.8), image 1 goes on and is right at exit 1
    assert p.exit_shares == (2 / 3, 1 / 3)
    assert p.accuracy == 1.0
    assert np.isclose(p.mean_macs, (10 + 30 + 10) / 3) and np.isclose(p.macs_fraction, p.mean_macs / 25)
    (q,) = sweep(probs, labels, [10, 30], 25, "max-prob", [1.0])
    assert q.exit_shares == (0.0, 1.0) and q.accuracy == 1.0


def test_dead_exit_is_detected():
    model = build_model(model_config("tiny_ee")).eval()
    x = torch.randn(8, 3, 32, 32)
    assert dead_exits(model, x) == []
    with torch.no_grad():
        model.heads[1].bn.weight.fill_(0.1)
        model.heads[1].bn.bias.fill_(-5.0)
    assert dead_exits(model, x) == [1]
