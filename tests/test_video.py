"""Video files and live sources (erde.runtime.core.video), on an MJPG file made here from real images."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed (pip install 'erde[video]')")

from erde.runtime.core import video  # noqa: E402
from erde.runtime.core.manifest import Preprocessing  # noqa: E402
from erde.runtime.core.video import Frame, LiveSource, VideoError, open_camera, open_video, prepare  # noqa: E402

PRE = Preprocessing((32, 32), (0.5,) * 3, (0.25,) * 3)
SAMPLES = Path(__file__).resolve().parents[1] / "runtime" / "samples"
HOLD = 2  # frames per image
FPS = 20.0


def _images():
    data = os.environ.get("ERDE_DATA")
    paths = sorted(Path(data, "test").glob("*/*.jpg"))[::250][:40] if data else []
    images = [cv2.imread(str(p)) for p in (paths or sorted(SAMPLES.glob("*.png")))]
    return (images * 40)[:40]  # 40 images, 80 frames: the two samples alternate when there is no dataset


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (320, 240))
    assert writer.isOpened()
    images = _images()
    for img in images:
        big = cv2.resize(img, (320, 240), interpolation=cv2.INTER_CUBIC)
        for _ in range(HOLD):
            writer.write(big)
    writer.release()
    return path, len(images) * HOLD


def _one_line_error(call, match):
    with pytest.raises(VideoError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_reads_every_frame(clip):
    path, n = clip
    with open_video(path, PRE) as source:
        frames = list(source.frames())
        assert source.fps == pytest.approx(FPS) and source.frame_count == n
        assert source.skipped == 0 and not source.truncated and source.frames_read == n
        assert source.describe() == f"video {path}: 320x240, 20 fps, {n} frames"
    assert [f.index for f in frames] == list(range(n))
    for f in frames:
        assert isinstance(f, Frame) and f.image.shape == (32, 32, 3) and f.image.dtype == np.uint8
        assert isinstance(f.decode_ms, float) and f.decode_ms >= 0
        assert isinstance(f.preprocess_ms, float) and f.preprocess_ms >= 0
    assert not np.array_equal(frames[0].image, frames[-1].image)


def test_frames_are_rgb(clip):
    path, _ = clip
    first = cv2.VideoCapture(str(path)).read()[1]
    with open_video(path, PRE) as source:
        image = next(source.frames()).image
    expected = cv2.cvtColor(cv2.resize(first, (32, 32), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    assert np.array_equal(image, expected)


def test_max_fps_thins_by_video_time(clip):
    path, n = clip
    with open_video(path, PRE, max_fps=FPS / 4) as source:
        indices = [f.index for f in source.frames()]
    assert indices == list(range(0, n, 4))
    assert source.skipped == n - len(indices) and not source.truncated
    with open_video(path, PRE, max_fps=1000) as source:
        assert len(list(source.frames())) == n and source.skipped == 0


def test_truncated_file_ends_early(clip, tmp_path):
    path, n = clip
    cut = tmp_path / "cut.avi"
    data = path.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with open_video(cut, PRE) as source:
        frames = list(source.frames())
    assert 0 < len(frames) < n and source.truncated and source.frame_count == n
    assert all(f.image.shape == (32, 32, 3) for f in frames)


def test_bad_files(clip, tmp_path):
    data = clip[0].read_bytes()
    start = data.find(b"00dc", data.find(b"movi")) + 8  # the first frame's JPEG bytes
    blank = tmp_path / "blank.avi"
    blank.write_bytes(data[:start] + bytes(len(data) - start))  # a valid header, every frame zeroed
    _one_line_error(lambda: open_video(blank, PRE), r"blank\.avi: no decodable frames")
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(bytes(range(256)) * 64)
    _one_line_error(lambda: open_video(garbage, PRE), r"garbage\.avi: OpenCV cannot open it")
    _one_line_error(lambda: open_video(tmp_path / "nope.mp4", PRE), r"nope\.mp4: no such file")
    _one_line_error(lambda: open_video(tmp_path, PRE), "is a folder, not a regular video file")


def test_bad_max_fps(clip):
    _one_line_error(lambda: open_video(clip[0], PRE, max_fps=0), "max_fps must be a positive")


def test_missing_opencv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    _one_line_error(lambda: prepare(np.zeros((4, 4, 3), np.uint8), PRE), r"pip install 'erde\[video\]'")


class Paced:
    """A capture played live: each read waits ``period`` seconds, like a camera at 1/period fps."""

    def __init__(self, capture, period):
        self.capture, self.period, self.released = capture, period, False

    def isOpened(self):
        return self.capture.isOpened()

    def read(self):
        time.sleep(self.period)
        return self.capture.read()

    def release(self):
        self.released = True
        self.capture.release()


def test_live_source_keeps_the_newest_frame(clip):
    path, n = clip
    capture = Paced(cv2.VideoCapture(str(path)), 0.01)  # a 100 fps "camera"
    with LiveSource("live clip", PRE, capture, fps=100.0) as source:
        indices = []
        for frame in source.frames():  # a consumer three times slower than the source
            indices.append(frame.index)
            assert frame.image.shape == (32, 32, 3)
            time.sleep(0.03)
        assert source.describe() == "live clip: 320x240, 100 fps"
    assert source.skipped > 0 and len(indices) + source.skipped == n
    assert indices == sorted(set(indices)) and indices[-1] == n - 1
    assert capture.released and not source._thread.is_alive()


class Endless:
    def __init__(self, period=0.001):
        self.period, self.released, self.frame = period, False, np.zeros((48, 64, 3), np.uint8)

    def isOpened(self):
        return True

    def read(self):
        time.sleep(self.period)
        return True, self.frame

    def release(self):
        self.released = True


def test_close_stops_the_grabber():
    capture = Endless()
    source = LiveSource("endless", PRE, capture)
    frames = source.frames()
    indices = [next(frames).index for _ in range(5)]
    assert indices == sorted(set(indices))
    source.close()
    assert not source._thread.is_alive() and capture.released
    assert list(frames) == []
    assert threading.active_count() < 50


def test_stalled_and_dead_sources():
    stalled = LiveSource("camera 7", PRE, Endless(period=2.0), stall_s=0.2)
    _one_line_error(lambda: next(stalled.frames()), r"camera 7: no frame for 0\.2 s")
    stalled.close()
    dead = Endless()
    dead.read = lambda: (False, None)
    _one_line_error(lambda: next(LiveSource("camera 8", PRE, dead).frames()), "camera 8: opened but delivered no frame")


def test_missing_camera_fails_fast():
    start = time.perf_counter()
    _one_line_error(lambda: open_camera(99, PRE), "camera 99: cannot be opened")
    assert time.perf_counter() - start < 5


def test_prepare_center_crop_and_stretch():
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, :80] = frame[:, 560:] = (0, 0, 255)  # red sides (BGR)
    frame[:, 80:560] = (255, 0, 0)  # blue centre
    crop = prepare(frame, Preprocessing((32, 32), (0.5,) * 3, (0.25,) * 3, resize="shorter-side-center-crop"))
    assert crop.shape == (32, 32, 3) and (crop == (0, 0, 255)).all()  # RGB blue: only the centre is left
    stretched = prepare(frame, PRE)
    assert (stretched[:, 0] == (255, 0, 0)).all() and (stretched[:, 16] == (0, 0, 255)).all()
    tall = np.full((480, 640, 3), 50, np.uint8)
    tall[80:400] = 200  # a 2:1 target keeps the middle 320 rows of 480
    band = prepare(tall, Preprocessing((16, 32), (0.5,) * 3, (0.25,) * 3, resize="shorter-side-center-crop"))
    assert band.shape == (16, 32, 3) and (band == 200).all()
    _one_line_error(lambda: prepare(np.zeros((4, 4), np.uint8), PRE), "must be HxWx3 uint8 BGR")
