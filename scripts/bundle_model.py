"""Rebuild the model bundled with the runtime (``runtime/models/cifar10``) from a committed student.

    python scripts/bundle_model.py --data ../shared/datasets/cifar10 [--checkpoint PT | --source MODEL_DIR]

Exports ``--checkpoint`` (default: the committed ``air32w16_ee`` ERDE student in
``benchmarks/results/bundle-student``, study v3's recipe for seed 1 trained 40 epochs) into a temporary folder, or takes an exported model folder
(``--source``), measures its latency profile on this machine at
``--profile-threads`` (``erde-profile``, one fresh process per thread count: run it on a quiet
machine), calibrates its threshold on the validation split (``erde-calibrate``: the lowest expected
latency at ``--calibrate-threads`` within ``--max-drop`` points of the final exit, at ``--confidence``), records its test
accuracy, MACs and expected latency at that threshold in the manifest, and replaces the bundled
folder atomically. ``--int8`` rebuilds the int8 copy the same way from the bundled fp32 folder
(``erde-quantize``: reduced-range weights, right on every CPU). Also draws the sample images in
``runtime/samples`` (our own drawings, free to redistribute), so ``erde-run --image`` has
something to classify right after ``pip install``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

from erde.runtime.tools.calibrate import DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP_POINTS, calibrate
import click

from erde.runtime.common.cli import FINITE, PATH, POSITIVE, command, console_script, data_option, exclusive
from erde.runtime.core.criteria import show, sweep
from erde.runtime.common.errors import ErdeError
from erde.runtime.common.ownership import MODEL_TOOLS, build_folder
from erde.runtime.core.manifest import load_manifest, save_manifest

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "benchmarks" / "results" / "bundle-student" / "student_w16_erde40_seed1.pt"
BUNDLED = REPO / "runtime" / "models" / "cifar10"
BUNDLED_INT8 = REPO / "runtime" / "models" / "cifar10-int8"
SAMPLES = REPO / "runtime" / "samples"


def draw_samples(folder: Path) -> None:
    """Two simple drawings: an airplane in the sky and a ship on the sea (96x96 PNG)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    sky = Image.new("RGB", (96, 96), (120, 170, 225))
    d = ImageDraw.Draw(sky)
    d.polygon([(10, 50), (80, 44), (88, 48), (80, 52)], fill=(230, 230, 235))  # fuselage
    d.polygon([(38, 48), (56, 20), (62, 22), (52, 48)], fill=(200, 200, 210))  # upper wing
    d.polygon([(38, 50), (56, 78), (62, 76), (52, 50)], fill=(200, 200, 210))  # lower wing
    d.polygon([(12, 49), (8, 36), (16, 36), (22, 48)], fill=(200, 200, 210))  # tail
    sky.save(folder / "airplane.png")
    sea = Image.new("RGB", (96, 96), (150, 190, 230))
    d = ImageDraw.Draw(sea)
    d.rectangle([0, 58, 96, 96], fill=(30, 70, 130))
    d.polygon([(14, 52), (84, 52), (74, 66), (22, 66)], fill=(90, 60, 50))  # hull
    d.rectangle([36, 38, 62, 52], fill=(235, 235, 235))  # cabin
    d.rectangle([46, 26, 52, 38], fill=(200, 60, 50))  # funnel
    sea.save(folder / "ship.png")


def test_split_metrics(model_dir: Path, data: Path, criterion: str, threshold: float, threads: int) -> dict:
    """Test-split accuracy per exit and at the threshold, its MACs and (with a profile) its expected latency."""
    from erde.runtime.tools.calibrate import validation_probs
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.core.engine import Engine
    from erde.runtime.tools.profile import ProfileError, find_profile

    test = image_folder_split(data, "test")
    engine = Engine.load(model_dir, threads=threads)
    m = engine.manifest
    if tuple(test.class_names) != tuple(m.class_names):
        raise ErdeError(f"{data}/test: classes {list(test.class_names)} differ from the model's")
    probs = validation_probs(engine, test.files)
    labels = test.labels
    (p,) = sweep(probs, labels, [s.cumulative_macs for s in m.segments], m.full_macs, criterion, [threshold])
    out = {f"test_accuracy_exit_{k + 1}": float((e.argmax(1) == labels).mean()) for k, e in enumerate(probs)}
    out.update({"test_accuracy_calibrated": p.accuracy, "test_mean_macs_calibrated": p.mean_macs,
                "test_macs_fraction_calibrated": p.macs_fraction, "test_images": float(len(labels))})
    try:
        prof = find_profile(model_dir, m, threads)
    except ProfileError:
        return out
    out.update({"test_expected_ms_calibrated": prof.expected_ms(p.exit_shares), "test_full_onnx_ms": prof.full_ms})
    return out


def measure_profiles(folder: Path, threads: Sequence[int]) -> None:
    """erde-profile in a fresh process per thread count (one process holds one onnxruntime pool size)."""
    import subprocess

    for t in threads:
        r = subprocess.run([sys.executable, "-m", "erde.runtime.tools.profile_cli", "--model", str(folder), "--threads", str(t)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ErdeError(f"erde-profile --model {folder} --threads {t} failed: {r.stderr.strip()}")
        print(r.stdout.strip())


@command("python scripts/bundle_model.py")
@data_option(False, "CIFAR-10 image folder")
@click.option("--checkpoint", type=PATH, default=None,
              help="A student checkpoint to export and bundle (default: the air32w16_ee ERDE student).")
@click.option("--source", type=PATH, default=None, help="An exported model folder to bundle instead.")
@click.option("--max-drop", type=FINITE, default=DEFAULT_MAX_DROP_POINTS, help="Accuracy drop allowed, in points.")
@click.option("--confidence", type=FINITE, default=DEFAULT_CONFIDENCE,
              help="Level of the upper bound on the drop (erde-calibrate --confidence).")
@click.option("--profile-threads", default="1,2", help="Thread counts to measure latency profiles at.")
@click.option("--calibrate-threads", type=POSITIVE, default=1,
              help="The thread count whose profile calibration minimises (default 1).")
@click.option("--unsure-coverage", type=FINITE, default=0.9,
              help="The \"unsure\" floor: the share of validation images still answered (default 0.9).")
@click.option("--int8", is_flag=True,
              help="Rebuild the int8 copy (runtime/models/cifar10-int8) from the bundled fp32 model instead: "
                   "erde-quantize, then profiles and calibration as for the fp32 one.")
def cli(**kw) -> int:
    """Export, profile, calibrate and install the bundled CIFAR-10 student (or its int8 copy)."""
    exclusive(checkpoint=kw["checkpoint"], source=kw["source"])
    args = SimpleNamespace(**kw)
    args.checkpoint = args.checkpoint or STUDENT
    return bundle(args)


main = console_script(cli)


def bundle(args) -> int:
    """Export (or take) a student, then profile, calibrate and install it as the bundled model."""
    try:
        profile_threads = [int(t) for t in args.profile_threads.split(",")]
    except ValueError:
        raise ErdeError(f"--profile-threads {args.profile_threads!r}: expected thread counts, e.g. 1,2") from None
    if args.data is None:
        raise ErdeError("pass --data PATH (the CIFAR-10 image folder) or set ERDE_DATA")
    if args.int8:
        with tempfile.TemporaryDirectory(prefix="erde-bundle-") as tmp:
            source = Path(tmp) / "int8"
            quantize_bundle(BUNDLED, source, args.data)
            return install(args, source, profile_threads, BUNDLED_INT8)
    if args.source is not None:
        return install(args, args.source, profile_threads)
    if not args.checkpoint.is_file():
        raise ErdeError(f"{args.checkpoint}: no such checkpoint; pass --checkpoint PT or --source MODEL_DIR")
    with tempfile.TemporaryDirectory(prefix="erde-bundle-") as tmp:
        source = Path(tmp) / "student_onnx"
        export_student(args.checkpoint, source, args.data)
        return install(args, source, profile_threads)


def export_student(checkpoint: Path, out: Path, data: Optional[Path] = None) -> None:
    """erde-export in a fresh process: its parity check would otherwise fix this process's onnxruntime
    thread pool at the default size, and calibration at ``--calibrate-threads`` could not run here."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "erde.export.cli", str(checkpoint), "--out", str(out)]
                       + (["--data", str(data)] if data is not None else []),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ErdeError(f"erde-export {checkpoint} failed: {r.stderr.strip() or r.stdout.strip()}")
    print(r.stdout.strip())


def quantize_bundle(fp32: Path, out: Path, data: Path) -> None:
    """erde-quantize in a fresh process (its calibrator's sessions cannot join this process's shared pool)."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "erde.export.quantize", "--model", str(fp32), "--data", str(data), "--out", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ErdeError(f"erde-quantize --model {fp32} failed: {r.stderr.strip() or r.stdout.strip()}")
    print(r.stdout.strip())


def install(args, source: Path, profile_threads: Sequence[int], target: Path = BUNDLED) -> int:
    """Profile and calibrate the model folder ``source``, add its test metrics, replace the bundled ``target``."""
    if not (source / "manifest.json").exists():
        raise ErdeError(f"{source}: no exported model folder; export a student (erde-export) or run the study "
                        "first (python scripts/cifar10_study.py --data PATH)")
    draw_samples(SAMPLES)
    target.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path):
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        measure_profiles(tmp, profile_threads)
        result = calibrate(tmp, args.data, criterion="all", mode="accuracy-drop", target=args.max_drop,
                           threads=args.calibrate_threads, confidence=args.confidence,
                           unsure=("coverage", args.unsure_coverage))
        if not result.choice.met:
            raise ErdeError(f"no threshold meets a {args.max_drop} point drop on the validation split")
        m = load_manifest(tmp)
        cal = m.calibration
        metrics = dict(m.metrics)
        metrics.update(test_split_metrics(tmp, Path(args.data), cal.criterion, cal.threshold, args.calibrate_threads))
        save_manifest(tmp, replace(m, metrics=metrics, default_criterion=cal.criterion,
                                   default_threshold=cal.threshold))
        return cal, metrics

    cal, metrics = build_folder(target, True, "erde-export", MODEL_TOOLS, build, protect=[source])
    print(f"bundled {target}: {cal.criterion} threshold {show(cal.threshold)}, validation accuracy "
          f"{cal.val_accuracy * 100:.2f}%, test accuracy {metrics['test_accuracy_calibrated'] * 100:.2f}% at "
          f"{metrics['test_macs_fraction_calibrated'] * 100:.0f}% of the full MACs"
          + (f", expected {metrics['test_expected_ms_calibrated']:.3f} ms against {metrics['test_full_onnx_ms']:.3f} ms "
             "for full.onnx" if "test_expected_ms_calibrated" in metrics else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
