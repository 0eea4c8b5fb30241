"""runtime/common/files.py: regular files only, capped reads, atomic writes."""

import os

import pytest

from erde.runtime.common.files import UnsafePathError, check_regular, json_depth_ok, read_capped, write_atomic


def test_read_capped_refuses_fifos_devices_links_out_and_big_files(tmp_path):
    (tmp_path / "m").mkdir()
    ok = tmp_path / "m" / "a.bin"
    ok.write_bytes(b"12345")
    assert read_capped(ok, 5, inside=tmp_path / "m") == b"12345"
    with pytest.raises(UnsafePathError, match="limit"):
        read_capped(ok, 4)
    os.mkfifo(tmp_path / "m" / "fifo")
    with pytest.raises(UnsafePathError, match="FIFO"):
        read_capped(tmp_path / "m" / "fifo", 10)
    os.symlink("/dev/null", tmp_path / "m" / "dev")
    with pytest.raises(UnsafePathError, match="character device"):
        check_regular(tmp_path / "m" / "dev", 10)
    (tmp_path / "outside.bin").write_bytes(b"x")
    os.symlink(tmp_path / "outside.bin", tmp_path / "m" / "link")
    with pytest.raises(UnsafePathError, match="leads out of"):
        read_capped(tmp_path / "m" / "link", 10, inside=tmp_path / "m")


def test_json_depth():
    assert json_depth_ok('{"a": [1, {"b": "[[[["}]}', limit=3)
    assert not json_depth_ok("[" * 5 + "]" * 5, limit=4)


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
