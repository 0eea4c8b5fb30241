"""erde-quantize (export/quantize.py): int8 model folders the runtime runs unchanged."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from erde.export.quantize import main
from erde.runtime.engine import Engine
from erde.runtime.manifest import load_manifest
from runtime_fixtures import console_command, torch_blocked_env


@pytest.fixture(scope="module")
def int8(exported, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    assert main([str(exported[0]), "--data", str(tiny_data), "--out", str(out), "--images", "12"]) == 0
    return out


def test_the_int8_folder_records_its_precision_and_runs(int8, exported):
    m = load_manifest(int8)
    assert all(s.precision == "int8" for s in m.segments) and m.full.precision == "int8"
    assert m.quantization["calibration_split"] == "validation" and m.quantization["calibration_images"] == 12
    assert m.calibration is None  # thresholds must be calibrated again on the int8 model
    a, b = Engine.load(exported[0], threads=1), Engine.load(int8, threads=1)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    assert b.exit_probs(x).shape == a.exit_probs(x).shape
    graph = (int8 / m.segments[0].file).read_bytes()
    assert b"QuantizeLinear" in graph


def test_erde_run_runs_an_int8_folder_with_torch_blocked(int8, tiny_data, tmp_path):
    image = next((tiny_data / "test" / "red").iterdir())
    r = subprocess.run(console_command("erde-run", "erde.runtime.cli") + ["--model", str(int8), "--image", str(image),
                                                                         "--json", "--threads", "1"],
                       capture_output=True, text=True, env=torch_blocked_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"class_name"' in r.stdout


def _one_error(capsys, argv):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs(exported, int8, tiny_data, tmp_path, capsys):
    assert "already quantized" in _one_error(capsys, [int8, "--data", tiny_data, "--out", tmp_path / "x"])
    assert "overwrite the input" in _one_error(capsys, [exported[0], "--data", tiny_data, "--out", exported[0]])
    empty = tmp_path / "empty"
    for c in ("red", "green", "blue"):
        (empty / "train" / c).mkdir(parents=True)
    _one_error(capsys, [exported[0], "--data", empty, "--out", tmp_path / "y"])
    big = tmp_path / "big"
    shutil.copytree(tiny_data, big)
    for p in (big / "train").rglob("*.png"):
        Image.new("RGB", (64, 64)).save(p)
    assert "64x64 pixels" in _one_error(capsys, [exported[0], "--data", big, "--out", tmp_path / "z"])
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
