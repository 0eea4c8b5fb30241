from __future__ import annotations

import csv
import json
import subprocess

import numpy as np

from erde.runtime.core.criteria import show
import pytest
from PIL import Image

from erde.runtime.tools import calibrate as cal_mod
from erde.runtime.tools import run_cli
from erde.runtime.tools.calibrate import ThresholdRow, choose, threshold_grid
from erde.runtime.common.errors import ErdeError
from erde.runtime.tools.calibrate_cli import main
from erde.runtime.common.datasets import DataError, image_folder_split, list_image_folder, split_indices
from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import load_manifest
from erde.runtime.core.preprocess import preprocess
from runtime_fixtures import console_command, torch_blocked_env, make_model_folder, random_image


HEAD_SCALES = (0.5, 1.0, 3.0)  # early exits less sure than the last, so thresholds matter



def _engine(folder):
    return Engine.load(folder, threads=1)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("m"), head_scales=HEAD_SCALES)


@pytest.fixture(scope="module")
def data(tmp_path_factory, base_model):
    """PATH/train/class<k>/*.png: 64 random images, 3 of 4 filed under the final exit's answer, so that
    the final exit is right about 75% of the time and early exits sometimes disagree with it."""
    root = tmp_path_factory.mktemp("data")
    eng = _engine(base_model)
    images = [random_image(8, 8, seed=100 + i) for i in range(64)]
    final = eng.exit_probs(preprocess(images, eng.manifest.preprocessing))[-1].argmax(axis=1).tolist()
    rng = np.random.default_rng(0)
    for k in range(4):
        (root / "train" / f"class{k}").mkdir(parents=True)
    for i, (img, c) in enumerate(zip(images, final)):
        label = c if i % 4 else int((c + 1 + rng.integers(0, 3)) % 4)
        Image.fromarray(img).save(root / "train" / f"class{label}" / f"{i:03d}.png")
    return root


@pytest.fixture
def model(tmp_path, base_model):
    return make_model_folder(tmp_path, head_scales=HEAD_SCALES)  # same seed as base_model: same graphs, a fresh manifest per test


def val_set(data, fraction=0.5):
    folder = image_folder_split(data)
    _, val = split_indices(folder.labels, fraction)
    return [folder.files[i] for i in val], folder.labels[val]


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def read_table(folder):
    with open(folder / "calibration.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def check_choice_matches_engine(folder, data, fraction=0.5):
    m = load_manifest(folder)
    c = m.calibration
    files, labels = val_set(data, fraction)
    eng = _engine(folder)
    preds = eng.predict(files, batch_size=8)  # no threshold: the calibrated one
    assert eng.resolve_threshold() == (c.criterion, c.threshold, "calibrated")
    assert np.mean([p.class_index == y for p, y in zip(preds, labels)]) == pytest.approx(c.val_accuracy)
    assert np.mean([p.macs for p in preds]) == pytest.approx(c.val_mean_macs)
    return m, eng


# --- the split ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_matches_training(fraction):
    torch = pytest.importorskip("torch")  # noqa: F841  (erde.training needs it)
    from erde.training.data import Dataset, train_val_split

    rng = np.random.default_rng(3)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([13, 7, 30, 1, 22])]).astype(np.int64)
    labels = labels[rng.permutation(len(labels))]
    ds = Dataset(np.arange(len(labels)), labels, tuple("abcde"), "image-folder")
    tr, va = train_val_split(ds, fraction)
    train_idx, val_idx = split_indices(labels, fraction)
    assert np.array_equal(tr.images, train_idx) and np.array_equal(va.images, val_idx)


def test_listing_matches_training(data):
    pytest.importorskip("torch")
    from erde.training.data import load_image_folder

    ds = load_image_folder(data / "train", (8, 8), cache=False)
    folder = list_image_folder(data / "train")
    assert folder.class_names == ds.class_names and np.array_equal(folder.labels, ds.labels)
    assert len(folder) == 64


