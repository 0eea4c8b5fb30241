"""erde-verify on emulated 64-bit ARM: scripts/emulated_verify.sh runs both bundled model folders under qemu-aarch64."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The user's ERDE_CACHE, read before conftest's per-test isolation replaces it: the script keeps its downloads
# (arm64 Python, aarch64 wheels) there so that later runs are quick; its emulated erde-verify uses a fresh cache.
USER_CACHE = os.environ.get("ERDE_CACHE") or str(Path.home() / ".cache" / "erde")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None,
                    reason="qemu-aarch64 is not on PATH (apt-get install qemu-user): no 64-bit ARM emulation here")
def test_emulated_verify_passes_on_aarch64():
    env = dict(os.environ, ERDE_CACHE=USER_CACHE, PYTHON=sys.executable)  # PYTHON: a Python with pip
    r = subprocess.run(["bash", str(ROOT / "scripts" / "emulated_verify.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for model in ("cifar10", "cifar10-int8"):
        assert any(line.startswith(f"{model}: passed ") for line in lines), r.stdout
    assert lines[-1].startswith("emulated aarch64: both model folders passed"), r.stdout
