from PIL import Image

from erde.benchmarks import bundle_model


def test_samples_are_drawn(tmp_path):
    bundle_model.draw_samples(tmp_path)
    for name in ("airplane.png", "ship.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (96, 96) and img.mode == "RGB"


def test_needs_the_study_first(tmp_path, capsys):
    assert bundle_model.main(["--study", str(tmp_path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "run the study first" in err
