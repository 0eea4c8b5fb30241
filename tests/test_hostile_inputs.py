"""Hostile inputs through the real command lines (issue 14): one Error: line, no hang, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime_fixtures import console_command, make_model_folder, random_image

SCRIPTS = {
    "erde-run": "erde.runtime.tools.run_cli",
    "erde-calibrate": "erde.runtime.tools.calibrate_cli",
    "erde-bench": "erde.benchmarks.edge_bench",
    "erde-train": "erde.training",
    "erde-export": "erde.export.cli",
    "erde-profile": "erde.runtime.tools.profile_cli",
    "erde-quantize": "erde.export.quantize",
    "erde-verify": "erde.runtime.tools.verify_cli",
}


def run(script: str, *args, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    cmd = console_command(script, SCRIPTS[script]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                          errors="backslashreplace")


def one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("m"))


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(random_image()).save(path)
    return path


# ---- every console script: a bad option and a failing input ------------------------------------


def test_every_console_script_is_in_this_test():
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_has_help_and_version(script):
    r = run(script, "--help")
    assert r.returncode == 0 and "--help" in r.stdout and "--version" in r.stdout and r.stderr == "", r.stderr
    r = run(script, "--version")
    assert r.returncode == 0 and r.stdout.startswith(f"{script} (erde ") and r.stderr == "", r.stdout + r.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_gives_one_line_for_a_bad_option(script):
    line = one_error_line(run(script, "--no-such-option"))
    assert line.endswith(f"(see {script} --help)"), line


@pytest.mark.parametrize("script,args", [
    ("erde-run", ["--model", "missing-folder", "--image", "x.png"]),
    ("erde-calibrate", ["--model", "missing-folder", "--data", "missing-data"]),
    ("erde-bench", ["--model", "missing-folder", "--images", "missing-images"]),
    ("erde-train", ["teacher", "--data", "missing-data", "--out", "t.pt"]),
    ("erde-export", ["missing.pt"]),
    ("erde-profile", ["--model", "missing-folder"]),
    ("erde-quantize", ["--model", "missing-folder", "--data", "missing-data", "--out", "q"]),
    ("erde-verify", ["--model", "missing-folder"]),
])
def test_every_command_gives_one_line_for_a_failing_input(script, args, tmp_path):
    one_error_line(run(script, *[str(tmp_path / a) if "missing" in a else a for a in args]))


# ---- erde-export --force ------------------------------------------------------------------------


def test_export_force_keeps_a_users_folder_and_the_checkpoint(tiny_student, tmp_path):
    ckpt = tmp_path / "student.pt"
    shutil.copy(tiny_student, ckpt)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    assert "not written by erde" in one_error_line(run("erde-export", ckpt, "--out", notes, "--force"))
    assert (notes / "notes.txt").read_text() == "mine"
    one_error_line(run("erde-export", ckpt, "--out", tmp_path, "--force"))  # the checkpoint's own folder
    assert ckpt.exists()
    r = subprocess.run(console_command("erde-export", SCRIPTS["erde-export"]) + [str(ckpt), "--out", ".", "--force"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    one_error_line(r)
    assert ckpt.exists() and (notes / "notes.txt").exists()


def _foreign_folder(tmp_path: Path) -> Path:
    """A user's folder that happens to hold a manifest.json (issue 25: --force deleted it whole)."""
    d = tmp_path / "users"
    d.mkdir()
    (d / "precious.txt").write_text("mine")
    (d / "manifest.json").write_text('{"not": "erde"}')
    return d


def test_export_force_does_not_take_a_stray_manifest_as_proof(tiny_student, tmp_path):
    d = _foreign_folder(tmp_path)
    assert "not written by erde" in one_error_line(run("erde-export", tiny_student, "--out", d, "--force"))
    assert (d / "precious.txt").read_text() == "mine"


def test_force_refuses_a_file_a_user_added_to_an_export(exported, tiny_data, tmp_path):
    out = tmp_path / "q"
    args = ["--model", exported[0], "--data", tiny_data, "--out", out, "--max-images", "8"]
    assert run("erde-quantize", *args, timeout=120).returncode == 0
    (out / "notes.txt").write_text("mine")
    line = one_error_line(run("erde-quantize", *args, "--force", timeout=120))
    assert "notes.txt, which erde did not write" in line and (out / "notes.txt").exists()
    d = _foreign_folder(tmp_path)
    one_error_line(run("erde-quantize", "--model", exported[0], "--data", tiny_data, "--out", d, "--force"))
    assert (d / "precious.txt").read_text() == "mine"


