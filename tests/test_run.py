"""training/run.py: the run spec stored in a checkpoint, compared field by field on --resume."""

from pathlib import Path

from erde.training.losses import LossConfig
from erde.training.run import RunSpec
from erde.training.train import TrainConfig


def _spec(**kw):
    d = dict(kind="teacher", arch="tiny_ee", exits=None, data=str(Path("/data").resolve()), limit=None,
             val_fraction=0.1, train=TrainConfig(epochs=2), loss=LossConfig("ce"), teacher=None)
    d.update(kw)
    return RunSpec(**d)


def test_to_dict_is_the_checkpoints_train_args_and_differences_name_fields():
    a = _spec()
    stored = a.to_dict()
    assert set(stored) == {"kind", "arch", "exits", "data", "limit", "val_fraction", "train", "loss", "teacher"}
    assert a.differences(stored) == []
    assert _spec(arch="resnet8_ee", exits=(0,)).differences(stored) == ["arch", "exits"]
    assert _spec(train=TrainConfig(epochs=3)).differences(stored) == ["train"]
    assert _spec(kind="student").differences(stored) == []  # the kind is not an option of the run