def test_split_errors(tmp_path):
    with pytest.raises(DataError, match="must be in"):
        split_indices(np.zeros(10), 1.0)
    with pytest.raises(DataError, match="too few"):
        split_indices(np.array([0, 1]), 0.1)
    with pytest.raises(DataError, match="not an image folder"):
        image_folder_split(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        image_folder_split(tmp_path)


# --- the choice -----------------------------------------------------------------------------------------


def _row(t, acc, macs, crit="max-prob", stderr=0.0):
    return ThresholdRow(crit, t, acc, macs, macs / 100.0, (1.0,), stderr)


def test_choose_rules():
    rows = [_row(0.5, 0.80, 40), _row(0.6, 0.84, 50), _row(0.7, 0.845, 50), _row(0.8, 0.85, 70), _row(0.9, 0.86, 90)]
    c = choose(rows, "accuracy-drop", 2.0, 0.86, 100)  # >= 0.84: fewest MACs is 50, the more accurate of the two
    assert c.met and c.row.threshold == 0.7
    c = choose(rows, "mac-budget", 0.6, 0.86, 100)
    assert c.met and c.row.threshold == 0.7
    c = choose(rows, "accuracy-drop", 0.0, 0.90, 100)
    assert not c.met and c.closest.threshold == 0.9
    c = choose(rows, "mac-budget", 0.3, 0.86, 100)
    assert not c.met and c.closest.threshold == 0.5
    same = [_row(0.5, 0.8, 40), _row(0.6, 0.8, 40)]  # ties: the safer side of the target
    assert choose(same, "accuracy-drop", 10, 0.8, 100).row.threshold == 0.6
    assert choose(same, "mac-budget", 0.5, 0.8, 100).row.threshold == 0.5
    # the bound: 0.845 loses 1.5 points, but 1.5 + 1.2816 x 1.0 > 2 points at 90%; 0.85 (1 + 0.64) passes
    noisy = [_row(0.7, 0.845, 50, stderr=0.01), _row(0.8, 0.85, 70, stderr=0.005), _row(0.9, 0.86, 90)]
    assert choose(noisy, "accuracy-drop", 2.0, 0.86, 100).row.threshold == 0.8
    assert choose(noisy, "accuracy-drop", 2.0, 0.86, 100, confidence=0.5).row.threshold == 0.7
    assert choose(noisy, "accuracy-drop", 2.0, 0.86, 100, confidence=0.999).row.threshold == 0.9
    assert choose(noisy, "mac-budget", 0.5, 0.86, 100).row.threshold == 0.7  # budgets ignore the bound
    with pytest.raises(ErdeError, match="--confidence 1.0 is out of range"):
        choose(noisy, "accuracy-drop", 2.0, 0.86, 100, confidence=1.0)
    assert len(threshold_grid("max-prob")) == 700 and threshold_grid("max-prob")[-1] == 0.999
    assert threshold_grid("entropy")[0] == 0.001 and threshold_grid("entropy")[-1] == 0.9


# --- the command ----------------------------------------------------------------------------------------


def test_accuracy_drop_mode(capsys, model, data):
    rc, out, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5, "--threads", 1, "--max-drop", 0,
                       "--confidence", 0.5, "--same-threshold")
    assert rc == 0, err
    assert err == "" and "chosen:" in out and "calibration.csv" in out and "upper confidence bound" not in out
    m, _ = check_choice_matches_engine(model, data)
    c = m.calibration
    assert (c.mode, c.target, c.table_file, c.confidence) == ("accuracy-drop", 0.0, "calibration.csv", 0.5)
    rows = read_table(model)
    assert len(rows) == 700 + 900 + 999 and {r["criterion"] for r in rows} == {"max-prob", "entropy", "margin"}
    final = m.metrics["calibration_val_accuracy_final_exit"]
    assert c.val_accuracy >= final - 1e-9
    ok = [r for r in rows if float(r["val_accuracy"]) >= final - 1e-9]
    assert c.val_mean_macs <= min(float(r["mean_macs"]) for r in ok) + 0.1
    assert c.val_mean_macs < m.segments[-1].cumulative_macs  # some images leave early
    chosen = [r for r in rows if r["chosen"] == "1"]
    assert len(chosen) == 1 and chosen[0]["criterion"] == c.criterion and float(chosen[0]["threshold"]) == c.threshold
    assert m.metrics["calibration_val_images"] == 32 and m.metrics["test_accuracy"] == 0.5  # other metrics kept


