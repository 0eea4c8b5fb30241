"""runtime/core/graphs.py: a model folder's graph files are read only when they match the manifest."""

import pytest

from erde.runtime.common.errors import ErdeError
from erde.runtime.core.graphs import Prediction, _read_checked


def test_read_checked(tmp_path):
    import hashlib

    (tmp_path / "g.onnx").write_bytes(b"graph")
    sha = hashlib.sha256(b"graph").hexdigest()
    assert _read_checked(tmp_path, "g.onnx", sha) == b"graph"
    with pytest.raises(ErdeError, match="sha256 does not match"):
        _read_checked(tmp_path, "g.onnx", "0" * 64)
    with pytest.raises(ErdeError, match="missing"):
        _read_checked(tmp_path, "gone.onnx", sha)


def test_prediction_to_dict_is_plain_json():
    import json

    p = Prediction(1, "cat", 0.9, 0, 2, 10, 0.5, 1.0, (1.0,))
    d = p.to_dict()
    assert d["segment_latency_ms"] == [1.0] and json.loads(json.dumps(d))["class_name"] == "cat"


def test_the_hot_paths_prediction_is_the_same_frozen_object():
    import dataclasses

    from erde.runtime.core.graphs import new_prediction

    args = (1, "cat", 0.9, 0, 2, 10, 0.5, 1.0, (1.0,))
    fast, slow = new_prediction(*args), Prediction(*args)
    assert fast == slow and repr(fast) == repr(slow) and fast.to_dict() == slow.to_dict()
    assert [f.name for f in dataclasses.fields(Prediction)] == list(fast.__dict__)  # every field, in order
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.confidence = 1.0
