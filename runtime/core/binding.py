"""Batch-1 runs of a chain of sessions with their buffers bound once (onnxruntime IOBinding). Torch-free.

At batch 1 every shape is fixed, so the engine binds, once per thread, an input
buffer for the image, a probabilities buffer for every exit, and a feature
buffer that is at the same time the output of segment k and the input of
segment k+1. A call is then only ``run_with_iobinding``: no feed dictionaries,
no output arrays allocated, no feature map copied between segments. A single graph
such as full.onnx gained nothing measurable from it (benchmarks/results/README.md),
so ``Engine.run_full`` keeps ``session.run``.

The buffers are reused by the next call: copy what must outlive it.
``run_until`` is the batch-1 loop over either kind of chain.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .graphs import Graph


def _static_shape(dims: Sequence[Any]) -> Optional[Tuple[int, ...]]:
    """The output's shape at batch 1, or None if a dimension other than the batch one is not fixed."""
    if not dims:
        return None
    rest = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        return None
    return (1,) + tuple(rest)


#: The feature-map types a bound chain hands on: float32, or uint8 NHWC between int8 segments (erde-quantize).
_DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}

#: An exit test on one image's probabilities, as Python floats: True = the image leaves here.
ExitTest = Callable[[List[float]], bool]


class PlainChain:
    """The same calls as ``BoundChain`` over ``session.run``, for graphs whose buffers cannot be bound."""

    def __init__(self, segments: Sequence[Graph], num_classes: Optional[int] = None):
        self.segments = list(segments)
        self._feeds: List[Optional[np.ndarray]] = [None] * len(self.segments)
        self._shape = None if num_classes is None else (1, num_classes)

    def load(self, x: np.ndarray) -> None:
        self._feeds[0] = x

    def run(self, k: int) -> np.ndarray:
        segment = self.segments[k]
        outputs = segment.session.run(segment.output_names, {segment.input_name: self._feeds[k]})
        if self._shape is not None and outputs[0].shape != self._shape:
            raise ValueError(f"probabilities of shape {outputs[0].shape}, expected {list(self._shape)}")
        if k + 1 < len(self.segments):
            self._feeds[k + 1] = outputs[1]
        return outputs[0]

    def feed(self, k: int) -> Optional[np.ndarray]:
        return self._feeds[k]


def _bound_call(session: Any, binding: Any) -> Callable[[], None]:
    """One run of ``session`` over ``binding``: onnxruntime's own ``run_with_iobinding`` below its Python wrapper
    where the API exposes it (0.7 us less a segment, 1.5 us an image on the bundled int8 model), else the public
    method."""
    inner, io = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    if inner is not None and io is not None and hasattr(inner, "run_with_iobinding"):
        return functools.partial(inner.run_with_iobinding, io, None)
    return functools.partial(session.run_with_iobinding, binding)


class BoundChain:
    """Stages whose sessions run one image through bound buffers; create with ``bind_chain``."""

    def __init__(self, segments: Sequence[Graph], image: np.ndarray, probs: List[np.ndarray],
                 features: List[np.ndarray], bindings: List[Any]):
        self.segments = list(segments)
        self._image = image
        self._probs = probs  # [1, K] per segment, rewritten by every call
        self._features = features
        self._bindings = bindings
        self._calls = [_bound_call(s.session, b) for s, b in zip(self.segments, bindings)]

    def load(self, x: np.ndarray) -> None:
        """Copy one preprocessed image [1, 3, H, W] float32 into the input buffer."""
        np.copyto(self._image, x)

    def run(self, k: int) -> np.ndarray:
        """Run segment ``k`` on what segment k-1 (or ``load``) left; return its probabilities buffer [1, K].
        onnxruntime raises if the graph answers in another shape than the bound buffer's."""
        self._calls[k]()
        return self._probs[k]

    def feed(self, k: int) -> np.ndarray:
        """The input array segment ``k`` reads (to re-run it without bindings and report an error)."""
        return self._image if k == 0 else self._features[k - 1]


def run_until(chain: Union[BoundChain, PlainChain], x: np.ndarray, leave: Optional[Sequence[ExitTest]],
              last: Optional[int] = None) -> Tuple[int, List[float], List[float]]:
    """One image [1, 3, H, W] through the chain until ``leave[k]`` (the test of early exit k) says so (None:
    nobody leaves early) or segment ``last`` (default: the final one) has run. Returns (the segment that
    answered, its probabilities as Python floats, ``time.perf_counter()`` marks: the start, then the end of each
    segment run with its exit test).

    The engine's hot path at batch 1: the least Python work per segment (Python floats are quicker than numpy
    calls on a few values). Errors are onnxruntime's, or ValueError for a plain chain's wrong shape."""
    chain.load(x)
    run = chain.run
    clock = time.perf_counter
    final = len(chain.segments) - 1 if last is None else last
    marks = [clock()]
    for k in range(final + 1):
        values = run(k)[0].tolist()
        done = k == final or (leave is not None and leave[k](values))
        marks.append(clock())
        if done:
            return k, values, marks
    raise ValueError(f"no segment {final} in a chain of {len(chain.segments)}")


def bind_chain(segments: Sequence[Graph], input_shape: Tuple[int, ...],
               num_classes: int) -> Union[BoundChain, PlainChain]:
    """The chain of segments with its batch-1 buffers bound; a ``PlainChain`` (same answers, ``session.run``)
    when a feature map's shape is not fixed or this onnxruntime cannot bind buffers."""
    try:
        image = np.zeros((1,) + tuple(input_shape), dtype=np.float32)
        feed = image
        probs, features, bindings = [], [], []
        for k, segment in enumerate(segments):
            io = segment.session.io_binding()
            io.bind_input(segment.input_name, "cpu", 0, feed.dtype.type, list(feed.shape), feed.ctypes.data)
            p = np.zeros((1, num_classes), dtype=np.float32)
            io.bind_output(segment.output_names[0], "cpu", 0, np.float32, list(p.shape), p.ctypes.data)
            probs.append(p)
            if k < len(segments) - 1:
                if len(segment.output_names) < 2:
                    return PlainChain(segments, num_classes)
                meta = {o.name: o for o in segment.session.get_outputs()}.get(segment.output_names[1])
                shape = _static_shape(meta.shape if meta is not None else [])
                dtype = _DTYPES.get(meta.type) if meta is not None else None
                if shape is None or dtype is None:
                    return PlainChain(segments, num_classes)
                feed = np.zeros(shape, dtype=dtype)  # float32, or uint8 between int8 segments
                io.bind_output(segment.output_names[1], "cpu", 0, dtype, list(shape), feed.ctypes.data)
                features.append(feed)
            bindings.append(io)
    except Exception:  # an onnxruntime without these calls: the engine runs without bindings
        return PlainChain(segments, num_classes)
    return BoundChain(segments, image, probs, features, bindings)
