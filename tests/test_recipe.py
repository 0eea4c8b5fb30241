"""Training recipes: schedules, parameter groups, lookahead, flips and the command line's defaults."""

import pytest
import torch

from erde.training.data import alternating_flips, augment
from erde.training.models import build_model, model_config
from erde.training.recipe import BIAS_LR_SCALE, HEAD_LR_SCALE, Lookahead, lr_factor, make_optimizer, set_lr
from erde.training.run import train_config


def test_airbench_schedule_is_a_triangle():
    cfg, smoothing = train_config("airbench", 0)
    assert (cfg.batch_size, cfg.lr, cfg.momentum, smoothing) == (1024, 11.5, 0.85, 0.2)
    f = [lr_factor(s, 100, cfg) for s in range(101)]
    assert f[0] == pytest.approx(0.2) and max(f) == pytest.approx(1.0) and f.index(max(f)) == 23
    assert f[100] == pytest.approx(0.07) and all(a <= b for a, b in zip(f[:23], f[1:24]))


def test_given_options_override_the_recipe():
    cfg, smoothing = train_config("airbench", 3, epochs=4, lr=5.0, label_smoothing=0.0)
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.recipe, smoothing) == (4, 5.0, 3, "airbench", 0.0)


def test_airbench_groups_decoupled_rates():
    model = build_model(model_config("air32_ee"))
    cfg, _ = train_config("airbench", 0)
    opt = make_optimizer(model, cfg)
    shifts, heads, rest = opt.param_groups
    base = rest["initial_lr"]
    assert base == pytest.approx(11.5 / (1024 * (1 + 1 / 0.15)) * 1024)  # per 1024 images, mean loss
    assert shifts["initial_lr"] == pytest.approx(base * BIAS_LR_SCALE)
    assert heads["initial_lr"] == pytest.approx(base * HEAD_LR_SCALE)
    assert any(p is model.blocks[0].norm1.bias for p in shifts["params"])
    assert any(p is model.heads[0].fc.weight for p in heads["params"])
    for g in (shifts, heads, rest):  # the same decay per step in every group
        assert g["initial_lr"] * g["weight_decay"] == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)))
    set_lr(opt, 0.5)
    assert rest["lr"] == pytest.approx(base / 2)


def test_lookahead_pulls_the_weights_towards_their_average():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    la = Lookahead(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.step(model, 4, 10)  # not a lookahead step
    assert model.weight[0, 0].item() == 1.0
    la.step(model, 5, 10)
    keep = 0.95**5 * 0.5**3
    assert model.weight[0, 0].item() == pytest.approx(1 - keep)
    restored = Lookahead(model, la.state())
    assert restored.average["weight"][0, 0].item() == pytest.approx(1 - keep)


def test_alternating_flips_invert_every_other_epoch():
    a, b, c = (alternating_flips(100, 0, e) for e in range(3))
    assert torch.equal(a, ~b) and torch.equal(a, c) and 20 < int(a.sum()) < 80
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = augment(x, torch.tensor([True, False]), torch.Generator().manual_seed(0), pad=0)
    torch.testing.assert_close(out[0], x[0].flip(2))
    torch.testing.assert_close(out[1], x[1])


def test_the_whitening_bias_stops_learning_after_three_epochs():
    from erde.training.recipe import freeze_stem_bias

    model = build_model(model_config("air32_ee"))
    cfg, _ = train_config("airbench", 0)
    for epoch, kept in ((2, True), (3, False)):
        model.zero_grad()
        sum(o.sum() for o in model(torch.randn(2, 3, 32, 32))).backward()
        freeze_stem_bias(model, epoch, cfg)
        assert (model.stem[0].bias.grad is not None) == kept
        assert model.blocks[0].norm1.bias.grad is not None
