"""Frames through the engine at batch 1, as they come: any iterable of images, a video file, a camera.

``stream`` and ``from_video`` are the Python API (``Engine.stream``, ``Engine.from_video``); ``erde-run --video``
and ``--camera`` are ``run_frames``, beside the command.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

from .preprocess import ImageInput, preprocess_one
from .graphs import Prediction


def stream(engine, frames: Iterable[ImageInput], threshold: Optional[float] = None,
           criterion: Optional[str] = None) -> Iterator[Prediction]:
    """One prediction per frame (a path, PIL image or HxWx3 uint8 array), at batch 1, as the frames come."""
    criterion, threshold, _ = engine.resolve_threshold(threshold, criterion)
    pre = engine.manifest.preprocessing
    for image in frames:
        yield engine.predict_array(preprocess_one(image, pre)[None], threshold, criterion)[0]


def from_video(engine, path, threshold: Optional[float] = None, criterion: Optional[str] = None,
               max_fps: Optional[float] = None) -> Iterator[Prediction]:
    """One prediction per frame of a video file (needs ``erde[video]``)."""
    from .video import open_video

    with open_video(path, engine.manifest.preprocessing, max_fps) as source:
        yield from stream(engine, (f.image for f in source.frames()), threshold, criterion)