def test_confidence_bound_is_the_default(capsys, model, data):
    rc, out, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5, "--threads", 1, "--max-drop", 3)
    assert rc == 0, err
    assert "the drop's 0.9 upper confidence bound" in out
    m = load_manifest(model)
    c = m.calibration
    assert (c.mode, c.target, c.confidence) == ("accuracy-drop", 3.0, 0.9)
    final = m.metrics["calibration_val_accuracy_final_exit"]
    rows = cal_mod.read_table(model, m.num_exits)
    assert all(r.drop_stderr >= 0 for r in rows) and any(r.drop_stderr > 0 for r in rows)
    bound = [r for r in rows if final - r.accuracy + 1.2816 * r.drop_stderr <= 0.03 + 1e-6]
    point = [r for r in rows if final - r.accuracy <= 0.03 + 1e-9]
    chosen = cal_mod.row_at(rows, c.criterion, c.threshold)
    assert chosen in bound and chosen.mean_macs == pytest.approx(min(r.mean_macs for r in bound), abs=0.1)
    assert min(r.mean_macs for r in point) <= chosen.mean_macs  # the bound never buys a cheaper threshold


def test_each_early_exit_gets_its_own_threshold_where_that_costs_less(capsys, model, data):
    """The per-exit refinement starts from the best single threshold and never ends worse by the same measure;
    the table holds the rule it chose, and the engine reproduces that rule's accuracy and MACs."""
    args = ["--model", model, "--data", data, "--val-fraction", 0.5, "--threads", 1, "--max-drop", 5, "--confidence", 0.5,
            "--criterion", "max-prob"]
    assert run(capsys, *args, "--same-threshold")[0] == 0
    same = load_manifest(model).calibration
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    m, _ = check_choice_matches_engine(model, data)
    c = m.calibration
    assert c.val_mean_macs <= same.val_mean_macs and c.val_accuracy >= m.metrics["calibration_val_accuracy_final_exit"] - 0.05
    assert isinstance(same.threshold, float)
    if isinstance(c.threshold, tuple):  # the fixture's exits are weak: a pair may or may not pay; the format holds
        assert len(c.threshold) == m.num_exits - 1 and f"chosen: max-prob {show(c.threshold)}:" in out
    chosen = [r for r in read_table(model) if r["chosen"] == "1"]
    assert len(chosen) == 1 and chosen[0]["threshold"] == "/".join(f"{t:.6g}" for t in np.atleast_1d(c.threshold))
    rows = cal_mod.read_table(model, m.num_exits)
    assert cal_mod.row_at(rows, c.criterion, c.threshold).threshold == c.threshold


def test_table_rows_match_engine(model, data):
    res = cal_mod.calibrate(model, data, "all", "accuracy-drop", 100.0, 0.5, threads=1, write=False)
    files, labels = val_set(data)
    eng = _engine(model)
    picks = {("max-prob", 0.5), ("max-prob", 0.9), ("entropy", 0.2), ("entropy", 0.6)}
    for r in [r for r in res.rows if (r.criterion, r.threshold) in picks]:
        preds = eng.predict(files, r.threshold, r.criterion, batch_size=32)
        assert np.mean([p.class_index == y for p, y in zip(preds, labels)]) == pytest.approx(r.accuracy)
        assert np.mean([p.macs for p in preds]) == pytest.approx(r.mean_macs)
        shares = np.bincount([p.exit_index for p in preds], minlength=3) / len(preds)
        assert tuple(shares) == pytest.approx(r.exit_shares)
    assert load_manifest(model).calibration is None  # write=False
    assert not (model / "calibration.csv").exists()


def test_mac_budget_mode_json(capsys, model, data):
    full = load_manifest(model).full_macs
    rc, out, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5, "--mac-budget", 0.8,
                       "--criterion", "entropy", "--json")
    assert rc == 0, err
    d = json.loads(out)
    m, _ = check_choice_matches_engine(model, data)
    c = m.calibration
    assert (c.criterion, c.mode, c.target) == ("entropy", "mac-budget", 0.8)
    assert c.val_mean_macs <= 0.8 * full and d["calibration"]["threshold"] == (
        list(c.threshold) if isinstance(c.threshold, tuple) else c.threshold)
    rows = read_table(model)
    assert {r["criterion"] for r in rows} == {"entropy"}
    within = [r for r in rows if float(r["mean_macs"]) <= 0.8 * full]
    assert c.val_accuracy == pytest.approx(max(float(r["val_accuracy"]) for r in within), abs=1e-6)


