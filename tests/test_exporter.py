import os
import json

import numpy as np
import onnx
import pytest
import torch

from erde.export import exporter
from erde.export.exporter import ExportError, export_checkpoint, sha256_file
from erde.runtime.common.errors import ErdeError
from erde.runtime.core.manifest import load_manifest
from erde.training.checkpoint import CheckpointError, read_checkpoint


def test_folder_has_segments_full_graph_and_manifest(exported, tiny_student):
    out, manifest = exported
    assert sorted(p.name for p in out.iterdir()) == [
        ".erde-owner.json", "early_exit.onnx", "full.onnx", "manifest.json", "segment_0.onnx", "segment_1.onnx", "segment_2.onnx",
        "segment_3.onnx", "selftest.npz"]
    loaded = load_manifest(out)
    assert loaded == manifest
    assert loaded.class_names == ["blue", "green", "red"] and loaded.num_exits == 4
    assert loaded.source["checkpoint_sha256"] == sha256_file(tiny_student)
    for seg in loaded.segments:
        assert seg.sha256 == sha256_file(out / seg.file)
    assert loaded.segments[0].inputs[0].name == "image" and loaded.segments[0].inputs[0].shape[0] == "batch"
    assert loaded.segments[1].inputs[0].name == "features_0"
    assert loaded.segments[-1].feature_output is None
    assert loaded.full.macs < loaded.segments[-1].cumulative_macs  # the static path has no exit heads
    assert "val_accuracy_exit_1" in loaded.metrics
    assert loaded.early_exit_graph.sha256 == sha256_file(out / "early_exit.onnx")
    assert loaded.source["val_fraction"] == "0.25"  # erde-calibrate carves the same validation split


