"""benchmarks/cold_start.py: process start to the first result of erde-run, recorded without venv paths."""

from PIL import Image

from erde.benchmarks.cold_start import cold_start
from runtime_fixtures import make_model_folder, random_image


def test_cold_start_of_a_real_erde_run(tmp_path):
    folder = make_model_folder(tmp_path)
    image = tmp_path / "x.png"
    Image.fromarray(random_image()).save(image)
    c = cold_start(folder, image, 1, runs=2)
    assert len(c.times_ms) == 2 and all(t > 0 for t in c.times_ms) and c.median_ms > 0
    assert c.command.startswith("erde-run ") and ".venv" not in c.command
