"""Shared fixtures: a tiny image-folder dataset and a tiny teacher, made once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The maintenance scripts (study, bundle builder, ...) live in scripts/, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from training_fixtures import make_image_folder, train_cli


@pytest.fixture(autouse=True, scope="session")
def per_session_pools():
    """In-process tests use per-session pools: onnxruntime's global pool, once made, would force every later
    session of this pytest process onto it. The default policy is tested in a subprocess (test_engine.py)."""
    from erde.runtime.core import sessions
    old, sessions.SHARED_POOL_DEFAULT = sessions.SHARED_POOL_DEFAULT, False
    yield
    sessions.SHARED_POOL_DEFAULT = old


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERDE_CACHE", str(tmp_path_factory.getbasetemp() / "erde-cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "colours")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    r = train_cli(["teacher", "--arch", "tiny_ee", "--data", tiny_data, "--out", out, "--epochs", "2",
                   "--batch-size", "16", "--val-fraction", "0.25", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def exported(tiny_student, tmp_path_factory):
    """The tiny student exported once: (model folder, manifest)."""
    from erde.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "model"
    return out, export_checkpoint(tiny_student, out, single_graph=True)  # with early_exit.onnx, to test it too


@pytest.fixture(scope="session")
def tiny_student(tiny_data, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "student.pt"
    r = train_cli(["student", "--teacher", tiny_teacher, "--arch", "tiny_ee", "--loss", "erde", "--data", tiny_data,
                   "--out", out, "--epochs", "2", "--batch-size", "16", "--val-fraction", "0.25", "--quiet"])
    assert r.exit_code == 0, r.output
    return out