def test_graph_metadata_carries_the_essentials(exported):
    out, manifest = exported
    model = onnx.load(str(out / "segment_2.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["erde_segment"] == "2" and meta["erde_num_exits"] == "4"
    assert json.loads(meta["erde_class_names"]) == manifest.class_names
    assert json.loads(meta["erde_cumulative_macs"]) == [s.cumulative_macs for s in manifest.segments]
    assert model.opset_import[0].version == exporter.OPSET


def test_dynamic_batch_axis(exported):
    import onnxruntime as ort

    out, _ = exported
    sess = ort.InferenceSession(str(out / "full.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        probs = sess.run(None, {"image": np.zeros((n, 3, 32, 32), np.float32)})[0]
        assert probs.shape == (n, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_existing_folder_needs_force_and_is_replaced_whole(exported, tiny_student, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="--force"):
        export_checkpoint(tiny_student, out)
    assert (out / "old.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="not written by erde"):  # --force replaces only erde's folders
        export_checkpoint(tiny_student, out, force=True)
    assert (out / "old.txt").read_text() == "keep me"
    (out / "old.txt").unlink()
    export_checkpoint(tiny_student, out, force=True)  # an empty folder may be filled
    export_checkpoint(tiny_student, out, force=True)  # a folder erde wrote is replaced whole
    (out / "notes.txt").write_text("a user's file added to the export")
    with pytest.raises(ExportError, match="notes.txt, which erde did not write"):
        export_checkpoint(tiny_student, out, force=True)
    assert (out / "notes.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_force_never_removes_the_checkpoint_or_a_folder_holding_it(tiny_student, tmp_path):
    import shutil

    ckpt = tmp_path / "ck" / "student.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_student, ckpt)
    for out in (ckpt.parent, tmp_path, ckpt):
        with pytest.raises(ExportError):
            export_checkpoint(ckpt, out, force=True)
    assert ckpt.exists()


def test_stale_temporary_folders_of_dead_exports_are_removed(tiny_student, tmp_path):
    dead = tmp_path / ".m.erde-tmp-999999999.abc"  # a pid no process has
    dead.mkdir()
    (dead / "segment_0.onnx").write_text("partial")
    alive = tmp_path / f".m.erde-tmp-{os.getpid()}.xyz"  # our own (a concurrent export in this process)
    alive.mkdir()
    export_checkpoint(tiny_student, tmp_path / "m")
    assert not dead.exists() and alive.exists()


def test_failed_check_leaves_nothing_behind(tiny_student, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "check_parity", lambda *a, **k: ["segment_1.onnx: differs", "entropy: differs"])
    with pytest.raises(ExportError, match="2 check"):
        export_checkpoint(tiny_student, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints(tiny_student, tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "m")
    ckpt = read_checkpoint(tiny_student)
    ckpt["version"] = 2
    torch.save(ckpt, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="version 2"):
        export_checkpoint(tmp_path / "v2.pt", tmp_path / "m")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError):
        export_checkpoint(tiny_student, blocker / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "v2.pt"]


def test_an_exit_that_does_not_pay_can_be_dropped_at_export(tiny_student, tmp_path):
    from erde.runtime.core.engine import Engine
    from erde.training.checkpoint import read_checkpoint

    trained = read_checkpoint(tiny_student)["model_args"]["exit_after"]
    m = export_checkpoint(tiny_student, tmp_path / "m", exits=(trained[1],))
    assert m.num_exits == 2 and Engine.load(tmp_path / "m", threads=1).num_exits == 2
    assert m.metrics["val_accuracy_exit_1"] == read_checkpoint(tiny_student)["metrics"]["val_exit_accuracy"][1]
    with pytest.raises(ErdeError, match="subset of the trained early exits"):
        export_checkpoint(tiny_student, tmp_path / "n", exits=(99,))


def test_the_single_graph_gives_the_chains_answers(exported):
    """early_exit.onnx (batch 1) and the segment chain take the same exit with the same confidence."""
    from erde.runtime.core.engine import Engine

    out, _ = exported
    eng = Engine.load(out, threads=1)
    assert eng.single_graph
    x = np.random.default_rng(3).standard_normal((24, 3, 32, 32)).astype(np.float32)
    for criterion, t in (("max-prob", 0.5), ("max-prob", 0.9), ("entropy", 0.3)):
        chain = eng.predict_array(x, t, criterion)  # batch 24: the chain with compaction
        single = eng.predict_array(x, t, criterion, batch_size=1)  # batch 1: early_exit.onnx
        assert [(p.exit_index, p.class_index) for p in chain] == [(p.exit_index, p.class_index) for p in single]
        assert max(abs(a.confidence - b.confidence) for a, b in zip(chain, single)) < 1e-5
    assert all(eng.time_to_exit(x[:1], k) > 0 for k in range(eng.num_exits))


def test_an_airnet_exports_with_its_block_norms_folded_and_the_same_answers(tmp_path):
    from erde.training.checkpoint import make_checkpoint, save_checkpoint
    from erde.training.models import build_model, model_config

    torch.manual_seed(0)
    net = build_model(model_config("air32w16_ee")).eval()
    with torch.no_grad():  # statistics away from the identity, as training leaves them
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    ckpt = make_checkpoint(net, kind="student", class_names=list("abcdefghij"),
                           preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
                           train_args={"arch": "air32w16_ee"}, metrics={}, progress={"epoch": 1, "epochs": 1})
    save_checkpoint(ckpt, tmp_path / "air.pt")
    export_checkpoint(tmp_path / "air.pt", tmp_path / "air", parity_batch=4)  # raises unless it answers like torch
    ops = {f: [n.op_type for n in onnx.load(str(tmp_path / "air" / f)).graph.node]
           for f in ("full.onnx", "segment_0.onnx", "segment_1.onnx", "segment_2.onnx")}
    assert ops["full.onnx"].count("BatchNormalization") == 0
    assert [ops[f"segment_{k}.onnx"].count("BatchNormalization") for k in range(3)] == [1, 1, 0]  # the exit heads'
