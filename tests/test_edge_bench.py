from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from erde.benchmarks import edge_bench
from erde.benchmarks.edge_bench import main
from erde.runtime.core.manifest import Calibration
from runtime_fixtures import make_model_folder, random_image

HEAD_SCALES = (0.5, 1.0, 3.0)  # early exits less sure than the last, so thresholds matter
FAST = ["--repeats", "5", "--warmup", "1", "--threads", "1", "--batch-size", "3"]



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cal = Calibration("max-prob", 0.7, "accuracy-drop", 0.5, 0.8, 20000.0, "calibration.csv")
    return make_model_folder(tmp_path_factory.mktemp("m"), head_scales=HEAD_SCALES, calibration=cal)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    (folder / "sub").mkdir()
    for i in range(6):
        Image.fromarray(random_image(12, 10, seed=i)).save(folder / ("sub" if i % 2 else ".") / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_outputs(capsys, model, images, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, "--model", model, "--images", images, "--out", out_dir, "--cold-starts", "1",
                       "--thresholds", "0.5,0.9", *FAST)
    assert rc == 0, err
    assert err == ""
    rows = read_csv(out_dir / "results.csv")
    one = [r for r in rows if r["batch"] == "1"]
    three = [r for r in rows if r["batch"] == "3"]
    assert {r["method"] for r in one} == {"engine", "engine-all-segments", "full-onnx"}
    assert {r["method"] for r in three} == {"engine", "full-onnx"}
    engine_rows = {float(r["threshold"]): r for r in one if r["method"] == "engine"}
    assert sorted(engine_rows) == [0.5, 0.7, 0.9] and engine_rows[0.7]["threshold_source"] == "calibrated"
    for r in rows:
        assert int(r["calls"]) >= 3 and float(r["p50_ms"]) > 0 and float(r["throughput_ips"]) > 0
        assert float(r["p50_ms"]) <= float(r["p95_ms"]) <= float(r["p99_ms"])
        if r["method"] == "engine":
            shares = [float(r[f"exit_{k}_share"]) for k in (1, 2, 3)]
            assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert any(float(r["macs_fraction"]) < 1 for r in engine_rows.values())  # some images leave early
    summary = (out_dir / "summary.md").read_text()
    for text in ("At threshold 0.7 (calibrated)", "tracking ratio", "overhead of the engine through all segments",
                 "cold start (process start to first result of erde-run, median of 1)", "onnxruntime |",
                 "PyTorch eager loop: no --checkpoint given", "erde-bench --model " + str(model)):
        assert text in summary, text
    assert "tracking ratio" in out and "cold start:" in out and "skipped: PyTorch eager loop" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot.png: matplotlib cannot be imported" in summary
    else:
        assert (out_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_without_full_graph(capsys, tmp_path, images):
    model = make_model_folder(tmp_path, with_full=False, head_scales=HEAD_SCALES)
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, "--model", model, "--images", images, "--out", out_dir, "--cold-starts", "0", "--no-plot", *FAST)
    assert rc == 0, err
    assert "skipped: full.onnx: the model folder has none" in out
    rows = read_csv(out_dir / "results.csv")
    assert {r["method"] for r in rows} == {"engine", "engine-all-segments"}
    # no calibration: the default list plus the manifest's default threshold, which is the reference
    assert {float(r["threshold"]) for r in rows if r["method"] == "engine"} == {0.5, 0.8, 0.9, 0.95, 0.99}
    summary = (out_dir / "summary.md").read_text()
    assert "At threshold 0.9 (manifest default)" in summary and "**n/a**" in summary
    assert "full.onnx: the model folder has none" in summary


def test_checkpoint_that_cannot_be_used_is_skipped(capsys, model, images, tmp_path):
    pytest.importorskip("torch")
    rc, out, err = run(capsys, "--model", model, "--images", images, "--out", tmp_path / "o", "--cold-starts", "0",
                       "--no-plot", "--checkpoint", tmp_path / "missing.pt", "--batch-size", "1", *FAST[:4])
    assert rc == 0, err
    assert "skipped: PyTorch eager loop:" in out and "missing.pt: no such checkpoint file" in out
    assert "skipped: batch-N throughput: --batch-size is 1" in out


def _bad_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "a.txt").write_text("x")
    return empty


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "'--threads': 0 is not in the range x>=1"),
    (["--provider", "NoSuchProvider"], "provider 'NoSuchProvider' is not available here"),
    (["--repeats", "0"], "'--repeats': 0 is not in the range x>=1"),
    (["--warmup", "-1"], "'--warmup': -1 is not in the range x>=0"),
    (["--thresholds", "0.5,1.5"], "threshold 1.5 is not a number in [0, 1]"),
    (["--thresholds", "a"], "expected comma-separated numbers"),
    (["--criterion", "median"], "'median' is not one of"),
    (["--images", "EMPTY"], "no image files"),
    (["--images", "MISSING"], "MISSING: no such folder"),
    (["MODEL", "NOMODEL"], "no such folder"),
])
def test_bad_input_one_error_line(capsys, model, images, tmp_path, args, message):
    subst = {"EMPTY": str(_bad_folder(tmp_path)), "MISSING": "MISSING", "NOMODEL": str(tmp_path / "nomodel")}
    args = [subst.get(a, a) for a in args]
    model_arg = str(model)
    if args[0] == "MODEL":
        model_arg, args = args[1], args[2:]
    if "--images" not in args:
        args += ["--images", str(images)]
    rc, out, err = run(capsys, "--model", model_arg, "--out", tmp_path / "o", *args)
    assert rc == 2 and out == "", (out, err)
    assert err.startswith("Error: ") and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "results.csv").exists()


