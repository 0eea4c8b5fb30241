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


def test_fewer_calls_than_images_time_a_sample_of_all_of_them():
    """An image folder lists one class after the other: 300 calls over 1,000 images must not be the first 300."""
    from erde.benchmarks.bench_measure import _timed

    inputs = [np.full(1, i) for i in range(1000)]
    seen = []
    s = Series(ENGINE, 0.9, 1, lambda x: seen.append(int(x[0])) or [0])
    _timed([s], inputs, warmup=0, repeats=300)
    assert len(seen) == len(set(seen)) == 300 and len(s.times_ms) == 300
    assert max(seen) > 900 and min(seen) < 100 and 350 < np.mean(seen) < 650  # spread over the whole folder
    again = []
    _timed([Series(ENGINE, 0.9, 1, lambda x: again.append(int(x[0])) or [0])], inputs, warmup=0, repeats=300)
    assert again == seen  # the same seeded order every run, for every series
