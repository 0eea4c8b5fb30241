"""runtime/core/sessions.py: the thread-pool policy (the shared global pool is tested in a fresh process in
test_engine.py; in this pytest process every session has its own pool, see conftest.py)."""

import pytest

from erde.runtime.common.errors import ErdeError
from erde.runtime.core.sessions import _one_line, make_session, session_options
from runtime_fixtures import make_model_folder


def test_per_session_pools_do_not_spin():
    so = session_options(threads=1)
    assert so.use_per_session_threads and so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_bad_threads_providers_and_graphs_are_one_line(tmp_path):
    with pytest.raises(ErdeError, match="positive integer"):
        session_options(threads=0)
    folder = make_model_folder(tmp_path)
    with pytest.raises(ErdeError, match="not available"):
        make_session(folder / "segment0.onnx", providers=["NoSuchProvider"])
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ErdeError, match="cannot load this graph") as e:
        make_session(tmp_path / "bad.onnx")
    assert "\n" not in str(e.value)
    assert _one_line(ValueError("a\n  b")) == "a b"