def test_unreadable_images_are_skipped_or_fatal(capsys, model, images, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    rc, out, err = run(capsys, "--model", model, "--images", bad, "--out", tmp_path / "o", *FAST)
    assert rc == 2 and err.startswith("Error: none of the 1 image files could be read") and err.count("\n") == 1
    Image.fromarray(random_image(8, 8)).save(bad / "good.png")
    rc, out, err = run(capsys, "--model", model, "--images", bad, "--out", tmp_path / "o", "--cold-starts", "0", "--no-plot", *FAST)
    assert rc == 0, err
    assert "skipped: 1 unreadable image file(s)" in out


def test_model_dir_defaults_to_the_bundled_model(capsys, monkeypatch, model, images, tmp_path):
    from erde.runtime.tools import run_cli as cli
    monkeypatch.setattr(cli, "BUNDLED_MODEL", model)
    rc, out, err = run(capsys, "--images", images, "--out", tmp_path / "out", "--cold-starts", "0", "--no-plot", *FAST)
    assert rc == 0, err
    assert f"({model})" in out.splitlines()[0]
    monkeypatch.setattr(cli, "BUNDLED_MODEL", tmp_path / "none")
    rc, out, err = run(capsys, "--images", images, "--out", tmp_path / "out2", *FAST)
    assert rc == 2 and err.startswith("Error: no model folder given") and len(err.splitlines()) == 1


def test_default_out_folder_is_under_the_cache_and_names_no_host(tmp_path, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)
    out = edge_bench.default_out("m", 1)
    assert out.is_absolute() and out.parent.name == "bench" and out.name.startswith("edge-m-") and out.name.endswith("-1t")
    assert socket.gethostname() not in str(out)


def test_out_never_writes_into_a_users_folder(capsys, model, images, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my own results")
    for force in ((), ("--force",)):
        rc, out, err = run(capsys, "--model", model, "--images", images, "--out", mine, "--cold-starts", "0", *FAST, *force)
        assert rc == 2 and ("--force" in err if not force else "not written by erde" in err), err
        assert len(err.splitlines()) == 1 and (mine / "results.csv").read_text() == "my own results"


def test_accuracy_from_class_folders(capsys, model, tmp_path):
    imgs = tmp_path / "labelled"
    for i in range(8):
        (imgs / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(12, 10, seed=i)).save(imgs / f"class{i % 4}" / f"{i}.png")
    rc, out, err = run(capsys, "--model", model, "--images", imgs, "--out", tmp_path / "o", "--cold-starts", "0", *FAST)
    assert rc == 0, err
    rows = read_csv(tmp_path / "o" / "results.csv")
    accs = {r["method"]: float(r["accuracy"]) for r in rows if r["batch"] == "1"}
    assert set(accs) == {"engine", "engine-all-segments", "full-onnx"} and all(0 <= a <= 1 for a in accs.values())
    assert "points lost by leaving early" in (tmp_path / "o" / "summary.md").read_text()


def test_runs_without_torch_and_matplotlib(tmp_path, model, images):
    blocked = tmp_path / "blocked"
    for name in ("torch", "matplotlib", "onnx"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    script = Path(sys.executable).parent / "erde-bench"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "erde.benchmarks.edge_bench"]
    out_dir = tmp_path / "out"
    proc = subprocess.run(cmd + ["--model", str(model), "--images", str(images), "--out", str(out_dir), "--cold-starts", "0",
                                 "--checkpoint", str(tmp_path / "student.pt")] + FAST,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: PyTorch eager loop: torch (or erde.training) cannot be imported (torch is blocked" in proc.stdout
    assert "skipped: plot.png: matplotlib cannot be imported (matplotlib is blocked" in proc.stdout
    assert (out_dir / "results.csv").exists() and not (out_dir / "plot.png").exists()


@pytest.mark.slow
def test_pytorch_eager_loop(capsys, tmp_path, images):
    torch = pytest.importorskip("torch")
    from erde.export.exporter import export_checkpoint
    from erde.training.checkpoint import make_checkpoint, save_checkpoint
    from erde.training.models import build_model, model_config

    torch.manual_seed(0)
    net = build_model(model_config("tiny_ee", 3)).eval()
    ckpt = make_checkpoint(net, kind="student", class_names=["a", "b", "c"],
                           preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
                           train_args={"arch": "tiny_ee"}, metrics={}, progress={"epoch": 1, "epochs": 1})
    save_checkpoint(ckpt, tmp_path / "s.pt")
    export_checkpoint(tmp_path / "s.pt", tmp_path / "s_onnx", parity_batch=4)
    rc, out, err = run(capsys, "--model", tmp_path / "s_onnx", "--images", images, "--out", tmp_path / "o", "--cold-starts", "0",
                       "--no-plot", "--checkpoint", tmp_path / "s.pt", "--thresholds", "0.4,0.6", *FAST)
    assert rc == 0, err
    rows = read_csv(tmp_path / "o" / "results.csv")
    eager = {float(r["threshold"]): r for r in rows if r["method"] == "torch-eager"}
    engine = {float(r["threshold"]): r for r in rows if r["method"] == "engine" and r["batch"] == "1"}
    assert set(eager) == set(engine) == {0.4, 0.6}
    for t in eager:  # the same images leave at the same exits
        assert [eager[t][f"exit_{k}_share"] for k in range(1, 5)] == [engine[t][f"exit_{k}_share"] for k in range(1, 5)]
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "| torch |" in summary and "PyTorch eager vs ONNX, max probability difference" in summary
    assert "over the PyTorch eager loop at the same threshold: n/a" not in summary


def test_module_level_imports_are_runtime_only():
    import ast

    path = Path(edge_bench.__file__)
    tree = ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.append(node.module.split(".")[0])
    assert not {"torch", "matplotlib", "onnx"} & set(top)


def test_compare_times_a_second_folder_in_the_same_rounds(capsys, model, tmp_path):
    import shutil

    imgs = tmp_path / "labelled"
    for i in range(8):
        (imgs / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(12, 10, seed=i)).save(imgs / f"class{i % 4}" / f"{i}.png")
    other = tmp_path / "copy"
    shutil.copytree(model, other)
    rc, out, err = run(capsys, "--model", model, "--images", imgs, "--out", tmp_path / "o", "--cold-starts", "0",
                       "--compare", other, *FAST)
    assert rc == 0, err
    rows = read_csv(tmp_path / "o" / "results.csv")
    methods = {r["method"] for r in rows if r["batch"] == "1"}
    assert {"compare-engine", "compare-full-onnx"} <= methods
    cmp = next(r for r in rows if r["method"] == "compare-engine")
    assert cmp["threshold_source"] == "calibrated" and float(cmp["accuracy"]) >= 0
    assert "compared model" in (tmp_path / "o" / "summary.md").read_text()
    bad = make_model_folder(tmp_path / "bad", class_names=["a", "b", "c", "d"])
    rc, out, err = run(capsys, "--model", model, "--images", imgs, "--out", tmp_path / "o2", "--cold-starts", "0",
                       "--compare", bad, *FAST)
    assert rc == 2 and "classes or preprocessing differ" in err
