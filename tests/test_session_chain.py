import json
import subprocess
import sys

from runtime_fixtures import make_model_folder


def test_one_measurement_in_a_fresh_process(tmp_path):
    model = make_model_folder(tmp_path)
    out = subprocess.run([sys.executable, "-m", "erde.benchmarks.session_chain", str(model), "--repeats", "5",
                          "--one", "no-spin", "1"], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["policy"] == "no-spin" and r["threads"] == 1
    assert r["full_us"] > 0 and r["chain_us"] > 0 and abs(r["ratio"] - r["chain_us"] / r["full_us"]) < 1e-9
