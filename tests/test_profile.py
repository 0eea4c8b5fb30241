"""Latency profiles (runtime/tools/profile.py, erde-profile) and calibration in milliseconds."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from erde.runtime.tools.calibrate import choose, latency_cost, threshold_table
from erde.runtime.tools.calibrate_cli import main as calibrate_main
from erde.runtime.tools.run_cli import main as run_main
from erde.runtime.core.engine import Engine
from erde.runtime.common.machine import MachineKey
from erde.runtime.core.manifest import model_sha256
from erde.runtime.tools.profile import (PROFILE_NAME, LatencyProfile, ProfileError, find_profile,
                                  load_profiles, measure, other_thread_counts, save_profile)
from erde.runtime.tools.profile_cli import main as profile_main
from runtime_fixtures import make_train_folder, console_command, make_model_folder, random_image

HEAD_SCALES = (0.5, 1.0, 3.0)



@pytest.fixture
def model(tmp_path):
    return make_model_folder(tmp_path, head_scales=HEAD_SCALES, channels=16, input_size=(32, 32))


@pytest.fixture
def data(tmp_path):
    return make_train_folder(tmp_path / "data", 48, 32)


def _fake(engine, **changes) -> LatencyProfile:
    d = dict(machine=MachineKey.here(1), model_sha256=model_sha256(engine.manifest), segment_ms=(0.1, 0.2, 0.3),
             full_ms=0.55, spread=0.02, calls=100, measured="2026-11-30T00:00:00+00:00")
    d.update(changes)
    return LatencyProfile(**d)


def test_measure_save_and_find(model):
    engine = Engine.load(model, threads=1)
    prof = measure(engine, calls=200, warmup=5)
    assert len(prof.segment_ms) == 3 and all(v > 0 for v in prof.segment_ms)
    assert list(prof.cumulative_ms) == sorted(prof.cumulative_ms) and prof.full_ms > 0
    save_profile(model, prof)
    assert find_profile(model, engine.manifest, 1) == prof
    other = _fake(engine, machine=MachineKey("Some ARM board", 4, 4, "1.19.2"))
    save_profile(model, other)  # a second machine's entry is kept beside this one's
    assert len(load_profiles(model)) == 2 and find_profile(model, engine.manifest, 1) == prof


@pytest.mark.parametrize("change,why", [
    ({"machine": MachineKey("Another CPU", 2, 1, "1.32.0")}, "Another CPU"),
    ({"model_sha256": "0" * 64}, "other graphs"),
])
def test_a_profile_of_another_machine_or_model_is_refused(model, change, why):
    engine = Engine.load(model, threads=1)
    save_profile(model, _fake(engine, **change))
    with pytest.raises(ProfileError, match=why):
        find_profile(model, engine.manifest, 1)
    save_profile(model, _fake(engine))
    with pytest.raises(ProfileError, match="no profile for this machine"):
        find_profile(model, engine.manifest, 2)  # same machine, another thread count


def test_the_same_cpu_name_with_other_instruction_sets_is_another_machine(model, capsys, tmp_path):
    """"AMD EPYC" has been an AVX-512/VNNI part and an AVX2-only one: a profile of the other is not used."""
    engine = Engine.load(model, threads=1)
    here = MachineKey.here(1)
    other = ("avx2", "fma") if here.flags != ("avx2", "fma") else ("avx2", "avx512_vnni", "avx512f", "fma")
    save_profile(model, _fake(engine, machine=dataclasses.replace(here, flags=other)))
    with pytest.raises(ProfileError, match="no profile for this machine") as e:
        find_profile(model, engine.manifest, 1)
    assert " ".join(other) in str(e.value) and " ".join(here.flags) in str(e.value)
    img = tmp_path / "x.png"
    Image.fromarray(random_image(32, 32)).save(img)
    assert run_main(["--model", str(model), "--image", str(img), "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "expected latency" not in out and "ignored" in err and " ".join(other) in err


def test_an_old_profile_without_flags_matches_no_machine(model):
    engine = Engine.load(model, threads=1)
    d = _fake(engine).to_dict()
    del d["machine"]["flags"]
    (model / PROFILE_NAME).write_text(json.dumps({"format": "erde-latency-profile", "version": 1, "profiles": [d]}))
    with pytest.raises(ProfileError, match=r"\[unknown\]"):
        find_profile(model, engine.manifest, 1)


def test_a_folder_that_cannot_be_written_keeps_its_profile_per_user(model, monkeypatch, tmp_path):
    import erde.runtime.tools.profile as profile_mod

    monkeypatch.setenv("ERDE_CACHE", str(tmp_path / "cache"))  # this test's own per-user folder

    engine = Engine.load(model, threads=1)
    real = profile_mod.write_json_atomic

    def read_only(path, data):
        if path.parent == model:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(profile_mod, "write_json_atomic", read_only)
    path = save_profile(model, _fake(engine))
    assert path == profile_mod.user_profile_path(engine.manifest) and not (model / PROFILE_NAME).exists()
    assert find_profile(model, engine.manifest, 1) == _fake(engine)


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "erde-latency-profile", "version": 9, "profiles": []}',
                                  '{"format": "erde-latency-profile", "version": 1, "profiles": [{"x": 1}]}'])
def test_a_corrupt_profile_is_refused(model, text):
    engine = Engine.load(model, threads=1)
    (model / PROFILE_NAME).write_text(text)
    with pytest.raises(ProfileError, match=PROFILE_NAME):
        find_profile(model, engine.manifest, 1)


def test_a_latency_budget_never_returns_a_threshold_over_budget():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=(3, 400)).astype(np.float32)
    labels = rng.integers(0, 4, 400)
    rows = threshold_table(probs, labels, [10, 20, 30], 30, "max-prob")
    prof = LatencyProfile(MachineKey("cpu", 2, 1, "x"), "s", (0.2, 0.15, 0.25), 0.5, 0.01, 10, "now")
    cost = latency_cost(prof)
    met = 0
    for budget in np.linspace(0.05, 0.7, 60):
        c = choose(rows, "latency-budget", float(budget), float((probs[-1].argmax(1) == labels).mean()), 30, cost)
        if c.met:
            met += 1
            assert cost(c.row) <= budget
            assert all(r.accuracy <= c.row.accuracy for r in rows if cost(r) <= budget)
        else:
            assert budget < min(cost(r) for r in rows) and c.closest is not None
    assert 0 < met < 60


def test_expected_latency_matches_measured_within_the_spread(model):
    """The profile's expected latency at a threshold, against timing the engine at that threshold."""
    engine = Engine.load(model, threads=1)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(60)]
    exits = np.array([engine.predict_array(x, 0.6)[0].exit_index for x in xs])
    shares = np.bincount(exits, minlength=3) / len(exits)
    assert 0 < shares[0] < 1  # the threshold splits the images
    prof = measure(engine, calls=1000, warmup=20)
    means = []
    for _ in range(5):  # rounds: the run-to-run spread of the measured mean
        t = []
        for x in xs:
            for _ in range(5):  # wall time of the call a user makes, as erde-bench times it
                t0 = time.perf_counter()
                engine.predict_array(x, 0.6)
                t.append((time.perf_counter() - t0) * 1000.0)
        means.append(float(np.mean(np.sort(t)[:int(len(t) * 0.95)])))
    measured = float(np.median(means))
    spread = max((max(means) - min(means)) / measured, prof.spread)
    expected = prof.expected_ms(shares)
    assert abs(expected - measured) / measured <= max(2 * spread, 0.15), (expected, measured, means, prof)


