"""Frames from a video file or a camera, prepared for the model (OpenCV, an optional dependency).

    with open_video("clip.avi", manifest.preprocessing, max_fps=5) as source:
        for frame in source.frames():  # frame.image: HxWx3 uint8 RGB at the model's input size
            ...

A file is read frame by frame (optionally thinned to ``max_fps`` per second of video time). A camera is
read by a background thread that keeps only the newest frame: a slow classifier always gets the latest
picture, and the frames it had no time for are counted in ``skipped``. Both use :func:`prepare`.
OpenCV is imported on first use; without it, a VideoError says how to install it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np

from ..common.errors import ErdeError
from ..common.files import UnsafePathError, check_regular
from .manifest import RESIZE_RULES, Preprocessing

MAX_VIDEO_BYTES = 1 << 50  # no size limit: check_regular only refuses folders, FIFOs and devices
STALL_S = 10.0  # a live source that delivers no frame for this long is reported as stalled

Raw = Tuple[int, np.ndarray, float]  # (frame index, BGR frame, decode ms)


class VideoError(ErdeError):
    """A video file or camera is missing, unreadable or stalled, or OpenCV is not installed."""


@dataclass(frozen=True)
class Frame:
    index: int  # position in the source, from 0; gaps are frames skipped
    image: np.ndarray  # HxWx3 uint8 RGB at the model's input size, already resized
    decode_ms: float  # reading and decoding the frame
    preprocess_ms: float  # colour conversion, crop and resize


def _positive(value: float) -> Optional[float]:
    return float(value) if value and value > 0 else None  # OpenCV reports an unknown property as 0 or -1


def _read(capture: Any, index: int) -> Optional[Raw]:
    """The next frame of a capture, timed; None at its end."""
    start = perf_counter()
    try:
        ok, bgr = capture.read()
    except Exception:  # cv2.error from a failing device or a corrupt file: the source has ended
        return None
    return (index, bgr, (perf_counter() - start) * 1000.0) if ok and bgr is not None else None


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise VideoError(f"OpenCV is needed for video files and cameras but cannot be imported ({e}); "
                         "install it with: pip install 'erde[video]'") from None
    return cv2


def quiet_opencv() -> None:
    """OpenCV's and FFmpeg's own messages (e.g. "can't open camera by index", "overread") off stderr, so that a
    command says what went wrong in its one Error line. Read by OpenCV when it is first imported."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")


