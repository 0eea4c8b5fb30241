"""erde-quantize (export/quantize.py): int8 model folders the runtime runs unchanged."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erde.export.quantize import main, saturation_risks
from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import load_manifest
from runtime_fixtures import console_command, torch_blocked_env


@pytest.fixture(scope="module")
def int8(exported, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    assert main(["--model", str(exported[0]), "--data", str(tiny_data), "--out", str(out), "--max-images", "12"]) == 0
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


def test_int8_segments_hand_on_uint8_nhwc_feature_maps(int8, exported):
    """The manifest says what crosses each boundary, and the engine binds buffers of that type."""
    m, fp32 = load_manifest(int8), load_manifest(exported[0])
    assert "uint8 NHWC" in m.quantization["boundaries"] and "integer" in m.quantization["exit_heads"]
    for a, b, f in zip(m.segments, m.segments[1:], fp32.segments):
        out = next(t for t in a.outputs if t.name == a.feature_output)
        batch, c, h, w = next(t for t in f.outputs if t.name == f.feature_output).shape
        assert out == b.inputs[0] and out.dtype == "uint8" and out.shape == [batch, h, w, c]
    e = Engine.load(int8, threads=1)
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    probs = e.exit_probs(x)
    chain = e._chain()
    assert [f.dtype for f in chain._features] == [np.uint8] * (m.num_exits - 1)
    for i in range(len(x)):  # the bound batch-1 chain answers as the batched sessions do
        p = e.predict_array(x[i:i + 1], early_exit=False)[0]
        assert p.exit_index == m.num_exits - 1 and p.class_index == int(probs[-1, i].argmax())
        assert abs(p.confidence - float(probs[-1, i].max())) < 1e-6


def test_erde_run_runs_an_int8_folder_with_torch_blocked(int8, tiny_data, tmp_path):
    image = next((tiny_data / "test" / "red").iterdir())
    r = subprocess.run(console_command("erde-run", "erde.runtime.tools.run_cli") + ["--model", str(int8), "--image", str(image),
                                                                         "--json", "--threads", "1"],
                       capture_output=True, text=True, env=torch_blocked_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"class_name"' in r.stdout


def _one_error(capsys, argv):
    assert main(["--model"] + [str(a) for a in argv]) == 2
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


# ---- right on every CPU: 7-bit weights, read back from the graphs --------------------------------

BUNDLED_INT8 = Path(__file__).resolve().parents[1] / "runtime" / "models" / "cifar10-int8"


def test_int8_graphs_cannot_saturate_without_vnni(int8):
    """On any machine, VNNI or not: every int8 weight lies in [-64, 64], so uint8 x int8 pair sums fit int16."""
    m = load_manifest(int8)
    assert "[-64, 64]" in m.quantization["weights"]
    for f in [s.file for s in m.segments] + [m.full.file]:
        assert saturation_risks(int8 / f) == [], f


def test_the_bundled_int8_model_cannot_saturate():
    m = load_manifest(BUNDLED_INT8)
    for f in [s.file for s in m.segments] + [m.full.file]:
        assert saturation_risks(BUNDLED_INT8 / f) == [], f


def test_a_full_range_int8_graph_is_named_a_risk(exported, tmp_path):
    """The format the first int8 bundle had (full int8 weight range) is what the check exists to catch."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": x}])

        def get_next(self):
            return next(self.it, None)

    src = tmp_path / "full.onnx"
    shutil.copyfile(exported[0] / "full.onnx", src)
    quantize_static(str(src), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    risks = saturation_risks(tmp_path / "q.onnx")
    assert risks and "beyond [-64, 64]" in risks[0]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_quantize_only_reads_its_input_even_read_only(exported, tiny_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(exported[0], src)
    before = _snapshot(src)
    for p in [src, *src.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert main(["--model", str(src), "--data", str(tiny_data), "--out", str(tmp_path / "q"), "--max-images", "8"]) == 0
    finally:
        src.chmod(0o755)
    assert _snapshot(src) == before


@pytest.mark.slow
def test_a_kill_at_any_point_leaves_the_input_and_no_temporary_files(exported, tiny_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(exported[0], src)
    before = _snapshot(src)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    cmd = console_command("erde-quantize", "erde.export.quantize")
    for delay in (1.5, 3.5):  # during the fp32 sessions and calibration, then during a graph's quantization
        p = subprocess.Popen(cmd + [str(src), "--data", str(tiny_data), "--out", str(tmp_path / "q"), "--force",
                                    "--max-images", "8"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _snapshot(src) == before, delay
        assert not [q for q in tmpdir.iterdir() if q.name.startswith("ort.quant")], delay
    assert main(["--model", str(src), "--data", str(tiny_data), "--out", str(tmp_path / "q"), "--force", "--max-images", "8"]) == 0
    assert sorted(q.name for q in tmp_path.iterdir()) == ["q", "src", "tmpdir"]  # the killed runs' folders are gone


def test_without_onnx_the_error_names_the_extra(exported, tiny_data, tmp_path):
    r = subprocess.run(console_command("erde-quantize", "erde.export.quantize")
                       + ["--model", str(exported[0]), "--data", str(tiny_data), "--out", str(tmp_path / "q")],
                       capture_output=True, text=True, env=torch_blocked_env(tmp_path), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "erde[quantize]" in r.stderr and not (tmp_path / "q").exists()