# ---- command lines ---------------------------------------------------------------------------------


def test_erde_profile_writes_a_profile_that_erde_run_shows(model, capsys, tmp_path):
    assert profile_main(["--model", str(model), "--threads", "1", "--calls", "100"]) == 0
    out = capsys.readouterr().out
    assert "all segments cost" in out and PROFILE_NAME in out
    img = tmp_path / "x.png"
    Image.fromarray(random_image(32, 32)).save(img)
    assert run_main(["--model", str(model), "--image", str(img), "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "expected latency:" in out and err == ""


def test_erde_run_warns_about_a_foreign_profile_and_still_runs(model, capsys, tmp_path):
    engine = Engine.load(model, threads=1)
    save_profile(model, _fake(engine, machine=MachineKey("Another CPU", 2, 1, "1.32.0")))
    img = tmp_path / "x.png"
    Image.fromarray(random_image(32, 32)).save(img)
    assert run_main(["--model", str(model), "--image", str(img), "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("Warning: ") and "Another CPU" in err and "ignored" in err
    assert "expected latency" not in out


def test_calibrate_budget_ms_needs_a_profile_of_this_machine(model, data, capsys):
    rc = calibrate_main(["--model", str(model), "--data", str(data), "--budget-ms", "1", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("Error: ") and "no latency profile" in err and err.count("\n") == 1
    engine = Engine.load(model, threads=1)
    save_profile(model, _fake(engine, machine=MachineKey("Another CPU", 2, 1, "1.32.0")))
    rc = calibrate_main(["--model", str(model), "--data", str(data), "--budget-ms", "1", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Another CPU" in err


def test_calibrate_in_milliseconds(model, data, capsys):
    engine = Engine.load(model, threads=1)
    save_profile(model, _fake(engine))
    rc = calibrate_main(["--model", str(model), "--data", str(data), "--budget-ms", "0.05", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 1 and "none meets" not in err and "closest" in err and "expected 0.1" in err  # under exit 1's cost
    rc = calibrate_main(["--model", str(model), "--data", str(data), "--budget-ms", "0.2", "--threads", "1", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["calibration"]["val_expected_ms"] <= 0.2 and d["profile"]
    rc = calibrate_main(["--model", str(model), "--data", str(data), "--threads", "1"])  # accuracy-drop, now in ms
    out = capsys.readouterr().out
    assert rc == 0 and "cost: expected latency" in out
    header = (model / "calibration.csv").read_text().splitlines()[0]
    assert header.endswith("expected_ms")


def test_erde_profile_console_script_bad_model(tmp_path):
    r = subprocess.run(console_command("erde-profile", "erde.runtime.tools.profile_cli") + ["--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1


def test_erde_run_says_when_full_onnx_is_expected_faster(model, capsys, tmp_path):
    from erde.runtime.tools.calibrate import TABLE_NAME, ThresholdRow, table_csv

    engine = Engine.load(model, threads=1)
    save_profile(model, _fake(engine))  # cumulative 0.1 / 0.3 / 0.6 ms; full.onnx 0.55 ms
    rows = [ThresholdRow("max-prob", 0.5, 0.8, 10.0, 0.1, (1.0, 0.0, 0.0)),
            ThresholdRow("max-prob", 0.99, 0.9, 100.0, 1.0, (0.0, 0.0, 1.0))]
    (model / TABLE_NAME).write_text(table_csv(rows, 3))
    img = tmp_path / "x.png"
    Image.fromarray(random_image(32, 32)).save(img)
    lines = {}
    for args in (["--threshold", "0.5"], ["--threshold", "0.99"], ["--static"]):
        assert run_main(["--model", str(model), "--image", str(img), "--threads", "1"] + args) == 0
        out, err = capsys.readouterr()
        assert err == ""
        lines[args[-1]] = out.splitlines()[1]
    assert lines["0.5"].startswith("expected latency: 0.100 ms") and "--static" not in lines["0.5"]
    assert lines["0.99"].startswith("expected latency: 0.600 ms") and \
        lines["0.99"].endswith("full.onnx 0.550 ms, faster than early exit here: --static runs it")
    assert lines["--static"].startswith("expected latency: 0.550 ms per image for full.onnx")
    # Without a given threshold, at a calibrated one where the static graph is expected sooner, erde-run runs it.
    from erde.runtime.core.manifest import Calibration, load_manifest, save_manifest

    save_manifest(model, dataclasses.replace(load_manifest(model), calibration=Calibration(
        "max-prob", 0.99, "accuracy-drop", 0.5, 0.9, 100.0, TABLE_NAME)))
    assert run_main(["--model", str(model), "--image", str(img), "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_index"] == 2
    assert run_main(["--model", str(model), "--image", str(img), "--threads", "1"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "static full.onnx, no early exit (chosen: full.onnx expected 0.550 ms here against 0.600 ms" in head
    assert run_main(["--model", str(model), "--image", str(img), "--threads", "1", "--early-exit"]) == 0
    assert "threshold 0.99 (calibrated)" in capsys.readouterr().out.splitlines()[0]


def test_other_thread_counts_are_this_machine_and_model_only(model):
    engine = Engine.load(model, threads=1)
    here = MachineKey.here(1)
    (model / PROFILE_NAME).unlink(missing_ok=True)
    for p in (_fake(engine), _fake(engine, machine=dataclasses.replace(here, threads=2)),
              _fake(engine, machine=dataclasses.replace(here, threads=4, cpu="Another CPU")),
              _fake(engine, machine=dataclasses.replace(here, threads=3), model_sha256="0" * 64)):
        save_profile(model, p)
    assert [p.machine.threads for p in other_thread_counts(model, engine.manifest, 1)] == [2]
    assert [p.machine.threads for p in other_thread_counts(model, engine.manifest, 2)] == [1]


def test_erde_run_names_a_faster_thread_count(model, capsys, tmp_path):
    from erde.runtime.tools.calibrate import TABLE_NAME, ThresholdRow, table_csv

    engine = Engine.load(model, threads=1)
    two = dataclasses.replace(MachineKey.here(1), threads=2)
    (model / PROFILE_NAME).unlink(missing_ok=True)
    save_profile(model, _fake(engine))  # 1 thread: cumulative 0.1 / 0.3 / 0.6 ms, full.onnx 0.55 ms
    rows = [ThresholdRow("max-prob", 0.5, 0.8, 10.0, 0.1, (0.5, 0.0, 0.5))]  # expected 0.35 ms at 1 thread
    (model / TABLE_NAME).write_text(table_csv(rows, 3))
    img = tmp_path / "x.png"
    Image.fromarray(random_image(32, 32)).save(img)

    def line(segment_ms, full_ms, *args):
        save_profile(model, _fake(engine, machine=two, segment_ms=segment_ms, full_ms=full_ms))
        assert run_main(["--model", str(model), "--image", str(img), "--threads", "1"] + list(args)) == 0
        out, err = capsys.readouterr()
        assert err == ""
        return out.splitlines()[1]

    assert line((0.05, 0.1, 0.15), 0.3, "--threshold", "0.5").endswith(
        "; 2 threads expected faster here (0.175 ms): --threads 2")
    assert line((0.05, 0.1, 0.15), 0.3, "--static").endswith("; 2 threads expected faster here (0.300 ms): --threads 2")
    assert line((0.1, 0.2, 0.3), 0.2, "--threshold", "0.5").endswith(  # the static graph at 2 threads beats both
        "; 2 threads with full.onnx expected faster here (0.200 ms): --threads 2 --static")
    assert "--threads" not in line((0.1, 0.2, 0.295), 0.54, "--threshold", "0.5")  # 0.7% less: within the spread
    assert "--threads" not in line((0.1, 0.2, 0.295), 0.55, "--static")
