from erde.training.macs import exit_macs
from erde.training.models import build_model, model_config


def _conv(c_in, c_out, k, hw):
    return c_in * c_out * k * k * hw * hw


def test_resnet20_macs_match_a_hand_count():
    m = exit_macs(build_model(model_config("resnet20_ee")))
    stem = _conv(3, 16, 3, 32)
    stage1_block = 2 * _conv(16, 16, 3, 32)
    assert m.backbone[0] == stem + 3 * stage1_block  # exit 1 after stage 1
    assert m.head[0] == 16 * 16 * 16 * 10  # Linear on the 2x2-pooled 16x32x32 map
    assert m.head[-1] == 64 * 10
    total_conv = stem + 3 * stage1_block
    total_conv += _conv(16, 32, 3, 16) + _conv(32, 32, 3, 16) + _conv(16, 32, 1, 16) + 2 * 2 * _conv(32, 32, 3, 16)
    total_conv += _conv(32, 64, 3, 8) + _conv(64, 64, 3, 8) + _conv(32, 64, 1, 8) + 2 * 2 * _conv(64, 64, 3, 8)
    assert m.full == total_conv + 640
    assert m.cumulative[-1] == m.full + sum(m.head[:-1])
    assert list(m.cumulative) == sorted(m.cumulative)


def test_student_is_several_times_cheaper_than_teacher():
    teacher = exit_macs(build_model(model_config("resnet56_ee"))).full
    student = exit_macs(build_model(model_config("resnet20_ee"))).full
    assert 2.9 < teacher / student < 3.2
