"""runtime/core/selftest.py and erde-verify: a model folder checks, on the machine at hand, the answers it was built with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from erde.runtime.core.engine import Engine
from erde.runtime.core.manifest import load_manifest, save_manifest
from erde.runtime.common.ownership import sha256_file
from erde.runtime.core.selftest import SELFTEST_NAME, MismatchError, SelfTestError, load_golden, require_verified, verify
from runtime_fixtures import console_command, make_model_folder

MODELS = Path(__file__).resolve().parents[1] / "runtime" / "models"


def verify_cli(model, *args, prefix=(), timeout=120):
    """erde-verify; under ``prefix`` (an emulator) the Python binary itself, since qemu-user runs ELF files."""
    cmd = [sys.executable, "-m", "erde.runtime.tools.verify_cli"] if prefix else console_command("erde-verify",
                                                                                           "erde.runtime.tools.verify_cli")
    return subprocess.run(list(prefix) + cmd + ["--model", str(model)] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


def _alter_weights(src: Path, dst: Path, scale: float = 1.5) -> Path:
    """A copy of ``src`` whose first segment's weights were changed, with the manifest's hashes made to match."""
    shutil.copytree(src, dst)
    m = load_manifest(dst)
    seg = m.segments[0]
    proto = onnx.load(str(dst / seg.file))
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((w * scale).astype(w.dtype), init.name))
    onnx.save(proto, str(dst / seg.file))
    import dataclasses

    segments = [dataclasses.replace(seg, sha256=sha256_file(dst / seg.file))] + list(m.segments[1:])
    save_manifest(dst, dataclasses.replace(m, segments=segments))
    return dst


def test_a_folder_passes_its_own_self_test(tmp_path):
    folder = make_model_folder(tmp_path)
    g = load_golden(folder)
    assert g.images.dtype == np.uint8 and g.probs.shape[:2] == (3, len(g.images)) and "cores" in g.machine
    v = verify(Engine.load(folder, threads=1))
    assert v.passed and [c.value for c in v.checks][:2] == [1.0, 1.0]


def test_altered_weights_fail_with_one_line_and_exit_3(tmp_path):
    bad = _alter_weights(make_model_folder(tmp_path), tmp_path / "altered", scale=3.0)
    r = verify_cli(bad, "--threads", "1")
    assert r.returncode == 3, r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: ") and "differ" in r.stderr
    assert "✗" in r.stdout


def test_the_bundles_pass_here():
    for name in ("cifar10", "cifar10-int8"):
        r = verify_cli(MODELS / name, "--threads", "1", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        d = json.loads(r.stdout)
        assert d["passed"] and d["images"] >= 16 and all(c["ok"] for c in d["checks"])


def test_erde_run_checks_once_per_machine_and_refuses_a_failing_folder(tmp_path, monkeypatch, capsys):
    from erde.runtime.core import selftest
    from erde.runtime.tools.run_cli import main as run_main

    monkeypatch.setenv("ERDE_CACHE", str(tmp_path / "cache"))
    folder = make_model_folder(tmp_path)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    assert run_main(["--model", str(folder), "--image", str(img), "--threads", "1"]) == 0
    assert len(list((tmp_path / "cache" / "verified").iterdir())) == 1
    monkeypatch.setattr(selftest, "verify", lambda *a, **k: pytest.fail("verified twice on one machine"))
    assert run_main(["--model", str(folder), "--image", str(img), "--threads", "1"]) == 0
    monkeypatch.undo()
    monkeypatch.setenv("ERDE_CACHE", str(tmp_path / "cache"))
    bad = _alter_weights(folder, tmp_path / "altered", scale=3.0)
    capsys.readouterr()
    assert run_main(["--model", str(bad), "--image", str(img), "--threads", "1"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "self-test" in err and "--no-verify" in err
    assert run_main(["--model", str(bad), "--image", str(img), "--threads", "1"]) == 3  # the cached verdict
    capsys.readouterr()
    assert run_main(["--model", str(bad), "--image", str(img), "--threads", "1", "--no-verify"]) == 0


def test_a_folder_without_a_self_test_is_refused_unless_asked(tmp_path, capsys):
    from erde.runtime.tools.run_cli import main as run_main

    folder = make_model_folder(tmp_path, with_selftest=False)
    img = Path(__file__).resolve().parents[1] / "runtime" / "samples" / "ship.png"
    assert run_main(["--model", str(folder), "--image", str(img)]) == 2
    assert "no self-test" in capsys.readouterr().err
    assert run_main(["--model", str(folder), "--image", str(img), "--no-verify"]) == 0
    with pytest.raises(SelfTestError):
        require_verified(Engine.load(folder), None)


# ---- the CPUs the folder lands on: x86 without VNNI, emulated -------------------------------------

QEMU = shutil.which("qemu-x86_64")
HASWELL = (QEMU, "-cpu", "Haswell-noTSX")  # AVX2, no AVX-512, no VNNI: the CPU where full-range int8 saturates


def _full_range_int8(tmp_path: Path) -> Path:
    """The int8 bundle with graphs quantized as the first int8 bundle was (full int8 weight range), keeping the
    bundle's self-test: right on a VNNI CPU, wrong on one without."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from erde.export.quantize import _segment_inputs
    from erde.runtime.core.preprocess import preprocess

    dst = tmp_path / "full-range-int8"
    shutil.copytree(MODELS / "cifar10-int8", dst)
    fp32 = Engine.load(MODELS / "cifar10", threads=1)
    x = preprocess(list(load_golden(MODELS / "cifar10").images), fp32.manifest.preprocessing)
    m = load_manifest(dst)
    import dataclasses

    segments = []
    for seg, feed in zip(m.segments, _segment_inputs(fp32, x)):
        class Reader(CalibrationDataReader):
            def __init__(self, name=seg.inputs[0].name, feed=feed):
                self.it = iter([{name: feed}])

            def get_next(self):
                return next(self.it, None)

        src = tmp_path / f"src-{seg.file}"
        shutil.copyfile(MODELS / "cifar10" / seg.file, src)
        quantize_static(str(src), str(dst / seg.file), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "GlobalAveragePool",
                                              "AveragePool"])
        segments.append(dataclasses.replace(seg, sha256=sha256_file(dst / seg.file)))
    save_manifest(dst, dataclasses.replace(m, segments=segments, full=None))
    (dst / "full.onnx").unlink()
    return dst


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install qemu-user; .ci/run does)")
def test_on_emulated_x86_without_vnni_the_int8_bundle_passes_and_full_range_int8_fails(tmp_path):
    r = verify_cli(MODELS / "cifar10-int8", "--threads", "1", prefix=HASWELL, timeout=300)  # fp32: on emulated ARM
    assert r.returncode == 0, r.stdout + r.stderr
    bad = _full_range_int8(tmp_path)
    assert verify_cli(bad, "--threads", "1").returncode == (0 if "avx512_vnni" in open("/proc/cpuinfo").read() else 3)
    r = verify_cli(bad, "--threads", "1", prefix=HASWELL, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if "TCG doesn't support" not in ln]
    assert len(err) == 1 and err[0].startswith("Error: ") and "class agreement" in err[0]
