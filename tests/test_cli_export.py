"""erde-export as a user runs it: one line per problem, nothing left behind."""

import subprocess
import sys

import torch
from click.testing import CliRunner

from erde.export.cli import cli as main


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(r):
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_default_out_folder_needs_no_flags(tiny_student, tmp_path):
    ckpt = tmp_path / "student.pt"
    ckpt.write_bytes(tiny_student.read_bytes())
    r = _run([ckpt])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "student_onnx" / "manifest.json").exists()
    assert "✓ full.onnx: max |probability difference|" in r.output and "✗" not in r.output
    assert "--force" in _error_line(_run([ckpt]))  # a second export does not clobber the first
    assert _run([ckpt, "--force"]).exit_code == 0


def test_bad_inputs(tiny_student, tmp_path):
    assert "no such" in _error_line(_run([tmp_path / "missing.pt", "--out", tmp_path / "a"]))
    (tmp_path / "text.pt").write_text("hello")
    assert "not a readable checkpoint" in _error_line(_run([tmp_path / "text.pt", "--out", tmp_path / "a"]))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert "not an ERDE checkpoint" in _error_line(_run([tmp_path / "foreign.pt", "--out", tmp_path / "a"]))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert "refused" in _error_line(_run([tmp_path / "evil.pt", "--out", tmp_path / "a"]))
    ckpt = torch.load(tiny_student, weights_only=True)
    ckpt["version"] = 7
    torch.save(ckpt, tmp_path / "v7.pt")
    assert "version 7" in _error_line(_run([tmp_path / "v7.pt", "--out", tmp_path / "a"]))
    (tmp_path / "blocker").write_text("a file, not a folder")
    _error_line(_run([tiny_student, "--out", tmp_path / "blocker" / "m"]))
    assert not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_real_command_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "erde.export.cli", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr
