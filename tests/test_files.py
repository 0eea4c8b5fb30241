"""runtime/files.py: regular files only, capped reads, atomic writes, folders replaced only when ours."""

import os

import pytest

from erde.runtime.files import (UnsafePathError, build_folder, check_regular, clean_stale_temps, json_depth_ok,
                                read_capped, write_atomic)


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


def test_build_folder_replaces_only_its_own_folders(tmp_path):
    def build(tmp):
        (tmp / "marker.json").write_text("{}")
        return "built"

    out = tmp_path / "out"
    assert build_folder(out, False, "marker.json", build) == "built"
    with pytest.raises(UnsafePathError, match="--force"):
        build_folder(out, False, "marker.json", build)
    assert build_folder(out, True, "marker.json", build) == "built"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UnsafePathError, match="not written by"):
        build_folder(mine, True, "marker.json", build)
    with pytest.raises(UnsafePathError, match="must not replace"):
        build_folder(tmp_path, True, "marker.json", build, protect=[mine / "notes.txt"])

    def fail(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_folder(out, True, "marker.json", fail)
    assert (out / "marker.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_stale_temps_of_dead_processes_only(tmp_path):
    out = tmp_path / "m"
    dead, alive, other = (tmp_path / ".m.erde-tmp-999999999.x", tmp_path / f".m.erde-tmp-{os.getpid()}.y",
                          tmp_path / ".m.something-else")
    for d in (dead, alive, other):
        d.mkdir()
    clean_stale_temps(out)
    assert not dead.exists() and alive.exists() and other.exists()