def test_unmeetable_target_names_closest_and_writes_nothing(capsys, model, data):
    before = (model / "manifest.json").read_bytes()
    rc, out, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5, "--mac-budget", 0.01)
    assert rc == 1 and out == ""
    assert err.startswith("Error: no threshold meets the target (mean MACs at most 1% of the full model's); "
                          "closest: ") and err.count("\n") == 1 and "nothing was written" in err
    assert (model / "manifest.json").read_bytes() == before and not (model / "calibration.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "-1"], "--max-drop -1 is out of range"),
    (["--max-drop", "101"], "--max-drop 101 is out of range"),
    (["--mac-budget", "0"], "--mac-budget 0 is out of range"),
    (["--mac-budget", "1.6"], "--mac-budget 1.6 is out of range"),
    (["--mac-budget", "nan"], "expected a finite number"),
    (["--max-drop", "1", "--mac-budget", "0.5"], "--max-drop and --mac-budget exclude each other"),
    (["--val-fraction", "1"], "--val-fraction 1 must be in (0, 1)"),
    (["--confidence", "0.3"], "--confidence 0.3 is out of range"),
    (["--threads", "0"], "'--threads': 0 is not in the range x>=1"),
    (["--criterion", "median"], "'median' is not one of"),
])
def test_bad_options(capsys, model, data, args, message):
    rc, out, err = run(capsys, "--model", model, "--data", data, *args)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("Error: ") and message in err, err


def test_bad_data(capsys, model, tmp_path, monkeypatch):
    monkeypatch.delenv("ERDE_DATA", raising=False)  # --data falls back to it, as in every command
    empty = tmp_path / "empty"
    for k in range(4):
        (empty / "train" / f"class{k}").mkdir(parents=True)
    rc, _, err = run(capsys, "--model", model, "--data", empty)
    assert rc == 2 and err.startswith("Error: ") and "no images found" in err and err.count("\n") == 1
    rc, _, err = run(capsys, "--model", model, "--data", tmp_path / "nope")
    assert rc == 2 and "no such file or folder" in err
    rc, _, err = run(capsys, "--model", model)
    assert rc == 2 and "--data" in err and err.count("\n") == 1
    few = tmp_path / "few"
    for k in range(4):
        (few / "train" / f"class{k}").mkdir(parents=True)
        Image.fromarray(random_image(8, 8, seed=k)).save(few / "train" / f"class{k}" / "a.png")
    rc, _, err = run(capsys, "--model", model, "--data", few)  # 1 image per class: round(0.1) = 0 taken
    assert rc == 2 and "too few to carve a validation split" in err
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        (other / "train" / name).mkdir(parents=True)
        Image.fromarray(random_image(8, 8)).save(other / "train" / name / "a.png")
    rc, _, err = run(capsys, "--model", model, "--data", other)
    assert rc == 2 and "differ from the model's classes" in err


