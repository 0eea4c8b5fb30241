"""runtime/core/stream.py and erde-run --video / --camera / --image -: frames through the engine at batch 1."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from erde.runtime.core.engine import Engine
from runtime_fixtures import console_command

cv2 = pytest.importorskip("cv2", reason="OpenCV (erde[video]) is not installed")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "runtime" / "models" / "cifar10"


def _real_images(n: int = 24):
    """CIFAR-10 test images when ERDE_DATA points at them, else the sample drawings: (BGR images, classes)."""
    data = os.environ.get("ERDE_DATA")
    paths = sorted(Path(data, "test").glob("*/*.jpg"))[::400][:n] if data else []
    paths = paths or sorted((ROOT / "runtime" / "samples").glob("*.png"))
    return [cv2.imread(str(p)) for p in paths], [p.parent.name for p in paths]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 640x480 MJPG video made from real images upscaled, each image one frame."""
    images, _ = _real_images()
    path = tmp_path_factory.mktemp("v") / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for img in images:
        w.write(cv2.resize(img, (640, 480), interpolation=cv2.INTER_CUBIC))
    w.release()
    return path, len(images)


def erde_run(*args, stdin=None, timeout=120):
    return subprocess.run(console_command("erde-run", "erde.runtime.tools.run_cli") + [str(a) for a in args], input=stdin,
                          capture_output=True, timeout=timeout)


def test_a_real_video_runs_end_to_end(video):
    path, n = video
    r = erde_run("--video", path, "--threads", "1")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    lines = out.splitlines()
    assert any(ln.startswith(f"video {path}: 640x480") for ln in lines[1:3])
    assert sum(ln.startswith("frame ") for ln in lines) == n
    first = next(ln for ln in lines if ln.startswith("frame "))
    assert "decode+preprocess" in first and "inference" in first
    summary = out[out.index("summary:"):]
    assert f"summary: {n} frames" in summary and "frames/s" in summary
    for stage in ("decode", "preprocess", "inference"):
        assert f"{stage} ms per frame: mean" in summary


def test_every_thins_lines_and_json_summarises_every_frame(video):
    path, n = video
    r = erde_run("--video", path, "--every", "5", "--json", "--threads", "1")
    rows = [json.loads(ln) for ln in r.stdout.decode().splitlines()]
    assert r.returncode == 0 and len(rows) == (n + 4) // 5 + 1
    assert rows[-1]["summary"]["frames"] == n and sum(rows[-1]["summary"]["class_counts"].values()) == n
    assert {"frame", "class_name", "decode_ms", "preprocess_ms", "inference_ms", "unsure"} <= set(rows[0])


def test_the_stream_api_answers_as_predict(video):
    engine = Engine.load(BUNDLED, threads=1)
    images, _ = _real_images(6)
    rgb = [np.ascontiguousarray(im[:, :, ::-1]) for im in images]
    assert [p.class_index for p in engine.stream(rgb)] == [p.class_index for p in engine.predict(rgb)]
    assert len(list(engine.from_video(video[0]))) == video[1]


def test_a_truncated_video_keeps_the_frames_read(video, tmp_path):
    path, n = video
    cut = tmp_path / "cut.avi"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 6 // 10])
    r = erde_run("--video", cut, "--threads", "1")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and err[0].startswith("Error: ") and "truncated" in err[0]
    assert "summary: " in r.stdout.decode()


@pytest.mark.parametrize("args, words", [
    (["--video", "no-such.avi"], "no such file"),
    (["--camera", "97"], "camera"),
    (["--video", "x.avi", "--image", "y.png"], "one kind of input"),
])
def test_bad_sources_give_one_line(tmp_path, args, words):
    r = erde_run(*args)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("Error: ") and words in err[0], err


def test_an_image_from_standard_input():
    data = (ROOT / "runtime" / "samples" / "ship.png").read_bytes()
    r = erde_run("--image", "-", "--json", "--threads", "1", stdin=data)
    assert r.returncode == 0, r.stderr.decode()
    row = json.loads(r.stdout.decode().splitlines()[0])
    assert row["image"] == "<stdin>" and row["class_name"]
    r = erde_run("--image", "-", stdin=b"not an image")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "<stdin>: not an image" in err[0]
