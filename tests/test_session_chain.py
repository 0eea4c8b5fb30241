import json
import subprocess
import sys
from pathlib import Path

from runtime_fixtures import make_model_folder

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_one_measurement_in_a_fresh_process(tmp_path):
    model = make_model_folder(tmp_path)
    out = subprocess.run([sys.executable, str(SCRIPTS / "session_chain.py"), "--model", str(model), "--repeats", "5",
                          "--one", "no-spin", "1"], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["policy"] == "no-spin" and r["threads"] == 1
    assert r["full_us"] > 0 and r["chain_us"] > 0 and abs(r["ratio"] - r["chain_us"] / r["full_us"]) < 1e-9


def test_bad_input_is_one_error_line(tmp_path, capsys):
    from session_chain import main

    for argv, start in ((["--model", str(tmp_path / "nope")], "Error: "), (["--model", str(tmp_path), "--threads", "0"],
                                                                          "Error: --threads")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and len(err.splitlines()) == 1, err
