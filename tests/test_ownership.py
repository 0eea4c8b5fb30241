"""runtime/common/ownership.py: a folder is replaced only when every file in it is one erde wrote, unchanged."""

import json
import os
import subprocess
import sys

import pytest

from erde.runtime.common.files import UnsafePathError
from erde.runtime.common.ownership import (OWNER_NAME, build_folder, check_replaceable, clean_stale_temps, may_update,
                                    new_temp_dir, read_record, record_files)

TOOLS = ("erde-export",)


def _build(tmp):
    (tmp / "manifest.json").write_text("{}")
    (tmp / "graph.onnx").write_bytes(b"\x00" * 10)
    return "built"


def test_a_built_folder_records_every_file_and_can_be_replaced(tmp_path):
    out = tmp_path / "out"
    assert build_folder(out, False, "erde-export", TOOLS, _build) == "built"
    record = read_record(out)
    assert record["tool"] == "erde-export" and sorted(record["files"]) == ["graph.onnx", "manifest.json"]
    with pytest.raises(UnsafePathError, match="--force"):
        build_folder(out, False, "erde-export", TOOLS, _build)
    assert build_folder(out, True, "erde-export", TOOLS, _build) == "built"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_a_stray_manifest_does_not_make_a_folder_ours(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    (mine / "manifest.json").write_text("{}")
    with pytest.raises(UnsafePathError, match="not written by erde"):
        build_folder(mine, True, "erde-export", TOOLS, _build)
    assert (mine / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("change", ["added", "changed", "subfolder"])
def test_a_users_addition_or_change_blocks_force(tmp_path, change):
    out = tmp_path / "out"
    build_folder(out, False, "erde-export", TOOLS, _build)
    if change == "added":
        (out / "precious.txt").write_text("keep")
    elif change == "changed":
        (out / "manifest.json").write_text('{"edited": true}')
    else:
        (out / "notes").mkdir()
    with pytest.raises(UnsafePathError, match="which erde did not write"):
        build_folder(out, True, "erde-export", TOOLS, _build)
    assert (out / "graph.onnx").exists()


def test_a_forged_record_that_lists_too_little_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    (mine / OWNER_NAME).write_text(json.dumps({"format": "erde-owner", "version": 1, "tool": "erde-export",
                                               "files": {}}))
    with pytest.raises(UnsafePathError, match="precious.txt"):
        check_replaceable(mine, True, "erde-export", TOOLS)


def test_a_folder_of_another_tool_is_refused(tmp_path):
    out = tmp_path / "bench"
    build_folder(out, False, "erde-bench", ("erde-bench",), _build)
    with pytest.raises(UnsafePathError, match="written by erde-bench"):
        check_replaceable(out, True, "erde-export", TOOLS)


def test_protected_paths_and_failures_leave_everything(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UnsafePathError, match="must not replace"):
        build_folder(tmp_path, True, "erde-export", TOOLS, _build, protect=[mine / "notes.txt"])
    out = tmp_path / "out"
    build_folder(out, False, "erde-export", TOOLS, _build)

    def fail(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_folder(out, True, "erde-export", TOOLS, fail)
    assert (out / "manifest.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_may_update(tmp_path):
    record_files(tmp_path, "erde-export", [])
    assert may_update(tmp_path, "calibration.csv")  # absent
    (tmp_path / "calibration.csv").write_text("a")
    assert not may_update(tmp_path, "calibration.csv")  # a file erde did not record
    assert may_update(tmp_path, "calibration.csv", lambda p: p.read_text() == "a")  # the caller knows the format
    record_files(tmp_path, "erde-calibrate", ["calibration.csv"])
    assert may_update(tmp_path, "calibration.csv") and read_record(tmp_path)["tool"] == "erde-export"


def test_stale_temps_of_dead_processes_only(tmp_path):
    out = tmp_path / "m"
    dead, alive, other = (tmp_path / ".m.erde-tmp-999999999.x", tmp_path / f".m.erde-tmp-{os.getpid()}.y",
                          tmp_path / ".m.something-else")
    for d in (dead, alive, other):
        d.mkdir()
    clean_stale_temps(out)
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_killed_runs_temporary_folder_goes_on_any_later_run(tmp_path):
    """A process dies (kill -9) with its temporary folder in one place; a run to another --out removes it."""
    first = tmp_path / "a" / "model"
    first.parent.mkdir()
    code = ("import os, pathlib; from erde.runtime.common.ownership import new_temp_dir; "
            f"t = new_temp_dir(pathlib.Path({str(first)!r})); (t / 'half.onnx').write_bytes(b'x'); os._exit(9)")
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ), check=False)
    left = [p for p in first.parent.iterdir() if ".erde-tmp-" in p.name]
    assert len(left) == 1
    other = tmp_path / "b" / "model"
    other.parent.mkdir()
    tmp = new_temp_dir(other)
    assert not left[0].exists() and tmp.exists()


def test_a_record_folder_is_written_whole_and_replaced_only_if_a_script_wrote_it(tmp_path):
    from erde.runtime.common.ownership import write_record

    out = write_record(tmp_path / "rec", {"README.md": "# one", "results.json": "{}"})
    assert (out / "README.md").read_text() == "# one" and (out / "results.json").read_text() == "{}"
    write_record(out, {"README.md": "# two"})  # its own record: replaced
    assert sorted(p.name for p in out.iterdir()) == [".erde-owner.json", "README.md"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UnsafePathError, match="notes.txt"):
        write_record(out, {"README.md": "# three"})
    assert (out / "README.md").read_text() == "# two" and (out / "notes.txt").read_text() == "mine"
