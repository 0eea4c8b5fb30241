"""Where a video frame's time goes: decode, preprocess and inference per frame, and frames per second, for the
bundled fp32 and int8 models on MJPG videos made from CIFAR-10 test images upscaled to 320x240 and 640x480.

    python scripts/video_bench.py --data ../shared/datasets/cifar10 --out benchmarks/results/video-epyc

Each measurement is one `erde-run --video FILE --json --threads T` process, as a user runs it (its summary
line); rounds interleave the four (size, model) pairs and the median round is reported. Needs erde[video].
Run it on a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import click

from erde.runtime.common.cli import PATH, POSITIVE, command, command_line, console_script, data_option

SIZES = ((320, 240), (640, 480))
MODELS = ("cifar10", "cifar10-int8")


def make_video(files: Sequence[Path], size, path: Path) -> None:
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    for f in files:
        w.write(cv2.resize(cv2.imread(str(f)), size, interpolation=cv2.INTER_CUBIC))
    w.release()


@command("python scripts/video_bench.py")
@data_option(True, "CIFAR-10 image folder")
@click.option("--out", type=PATH, required=True, help="Record folder to write.")
@click.option("--frames", type=POSITIVE, default=1000, help="Frames per video (default 1000).")
@click.option("--rounds", type=POSITIVE, default=3, help="Interleaved rounds (default 3).")
@click.option("--threads", type=POSITIVE, default=1, help="onnxruntime threads (default 1).")
def cli(**kw) -> int:
    """Frames per second of erde-run --video, decode and preprocess and inference apart."""
    return _run(SimpleNamespace(**kw), command_line())


main = console_script(cli)


def _run(args, command: str) -> int:
    from erde.runtime import bundled_model
    from erde.runtime.common import machine
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.common.errors import ErdeError
    from erde.runtime.common.ownership import write_record

    test = image_folder_split(args.data, "test")
    files = test.files[:: max(1, len(test.files) // args.frames)][: args.frames]
    results = {}
    with tempfile.TemporaryDirectory(prefix="erde-video-") as tmp:
        videos = {s: Path(tmp) / f"{s[0]}x{s[1]}.avi" for s in SIZES}
        for s, path in videos.items():
            make_video(files, s, path)
        for _ in range(args.rounds):
            for s, path in videos.items():
                for m in MODELS:
                    cmd = [sys.executable, "-m", "erde.runtime.tools.run_cli", "--model", str(bundled_model(m)), "--video",
                           str(path), "--json", "--every", str(10 ** 9), "--threads", str(args.threads)]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode != 0:
                        raise ErdeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
                    results.setdefault((s, m), []).append(json.loads(r.stdout.splitlines()[-1])["summary"])
    lines = ["# Video frames: where the time goes", "",
             f"`{command}`", "",
             f"Machine: {machine.describe()}; {args.threads} thread(s), batch 1, {len(files)} frames per video "
             "(CIFAR-10 test images upscaled with OpenCV, MJPG), each frame one `erde-run --video` frame; median of "
             f"{args.rounds} interleaved rounds by frames per second. Milliseconds per frame, mean (p95).", "",
             "| video | model | decode | preprocess | inference | frames/s | exits |", "|---|---|---:|---:|---:|---:|---|"]
    for (s, m), runs in results.items():
        d = sorted(runs, key=lambda r: r["fps"])[len(runs) // 2]
        ms = d["ms"]
        cell = lambda k: f"{ms[k]['mean']:.3f} ({ms[k]['p95']:.3f})"  # noqa: E731
        lines.append(f"| {s[0]}x{s[1]} | {m} | {cell('decode')} | {cell('preprocess')} | {cell('inference')} | "
                     f"{d['fps']:.0f} | {' / '.join(f'{100 * x:.0f}%' for x in d['exit_shares'])} |")
    text = "\n".join(lines) + "\n"

    write_record(args.out, {"README.md": text, "runs.json": json.dumps({f"{s[0]}x{s[1]} {m}": r
                                                                         for (s, m), r in results.items()}, indent=1)})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
