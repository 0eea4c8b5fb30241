import pytest
import torch

from erde.runtime.common.errors import ErdeError
from erde.training.models import build_model, config_from_dict, default_exits, list_archs, model_config
from erde.training.resnet import ResNetConfig


def test_registry_builds_every_arch():
    for arch in list_archs():
        cfg = model_config(arch, num_classes=7)
        assert cfg.num_exits == (3 if cfg.num_blocks == 3 else 4)
        model = build_model(cfg).eval()
        outs = model(torch.zeros(2, 3, 32, 32))
        assert [tuple(o.shape) for o in outs] == [(2, 7)] * cfg.num_exits


def test_exits_can_be_moved_or_dropped():
    cfg = model_config("resnet14_ee", exit_after=(1, 3))
    assert cfg.exit_after == (1, 3) and cfg.num_exits == 3
    outs = build_model(cfg).eval()(torch.zeros(1, 3, 32, 32))
    assert len(outs) == 3
    for bad in ((3, 1), (1, 1), (5,), (-1,)):
        with pytest.raises(ErdeError, match="increasing block indices"):
            model_config("resnet14_ee", exit_after=bad)


def test_default_exits_has_one_inside_a_stage():
    n = 3
    exits = default_exits(n)
    assert exits == (2, 4, 5)
    stage_ends = {n - 1, 2 * n - 1}
    assert any(e not in stage_ends for e in exits)
    assert default_exits(1) == (0, 1)  # n = 1: the two stage ends
    with pytest.raises(ErdeError):
        default_exits(0)


def test_segments_chain_equals_forward():
    model = build_model(model_config("tiny_ee")).eval()
    x = torch.randn(3, 3, 32, 32)
    full = model(x)
    feats = x
    for k in range(model.cfg.num_exits):
        feats, logits = model.run_segment(k, feats)
        torch.testing.assert_close(logits, full[k])
    assert model.segment_bounds()[-1][1] == len(model.blocks)


def test_config_round_trip_and_bad_exits():
    cfg = model_config("resnet20_ee", 100)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ErdeError):
        build_model(ResNetConfig("x", 2, exit_after=(3, 1)))
    with pytest.raises(ErdeError):
        model_config("resnet1000")


def test_exit_head_is_bn_relu_pool_dropout_linear():
    head = build_model(model_config("tiny_ee")).heads[0]
    kinds = [type(m).__name__ for m in head.children()]
    assert kinds == ["BatchNorm2d", "AvgPool2d", "Dropout", "Linear"]  # ReLU is functional, between bn and pool
    assert head.drop.p == 0.5 and head.pool.kernel_size == 2


def test_exits_none_is_a_static_network():
    from erde.training.models import parse_exits

    assert parse_exits("none") == ()
    model = build_model(model_config("air32_ee", exit_after=parse_exits("none")))
    assert len(model(torch.zeros(1, 3, 32, 32))) == 1


def test_each_family_has_its_own_config_and_old_checkpoints_still_load():
    air, res = model_config("air32w16_ee"), model_config("resnet8_ee")
    assert air.family == "airnet" and res.family == "resnet"
    assert not hasattr(air, "blocks_per_stage") and not hasattr(res, "whiten_channels")
    assert config_from_dict(air.to_dict()) == air and config_from_dict(res.to_dict()) == res
    # before the per-family configs, one config held every family's fields (committed checkpoints have it)
    old = dict(air.to_dict(), blocks_per_stage=1, base_width=16, widths=[32, 128, 256])
    assert config_from_dict(old) == air
    with pytest.raises(ErdeError, match="not known to this version"):
        config_from_dict(dict(air.to_dict(), family="transformer"))
    with pytest.raises(ErdeError, match="fields .'depth_multiplier'. are not known"):
        config_from_dict(dict(res.to_dict(), depth_multiplier=2))


def test_the_model_modules_import_no_cycle():
    import ast
    from pathlib import Path

    training = Path(__file__).resolve().parents[1] / "training"
    for family in ("net.py", "resnet.py", "airnet.py"):
        tree = ast.parse((training / family).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert imported <= {"net"}, (family, imported)  # families build on net only; models.py imports them
