"""The runtime's layout (runtime/README.md): what each part may import.

- ``core``: the engine a board needs; numpy, onnxruntime and Pillow only (OpenCV in ``video.py``, the
  ``erde[video]`` extra), and the common layer.
- ``common``: what every part of erde shares (errors, files, ownership, the CLI contract); it imports no other part.
- ``tools``: the commands and offline tools around the engine; they may also use click.
No file under runtime/ imports torch or onnx, and all of it parses as Python 3.9 (the oldest a board may have).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
PARTS = ("core", "common", "tools")
THIRD_PARTY = {"numpy", "onnxruntime", "PIL"}
ALLOWED = {"core": THIRD_PARTY, "common": THIRD_PARTY | {"click"}, "tools": THIRD_PARTY | {"click"}}
OPTIONAL = {"core/video.py": {"cv2"}}  # the erde[video] extra, imported only when a video or camera is read
MAY_USE = {"core": {"core", "common"}, "common": {"common"}, "tools": {"core", "common", "tools"}}


def _imports(path: Path):
    """(top-level packages imported, runtime parts imported relatively) of one file."""
    packages, parts = set(), set()
    here = path.parent.name
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            packages.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            packages.add(node.module.split(".")[0])
            if node.module.startswith("erde.runtime."):
                parts.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                parts.add(here)
            elif node.module:
                parts.add(node.module.split(".")[0])
    return packages, parts


def _files():
    return sorted(p for part in PARTS for p in (RUNTIME / part).glob("*.py"))


def test_every_runtime_module_is_in_a_part():
    assert [p.name for p in RUNTIME.glob("*.py")] == ["__init__.py"]
    assert len(_files()) > 20


@pytest.mark.parametrize("path", _files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_part_imports_only_what_it_may(path):
    part = path.parent.name
    packages, parts = _imports(path)
    stdlib = getattr(sys, "stdlib_module_names", None)  # Python 3.10+
    for name in packages - OPTIONAL.get(f"{part}/{path.name}", set()) - {"erde"}:
        assert name in ALLOWED[part] or stdlib is None or name in stdlib, f"{part}/{path.name} imports {name}"
        assert name not in ("torch", "onnx"), path.name
    assert parts <= MAY_USE[part] | {""}, f"{part}/{path.name} imports from {parts - MAY_USE[part]}"


def test_the_layering_check_sees_a_violation(tmp_path):
    bad = tmp_path / "core" / "x.py"
    bad.parent.mkdir()
    bad.write_text("from ..tools.run_cli import main\nimport torch\n")
    packages, parts = _imports(bad)
    assert "torch" in packages and "tools" in parts


def test_runtime_parses_as_python_39():
    for path in [RUNTIME / "__init__.py", *_files()]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
