import shutil

import torch

from erde.export.parity import check_parity
from erde.training.checkpoint import load_model


def test_parity_passes_on_a_good_export(exported, tiny_student):
    out, _ = exported
    model, _ = load_model(tiny_student)
    x = torch.randn(16, 3, 32, 32)
    lines = []
    assert check_parity(model, out, x, lines.append) == []
    assert len(lines) == 9 and all(ln.startswith("✓ ") for ln in lines)  # 4 segments, full, early_exit, 3 rules


def test_parity_reports_every_mismatch(exported, tiny_student, tmp_path):
    out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    model, _ = load_model(tiny_student)
    with torch.no_grad():  # PyTorch now differs from the exported graphs of the last exits
        model.final.fc.weight.mul_(-1.0)
        model.heads[2].fc.weight.mul_(-1.0)
    failures = check_parity(model, broken, torch.randn(16, 3, 32, 32))
    text = " ".join(failures)
    assert "segment_2.onnx" in text and "segment_3.onnx" in text and "full.onnx" in text
    assert "segment_0.onnx" not in text


def test_export_after_engine_load_in_one_process(tiny_student, tmp_path):
    """A notebook: load a model folder, then export another checkpoint in the same process (shared pool)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        from erde.runtime.tools.run_cli import BUNDLED_MODEL
        from erde.runtime.core.engine import Engine
        from erde.export.exporter import export_checkpoint
        Engine.load(BUNDLED_MODEL, threads=1)  # the process's global pool now exists
        lines = []
        export_checkpoint({str(tiny_student)!r}, {str(tmp_path / 'b')!r}, report=lines.append, single_graph=True)
        print(len(lines), all(ln.startswith("✓") for ln in lines[:-1]), lines[-1].split(":")[0])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["10", "True", "self-test"]
