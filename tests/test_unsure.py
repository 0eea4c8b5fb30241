"""runtime/core/unsure.py: a confidence floor chosen on the validation split, and erde-run's "unsure"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from erde.runtime.tools.calibrate_cli import main as calibrate_main
from erde.runtime.tools.run_cli import main as run_main
from erde.runtime.common.errors import ErdeError
from erde.runtime.core.manifest import load_manifest
from erde.runtime.core.unsure import choose_floor, curve
from runtime_fixtures import make_train_folder, make_model_folder, random_image


def test_a_coverage_target_is_met_on_the_images_it_was_chosen_on():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 5000)
    correct = rng.uniform(0, 1, 5000) < conf  # surer answers are more often right
    for target in (0.5, 0.8, 0.9, 0.95):
        u = choose_floor(conf, correct, "coverage", target)
        assert target <= u.val_coverage <= target + 0.001
        assert u.val_accuracy_answered > correct.mean()  # what is answered is more often right
    u = choose_floor(conf, correct, "accuracy", 0.8)
    assert u.val_accuracy_answered >= 0.8 and curve(conf, correct, [u.floor - 0.01])[0][2] < 0.8 + 0.01
    with pytest.raises(ErdeError):
        choose_floor(conf, correct, "coverage", 1.5)


@pytest.fixture
def data(tmp_path):
    return make_train_folder(tmp_path / "data", 80, 8)


def test_calibrate_chooses_the_floor_on_validation_and_erde_run_says_unsure(tmp_path, data, capsys):
    model = make_model_folder(tmp_path, head_scales=(0.5, 1.0, 3.0))
    assert calibrate_main(["--model", str(model), "--data", str(data), "--max-drop", "50", "--val-fraction", "0.5",
                           "--unsure-coverage", "0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    u = load_manifest(model).unsure
    assert u is not None and u.target == "coverage" and u.val_coverage >= 0.5 and result["unsure"]["floor"] == u.floor
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(12):
        Image.fromarray(random_image(8, 8, seed=100 + i)).save(images / f"{i:02d}.png")
    assert run_main(["--model", str(model), "--folder", str(images), "--json", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    flags = [r["unsure"] for r in rows[:-1]]
    assert flags == [r["confidence"] < u.floor for r in rows[:-1]] and any(flags)
    assert all(r["class_name"] for r in rows[:-1]) and rows[-1]["summary"]["unsure"] == sum(flags)
    assert run_main(["--model", str(model), "--folder", str(images), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"unsure below confidence {u.floor:.3f}" in out.splitlines()[0] and ": unsure (best guess class" in out
    assert run_main(["--model", str(model), "--folder", str(images), "--threads", "1", "--no-reject"]) == 0
    assert ": unsure" not in capsys.readouterr().out
    # Calibrating again without the option keeps the target and chooses the floor again.
    assert calibrate_main(["--model", str(model), "--data", str(data), "--max-drop", "50", "--val-fraction", "0.5"]) == 0
    assert load_manifest(model).unsure.target_value == 0.5


def test_the_bundled_model_is_unsure_about_most_photos_of_other_things():
    """scikit-image's sample photos (none of the ten classes): most (more than half) answered "unsure". The fp32
    bundle says it to 10 of the 15, the int8 bundle (calibrated with margin, a threshold per exit) to 9
    (benchmarks/results/unsure)."""
    from pathlib import Path

    from erde.runtime import Engine, bundled_model
    from erde.runtime.core.preprocess import preprocess
    from erde.runtime.core.unsure import answers

    with np.load(Path(__file__).parent / "data" / "photos.npz") as z:
        photos = [z[k] for k in z.files]
    for name in ("cifar10", "cifar10-int8"):
        engine = Engine.load(bundled_model(name), threads=1)
        crit, t, _ = engine.resolve_threshold()
        _, conf = answers(engine.exit_probs(preprocess(photos, engine.manifest.preprocessing)), crit, t)
        assert (conf < engine.manifest.unsure.floor).sum() > len(photos) / 2, name
