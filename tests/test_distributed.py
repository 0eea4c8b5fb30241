"""Several processes on the CPU (gloo): torchrun runs, DDP equivalence, resume, and bad input.

No GPU here or in CI: the CUDA paths (nccl, amp, SyncBatchNorm, channels-last) are only
refused or exercised through their CPU equivalents.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from erde.runtime.common.errors import ErdeError
from erde.training import data as data_mod
from erde.training import distributed
from erde.training.checkpoint import read_checkpoint
from erde.training.losses import LossConfig
from erde.training.models import build_model, model_config
from erde.training.train import DeviceConfig, Hooks, RunInfo, TrainConfig, TrainData, train
from training_fixtures import train_cli

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
COMMON = ["--arch", "tiny_ee", "--epochs", "2", "--batch-size", "16", "--val-fraction", "0.25", "--quiet",
          "--dist-timeout", "1"]


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def _error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


# ---- single process: environment, refusals, error reporting -------------------------------------

def test_without_torchrun_there_is_no_process_group(monkeypatch):
    assert distributed.torchrun_env() is None
    assert distributed.init_from_env(torch.device("cpu")) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env(torch.device("cpu")) is None  # one process: exactly as without torchrun
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(distributed.DistributedError, match="LOCAL_RANK not set"):
        distributed.torchrun_env()
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("extra, words", [
    (["--device", "cpu", "--amp", "fp16"], "fp16 needs a CUDA GPU"),
    (["--device", "cpu", "--amp", "bf16"], "bf16 is refused on the CPU"),
    (["--device", "cpu", "--sync-bn"], "--sync-bn needs CUDA"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_gpu_only_options_are_refused_on_the_cpu(tiny_data, tmp_path, extra, words):
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("a GPU is present")
    out = tmp_path / "t.pt"
    r = train_cli(["teacher", "--data", tiny_data, "--out", out] + COMMON + extra)
    assert r.exit_code == 2 and words in _error_line(r.output) and "Traceback" not in r.output
    assert not out.exists()


def test_errors_every_rank_shares_are_reported_by_rank_0_only(monkeypatch, capsys):
    @distributed.errors_from_rank0
    def shared():
        with distributed.same_on_every_rank():
            raise ErdeError("bad option")

    @distributed.errors_from_rank0
    def own():
        raise ErdeError("disk full")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        shared()
    assert e.value.code == 2 and capsys.readouterr().err == ""
    with pytest.raises(ErdeError, match="^rank 1: disk full$"):  # only this rank knows: it says so itself
        own()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ErdeError, match="^bad option$"):
        shared()


def _tiny_train_data(n_train: int = 48, n_val: int = 12, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train + n_val, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n_train + n_val) % 3
    x[y == 1, 0] //= 2  # learnable: class 1 is darker in red
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.29)
    return TrainData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], mean, std)


@pytest.mark.slow  # bf16 on a CPU without bfloat16 units: about 2 s per step even at batch 2
def test_autocast_path_runs_and_saves_float32_cpu_tensors(tmp_path):
    """The --amp code path (autocast on student and teacher, grad scaler off) in bf16 on the CPU,
    which the library allows and the command line refuses only for speed."""
    torch.manual_seed(0)
    model, teacher = build_model(model_config("tiny_ee", 3)), build_model(model_config("tiny_ee", 3)).eval()
    info = RunInfo("student", ["a", "b", "c"], {}, {}, str(tmp_path / "s.pt"))
    metrics = train(model, _tiny_train_data(2, 2), TrainConfig(epochs=1, batch_size=2), LossConfig("erde"), info,
                    teacher, hooks=Hooks(log=lambda m: None, progress=False),
                    dev=DeviceConfig(torch.device("cpu"), "bf16"))
    assert len(metrics["val_exit_accuracy"]) == 4
    ckpt = read_checkpoint(tmp_path / "s.pt")
    assert all(v.device.type == "cpu" and v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())
    with pytest.raises(ErdeError, match="fp16 needs a CUDA GPU"):
        DeviceConfig(torch.device("cpu"), "fp16")


# ---- equivalence: 2 processes x batch B == 1 process x batch 2B --------------------------------

def _model_without_batchnorm() -> nn.Module:
    """tiny_ee with every BatchNorm replaced by Identity and no dropout: nothing depends on
    how the batch is split, so both runs must compute the same parameters."""
    torch.manual_seed(0)
    model = build_model(replace(model_config("tiny_ee", 3), head_dropout=0.0))

    def strip(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
            else:
                strip(child)

    strip(model)
    return model


def _train_without_bn(batch_size: int, out: Path, ctx=None) -> None:
    data_mod.augment = lambda x, flip, generator, pad=4, pad_mode="constant": x  # no random augmentation
    model = _model_without_batchnorm()
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    info = RunInfo("teacher", ["a", "b", "c"], {}, {}, str(out), rank, world)
    # Same --lr in both runs: the peak follows the global batch (lr x batch x processes / 128), which is 2B in both.
    hooks = Hooks(log=lambda m: None, progress=False, ddp_model=ctx.wrap(model) if ctx else None,
                  reduce_metrics=ctx.all_reduce_sum if ctx else None, sync_buffers=ctx.sync_buffers if ctx else None)
    train(model, _tiny_train_data(), TrainConfig(epochs=2, batch_size=batch_size, lr=0.2), LossConfig("ce"), info,
          hooks=hooks)


def _equivalence_worker(rank: int, port: int, out: str, batch_size: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.joined(torch.device("cpu"), 1.0) as ctx:
        assert ctx is not None and ctx.backend == "gloo" and ctx.world_size == 2
        _train_without_bn(batch_size, Path(out), ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, monkeypatch):
    """DDP through DistContext.wrap / all_reduce_sum / sync_buffers and the real train() loop:
    2 gloo processes with batch 8 each against 1 process with batch 16, 6 steps. The model has
    no BatchNorm (Identity) and no dropout, and augmentation is switched off, so the split of
    the global batch cannot matter; parameters must agree within 1e-5."""
    import torch.multiprocessing as mp

    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    mp.spawn(_equivalence_worker, args=(_free_port(), str(two), 8), nprocs=2, join=True)
    monkeypatch.setattr(data_mod, "augment", data_mod.augment)  # restored after the test
    _train_without_bn(16, one)
    a, b = read_checkpoint(one), read_checkpoint(two)
    assert b["progress"]["world_size"] == 2 and a["progress"]["world_size"] == 1
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    assert a["metrics"]["val_exit_accuracy"] == b["metrics"]["val_exit_accuracy"]  # sharded val == whole val
    for ha, hb in zip(a["metrics"]["history"], b["metrics"]["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)


# ---- torchrun, as a user runs it ------------------------------------------------------------------

def torchrun(args, tmp_base: Path, script=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["ERDE_CACHE"] = str(tmp_base / "erde-cache")  # the session's cache (conftest)
    target = [str(script)] if script else ["-m", "erde.training.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


KILL_AFTER_FIRST_SAVE = """
from erde.training import train as train_mod
from erde.training.cli import main

