"""scripts/int8_exit_costs.py: each segment split into trunk and head, on a tiny model folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from runtime_fixtures import make_model_folder, make_train_folder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "int8_exit_costs.py"


def test_the_decomposition_adds_up(tmp_path):
    model = make_model_folder(tmp_path)
    data = make_train_folder(tmp_path / "data", 12, 8)
    shutil.move(str(data / "train"), str(data / "test"))
    out = tmp_path / "record"
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--data", str(data), "--calls", "50",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    ms = res["graph_ms"]
    assert set(ms) == {"segment 1", "trunk 1", "head 1", "segment 2", "trunk 2", "head 2", "segment 3", "full.onnx"}
    assert abs(sum(res["exit_shares"]) - 1) < 1e-9 and res["images"] == 12
    assert res["expected_free_heads_ms"] < res["expected_graph_ms"]  # a head costs something
    assert 0 < res["bound_no_overhead_ms"] <= ms["full.onnx"]
    assert 0 < res["chain_mean_ms"] and 0 < res["engine_mean_ms"] and 0 < res["full_mean_ms"]
    assert "| head 1 |" in (out / "README.md").read_text()
