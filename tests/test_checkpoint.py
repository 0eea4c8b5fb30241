import pickle

import pytest
import torch

from erde.training.checkpoint import CheckpointError, load_model, make_checkpoint, read_checkpoint, save_checkpoint
from erde.training.models import build_model, model_config


def _ckpt(model):
    return make_checkpoint(model, kind="teacher", class_names=["a", "b"],
                           preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
                           train_args={"arch": "tiny_ee"}, metrics={"val_exit_accuracy": [0.5] * 4},
                           progress={"epoch": 1, "epochs": 1, "finished": True})


def test_round_trip_rebuilds_the_model_with_weights_only(tmp_path):
    model = build_model(model_config("tiny_ee", 2)).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(_ckpt(model), path)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["version"] == 1 and raw["model_args"]["arch"] == "tiny_ee"
    loaded, ckpt = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(model(x), loaded(x)):
        torch.testing.assert_close(a, b)
    assert ckpt["class_names"] == ["a", "b"] and not list(tmp_path.glob("*.tmp"))


def test_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "erde-checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, pickle.dumps({"a": 1})])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_other_version_and_foreign_checkpoints(tmp_path):
    model = build_model(model_config("tiny_ee", 2))
    ckpt = _ckpt(model)
    ckpt["version"] = 99
    torch.save(ckpt, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        read_checkpoint(tmp_path / "v99.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an ERDE checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "missing.pt")


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(_ckpt(build_model(model_config("tiny_ee", 2))), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "cut.pt")


def test_compact_checkpoint_loads_and_predicts_like_the_original(tiny_teacher, tmp_path):
    from erde.training.cli import cli as cli_main
    from click.testing import CliRunner

    out = tmp_path / "small.pt"
    r = CliRunner().invoke(cli_main, ["compact", str(tiny_teacher), str(out)])
    assert r.exit_code == 0, r.output
    raw = read_checkpoint(out)
    assert raw["compact"] and raw["training_state"] == {}
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    assert "/" not in raw["train_args"]["data"]  # no absolute path of the machine that trained it
    a, _ = load_model(tiny_teacher)
    b, _ = load_model(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for la, lb in zip(a(x), b(x)):
            torch.testing.assert_close(la, lb, atol=2e-2, rtol=2e-2)
    assert out.stat().st_size < tiny_teacher.stat().st_size
    r = CliRunner().invoke(cli_main, ["compact", str(tiny_teacher), str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