def test_bad_image_and_debug(capsys, model, data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    for p in (bad / "train").rglob("*.png"):
        p.write_bytes(b"not a png")
    rc, _, err = run(capsys, "--model", model, "--data", bad, "--val-fraction", 0.5)
    assert rc == 2 and err.startswith("Error: ") and err.count("\n") == 1 and "not an image" in err
    rc, _, err = run(capsys, "--model", model, "--data", bad, "--val-fraction", 0.5, "--debug")
    assert rc == 2 and "Traceback" in err


def test_calibrated_folder_end_to_end_with_erde_run(capsys, model, data):
    rc, _, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5, "--max-drop", 5)
    assert rc == 0, err
    m = load_manifest(model)
    c = m.calibration
    rc = run_cli.main(["--model", str(model), "--folder", str(data / "train" / "class0"), "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.splitlines()[0].endswith(f"criterion {c.criterion}, threshold {show(c.threshold)} (calibrated)")
    # the recalibrated manifest still loads, and a second calibration replaces the first
    rc, _, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5, "--mac-budget", 1.0)
    assert rc == 0, err
    assert load_manifest(model).calibration.mode == "mac-budget"
    assert not [p for p in model.iterdir() if p.name.endswith(".tmp")]


def test_console_script_without_torch(tmp_path, model, data):
    env = torch_blocked_env(tmp_path)
    cmd = console_command("erde-calibrate", "erde.runtime.tools.calibrate_cli")
    proc = subprocess.run(cmd + ["--model", str(model), "--data", str(data), "--val-fraction", "0.5", "--threads", "1",
                                 "--criterion", "max-prob", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["calibration"]["criterion"] == "max-prob"


def test_engine_exit_probs_and_all_segments(base_model):
    from runtime_fixtures import random_inputs

    eng = _engine(base_model)
    x = random_inputs(10)
    probs = eng.exit_probs(x)
    assert probs.shape == (3, 10, 4) and probs.dtype == np.float32
    np.testing.assert_array_equal(eng.exit_probs(x, batch_size=3), probs)
    np.testing.assert_allclose(probs[-1], eng.run_full(x), rtol=1e-5, atol=1e-6)
    for t in (0.5, 0.8):
        preds = eng.predict_array(x, t, "max-prob")
        taken = cal_mod.criteria.exit_indices(probs, "max-prob", t)
        assert [p.exit_index for p in preds] == taken.tolist()
    everyone = eng.predict_array(x, 0.0, "max-prob", early_exit=False)  # t = 0 would let all leave at exit 1
    assert {p.exit_index for p in everyone} == {2}
    assert [p.class_index for p in everyone] == probs[-1].argmax(axis=1).tolist()
    assert all(len(p.segment_latency_ms) == 3 for p in everyone)


def test_failed_manifest_write_leaves_the_old_manifest(capsys, model, data, monkeypatch):
    import erde.runtime.common.files as files_mod

    before = (model / "manifest.json").read_bytes()
    real_replace = files_mod.os.replace

    def boom(src, dst):  # the table is written; the manifest's temporary file fills the disk
        if str(dst).endswith("manifest.json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", boom)
    rc, out, err = run(capsys, "--model", model, "--data", data, "--val-fraction", 0.5)
    assert rc == 2 and err.count("\n") == 1
    assert err == f"Error: {model / 'manifest.json'}: cannot write (No space left on device); the manifest is " \
                  "unchanged, calibration.csv holds the new table\n"
    assert (model / "manifest.json").read_bytes() == before
    assert not [p for p in model.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert _engine(model).resolve_threshold()[2] == "manifest default"


def test_out_writes_a_calibrated_copy_and_leaves_the_source(capsys, model, data, tmp_path):
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = tmp_path / "calibrated"
    assert main(["--model", str(model), "--data", str(data), "--max-drop", "5", "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert load_manifest(out).calibration is not None and (out / "calibration.csv").exists()
    assert _engine(out).num_exits == 3
    capsys.readouterr()
    assert main(["--model", str(model), "--data", str(data), "--max-drop", "5", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--model", str(model), "--data", str(data), "--max-drop", "5", "--out", str(out), "--force"]) == 0


def test_the_installed_bundle_is_never_changed(capsys, tmp_path):
    """erde-calibrate on the bundled model refuses to write into the package and names --out."""
    bundled = run_cli.model_folder(None)
    before = {p.name: p.read_bytes() for p in bundled.iterdir()}
    data = tmp_path / "cifar"
    for i, name in enumerate(load_manifest(bundled).class_names):
        (data / "train" / name).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(random_image(32, 32, seed=10 * i + j)).save(data / "train" / name / f"{j}.png")
    assert main(["--model", str(bundled), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "installed erde package" in err and "--out" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in bundled.iterdir()} == before


def test_a_calibration_table_erde_did_not_write_is_not_replaced(capsys, model, data):
    (model / "calibration.csv").write_text("my notes, not a table\n")
    assert main(["--model", str(model), "--data", str(data), "--max-drop", "5"]) == 2
    assert "not written by erde" in capsys.readouterr().err
    assert (model / "calibration.csv").read_text() == "my notes, not a table\n"
