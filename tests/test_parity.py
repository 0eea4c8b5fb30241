import shutil

import torch

from erde.export.parity import check_parity
from erde.training.checkpoint import load_model


def test_parity_passes_on_a_good_export(exported, tiny_student):
    out, _ = exported
    model, _ = load_model(tiny_student)
    x = torch.randn(16, 3, 32, 32)
    files = [f"segment_{k}.onnx" for k in range(4)]
    assert check_parity(model, out, files, "full.onnx", x) == []


def test_parity_reports_every_mismatch(exported, tiny_student, tmp_path):
    out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    model, _ = load_model(tiny_student)
    with torch.no_grad():  # PyTorch now differs from the exported graphs of the last exits
        model.final.fc.weight.mul_(-1.0)
        model.heads[2].fc.weight.mul_(-1.0)
    failures = check_parity(model, broken, [f"segment_{k}.onnx" for k in range(4)], "full.onnx",
                            torch.randn(16, 3, 32, 32))
    text = " ".join(failures)
    assert "segment_2.onnx" in text and "segment_3.onnx" in text and "full.onnx" in text
    assert "segment_0.onnx" not in text
