from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from erde.runtime.tools import run_cli as cli
from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import Calibration
from runtime_fixtures import console_command, torch_blocked_env, make_model_folder, random_image

RUNTIME = Path(cli.__file__).resolve().parent
JSON_KEYS = {"image", "class_index", "class_name", "confidence", "exit_index", "num_exits", "macs", "macs_fraction",
             "latency_ms", "segment_latency_ms", "criterion", "threshold", "unsure", "batch_size"}


def _rows(out: str) -> list:
    """The per-image JSON lines of a run, without its closing summary line."""
    rows = [json.loads(line) for line in out.splitlines()]
    assert "summary" in rows[-1]
    return rows[:-1]
LINE = re.compile(r"^(?P<name>.+): class\d \((?P<conf>[01]\.\d\d)\) exit (?P<exit>[123])/3, \d+% of full MACs "
                  r"\(\d+% saved\), \d+\.\d\d ms$")



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(6):
        Image.fromarray(random_image(12, 10, seed=i)).save(folder / f"img{i}.png")
    return folder


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_human_output(capsys, model, images):
    rc, out, err = run(capsys, "--model", model, "--folder", images, "--threads", 1)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"model model ({model}), 3 exits; criterion max-prob, threshold 0.9 (manifest default)"
    assert lines[7].startswith("summary: 6 images")
    for i, line in enumerate(lines[1:7]):
        m = LINE.match(line)
        assert m, line
        assert m["name"] == str(images / f"img{i}.png")


def test_json_output_matches_engine(capsys, model, images):
    rc, out, err = run(capsys, "--model", model, "--folder", images, "--json", "--threshold", 0.8,
                       "--criterion", "max-prob", "--threads", 1)
    assert rc == 0 and err == ""
    rows = _rows(out)
    assert len(rows) == 6 and all(set(r) == JSON_KEYS for r in rows)
    paths = sorted(images.iterdir())
    preds = Engine.load(model, threads=1).predict(paths, 0.8, "max-prob")
    for r, p, path in zip(rows, preds, paths):
        assert r["image"] == str(path)
        assert (r["class_index"], r["exit_index"], r["confidence"], r["macs"]) == (p.class_index, p.exit_index, p.confidence, p.macs)
        assert r["criterion"] == "max-prob" and r["threshold"] == 0.8 and r["num_exits"] == 3
        assert len(r["segment_latency_ms"]) == r["exit_index"] + 1
    assert len({r["exit_index"] for r in rows}) > 1  # the images do not all leave at one exit


def test_a_threshold_per_early_exit_on_the_command_line(capsys, tmp_path, model, images):
    rc, out, err = run(capsys, "--model", model, "--folder", images, "--json", "--threshold", "0.9/0.4",
                       "--criterion", "max-prob", "--threads", 1)
    assert rc == 0, err
    preds = Engine.load(model, threads=1).predict(sorted(images.iterdir()), (0.9, 0.4), "max-prob")
    rows = _rows(out)
    assert [(r["exit_index"], r["class_index"]) for r in rows] == [(p.exit_index, p.class_index) for p in preds]
    assert all(r["threshold"] == [0.9, 0.4] for r in rows)
    cal = Calibration("max-prob", (0.95, 0.5), "accuracy-drop", 0.5, 0.9, 1000.0)
    calibrated = make_model_folder(tmp_path / "c", calibration=cal)
    rc, out, _ = run(capsys, "--model", calibrated, "--image", images / "img0.png", "--threads", 1)
    assert rc == 0 and "criterion max-prob, threshold 0.95/0.5 (calibrated)" in out.splitlines()[0]
    rc, _, err = run(capsys, "--model", model, "--image", images / "img0.png", "--threshold", "0.9/0.5/0.2")
    assert rc == 2 and "3 thresholds 0.9/0.5/0.2 for a model with 3 exits" in err


def test_batches_give_the_same_answers(capsys, model, images):
    def answers(bs):
        rc, out, _ = run(capsys, "--model", model, "--folder", images, "--json", "--batch-size", bs, "--threads", 1)
        assert rc == 0
        return [{k: v for k, v in r.items() if "latency" not in k and k != "batch_size"} for r in _rows(out)]
    assert answers(1) == answers(4) == answers(6)


