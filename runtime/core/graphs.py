"""What an engine is made of: the checked graph files of a model folder, one session per graph, and
the answer for one image (``Prediction``). Torch-free."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple

from ..common.errors import ModelFolderError
from ..common.files import MAX_GRAPH_BYTES, read_capped
from .manifest import MANIFEST_NAME


@dataclass(frozen=True)
class Prediction:
    """The answer for one image.

    ``latency_ms``: with batch size 1, the wall time of the segments this image
    ran (each ``run`` call plus its exit test). In a batch, the wall time of the
    whole batch from its first segment up to the end of the segment where this
    image left; ``segment_latency_ms`` then holds the batch's per-segment times.
    ``macs`` are per image: the ``cumulative_macs`` of the exit taken.
    """

    class_index: int
    class_name: str
    confidence: float  # the max softmax probability at the exit taken
    exit_index: int  # 0-based
    num_exits: int
    macs: int
    macs_fraction: float  # macs / manifest.full_macs
    latency_ms: float
    segment_latency_ms: Tuple[float, ...]

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["segment_latency_ms"] = list(self.segment_latency_ms)
        return d


def new_prediction(class_index: int, class_name: str, confidence: float, exit_index: int, num_exits: int, macs: int,
                   macs_fraction: float, latency_ms: float, segment_latency_ms: Tuple[float, ...],
                   _new=object.__new__) -> Prediction:
    """``Prediction(...)`` for the engine's batch-1 hot path: the same frozen object, its fields set in one dict
    update (0.4 us) instead of the dataclass ``__init__``'s nine frozen-attribute calls (1.8 us)."""
    p = _new(Prediction)
    p.__dict__.update(class_index=class_index, class_name=class_name, confidence=confidence, exit_index=exit_index,
                      num_exits=num_exits, macs=macs, macs_fraction=macs_fraction, latency_ms=latency_ms,
                      segment_latency_ms=segment_latency_ms)
    return p


@dataclass(frozen=True)
class Graph:
    session: Any
    input_name: str
    output_names: List[str]  # [probs] or [probs, features]
    file: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_checked(folder: Path, file: str, sha256: str) -> bytes:
    path = folder / file
    if not path.exists() and not path.is_symlink():
        raise ModelFolderError(f"{path}: listed in {MANIFEST_NAME} but missing; copy the whole model folder "
                               "written by erde-export")
    data = read_capped(path, MAX_GRAPH_BYTES, inside=folder, what="model file")
    if _sha256(data) != sha256.lower():
        raise ModelFolderError(f"{path}: sha256 does not match {MANIFEST_NAME} (file altered or partly copied); "
                               "copy the model folder again or re-export it")
    return data


def open_graph(folder: Path, file: str, data: bytes, inputs: Sequence[str], outputs: Sequence[str],
               open_session: Callable[[bytes, str], Any], inputs_count: int = 1) -> Graph:
    """A checked graph file (``data``, from ``_read_checked``) as a Graph: its session, from
    ``open_session(data, name)``, and its inputs and outputs checked against the manifest's."""
    path = folder / file
    session = open_session(data, str(path))
    _check_io(session, path, inputs, outputs, inputs_count)
    return Graph(session, inputs[0], list(outputs), file)


def _check_io(session: Any, path: Path, inputs: Sequence[str], outputs: Sequence[str], inputs_count: int = 1) -> None:
    have_in = [i.name for i in session.get_inputs()]
    have_out = {o.name for o in session.get_outputs()}
    missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
    if missing or len(have_in) != inputs_count:
        raise ModelFolderError(f"{path}: graph inputs {have_in} / outputs {sorted(have_out)} do not match "
                               f"{MANIFEST_NAME} (expected one input {list(inputs)} and outputs {list(outputs)}); "
                               "re-export the model folder")