def prepare(frame_bgr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """A BGR uint8 frame (as OpenCV decodes it) -> HxWx3 uint8 RGB at ``pre.input_size`` = (height, width).

    "stretch" resizes straight; "shorter-side-center-crop" first cuts the centre to the target's aspect
    ratio. One area-averaging resize; the colour swap is done on the small result.
    """
    cv2 = _cv2()
    if frame_bgr.dtype != np.uint8 or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or 0 in frame_bgr.shape:
        raise VideoError(f"a video frame must be HxWx3 uint8 BGR, got shape {frame_bgr.shape} and dtype "
                         f"{frame_bgr.dtype}; open the source with open_video or open_camera")
    height, width = int(pre.input_size[0]), int(pre.input_size[1])
    if pre.resize not in RESIZE_RULES:
        raise VideoError(f"unknown resize rule {pre.resize!r} in the model's preprocessing; use one of {RESIZE_RULES}")
    if pre.resize == "shorter-side-center-crop":
        h, w = frame_bgr.shape[:2]
        if w * height > h * width:  # wider than the target: cut left and right
            crop = max(1, int(round(h * width / height)))
            left = (w - crop) // 2
            frame_bgr = frame_bgr[:, left:left + crop]
        else:  # taller: cut top and bottom
            crop = max(1, int(round(w * height / width)))
            top = (h - crop) // 2
            frame_bgr = frame_bgr[top:top + crop]
    small = cv2.resize(frame_bgr, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


class FrameSource:
    """Prepared frames from one source; ``close()`` it, or use it as a context manager."""

    def __init__(self, name: str, pre: Preprocessing, capture: Any, fps: Optional[float]):
        self.name = name
        self.pre = pre
        self.fps = fps  # the source's nominal frame rate, None if it does not say
        self.skipped = 0  # frames dropped (thinned to max_fps, or too many for the consumer)
        self.frames_read = 0  # frames yielded so far
        self.frame_count: Optional[int] = None  # frames in the file, from its header; None if unknown or live
        self._capture = capture
        self._size: Optional[Tuple[int, ...]] = None  # (width, height) of the source's frames

    def _raw(self) -> Iterator[Raw]:
        raise NotImplementedError

    def frames(self) -> Iterator[Frame]:
        for index, bgr, decode_ms in self._raw():
            start = perf_counter()
            image = prepare(bgr, self.pre)
            self.frames_read += 1
            yield Frame(index, image, decode_ms, (perf_counter() - start) * 1000.0)

    def describe(self) -> str:
        size = f"{self._size[0]}x{self._size[1]}" if self._size else "size unknown"
        fps = f"{self.fps:g} fps" if self.fps else "fps unknown"
        return f"{self.name}: {size}, {fps}" + (f", {self.frame_count} frames" if self.frame_count else "")

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class VideoFile(FrameSource):
    """Every frame of a file, or at most ``max_fps`` per second of video time."""

    def __init__(self, path: Path, pre: Preprocessing, capture: Any, fps: Optional[float],
                 frame_count: Optional[int], max_fps: Optional[float], first: Raw):
        super().__init__(f"video {path}", pre, capture, fps)
        self.frame_count = frame_count
        self.max_fps = max_fps
        self.truncated = False  # decoding stopped before frame_count frames
        self._first: Optional[Raw] = first
        self._size = first[1].shape[1::-1]

    def _raw(self) -> Iterator[Raw]:
        last_slot, index = -1, 0
        while self._capture is not None:
            raw, self._first = self._first or _read(self._capture, index), None
            if raw is None:
                break
            index += 1
            if self.max_fps and self.fps:
                slot = int(raw[0] / self.fps * self.max_fps + 1e-9)  # which 1/max_fps of video time it is in
                if slot == last_slot:
                    self.skipped += 1
                    continue
                last_slot = slot
            yield raw
        if self._capture is not None:  # the file ended by itself, not by close()
            self.truncated = self.frame_count is not None and index < self.frame_count


def open_video(path: Union[str, Path], pre: Preprocessing, max_fps: Optional[float] = None) -> VideoFile:
    """Open a video file and decode its first frame; raise VideoError if that is not possible."""
    path = Path(path)
    if max_fps is not None and not max_fps > 0:
        raise VideoError(f"max_fps must be a positive number of frames per second, got {max_fps}")
    try:
        check_regular(path, MAX_VIDEO_BYTES, what="video file")
    except UnsafePathError as e:
        raise VideoError(str(e)) from None
    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{path}: OpenCV cannot open it as a video (not a video, or a codec this OpenCV build "
                         "lacks); re-encode it, e.g. ffmpeg -i IN -c:v mjpeg OUT.avi")
    first = _read(capture, 0)
    if first is None:
        capture.release()
        raise VideoError(f"{path}: no decodable frames (empty or corrupt video); re-copy or re-encode it")
    fps, count = _positive(capture.get(cv2.CAP_PROP_FPS)), _positive(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if max_fps is not None and fps is None:
        capture.release()
        raise VideoError(f"{path}: the video does not state its frame rate, so it cannot be thinned to "
                         f"{max_fps:g} fps; leave out max_fps (--max-fps)")
    return VideoFile(path, pre, capture, fps, int(count) if count else None, max_fps, first)


class LiveSource(FrameSource):
    """A live source: a thread reads continuously and keeps the newest frame; ``frames()`` takes it."""

    def __init__(self, name: str, pre: Preprocessing, capture: Any, fps: Optional[float] = None,
                 stall_s: float = STALL_S):
        super().__init__(name, pre, capture, fps)
        self.stall_s = stall_s
        self._newest: Optional[Raw] = None  # the frame that frames() takes next
        self._grabbed = 0  # frames read from the capture
        self._ended = self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._grab, name=f"erde-grab {name}", daemon=True)
        self._thread.start()

    def _grab(self) -> None:
        while not self._closed and not self._ended:
            raw = _read(self._capture, self._grabbed)
            with self._cond:
                self._ended = raw is None
                if raw is not None:
                    self.skipped += self._newest is not None  # the consumer never took the previous one
                    self._newest, self._grabbed, self._size = raw, self._grabbed + 1, raw[1].shape[1::-1]
                self._cond.notify_all()

    def _raw(self) -> Iterator[Raw]:
        while not self._closed:
            with self._cond:
                got = self._cond.wait_for(lambda: self._newest is not None or self._ended or self._closed,
                                          timeout=self.stall_s)
                if not got:
                    raise VideoError(f"{self.name}: no frame for {self.stall_s:g} s; check that the camera is "
                                     "connected and not in use by another program")
                raw, self._newest = self._newest, None
            if raw is None and self._grabbed == 0 and not self._closed:
                raise VideoError(f"{self.name}: opened but delivered no frame; check that it works in another "
                                 "program and is not in use")
            if raw is None:
                return
            yield raw

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.stall_s)
        if not self._thread.is_alive():  # never release a capture that another thread is still reading
            super().close()


def open_camera(index: int, pre: Preprocessing) -> LiveSource:
    """Open camera ``index`` (0 = the first one, /dev/video0 on Linux) as a live source."""
    cv2 = _cv2()
    capture = cv2.VideoCapture(int(index))
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"camera {index}: cannot be opened (no such camera, or it is in use); "
                         "check the index (0 is the first camera) and that it is connected")
    return LiveSource(f"camera {index}", pre, capture, _positive(capture.get(cv2.CAP_PROP_FPS)))
