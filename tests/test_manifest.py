from __future__ import annotations

import json

import pytest

from erde.runtime.common.errors import ManifestError
from erde.runtime.core.manifest import (
    SCHEMA_VERSION, Calibration, load_manifest, manifest_from_dict, save_manifest,
)
from runtime_fixtures import make_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cal = Calibration("entropy", 0.25, "accuracy-drop", 0.01, 0.9, 12345.0, "calibration.csv")
    return make_model_folder(tmp_path_factory.mktemp("m"), calibration=cal)


def _raw(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_round_trip_equals(folder):
    m = load_manifest(folder)
    again = manifest_from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    assert again.calibration.criterion == "entropy" and again.calibration.threshold == 0.25
    assert again.preprocessing.input_size == (8, 8)
    assert again.num_exits == 3
    assert again.full_macs == again.full.macs > again.segments[0].cumulative_macs


def test_save_then_load_equals(folder, tmp_path):
    m = load_manifest(folder)
    save_manifest(tmp_path, m)
    assert load_manifest(tmp_path) == m
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file


def test_version_mismatch_says_what_to_do(folder):
    d = _raw(folder)
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ManifestError, match=rf"schema_version is {SCHEMA_VERSION + 1}.*re-export"):
        manifest_from_dict(d)
    d["schema_version"] = True  # True == 1 must not pass for version 1
    with pytest.raises(ManifestError, match="schema_version"):
        manifest_from_dict(d)


def test_one_error_lists_every_problem(folder):
    d = _raw(folder)
    del d["model_name"]
    d["class_names"] = ["only-one"]
    d["default_threshold"] = 1.5
    d["segments"][1]["cumulative_macs"] = "many"
    d["preprocessing"]["resize"] = "squash"
    with pytest.raises(ManifestError) as info:
        manifest_from_dict(d)
    msg = str(info.value)
    for part in ("manifest.model_name: missing", "manifest.class_names", "manifest.default_threshold",
                 "manifest.segments[1].cumulative_macs: expected int, got str", "manifest.preprocessing.resize"):
        assert part in msg, part


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.__setitem__("default_threshold", float("nan")), "default_threshold"),
    (lambda d: d["calibration"].__setitem__("threshold", -0.1), "calibration.threshold"),
    (lambda d: d["calibration"].__setitem__("confidence", 1.0), "calibration.confidence"),
    (lambda d: d["full"].__setitem__("file", "../full.onnx"), "manifest.full.file"),
    (lambda d: d["segments"][0].__setitem__("file", "sub/seg.onnx"), "segments[0].file"),
    (lambda d: d["segments"][1].__setitem__("file", "segment0.onnx"), "more than one graph"),
    (lambda d: d["segments"][0].__setitem__("head_macs", -1), "head_macs: must not be negative"),
    (lambda d: d["segments"][2].__setitem__("feature_output", "features2"), "feature_output"),
    (lambda d: d["segments"][0].__setitem__("cumulative_macs", 10 ** 12), "must not decrease"),
    (lambda d: d["preprocessing"].__setitem__("std", [0.2, 0.0, 0.2]), "preprocessing.std"),
    (lambda d: d.__setitem__("default_threshold", "0.9"), "expected int or float or list, got str"),
    (lambda d: d.__setitem__("default_threshold", [0.9]), "default_threshold: 1 thresholds for 2 early exits"),
    (lambda d: d.__setitem__("default_threshold", [0.9, 1.5]), "[0.9, 1.5] is not a number in [0, 1] or a list"),
])
def test_invalid_fields(folder, edit, expected):
    d = _raw(folder)
    edit(d)
    with pytest.raises(ManifestError, match="invalid manifest") as info:
        manifest_from_dict(d)
    assert expected in str(info.value)


def test_a_threshold_per_early_exit_reads_back(folder):
    d = _raw(folder)
    d["default_threshold"] = [0.7, 0.5]
    m = manifest_from_dict(d)
    assert m.default_threshold == (0.7, 0.5)
    assert manifest_from_dict(json.loads(json.dumps(m.to_dict()))).default_threshold == (0.7, 0.5)


def test_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{\n  "schema_version": 1,\n  oops\n}')
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON \(line 3"):
        load_manifest(tmp_path)


def test_not_utf8_and_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError, match="not a UTF-8 text file"):
        load_manifest(tmp_path)


def test_load_reports_path(folder, tmp_path):
    d = _raw(folder)
    d["segments"] = []
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"manifest\.json: invalid manifest: manifest.segments: expected at least one"):
        load_manifest(tmp_path)


def test_save_refuses_invalid(folder, tmp_path):
    import dataclasses
    m = dataclasses.replace(load_manifest(folder), default_criterion="median")
    with pytest.raises(ManifestError, match="default_criterion"):
        save_manifest(tmp_path, m)
    assert not (tmp_path / "manifest.json").exists()
