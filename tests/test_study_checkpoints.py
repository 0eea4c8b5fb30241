"""Committed study checkpoints are reused only when their hash, config and teacher all match."""

import json

from study_checkpoints import CommittedCheckpoints, defining_args, sha256

ARGS = defining_args({"kind": "student", "arch": "air32_ee", "exits": None, "limit": None, "val_fraction": 0.1,
                      "train": {"epochs": 10, "seed": 0, "recipe": "airbench"},
                      "loss": {"name": "erde", "beta": 0.5, "exit_weights": ()}})


def _store(tmp_path):
    logs = []
    store = CommittedCheckpoints(tmp_path / "checkpoints", logs.append)
    store.folder.mkdir()
    ckpt = store.folder / "student_erde.pt"
    ckpt.write_bytes(b"weights")
    store.commit("student_erde", ckpt, ARGS, teacher_sha="t" * 64)
    return store, logs


def test_a_matching_checkpoint_is_copied_to_the_work_folder(tmp_path):
    store, logs = _store(tmp_path)
    dest = tmp_path / "work" / "student_erde.pt"
    assert store.reuse("student_erde", ARGS, "t" * 64, dest)
    assert dest.read_bytes() == b"weights" and "hash and config match" in logs[-1]
    assert json.loads(store.index_path.read_text())["student_erde"]["sha256"] == sha256(dest)


def test_a_changed_file_config_or_teacher_is_not_reused_and_says_why(tmp_path):
    store, logs = _store(tmp_path)
    dest = tmp_path / "work" / "x.pt"
    assert not store.reuse("student_erde", ARGS, "u" * 64, dest)
    assert "another teacher" in logs[-1]
    other = dict(ARGS, train=dict(ARGS["train"], epochs=12))
    assert not store.reuse("student_erde", other, "t" * 64, dest)
    assert "train differ" in logs[-1]
    (store.folder / "student_erde.pt").write_bytes(b"tampered")
    assert not store.reuse("student_erde", ARGS, "t" * 64, dest)
    assert "sha256 differs" in logs[-1] and not dest.exists()


def test_nothing_committed_or_a_corrupt_index_reuses_nothing(tmp_path):
    store = CommittedCheckpoints(tmp_path / "none", [].append)
    assert not store.reuse("teacher", ARGS, None, tmp_path / "t.pt")
    store, logs = _store(tmp_path)
    store.index_path.write_text("{not json")
    assert not store.reuse("student_erde", ARGS, "t" * 64, tmp_path / "t.pt")
    assert "unreadable" in logs[-1]


def test_tuples_and_lists_compare_equal_after_the_json_index():
    assert defining_args({"loss": {"exit_weights": ()}})["loss"] == {"exit_weights": []}
