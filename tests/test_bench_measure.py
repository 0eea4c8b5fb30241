"""benchmarks/bench_measure.py: summaries of timed series, labels from class folders."""

from pathlib import Path

import numpy as np

from erde.benchmarks.bench_measure import ENGINE, Series, labels_of, summarize


def test_summary_of_a_series():
    s = Series(ENGINE, 0.9, 1, lambda x: [0], times_ms=[1.0, 2.0, 3.0, 10.0], exits=[0, 0, 1, 1])
    r = summarize(s, [100, 300], 300)
    assert r.mean_ms == 4.0 and r.p50_ms == 2.5 and r.mean_macs == 200 and r.exit_shares == (0.5, 0.5)
    assert r.exit_mean_ms == (1.5, 6.5) and r.throughput_ips == 4 / 0.016


def test_labels_only_when_every_image_names_its_class():
    files = [Path("t/cat/1.png"), Path("t/dog/2.png")]
    assert labels_of(files, ["cat", "dog"]).tolist() == [0, 1]
    assert labels_of(files + [Path("t/other/3.png")], ["cat", "dog"]) is None
    assert isinstance(labels_of(files, ["dog", "cat"]), np.ndarray)
