"""The bundle builder, and the committed bundle itself: what `pip install '.[runtime]'` ships."""

import fnmatch
import hashlib
import subprocess
import tomllib
from pathlib import Path

import pytest
from PIL import Image

import bundle_model
from erde.runtime.core.engine import Engine
from erde.runtime.common.errors import ErdeError
from erde.runtime.core.manifest import load_manifest
from runtime_fixtures import console_command, torch_blocked_env

REPO = Path(__file__).resolve().parents[1]


def test_samples_are_drawn(tmp_path):
    bundle_model.draw_samples(tmp_path)
    for name in ("airplane.png", "ship.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (96, 96) and img.mode == "RGB"


def test_needs_the_study_first(tmp_path, capsys):
    assert bundle_model.main(["--source", str(tmp_path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "run the study first" in err
    assert bundle_model.main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "none.pt: no such checkpoint" in err and len(err.splitlines()) == 1
    assert bundle_model.main(["--calibrate-threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: Invalid value for '--calibrate-threads'") and len(err.splitlines()) == 1


def test_the_student_is_exported_in_another_process(tiny_student, tmp_path):
    """The export's parity check must not fix this process's thread pool before calibration runs here."""
    from erde.runtime.core import sessions
    before = sessions._global_pool_active
    bundle_model.export_student(tiny_student, tmp_path / "out")
    assert load_manifest(tmp_path / "out").segments
    assert sessions._global_pool_active == before
    with pytest.raises(ErdeError, match=r"erde-export .*none\.pt failed"):
        bundle_model.export_student(tmp_path / "none.pt", tmp_path / "out2")


def test_the_bundled_model_is_calibrated_and_carries_its_test_metrics():
    m = load_manifest(bundle_model.BUNDLED)
    cal = m.calibration
    assert cal is not None and cal.mode == "accuracy-drop" and 0 < cal.threshold < 1
    assert (m.default_criterion, m.default_threshold) == (cal.criterion, cal.threshold)
    # A fresh clone rebuilds it: it was exported from the builder's default checkpoint, which is committed.
    digest = hashlib.sha256(bundle_model.STUDENT.read_bytes()).hexdigest()
    assert (m.source["checkpoint"], m.source["checkpoint_sha256"]) == (bundle_model.STUDENT.name, digest)
    # The choice keeps its promise on the validation split, and the test numbers are recorded beside it.
    assert m.metrics["calibration_val_accuracy_final_exit"] - cal.val_accuracy <= cal.target / 100 + 1e-9
    assert 0 < m.metrics["test_macs_fraction_calibrated"] < 1
    assert m.metrics["test_images"] == 10000 and 0.1 < m.metrics["test_accuracy_calibrated"] <= 1
    size = sum(p.stat().st_size for p in bundle_model.BUNDLED.iterdir())
    # air32w_ee: 1.1 M float32 weights, stored twice (the segments and full.onnx)
    assert size < 10_000_000, "the bundled model should stay under 10 MB"
    engine = Engine.load(bundle_model.BUNDLED, threads=1, shared_pool=False)  # every sha256 checks out
    (p,) = engine.predict([bundle_model.SAMPLES / "ship.png"])
    assert p.class_name in m.class_names


def test_every_bundled_file_is_package_data():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["erde.runtime"]
    runtime = REPO / "runtime"
    files = [p.relative_to(runtime).as_posix() for d in (bundle_model.BUNDLED, bundle_model.SAMPLES)
             for p in d.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files


def test_erde_run_uses_the_bundled_model_without_torch(tmp_path):
    proc = subprocess.run(console_command("erde-run", "erde.runtime.tools.run_cli")
                          + ["--image", str(bundle_model.SAMPLES / "airplane.png"), "--threads", "1"],
                          capture_output=True, text=True, env=torch_blocked_env(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header, line = lines[0], lines[-1]
    # The bundle carries latency profiles of the machine that built it: elsewhere a warning says it is ignored.
    assert len(lines) == 2 + ("Warning:" not in proc.stderr) and (len(lines) == 2 or "expected latency" in lines[1])
    assert "(calibrated)" in header and str(bundle_model.BUNDLED) in header
    assert line.startswith(f"{bundle_model.SAMPLES / 'airplane.png'}: ") and "of full MACs" in line and " ms" in line
