"""benchmarks/bench_report.py: the key ratios and machine facts of a benchmark report."""

import socket

from erde.benchmarks.bench_measure import ENGINE, ENGINE_ALL, ENGINE_CMP, FULL, Row
from erde.benchmarks.bench_report import key_ratios, machine_facts


def _row(method, mean_ms, macs, threshold=None):
    return Row(method, threshold, "", 1, 10, mean_ms, mean_ms, mean_ms, mean_ms, 1000 / mean_ms, macs, macs / 100,
               (), ())


def test_key_ratios():
    rows = [_row(ENGINE, 0.6, 50, 0.9), _row(ENGINE_ALL, 1.1, 102), _row(FULL, 1.0, 100),
            _row(ENGINE_CMP, 0.3, 50, 0.8)]
    r = key_ratios(rows, 0.9, 100, 102)
    assert abs(r["speedup_vs_full"] - 1 / 0.6) < 1e-9 and abs(r["tracking_vs_full"] - 1.2) < 1e-9
    assert abs(r["overhead_all_segments_vs_full"] - 1.1) < 1e-9 and abs(r["compare_engine_speedup"] - 2.0) < 1e-9
    assert r["speedup_vs_torch"] is None


def test_machine_facts_have_no_host_name():
    facts = machine_facts(1, "CPUExecutionProvider")
    assert "host" not in facts and socket.gethostname() not in str(facts.values()) and facts["cpu"]