def test_export_to_a_non_utf8_folder_name_works(tiny_student, tmp_path):
    out = os.path.join(os.fsencode(tmp_path), b"model\xff")
    r = subprocess.run(console_command("erde-export", SCRIPTS["erde-export"]) + [str(tiny_student).encode(), b"--out", out],
                       capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert os.path.isfile(os.path.join(out, b"manifest.json"))


def test_profile_of_the_installed_bundle_goes_to_the_user_folder(tmp_path):
    """erde-profile on the bundled model leaves the package as installed; erde-run finds the profile after."""
    bundled = Path(__file__).resolve().parents[1] / "runtime" / "models" / "cifar10"
    before = {p.name: p.read_bytes() for p in bundled.iterdir()}
    env = dict(os.environ, ERDE_CACHE=str(tmp_path / "cache"))
    r = run("erde-profile", "--threads", "1", "--calls", "20", env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert str(tmp_path / "cache" / "profiles") in r.stdout
    assert {p.name: p.read_bytes() for p in bundled.iterdir()} == before
    r = run("erde-run", "--image", bundled.parent.parent / "samples" / "ship.png", "--threads", "1", env=env)
    assert r.returncode == 0 and "expected latency" in r.stdout and r.stderr == "", r.stdout + r.stderr


# ---- model folders: FIFOs, links, sizes, nesting ------------------------------------------------


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return dst


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("which", ["manifest.json", "segment1.onnx"])
def test_a_fifo_in_the_model_folder_does_not_hang(model, tmp_path, image, which):
    m = _copy(model, tmp_path)
    (m / which).unlink()
    os.mkfifo(m / which)
    line = one_error_line(run("erde-run", "--model", m, "--image", image, timeout=10))
    assert "FIFO" in line and which in line


def test_a_segment_linked_to_dev_zero_or_outside_is_refused(model, tmp_path, image):
    m = _copy(model, tmp_path)
    (m / "segment0.onnx").unlink()
    os.symlink("/dev/zero", m / "segment0.onnx")
    assert "not a regular" in one_error_line(run("erde-run", "--model", m, "--image", image, timeout=10))
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(model / "segment0.onnx", outside)
    (m / "segment0.onnx").unlink()
    os.symlink(outside, m / "segment0.onnx")
    assert "leads out of" in one_error_line(run("erde-run", "--model", m, "--image", image, timeout=10))


def test_a_deeply_nested_manifest_is_one_line(model, tmp_path, image):
    m = _copy(model, tmp_path)
    (m / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested" in one_error_line(run("erde-run", "--model", m, "--image", image))


def test_a_manifest_whose_input_size_disagrees_is_one_line(model, tmp_path, image):
    m = _copy(model, tmp_path)
    d = json.loads((m / "manifest.json").read_text())
    d["preprocessing"]["input_size"] = [16, 16]
    (m / "manifest.json").write_text(json.dumps(d))
    one_error_line(run("erde-run", "--model", m, "--image", image))


def test_an_empty_model_option_is_refused(image):
    assert "--model is empty" in one_error_line(run("erde-run", "--model", "", "--image", image))


def test_an_image_that_is_a_fifo_is_reported_and_the_rest_run(model, tmp_path, image):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    os.mkfifo(folder / "b.png")
    shutil.copy(image, folder / "c.png")
    r = run("erde-run", "--model", model, "--folder", folder, timeout=10)
    assert r.returncode == 1 and "b.png" in r.stderr and "FIFO" in r.stderr
    assert "a.png" in r.stdout and "c.png" in r.stdout


# ---- images --------------------------------------------------------------------------------------


def test_a_non_utf8_file_name_does_not_stop_a_folder_run(model, tmp_path, image):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    shutil.copy(image, os.path.join(os.fsencode(folder), b"b\xff.png"))
    shutil.copy(image, folder / "c.png")
    env = dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8:strict", PYTHONUTF8="1")
    r = run("erde-run", "--model", model, "--folder", folder, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[4].startswith("summary: 3 images") and "c.png" in r.stdout  # header + 3 images


def test_an_all_nan_float_tiff_gives_no_warning(model, tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(path)
    r = run("erde-run", "--model", model, "--image", path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# ---- erde-train ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf"])
def test_a_non_finite_learning_rate_is_refused_before_training(lr, tmp_path, capsys):
    from erde.training.cli import main  # in this process: torch is imported already

    assert main(["teacher", "--data", str(tmp_path), "--out", str(tmp_path / "t.pt"), "--lr", lr]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1 and "--lr" in err, err
    assert not (tmp_path / "t.pt").exists()


# ---- memory ---------------------------------------------------------------------------------------


def _peak_rss_mb(args) -> float:
    code = ("import resource, sys; from erde.runtime.tools.run_cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return float(r.stderr.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_stays_flat_on_a_10000_image_folder_and_a_huge_batch(model, tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    img = Image.fromarray(random_image(8, 8))
    for i in range(10_000):
        img.save(big / f"{i:05d}.png")
    for i in range(500):
        img.save(small / f"{i:05d}.png")
    for batch in ("1", "64"):
        base = _peak_rss_mb(["--model", model, "--folder", small, "--batch-size", batch, "--json"])
        peak = _peak_rss_mb(["--model", model, "--folder", big, "--batch-size", batch, "--json"])
        assert peak < base + 40, (batch, base, peak)
    huge = _peak_rss_mb(["--model", model, "--folder", big, "--batch-size", "10000", "--json"])
    assert huge < base + 150, (base, huge)


def test_kill_9_during_export_leaves_a_temp_folder_that_the_next_export_removes(tiny_student, tmp_path):
    import signal
    import time

    out = tmp_path / "m"
    cmd = console_command("erde-export", SCRIPTS["erde-export"]) + [str(tiny_student), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    temps = []
    while time.time() < deadline and not temps and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".m.erde-tmp-")]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not temps:
        pytest.fail("erde-export finished before it could be killed; no temporary folder was seen")
    assert not out.exists() and any(p.exists() for p in temps)
    r = run("erde-export", tiny_student, "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.is_dir() and [p.name for p in tmp_path.iterdir()] == ["m"]