def test_calibrated_source_and_criterion_in_header(capsys, tmp_path, images):
    cal = Calibration("entropy", 0.25, "accuracy-drop", 0.01, 0.9, 1000.0)
    model = make_model_folder(tmp_path, calibration=cal)
    rc, out, _ = run(capsys, "--model", model, "--image", images / "img0.png", "--threads", 1)
    assert rc == 0 and "criterion entropy, threshold 0.25 (calibrated)" in out.splitlines()[0]
    rc, out, _ = run(capsys, "--model", model, "--image", images / "img0.png", "--threshold", 0.5, "--threads", 1)
    assert "criterion entropy, threshold 0.5 (given)" in out.splitlines()[0]


def test_bad_image_in_folder_reported_others_run(capsys, model, images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "img2.png").write_bytes(b"")
    (folder / "img4.png").write_text("not an image")
    rc, out, err = run(capsys, "--model", model, "--folder", folder, "--batch-size", 4, "--threads", 1)
    assert rc == 1
    assert len(out.splitlines()) == 1 + 4 + 4 and "summary: 4 images, 2 failed" in out  # header, lines, summary
    assert err.splitlines() == [f"Error: {folder / 'img2.png'}: empty file (0 bytes); re-copy or re-save the image",
                                f"Error: {folder / 'img4.png'}: not an image, or a format Pillow cannot read"]
    rc, out, err = run(capsys, "--model", model, "--folder", folder, "--json", "--threads", 1)
    rows = _rows(out)
    assert rc == 1 and err == "" and len(rows) == 6
    assert [r["image"] for r in rows] == [str(p) for p in sorted(folder.iterdir())]
    assert "empty file" in rows[2]["error"] and "not an image" in rows[4]["error"] and set(rows[2]) == {"image", "error"}
    assert all("class_index" in rows[i] for i in (0, 1, 3, 5))


def test_missing_image_among_others(capsys, model, images, tmp_path):
    rc, out, err = run(capsys, "--model", model, "--image", tmp_path / "gone.png", "--image", images / "img1.png",
                       "--threads", 1)
    assert rc == 1 and err.strip() == f"Error: {tmp_path / 'gone.png'}: no such file"
    assert LINE.match(out.splitlines()[1])


def _bad_model(tmp_path):
    folder = tmp_path / "bad_model"
    folder.mkdir()
    (folder / "manifest.json").write_text("{")
    return folder


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "threshold 1.5 is not a number in [0, 1]"),
    (["--threshold", "nan"], "threshold nan is not a number in [0, 1]"),
    (["--threshold", "-0.2"], "is not a number in [0, 1]"),
    (["--threshold", "high"], "'--threshold': expected a number, or one per early exit as T1/T2/..., got 'high'"),
    (["--criterion", "top-3"], "'--criterion': 'top-3' is not one of 'max-prob', 'entropy', 'margin'"),
    (["--threads", "0"], "'--threads': 0 is not in the range x>=1"),
    (["--batch-size", "-3"], "'--batch-size': -3 is not in the range x>=1"),
    (["--criterion", "entropy"], "has no threshold for criterion 'entropy'"),
    (["--frobnicate"], "No such option '--frobnicate'"),
    (["--model", "{tmp}/nope"], "nope: no such folder"),
    (["--model", "{bad}"], "manifest.json: not valid JSON (line 1"),
    (["--folder", "{tmp}"], "no image files"),
    ([], "pass one kind of input: --image FILE"),
])
def test_bad_options_one_error_line(capsys, model, images, tmp_path, args, message):
    bad = _bad_model(tmp_path)
    args = [a.format(tmp=tmp_path, bad=bad) for a in args]
    base = [] if "--model" in args else ["--model", str(model)]
    has_input = any(a in args for a in ("--folder", "--image")) or not args
    inputs = [] if has_input else ["--image", str(images / "img0.png")]
    rc, out, err = run(capsys, *(base + inputs + args))
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and message in err, err
    assert "Traceback" not in err and out == ""


