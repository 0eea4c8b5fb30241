"""The study's summary must follow from its CSVs: re-derive it, on made-up and on committed results."""

import json
from pathlib import Path

import pytest

from study_report import (
    EXITS_CSV, POINTS_CSV, SUMMARY_JSON, read_csv, summarize, write_report,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _result(method, accs, macs, full, curve):
    return {"method": method, "exit_accuracy": accs, "cumulative_macs": macs, "full_macs": full,
            "points": [{"criterion": c, "threshold": t, "accuracy": a, "mean_macs": m,
                        "exit_shares": [0.25, 0.25, 0.25, 0.25]}
                       for c in ("max-prob", "entropy") for t, a, m in curve]}


def _meta():
    return {"budget": "cpu", "budget_config": {"teacher_arch": "T", "student_arch": "S", "teacher_epochs": 1,
                                               "student_epochs": 1, "seed": 0, "alpha": 1.0, "temperature": 4.0},
            "beta_choice": {"beta": 0.5, "rule": "made up.", "scores": {}}, "machine": "test", "git_commit": "x",
            "command": "test", "timings_s": {"a": 1.0}, "test_images": 100}


def test_claims_on_made_up_results(tmp_path):
    results = [
        _result("teacher", [0.7, 0.8, 0.85, 0.90], [40, 60, 80, 100], 99, [(0.5, 0.80, 60), (0.9, 0.89, 90)]),
        _result("erde", [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24, [(0.5, 0.85, 12), (0.9, 0.895, 20)]),
        _result("kd", [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24, [(0.5, 0.84, 12), (0.9, 0.87, 20)]),
        _result("ce", [0.6, 0.7, 0.8, 0.87], [10, 15, 20, 25], 24, [(0.5, 0.83, 14), (0.9, 0.86, 22)]),
        _result("erde_beta0", [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24, [(0.5, 0.85, 12), (0.9, 0.88, 21)]),
    ]
    s = write_report(tmp_path, results, _meta())
    assert s["teacher_final_accuracy"] == 0.9 and s["teacher_full_macs"] == 99
    c = s["comparisons"]["erde vs kd (max-prob)"]
    assert c["wins_at_threshold"] == 2 and c["losses_at_threshold"] == 0
    assert c["wins_at_matched_macs"] == 2
    best = s["largest_mac_reduction_within_1_point"]
    assert best["erde"]["within_1_point"] and best["erde"]["reduction_vs_teacher"] == pytest.approx(99 / 20)
    assert not best["kd"]["within_1_point"] and best["kd"]["best_accuracy"] == 0.87
    assert "4.95x" in (tmp_path / "README.md").read_text()
    on_disk = json.loads((tmp_path / SUMMARY_JSON).read_text())["summary"]
    assert on_disk == json.loads(json.dumps(summarize(read_csv(tmp_path / POINTS_CSV), read_csv(tmp_path / EXITS_CSV))))


def test_a_difference_within_the_seed_range_is_a_tie(tmp_path):
    teacher = _result("teacher", [0.7, 0.8, 0.85, 0.90], [40, 60, 80, 100], 99, [(0.5, 0.80, 60), (0.9, 0.89, 90)])
    results = [teacher]
    # Two seeds: at t=0.5 ERDE's mean is 1 point above KD's but the seeds differ by 3 points (a tie);
    # at t=0.9 ERDE is 5 points above with ranges of 1 point (a win).
    for seed, (e5, e9, k5, k9) in enumerate([(0.84, 0.905, 0.84, 0.86), (0.87, 0.895, 0.85, 0.85)]):
        for method, a5, a9 in (("erde", e5, e9), ("kd", k5, k9), ("ce", k5, k9), ("erde_beta0", k5, k9)):
            r = _result(method, [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24, [(0.5, a5, 12), (0.9, a9, 20)])
            r["seed"] = seed
            results.append(r)
    s = write_report(tmp_path, results, _meta())
    assert s["seeds_per_method"] == {"teacher": 1, "erde": 2, "kd": 2, "ce": 2, "erde_beta0": 2}
    c = s["comparisons"]["erde vs kd (max-prob)"]
    assert (c["wins_at_threshold"], c["ties_at_threshold"], c["losses_at_threshold"]) == (1, 1, 0)
    t5 = c["per_threshold"][0]
    assert t5["accuracy_difference"] == pytest.approx(0.01) and t5["seed_range"] == pytest.approx(0.03)
    assert s["largest_mac_reduction_within_1_point"]["erde"]["point"]["test_accuracy"] == pytest.approx(0.9)
    text = (tmp_path / "README.md").read_text()
    assert "counted as a tie" in text and "(range 0.00)" in text
    assert s == json.loads(json.dumps(summarize(read_csv(tmp_path / POINTS_CSV), read_csv(tmp_path / EXITS_CSV))))


def _with_latency(result, ms_per_mac):
    result["cumulative_ms"] = [m * ms_per_mac for m in result["cumulative_macs"]]
    result["full_ms"] = result["full_macs"] * ms_per_mac
    for p in result["points"]:
        p["mean_ms"] = p["mean_macs"] * ms_per_mac
    return result


def test_latency_claims_and_matched_latency_budgets(tmp_path):
    results = [
        _with_latency(_result("teacher", [0.7, 0.8, 0.85, 0.90], [40, 60, 80, 100], 99,
                              [(0.5, 0.80, 60), (0.9, 0.89, 90)]), 0.01),
        _with_latency(_result("erde", [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24,
                              [(0.5, 0.85, 12), (0.9, 0.895, 20)]), 0.02),  # its MACs cost twice the time
        _with_latency(_result("kd", [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24, [(0.5, 0.85, 12), (0.9, 0.87, 20)]),
                      0.02),
        _with_latency(_result("ce", [0.6, 0.7, 0.8, 0.87], [10, 15, 20, 25], 24, [(0.5, 0.83, 14), (0.9, 0.86, 22)]),
                      0.02),
        _with_latency(_result("erde_beta0", [0.6, 0.7, 0.8, 0.88], [10, 15, 20, 25], 24,
                              [(0.5, 0.85, 12), (0.9, 0.88, 21)]), 0.02),
    ]
    s = write_report(tmp_path, results, _meta())
    assert s["teacher_full_ms"] == pytest.approx(0.99)
    ms = s["largest_latency_reduction_within_1_point"]["erde"]
    assert ms["reduction_vs_teacher"] == pytest.approx(0.99 / 0.4)  # half the reduction in MACs
    assert s["largest_mac_reduction_within_1_point"]["erde"]["reduction_vs_teacher"] == pytest.approx(99 / 20)
    rows = s["matched_latency"]["erde vs kd (max-prob)"]
    assert len(rows["budgets"]) == 11 and rows["budgets"][0]["mean_ms"] == pytest.approx(0.24)
    assert rows["ties"] == 1 and rows["wins"] == 10 and rows["losses"] == 0  # equal at the cheapest point only
    text = (tmp_path / "README.md").read_text()
    assert f"{ms['reduction_vs_teacher']:.2f}x** less time" in text and "| erde vs kd (max-prob) | 10 | 1 | 0 | 11 of 11 |" in text
    assert s == json.loads(json.dumps(summarize(read_csv(tmp_path / POINTS_CSV), read_csv(tmp_path / EXITS_CSV))))


@pytest.mark.parametrize("study", ["cifar10", "cifar10-v2", "cifar10-v3"])
def test_committed_summary_follows_from_committed_csvs(study):
    folder = RESULTS / study
    if not (folder / POINTS_CSV).exists():
        pytest.skip(f"no committed study results in {folder} yet")
    points, exits = read_csv(folder / POINTS_CSV), read_csv(folder / EXITS_CSV)
    derived = json.loads(json.dumps(summarize(points, exits)))
    committed = json.loads((folder / SUMMARY_JSON).read_text())["summary"]
    assert derived == committed
    text = (folder / "README.md").read_text()
    for method, r in derived["largest_mac_reduction_within_1_point"].items():
        if r["within_1_point"]:
            assert f"{r['reduction_vs_teacher']:.2f}x" in text, method
