"""runtime/common/datasets.py: the torch-free pieces shared by training and calibration (the split itself is
tested against training in test_calibrate.py)."""

from erde.runtime.common.datasets import cache_dir


def test_cache_dir_follows_erde_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ERDE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ERDE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "erde"
