"""runtime/tools/run_summary.py and the summary that ends a folder run of erde-run."""

from __future__ import annotations

import shutil

from erde.runtime.tools.run_cli import main as run_main
from erde.runtime.tools.run_summary import RunSummary, label_of
from erde.runtime.core.graphs import Prediction
from runtime_fixtures import make_model_folder

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "runtime" / "samples"


def _pred(cls: int, exit_index: int) -> Prediction:
    return Prediction(cls, f"c{cls}", 0.9, exit_index, 3, 10, 0.5, 1.0, (1.0,))


def test_counts_shares_accuracy_and_confusion():
    s = RunSummary(["c0", "c1"], 3)
    for cls, label, ex, unsure in ((0, 0, 0, False), (1, 0, 2, True), (1, 1, 1, False), (1, 1, 2, False)):
        s.add(_pred(cls, ex), unsure, label, inference=2.0)
    d = s.to_dict()
    assert d["images"] == 4 and d["exit_shares"] == [0.25, 0.25, 0.5] and d["unsure"] == 1
    assert d["class_counts"] == {"c0": 1, "c1": 3} and d["accuracy"] == 0.75 and d["accuracy_answered"] == 1.0
    assert d["confusion"] == [[1, 1], [0, 2]] and d["ms"]["inference"]["p95"] == 2.0
    text = "\n".join(s.lines())
    assert "accuracy (folder names are classes): 75.00%; on the answered ones 100.00%" in text and "confusion" in text


def test_labels_come_from_class_folders():
    assert label_of("data/test/cat/1.png", ["dog", "cat"]) == 1 and label_of("x/1.png", ["dog", "cat"]) is None


def test_a_folder_run_ends_with_a_summary_and_batch_lines_show_a_per_image_share(tmp_path, capsys):
    model = make_model_folder(tmp_path, class_names=["airplane", "ship", "cat", "dog"])
    folder = tmp_path / "test"
    for name in ("airplane", "ship"):
        (folder / name).mkdir(parents=True)
        shutil.copy(SAMPLES / f"{name}.png", folder / name / "a.png")
        shutil.copy(SAMPLES / f"{name}.png", folder / name / "b.png")
    assert run_main(["--model", str(model), "--folder", str(folder / "airplane"), "--folder", str(folder / "ship"),
                     "--batch-size", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "summary: 4 images" in out and "accuracy (folder names are classes)" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(str(folder))]
    batch_ms = [float(ln.rsplit(", ", 1)[1].split()[0]) for ln in lines]
    assert len(set(batch_ms)) == 1  # one batch: each image shows its share of the batch's time
