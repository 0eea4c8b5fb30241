import pytest
import torch

from erde.training import train as train_mod
from erde.training.checkpoint import read_checkpoint
from erde.training.train import TrainConfig, lr_at, make_optimizer, revive_heads
from erde.training.models import build_model, model_config
from training_fixtures import train_cli


def test_lr_schedule_is_one_cycle():
    cfg = TrainConfig(epochs=1, lr=0.2, batch_size=128, warmup_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 19
    assert lrs[0] < lrs[10] < lrs[19] and lrs[50] > lrs[99] >= 0
    assert lr_at(19, 100, cfg, world_size=2) == pytest.approx(0.4)  # linear scaling with the global batch


def test_no_weight_decay_on_batchnorm_and_biases():
    model = build_model(model_config("tiny_ee"))
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    assert no_decay["weight_decay"] == 0 and all(p.ndim <= 1 for p in no_decay["params"])
    assert any(p is model.heads[0].bn.weight for p in no_decay["params"])


def test_revive_resets_a_dead_head():
    model = build_model(model_config("tiny_ee"))
    with torch.no_grad():
        model.heads[0].bn.bias.fill_(-3)
    revive_heads(model, [0])
    assert torch.all(model.heads[0].bn.bias == 0) and torch.all(model.heads[0].bn.weight == 1)


@pytest.mark.parametrize("arch,recipe", [("tiny_ee", "sgd"), ("air32_ee", "airbench")])
def test_killed_run_resumes_to_the_same_weights(tiny_data, tmp_path, monkeypatch, arch, recipe):
    args = ["teacher", "--arch", arch, "--recipe", recipe, "--data", tiny_data, "--epochs", "2", "--batch-size", "16",
            "--val-fraction", "0.25", "--quiet"]
    straight = tmp_path / "straight.pt"
    assert train_cli(args + ["--out", straight]).exit_code == 0

    real_save = train_mod.save_checkpoint
    calls = []

    def save_then_die(ckpt, path):
        real_save(ckpt, path)
        calls.append(path)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    killed = tmp_path / "killed.pt"
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    r = train_cli(args + ["--out", killed])
    assert r.exit_code != 0 and len(calls) == 1
    assert read_checkpoint(killed)["progress"] == {"epoch": 1, "epochs": 2, "finished": False, "world_size": 1}
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    r = train_cli(args + ["--out", killed, "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    a, b = read_checkpoint(straight), read_checkpoint(killed)
    assert b["progress"]["finished"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], msg=key)
    assert [h["epoch"] for h in b["metrics"]["history"]] == [1, 2]
    assert ("lookahead" in read_checkpoint(killed)["training_state"]) == (recipe == "airbench")