def test_no_model_and_no_bundled_model(capsys, monkeypatch, tmp_path, images):
    monkeypatch.setattr(cli, "BUNDLED_MODEL", tmp_path / "models" / "cifar10")
    rc, _, err = run(capsys, "--image", images / "img0.png")
    assert rc == 2 and err == ("Error: no model folder given and no bundled model is installed; pass a folder "
                               "written by erde-export as --model DIR\n")
    monkeypatch.setattr(cli, "BUNDLED_MODEL", make_model_folder(tmp_path / "models", name="cifar10"))
    rc, out, _ = run(capsys, "--image", images / "img0.png", "--threads", 1)
    assert rc == 0 and "cifar10" in out.splitlines()[0]


def test_debug_shows_traceback(capsys, tmp_path, images):
    rc, _, err = run(capsys, "--model", _bad_model(tmp_path), "--image", images / "img0.png", "--debug")
    assert rc == 2 and "Traceback" in err and err.splitlines()[-1].startswith("Error: ")


def test_unexpected_error_is_one_line(capsys, monkeypatch, model, images):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(Engine, "load", boom)
    rc, _, err = run(capsys, "--model", model, "--image", images / "img0.png")
    assert rc == 1 and err == "Error: unexpected RuntimeError: disk on fire (run with --debug for the traceback)\n"


# --- torch-free ------------------------------------------------------------------------------------------


def test_erde_run_works_when_torch_cannot_be_imported(tmp_path, model, images):
    env = torch_blocked_env(tmp_path)
    cmd = console_command("erde-run", "erde.runtime.tools.run_cli")
    proc = subprocess.run(cmd + ["--model", str(model), "--folder", str(images), "--json", "--batch-size", "3"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert len(rows) == 6 and all(set(r) == JSON_KEYS for r in rows)
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert "torch is blocked" in check.stderr  # the block works


def test_static_runs_full_onnx(capsys, model, images):
    rc, out, err = run(capsys, "--model", model, "--folder", images, "--static", "--json", "--threads", 1)
    assert rc == 0 and err == ""
    rows = _rows(out)
    eng = Engine.load(model, threads=1)
    files = sorted(images.iterdir())
    from erde.runtime.core.preprocess import preprocess_one
    import numpy as np
    probs = eng.run_full(np.stack([preprocess_one(f, eng.manifest.preprocessing) for f in files]))
    assert [r["class_index"] for r in rows] == probs.argmax(axis=1).tolist()
    assert all(r["exit_index"] == 2 and r["macs_fraction"] == 1.0 and r["macs"] == eng.manifest.full_macs
               and r["criterion"] is None and r["threshold"] is None for r in rows)
    rc, out, err = run(capsys, "--model", model, "--image", files[0], "--static", "--threads", 1)
    assert rc == 0 and out.splitlines()[0].endswith("3 exits; static full.onnx, no early exit")
    assert LINE.match(out.splitlines()[1]) and "exit 3/3, 100% of full MACs (0% saved)" in out


def test_static_refuses_a_threshold_and_a_folder_without_full_onnx(capsys, model, images, tmp_path):
    rc, out, err = run(capsys, "--model", model, "--folder", images, "--static", "--threshold", 0.5)
    assert rc == 2 and out == "" and err.startswith("Error: --static runs full.onnx") and err.count("\n") == 1
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    d = json.loads((bare / "manifest.json").read_text())
    (bare / d["full"]["file"]).unlink()
    d["full"] = None
    (bare / "manifest.json").write_text(json.dumps(d))
    rc, out, err = run(capsys, "--model", bare, "--folder", images, "--static")
    assert rc == 2 and out == "" and "has no full.onnx" in err and err.count("\n") == 1


def test_only_missing_images_is_one_line_before_the_model_loads(capsys, model, tmp_path):
    rc, out, err = run(capsys, "--model", model, tmp_path / "nosuch.png", tmp_path / "other.png")
    assert rc == 2 and out == "" and err == (f"Error: {tmp_path / 'nosuch.png'}: no such file (nor is the 1 other "
                                             "image given); pass an image file or a folder of images\n")
