"""The airbench-style network: shapes, exits, frozen whitening, and the whitening itself."""

import dataclasses

import pytest
import torch

from erde.training.airnet import init_whitening
from erde.training.macs import exit_macs
from erde.training.models import build_model, keep_exits, model_config


def test_shapes_exits_and_segments():
    model = build_model(model_config("air32_ee")).eval()
    outs = model(torch.zeros(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 10)] * 3
    x = torch.zeros(1, 3, 32, 32)
    shapes = []
    for k in range(3):
        x, _ = model.run_segment(k, x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 15, 15), (64, 7, 7), (128, 3, 3)]
    one = keep_exits(model, (1,))
    torch.testing.assert_close(one(torch.ones(1, 3, 32, 32))[0], model(torch.ones(1, 3, 32, 32))[1])


def test_macs_rise_along_the_exits_and_the_teacher_is_larger():
    small, large = exit_macs(build_model(model_config("air32_ee"))), exit_macs(build_model(model_config("air94_ee")))
    assert small.cumulative[0] < small.cumulative[1] < small.cumulative[2]
    assert large.full > 5 * small.full


def test_the_wide_student_keeps_the_first_block_and_puts_its_macs_after_the_first_exit():
    narrow, wide = exit_macs(build_model(model_config("air32_ee"))), exit_macs(build_model(model_config("air32w_ee")))
    assert wide.cumulative[0] == narrow.cumulative[0]  # the same first block and exit head
    assert wide.cumulative[0] / wide.full < 0.25 < narrow.cumulative[0] / narrow.full


@pytest.mark.parametrize("arch, channels", [("air32_ee", 24), ("air32w16_ee", 16)])
def test_whitening_weights_are_frozen_and_whiten_the_patches(arch, channels):
    model = build_model(model_config(arch))
    conv = model.stem[0]
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    assert all(not m.weight.requires_grad for n, m in model.blocks.named_modules() if n.endswith("norm1"))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=g)
    images = images + 0.8 * torch.roll(images, 1, dims=3)  # neighbouring pixels correlate
    init_whitening(model, images)
    half = channels // 2
    assert conv.weight.shape[0] == channels and model.blocks[0].conv1.in_channels == channels
    out = torch.nn.functional.conv2d(images, conv.weight[:half])  # the +eigenvector half
    flat = out.transpose(0, 1).reshape(half, -1)
    cov = flat @ flat.T / flat.shape[1]
    torch.testing.assert_close(cov, torch.eye(half), atol=0.05, rtol=0)
    torch.testing.assert_close(conv.weight[half:], -conv.weight[:half])


def test_the_16_channel_stem_keeps_the_leading_eigenvectors():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(64, 3, 32, 32, generator=g)
    images = images + 0.8 * torch.roll(images, 1, dims=3)
    full, small = build_model(model_config("air32w_ee")), build_model(model_config("air32w16_ee"))
    init_whitening(full, images)
    init_whitening(small, images)
    torch.testing.assert_close(small.stem[0].weight[:8], full.stem[0].weight[:8])
    assert exit_macs(small).cumulative[0] < exit_macs(full).cumulative[0]


@pytest.mark.parametrize("channels", [0, 7, 26])
def test_bad_whiten_channels_are_refused(channels):
    from erde.runtime.common.errors import ErdeError

    with pytest.raises(ErdeError, match="whiten_channels"):
        build_model(dataclasses.replace(model_config("air32w_ee"), whiten_channels=channels))


def test_exits_are_checked():
    from erde.runtime.common.errors import ErdeError

    with pytest.raises(ErdeError, match="exits"):
        model_config("air32_ee", exit_after=(2,))


def _with_running_stats(model, seed=0):
    """Random BatchNorm statistics and shifts, as training leaves them (the backbone norms' scale stays 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_the_export_view_folds_the_first_norm_through_the_pool_with_the_same_answers(activation):
    cfg = dataclasses.replace(model_config("air32w16_ee"), activation=activation)
    model = _with_running_stats(build_model(cfg))
    view = model.for_export()
    assert all(type(b).__name__ == "_FoldedConvGroup" for b in view.blocks)
    assert all(type(b).__name__ == "ConvGroup" for b in model.blocks)  # a copy: the trained model is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), view(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_norm_with_a_scale_not_above_zero_is_left_in_place():
    model = _with_running_stats(build_model(model_config("air32w16_ee")))
    with torch.no_grad():
        model.blocks[1].norm1.weight[3] = -0.5  # max pool and a negative scale do not commute
    view = model.for_export()
    assert [type(b).__name__ for b in view.blocks] == ["_FoldedConvGroup", "ConvGroup", "_FoldedConvGroup"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(view(x)[-1], model(x)[-1], rtol=1e-4, atol=1e-4)
