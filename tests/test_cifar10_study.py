"""Pieces of the study command, on a tiny model folder and image folder (no training)."""

import json

import pytest
from PIL import Image

import cifar10_study as study
from runtime_fixtures import make_model_folder, random_image



def test_mean_accuracy_over_a_mac_range():
    curve = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.9)]
    assert study.mean_accuracy_over(curve, 10, 30) == pytest.approx(0.7)
    assert study.mean_accuracy_over(curve, 20, 20) == pytest.approx(0.7)


def test_evaluate_sweeps_every_threshold_with_the_engine(tmp_path):
    model = make_model_folder(tmp_path)
    for c in range(4):
        d = tmp_path / "data" / "test" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(random_image(8, 8, seed=10 * c + i)).save(d / f"{i}.png")
    images, labels, classes = study.load_test_split(tmp_path / "data")
    assert len(images) == 20 and classes == [f"class{c}" for c in range(4)]
    result = study.evaluate(model, "erde", (images, labels), tmp_path / "eval.json", threads=1)
    n_points = sum(len(v) for v in study.THRESHOLDS.values())
    assert len(result["points"]) == n_points and len(result["exit_accuracy"]) == 3
    for p in result["points"]:
        assert sum(p["exit_shares"]) == pytest.approx(1.0)
        assert result["cumulative_macs"][0] <= p["mean_macs"] <= result["cumulative_macs"][-1]
    assert json.loads((tmp_path / "eval.json").read_text()) == result  # cached for the next session


def test_bad_data_is_one_error_line(tmp_path, capsys):
    assert study.main(["--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:")
    assert study.main(["--data", str(tmp_path), "--budget", "huge"]) == 2  # argparse's errors too: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: Invalid value for '--budget'")


def test_a_finished_step_is_reused_only_with_the_same_settings(tmp_path):
    import torch

    from erde.runtime.common.errors import ErdeError

    step = study.Step("teacher", "resnet32_ee", 10, 0, "sgd")
    ckpt = tmp_path / "teacher.pt"
    assert not study._finished(ckpt, step.args())
    run = {"progress": {"finished": False}, "train_args": dict(step.args(), data="/x", teacher=None),
           "metrics": {"history": [{"epoch_seconds": 1.5}, {"epoch_seconds": 2.0}]}}
    torch.save(run, ckpt)
    assert not study._finished(ckpt, step.args())  # unfinished: the step resumes it
    run["progress"]["finished"] = True
    torch.save(run, ckpt)
    assert study._finished(ckpt, step.args())
    with pytest.raises(ErdeError, match="train differ"):
        study._finished(ckpt, study.Step("teacher", "resnet32_ee", 8, 0, "sgd").args())
    assert study.train_seconds(ckpt) == 3.5


def test_step_args_are_what_erde_train_stores(tiny_teacher, tiny_student):
    import torch

    from study_checkpoints import defining_args

    stored = torch.load(tiny_teacher, weights_only=True)["train_args"]
    want = study.Step("teacher", "tiny_ee", 2, 0, "sgd").args()
    assert defining_args(stored) == dict(want, val_fraction=0.25, train=dict(want["train"], batch_size=16))
    stored = torch.load(tiny_student, weights_only=True)["train_args"]
    want = study.Step("student", "tiny_ee", 2, 0, "sgd", "erde", 1.0, 0.5, 4.0).args()
    assert defining_args(stored) == dict(want, val_fraction=0.25, train=dict(want["train"], batch_size=16))


def test_a_budget_sharing_another_studys_teacher_finds_it_committed_with_its_own_config():
    from study_checkpoints import CommittedCheckpoints

    for name, budget in study.BUDGETS.items():
        if budget.teacher_results is None:
            continue
        store = CommittedCheckpoints(study.results_folder(budget.teacher_results) / "checkpoints")
        want = study.Step("teacher", budget.teacher_arch, budget.teacher_epochs, budget.seed, budget.recipe,
                          batch_size=budget.batch_size).args()
        assert store.index()["teacher"]["args"] == want, name


def test_seed_list_and_student_names(capsys):
    budget = study.BUDGETS["cpu"]
    assert study._seed_list("0,1") == [0, 1]
    assert study.student_name("erde", budget.seed, budget) == "erde"  # earlier single-seed runs are reused
    assert study.student_name("erde", 1, budget) == "erde_seed1"
    for bad in ("0,x", "1,1", "-1"):
        assert study.main(["--seeds", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_the_whole_study_then_a_fresh_work_folder_reuses_the_committed_checkpoints(tiny_data, tmp_path, monkeypatch,
                                                                                    capsys):
    tiny = study.Budget("tiny_ee", "tiny_ee", teacher_epochs=1, student_epochs=1, tune_epochs=1, tune_limit=64,
                        beta_grid=(0.5,), results="x", seeds=(0,), batch_size=16)
    monkeypatch.setitem(study.BUDGETS, "tiny", tiny)
    monkeypatch.setattr(study, "latency_profile", lambda d, t: _fake_profile(d))
    monkeypatch.setattr(study, "_erde", _erde_in_process)
    results = tmp_path / "results"
    args = ["--data", str(tiny_data), "--budget", "tiny", "--results", str(results), "--threads", "1"]
    assert study.main(args + ["--work", str(tmp_path / "w1")]) == 0
    index = json.loads((results / "checkpoints" / "checkpoints.json").read_text())
    assert sorted(index) == ["student_ce", "student_erde", "student_erde_beta0", "student_kd", "teacher"]
    first = (results / "summary.json").read_text()
    capsys.readouterr()
    assert study.main(args + ["--work", str(tmp_path / "w2")]) == 0  # a fresh clone: nothing trains again
    out = capsys.readouterr().out
    assert out.count("reusing committed") == 5 and "erde-train teacher" not in out and "erde-train student" not in out
    assert json.loads((results / "summary.json").read_text())["summary"] == json.loads(first)["summary"]


def _erde_in_process(tool, *args):
    """The study's steps run the same console scripts in this process: what is tested is the study's logic
    (reuse, commit, report), not a fresh process, and each subprocess would spend seconds importing torch."""
    from erde.export.cli import main as export_main
    from erde.training.cli import main as train_main

    study._log(" ".join([tool, *map(str, args)]))
    assert {"erde-train": train_main, "erde-export": export_main}[tool]([str(a) for a in args]) == 0


def _fake_profile(model_dir):
    """A made-up latency profile (timing is not what this test checks): 1 ms per segment."""
    from erde.runtime.core.manifest import load_manifest
    from erde.runtime.common.machine import MachineKey
    from erde.runtime.core.manifest import model_sha256
    from erde.runtime.tools.profile import LatencyProfile

    m = load_manifest(model_dir)
    return LatencyProfile(MachineKey("test cpu", 2, 1, "0"), model_sha256(m), tuple(1.0 for _ in m.segments),
                          float(len(m.segments)), 0.0, 1, "now")


def test_a_failing_step_stops_the_study_with_one_line(capsys):
    """The study runs each step as its console script in a fresh process; a failure names the step."""
    with pytest.raises(study.ErdeError, match="step failed .erde-export exited 2.; fix the cause and rerun"):
        study._erde("erde-export", "--no-such-option")
