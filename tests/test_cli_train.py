"""erde-train end to end on a tiny dataset, and every bad input it must refuse cleanly."""

import json
import pickle
import subprocess
import sys

import torch

from erde.training.checkpoint import read_checkpoint
from training_fixtures import train_cli

COMMON = ["--arch", "tiny_ee", "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25", "--quiet"]


def test_teacher_checkpoint_carries_everything(tiny_teacher):
    ckpt = read_checkpoint(tiny_teacher)
    assert ckpt["kind"] == "teacher" and ckpt["class_names"] == ["blue", "green", "red"]
    assert ckpt["preprocessing"]["input_size"] == [32, 32] and len(ckpt["preprocessing"]["mean"]) == 3
    assert ckpt["model_args"]["exit_after"] == [1, 2, 3] or tuple(ckpt["model_args"]["exit_after"]) == (1, 2, 3)
    assert len(ckpt["metrics"]["val_exit_accuracy"]) == 4 and ckpt["progress"]["finished"]
    assert ckpt["train_args"]["loss"]["name"] == "ce"


def test_student_learns_from_teacher_and_eval_prints_json(tiny_student, tiny_data, tmp_path):
    ckpt = read_checkpoint(tiny_student)
    assert ckpt["kind"] == "student" and ckpt["train_args"]["loss"]["name"] == "erde"
    r = train_cli(["eval", tiny_student, "--data", tiny_data, "--split", "test", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)  # --json: JSON on stdout, as in every command
    assert result["images"] == 36 and len(result["exit_accuracy"]) == 4
    assert max(result["exit_accuracy"]) > 0.5  # colours are easy: far above chance (1/3)
    mp = result["sweeps"]["max-prob"]
    assert all(abs(sum(p["exit_shares"]) - 1) < 1e-9 for p in mp)
    assert "max-prob" in result["sweeps"] and "entropy" in result["sweeps"]
    r = train_cli(["eval", tiny_student, "--data", tiny_data, "--split", "test"])
    assert "max-prob" in r.output and "entropy" in r.output


def _error_line(r):
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code != 0 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_bad_data_paths(tmp_path):
    assert "no such file" in _error_line(train_cli(["teacher", "--data", tmp_path / "nope", "--out", tmp_path / "t.pt"] + COMMON))
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    assert "no images" in _error_line(train_cli(["teacher", "--data", tmp_path / "empty", "--out", tmp_path / "t.pt"] + COMMON))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "x.txt").write_text("x")
    assert "not a dataset" in _error_line(train_cli(["teacher", "--data", garbage, "--out", tmp_path / "t.pt"] + COMMON))
    assert not (tmp_path / "t.pt").exists()


def test_existing_output_is_not_clobbered(tiny_data, tiny_teacher, tmp_path):
    before = tiny_teacher.read_bytes()
    line = _error_line(train_cli(["teacher", "--data", tiny_data, "--out", tiny_teacher] + COMMON))
    assert "--resume" in line and tiny_teacher.read_bytes() == before
    line = _error_line(train_cli(["teacher", "--data", tiny_data, "--out", tiny_teacher, "--resume"] + COMMON))
    assert "differ" in line or "finished" in line
    assert "exist" in _error_line(train_cli(["teacher", "--data", tiny_data, "--out", tmp_path / "no" / "t.pt"] + COMMON))


def test_bad_teacher_checkpoints(tiny_data, tiny_teacher, tmp_path):
    def student(teacher):
        return train_cli(["student", "--teacher", teacher, "--data", tiny_data, "--out", tmp_path / "s.pt"] + COMMON)

    assert "no such" in _error_line(student(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    assert "not a readable checkpoint" in _error_line(student(corrupt))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    assert "refused" in _error_line(student(evil))
    plain = tmp_path / "plain.pt"
    pickle.dump({"a": 1}, open(plain, "wb"))
    _error_line(student(plain))
    # a teacher with other exits: a 4-class dataset does not match the 3-class teacher
    ckpt = read_checkpoint(tiny_teacher)
    ckpt["model_args"]["exit_after"] = [1, 3]
    ckpt["class_names"] = ["a", "b", "c"]
    odd = tmp_path / "odd.pt"
    torch.save(ckpt, odd)
    line = _error_line(student(odd))
    assert "does not match" in line and "exits" in line and "classes" in line
    assert not (tmp_path / "s.pt").exists()


def test_bad_options(tiny_data, tiny_teacher, tmp_path):
    base = ["student", "--teacher", tiny_teacher, "--data", tiny_data, "--out", tmp_path / "s.pt"] + COMMON
    assert "exit weights" in _error_line(train_cli(base + ["--exit-weights", "1,1"]))
    assert "--exit-weights" in _error_line(train_cli(base + ["--exit-weights", "a,b"]))
    assert "temperature" in _error_line(train_cli(base + ["--temperature", "0"]))
    r = train_cli(base + ["--loss", "mse"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_no_traceback_from_the_real_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "erde.training.cli", "teacher", "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "t.pt")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
