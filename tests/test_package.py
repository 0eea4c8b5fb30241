"""The installed package as a user gets it: the public API from ``import erde``, the bundled models inside it,
no torch or onnx needed, and no shadowing by a clone's folders in the current directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime_fixtures import torch_blocked_env

ROOT = Path(__file__).resolve().parents[1]

USE = """
import erde, erde.runtime
from erde import Engine, Prediction, ErdeError, MismatchError, bundled_model, bundled_models, verify
assert erde.runtime.__file__.startswith(sys.argv[1]), erde.runtime.__file__  # the installed copy, not ./erde
assert bundled_models() == ["cifar10", "cifar10-int8"], bundled_models()
engine = Engine.load(bundled_model("cifar10-int8"), threads=1)
assert verify(engine).passed
p = engine.predict([sys.argv[2]])[0]
assert isinstance(p, Prediction) and p.class_name == "ship", p
try:
    bundled_model("imagenet")
except ErdeError as e:
    assert "bundled: cifar10, cifar10-int8" in str(e)
assert "torch" not in sys.modules and "onnx" not in sys.modules
print(erde.__version__)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --target`` of this checkout: the files a wheel would install, without the dependencies."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return target


def test_the_public_api_of_an_install_beside_a_clone(installed, tmp_path):
    clone = tmp_path / "erde"  # a clone named after the project, in the current directory, with its own runtime/
    (clone / "runtime").mkdir(parents=True)
    (clone / "runtime" / "__init__.py").write_text("raise ImportError('the clone shadowed the installed copy')\n")
    env = torch_blocked_env(tmp_path)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{installed}"
    env["ERDE_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-c", "import sys\n" + USE, str(installed), str(ROOT / "runtime/samples/ship.png")],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != "unknown"


def test_the_install_holds_the_bundled_models_and_samples(installed):
    for name in ("cifar10", "cifar10-int8"):
        folder = installed / "erde" / "runtime" / "models" / name
        assert {"manifest.json", "selftest.npz", ".erde-owner.json", "full.onnx"} <= {p.name for p in folder.iterdir()}
    assert (installed / "erde" / "runtime" / "samples" / "ship.png").is_file()
    assert (installed / "erde" / "__init__.py").is_file()