real_save = train_mod.save_checkpoint

def save_then_die(ckpt, path):
    real_save(ckpt, path)
    raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

train_mod.save_checkpoint = save_then_die
raise SystemExit(main())
"""


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "t.pt"
    r = torchrun(["teacher", "--data", tiny_data, "--out", out] + COMMON, tmp_path_factory.getbasetemp())
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.slow
def test_torchrun_writes_one_checkpoint_that_loads_and_exports(straight_run, tmp_path):
    from erde.export.exporter import export_checkpoint

    out, r = straight_run
    ckpt = read_checkpoint(out)  # weights_only=True
    assert ckpt["progress"] == {"epoch": 2, "epochs": 2, "finished": True, "world_size": 2}
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
    manifest = export_checkpoint(out, tmp_path / "model")
    assert (tmp_path / "model" / "manifest.json").is_file() and len(manifest.segments) == 4


@pytest.mark.slow
def test_only_rank_0_prints_and_writes(straight_run):
    out, r = straight_run
    log = r.stderr
    assert log.count("wrote ") == 1 and log.count("teacher epoch 1/2:") == 1 and log.count("teacher epoch 2/2:") == 1
    assert "2 process(es) on cpu" in log and "global batch 32" in log
    assert "Error" not in log and "Traceback" not in log and "rank 1" not in log
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.pt"]  # no temporary files left behind


@pytest.mark.slow
def test_resume_under_torchrun_continues_exactly(straight_run, tiny_data, tmp_path, tmp_path_factory):
    straight, _ = straight_run
    killed = tmp_path / "killed.pt"
    script = tmp_path / "kill_after_first_save.py"
    script.write_text(KILL_AFTER_FIRST_SAVE)
    args = ["teacher", "--data", tiny_data, "--out", killed] + COMMON
    base = tmp_path_factory.getbasetemp()
    r = torchrun(args, base, script)
    assert r.returncode != 0 and "interrupted" in r.stderr
    assert read_checkpoint(killed)["progress"] == {"epoch": 1, "epochs": 2, "finished": False, "world_size": 2}
    before = killed.read_bytes()
    # one process may not continue a run of two: the learning-rate schedule would change
    line = _error_line(train_cli(args + ["--resume"]).output)
    assert "written by 2 process(es), resumed with 1" in line and killed.read_bytes() == before
    r = torchrun(args + ["--resume"], base)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resuming") == 1
    a, b = read_checkpoint(straight), read_checkpoint(killed)
    assert b["progress"]["finished"] and [h["epoch"] for h in b["metrics"]["history"]] == [1, 2]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)


@pytest.mark.slow
def test_more_processes_than_the_data_allows_is_one_error_from_rank_0(tiny_data, tmp_path, tmp_path_factory):
    out = tmp_path / "t.pt"  # 90 training images: one batch of 64, not two
    r = torchrun(["teacher", "--data", tiny_data, "--out", out] + COMMON + ["--batch-size", "64"],
                 tmp_path_factory.getbasetemp())
    assert r.returncode != 0
    line = _error_line(r.stdout + r.stderr)
    assert "fewer than one batch of 64 x 2 process(es)" in line and "rank 1" not in line
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_with_the_airbench_recipe_keeps_whitening_frozen_and_lookahead_in_step(tiny_data, tmp_path,
                                                                                      tmp_path_factory):
    """The airbench recipe under DDP: the frozen whitening conv (set from the training images) stays the
    same as in one process, and rank 0 saves the lookahead state that --resume needs."""
    args = ["teacher", "--data", tiny_data, "--arch", "air32_ee", "--recipe", "airbench", "--epochs", "4",
            "--batch-size", "16", "--val-fraction", "0.25", "--quiet", "--dist-timeout", "1"]
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    r = torchrun(args + ["--out", two], tmp_path_factory.getbasetemp())
    assert r.returncode == 0, r.stderr
    assert train_cli(args + ["--out", one]).exit_code == 0
    a, b = read_checkpoint(one), read_checkpoint(two)
    assert b["progress"]["world_size"] == 2 and b["train_args"]["train"]["recipe"] == "airbench"
    assert set(b["training_state"]["lookahead"]) == set(a["training_state"]["lookahead"])
    torch.testing.assert_close(b["state_dict"]["stem.0.weight"], a["state_dict"]["stem.0.weight"], rtol=0, atol=0)
    fresh = build_model(model_config("air32_ee")).state_dict()
    moved = [k for k, v in b["state_dict"].items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert "blocks.0.conv1.weight" in moved and "stem.0.weight" in moved  # trained, and whitened once
