"""Early-exit inference over a model folder with onnxruntime (no torch).

A model folder holds ``manifest.json`` and one ONNX graph per segment. Segment
k returns the softmax probabilities of exit k and, except the last, the
feature map for segment k+1. An image leaves at the first exit whose
probabilities pass the exit rule (``exit_mask``); the last exit always answers.

Sessions and the thread-pool policy live in ``erde.runtime.core.sessions``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from . import criteria
from .criteria import Threshold
from .binding import BoundChain, ExitTest, PlainChain, bind_chain, run_until
from ..common.errors import ErdeError, ModelFolderError
from .manifest import MANIFEST_NAME, Manifest, load_manifest
from .preprocess import ImageInput, preprocess
from .sessions import _check_providers, _check_threads, _one_line, make_session
from .graphs import Prediction, _read_checked, Graph, new_prediction, open_graph  # noqa: F401 (Prediction: part of this API)

#: Largest batch given to onnxruntime in one call; larger batches run in chunks, so memory stays bounded.
MAX_RUN_BATCH = 256


def exit_mask(probs: np.ndarray, criterion: str, threshold: float) -> np.ndarray:
    """Which rows of ``probs`` [N, K] may leave at this exit (bool [N]): ``criteria.passes``, checked."""
    return criteria.passes(probs, criteria.check_criterion(criterion), threshold)


class Engine:
    """Runs an early-exit model folder. Create with ``Engine.load``."""

    def __init__(self, folder: Path, manifest: Manifest, segments: List[Graph], full: Optional[Graph],
                 threads: Optional[int], single: Optional[Graph] = None):
        self.folder = folder
        self.manifest = manifest
        self.threads = threads
        self._segments = segments
        self._full = full
        self._single = single  # early_exit.onnx: the whole model in one graph, for batch 1
        self._cum_macs = [s.cumulative_macs for s in manifest.segments]
        self._full_macs = manifest.full_macs
        self._num_classes = len(manifest.class_names)
        h, w = manifest.preprocessing.input_size
        self._input_shape = (3, h, w)
        self._bound = threading.local()  # per thread: the segment chain with its batch-1 buffers bound
        self._rules: dict = {}  # (type, threshold, criterion) given -> (criterion, threshold, exit test)
        self._answers = (manifest.class_names, len(segments), self._cum_macs,
                         [m / self._full_macs for m in self._cum_macs])  # what a batch-1 answer repeats

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], threads: Optional[int] = None,
             providers: Optional[List[str]] = None, shared_pool: Optional[bool] = None) -> "Engine":
        """Load and check a model folder (manifest, file hashes, no stray .onnx files) and open its sessions."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: {'no such folder' if not folder.exists() else 'not a folder'}; "
                                   "pass a model folder written by erde-export")
        threads = _check_threads(threads)
        providers = _check_providers(providers)
        manifest = load_manifest(folder)
        one_graph = manifest.early_exit_graph
        listed = ([s.file for s in manifest.segments] + ([manifest.full.file] if manifest.full else [])
                  + ([one_graph.file] if one_graph else []))
        extra = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.name not in listed)
        if extra:
            raise ModelFolderError(f"{folder / extra[0]}: .onnx file not listed in {MANIFEST_NAME}"
                                   + (f" (also: {', '.join(extra[1:])})" if len(extra) > 1 else "")
                                   + "; the folder mixes two exports: remove it or re-export into an empty folder")
        blobs = [_read_checked(folder, s.file, s.sha256) for s in manifest.segments]  # every hash before a session
        full_blob = _read_checked(folder, manifest.full.file, manifest.full.sha256) if manifest.full else None

        def open_session(data: bytes, name: str):
            return make_session(data, threads, providers, shared_pool, name=name)

        segments = [open_graph(folder, s.file, blob, [s.inputs[0].name],
                               [s.probs_output] + ([s.feature_output] if s.feature_output else []), open_session)
                    for s, blob in zip(manifest.segments, blobs)]
        full = single = None
        if manifest.full is not None:
            f = manifest.full
            full = open_graph(folder, f.file, full_blob, [f.input_name], [f.probs_output], open_session)
        if one_graph is not None:
            single = open_graph(folder, one_graph.file, _read_checked(folder, one_graph.file, one_graph.sha256),
                                ["image", "thresholds", "criterion"], ["probs", "exit"], open_session, inputs_count=3)
        return cls(folder, manifest, segments, full, threads, single)

    @property
    def num_exits(self) -> int:
        return len(self._segments)

    @property
    def has_full(self) -> bool:
        return self._full is not None

    def resolve_threshold(self, threshold: Optional[Threshold] = None,
                          criterion: Optional[str] = None) -> Tuple[str, Threshold, str]:
        """(criterion, threshold, source) with source "given", "calibrated" or "manifest default".

        Neither given: the calibrated pair if the manifest has one, else the
        manifest default. Only a threshold given: it is read with that same
        criterion. Only a criterion given: the calibrated or default threshold
        of that criterion, else an error.
        """
        m = self.manifest
        cal = m.calibration
        if threshold is None:
            if cal is not None and criterion in (None, cal.criterion):
                crit, t = criteria.check_rule(cal.criterion, cal.threshold, self.num_exits)
                return crit, t, "calibrated"
            if criterion in (None, m.default_criterion):
                crit, t = criteria.check_rule(m.default_criterion, m.default_threshold, self.num_exits)
                return crit, t, "manifest default"
            criteria.check_rule(criterion, 0.5, self.num_exits)  # an unknown criterion is reported as such
            raise ErdeError(f"{self.folder / MANIFEST_NAME} has no threshold for criterion {criterion!r}; "
                            "pass a threshold too (--threshold)")
        if criterion is None:
            criterion = cal.criterion if cal is not None else m.default_criterion
        crit, t = criteria.check_rule(criterion, threshold, self.num_exits)
        return crit, t, "given"

    def _rule(self, threshold: Optional[Threshold], criterion: Optional[str]) -> Tuple[str, Threshold, Tuple[ExitTest, ...]]:
        """``resolve_threshold`` and the batch-1 exit tests of its answer, kept for the next call with the same
        arguments (the type is part of the key: True == 1.0, but only 1.0 is a threshold)."""
        key = (type(threshold), threshold, criterion)
        try:
            rule = self._rules.get(key)
        except TypeError:  # an unhashable argument: resolve_threshold says what is wrong with it
            key, rule = None, None
        if rule is None:
            crit, t, _ = self.resolve_threshold(threshold, criterion)
            rule = (crit, t, criteria.exit_tests(crit, t, self.num_exits))
            if key is not None and len(self._rules) < 64:
                self._rules[key] = rule
        return rule

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], threshold: Optional[Threshold] = None,
                criterion: Optional[str] = None, batch_size: int = 1) -> List[Prediction]:
        """Classify images (paths, PIL images or HxWx3 uint8 arrays), ``batch_size`` at a time."""
        criterion, threshold, _ = self.resolve_threshold(threshold, criterion)
        batch_size = _check_batch_size(batch_size)
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]  # one path, PIL image or array
        else:
            images = list(images)
        out: List[Prediction] = []
        for start in range(0, len(images), batch_size):
            x = preprocess(images[start:start + batch_size], self.manifest.preprocessing)
            out.extend(self._run(x, criterion, threshold))
        return out

    def stream(self, frames, threshold: Optional[Threshold] = None, criterion: Optional[str] = None):
        """One Prediction per frame of any iterable of paths, PIL images or arrays, at batch 1 (erde.runtime.core.stream)."""
        from .stream import stream

        return stream(self, frames, threshold, criterion)

    def from_video(self, path, threshold: Optional[Threshold] = None, criterion: Optional[str] = None,
                   max_fps: Optional[float] = None):
        """One Prediction per frame of a video file (needs erde[video]; erde.runtime.core.stream)."""
        from .stream import from_video

        return from_video(self, path, threshold, criterion, max_fps)

    def predict_array(self, x: np.ndarray, threshold: Optional[Threshold] = None, criterion: Optional[str] = None,
                      batch_size: Optional[int] = None, early_exit: bool = True) -> List[Prediction]:
        """Classify preprocessed input [N, 3, H, W] float32; ``batch_size`` None runs all N as one batch.

        ``early_exit=False`` runs every image through all segments and answers
        from the last exit (the threshold is then not used): the engine's
        overhead against ``run_full``, as the benchmark measures it.
        """
        criterion, threshold, tests = self._rule(threshold, criterion)
        x = self._check_input(x)
        n = x.shape[0]
        if n == 1:  # the board's case: the batch-1 hot path, with the exit test made once per rule
            return [self._predict_batch1(x, criterion, threshold, early_exit, tests)]
        step = min(n if batch_size is None else _check_batch_size(batch_size), MAX_RUN_BATCH)
        if step >= n:
            return self._run(x, criterion, threshold, early_exit)
        out: List[Prediction] = []
        for start in range(0, n, step):
            out.extend(self._run(x[start:start + step], criterion, threshold, early_exit))
        return out

    def exit_probs(self, x: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """Probabilities of every exit for every image, [E, N, K] float32: all segments run, nobody leaves.

        For calibration: ``criteria.exit_indices`` on this array gives the exit
        the engine takes at any threshold. ``batch_size`` None runs all N at once.
        """
        x = self._check_input(x)
        n = x.shape[0]
        step = min(n if batch_size is None else _check_batch_size(batch_size), MAX_RUN_BATCH)
        out = np.empty((len(self._segments), n, self._num_classes), dtype=np.float32)
        for start in range(0, n, step):
            feed = x[start:start + step]
            for k, segment in enumerate(self._segments):
                outputs = self._run_graph(segment, feed)
                out[k, start:start + len(feed)] = outputs[0]
                feed = outputs[1] if len(outputs) > 1 else None
        return out

    def warmup(self, batch_size: int = 1, include_full: bool = True) -> None:
        """Run a zero batch through every segment (and full.onnx) once, so the first timed call is not the slow one."""
        x = np.zeros((min(_check_batch_size(batch_size), MAX_RUN_BATCH),) + self._input_shape, dtype=np.float32)
        feed = x
        for segment in self._segments:
            outputs = self._run_graph(segment, feed)
            feed = outputs[1] if len(outputs) > 1 else None
        if include_full and self._full is not None:
            self._run_graph(self._full, x)
        if self._single is not None:
            self._predict_one_graph(x[:1], "max-prob", None)

    def run_full(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [N, K] of the static student (full.onnx): no exits, one session."""
        if self._full is None:
            raise ErdeError(f"{self.folder}: this model folder has no full graph (manifest 'full' is empty)")
        x = self._check_input(x)
        return self._run_graph(self._full, x)[0]

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1:] != self._input_shape or x.shape[0] < 1:
            shape = getattr(x, "shape", type(x).__name__)
            raise ErdeError(f"expected a float32 array [N, {', '.join(map(str, self._input_shape))}] "
                            f"for {self.folder}, got {shape}; use preprocess() on images first")
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        return x

    def _run_graph(self, segment: Graph, x: np.ndarray) -> List[np.ndarray]:
        try:
            outputs = segment.session.run(segment.output_names, {segment.input_name: x})
        except Exception as e:
            raise ModelFolderError(f"{self.folder / segment.file}: onnxruntime failed to run this graph "
                                   f"({_one_line(e)}); check the manifest's input size against the graphs, "
                                   "or re-export the model folder") from None
        probs = outputs[0]
        if probs.ndim != 2 or probs.shape != (x.shape[0], self._num_classes):
            raise ModelFolderError(f"{self.folder / segment.file}: probabilities of shape {probs.shape}, expected "
                                   f"[{x.shape[0]}, {self._num_classes}] ({self._num_classes} class_names in "
                                   f"{MANIFEST_NAME}); re-export the model folder")
        return outputs

    def _chain(self) -> Union[BoundChain, PlainChain]:
        """This thread's batch-1 segment chain (its buffers are bound on first use)."""
        chain = getattr(self._bound, "chain", None)
        if chain is None:
            chain = self._bound.chain = bind_chain(self._segments, self._input_shape, self._num_classes)
        return chain

    def _explain_failure(self, chain: Union[BoundChain, PlainChain]) -> None:
        """A batch-1 run failed: run its segments again through ``_run_graph``, which raises the one-line error
        of the graph at fault; if none fails that way, say the chain could not run."""
        feed = chain.feed(0)
        for segment in chain.segments:
            outputs = self._run_graph(segment, feed)
            feed = outputs[1] if len(outputs) > 1 else feed
        raise ModelFolderError(f"{self.folder}: onnxruntime could not run the segment chain through bound buffers; "
                               "re-export the model folder")

    def _prediction(self, class_index: int, confidence: float, exit_index: int,
                    segment_ms: Sequence[float]) -> Prediction:
        """``segment_ms``: the milliseconds of every segment that ran (at least up to ``exit_index``); the rest of
        the answer comes from values computed at load (``_answers``)."""
        seg = tuple(segment_ms[:exit_index + 1])
        names, num_exits, macs, fraction = self._answers
        return new_prediction(class_index, names[class_index], confidence, exit_index, num_exits, macs[exit_index],
                              fraction[exit_index], sum(seg), seg)

    def _predict_batch1(self, x: np.ndarray, criterion: str, threshold: Threshold, early_exit: bool,
                        tests: Optional[Tuple[ExitTest, ...]] = None) -> Prediction:
        """Batch size 1, the usual case on a board: one scalar test per exit, no masks or compaction.

        This is the hot path whose overhead against full.onnx the benchmark reports: the segments run through
        buffers bound once per thread, in ``binding.run_until``; errors are explained only after a failure.
        """
        if self._single is not None:
            return self._predict_one_graph(x, criterion, threshold if early_exit else None)
        chain = self._chain()
        try:
            if early_exit and tests is None:
                tests = criteria.exit_tests(criterion, threshold, self.num_exits)
            k, values, marks = run_until(chain, x, tests if early_exit else None)
        except Exception:
            self._explain_failure(chain)
            raise
        confidence = max(values)
        return self._prediction(values.index(confidence), confidence, k,
                                [(b - a) * 1000.0 for a, b in zip(marks, marks[1:])])

    def _single_call(self, x: np.ndarray, criterion: str, threshold: Optional[Threshold],
                     leave_at: Optional[int] = None) -> Tuple[np.ndarray, int, float]:
        """One call of early_exit.onnx: (probabilities [1,K], the exit that answered, milliseconds).

        ``threshold`` None: nobody leaves early; ``leave_at``: leave at that exit whatever the confidence.
        """
        rule = criteria.get(criterion)
        t = np.full(max(1, self.num_exits - 1), rule.never, dtype=np.float32)
        if threshold is not None and self.num_exits > 1:
            t[:] = criteria.per_exit(threshold, self.num_exits)
        if leave_at is not None and leave_at < self.num_exits - 1:
            t[:leave_at] = rule.never
            t[leave_at] = rule.always
        feeds = {"image": x, "thresholds": t, "criterion": np.array(criteria.CRITERIA.index(criterion), np.int64)}
        start = time.perf_counter()
        try:
            probs, exit_ = self._single.session.run(self._single.output_names, feeds)
        except Exception as e:
            raise ModelFolderError(f"{self.folder / self._single.file}: onnxruntime failed to run this graph "
                                   f"({_one_line(e)}); re-export the model folder") from None
        return probs, int(exit_[0]), (time.perf_counter() - start) * 1000.0

    def _predict_one_graph(self, x: np.ndarray, criterion: str, threshold: Optional[Threshold],
                    leave_at: Optional[int] = None) -> Prediction:
        """Batch 1 through early_exit.onnx. The per-segment split of the time is not observable here:
        ``segment_latency_ms`` holds the whole call as one entry."""
        probs, k, ms = self._single_call(x, criterion, threshold, leave_at)
        p = probs[0]
        c = int(p.argmax())
        return self._prediction(c, float(p[c]), k, [ms])

    def single_graph_probs(self, x: np.ndarray, leave_at: int) -> Tuple[np.ndarray, int]:
        """early_exit.onnx forced to answer at exit ``leave_at``: (probabilities [1,K], the exit it reports)."""
        if self._single is None:
            raise ErdeError(f"{self.folder}: this model folder has no early_exit.onnx")
        probs, k, _ = self._single_call(x, "max-prob", None, leave_at)
        return probs, k

    def time_to_exit(self, x: np.ndarray, k: int) -> float:
        """Milliseconds for one image [1,3,H,W] to be answered at exit ``k`` (forced), as predict runs it."""
        if self._single is not None:
            return self._predict_one_graph(x, "max-prob", None, leave_at=k).latency_ms
        _, _, marks = run_until(self._chain(), x, None, last=k)  # nobody leaves early
        return (marks[-1] - marks[0]) * 1000.0

    @property
    def single_graph(self) -> bool:
        """Whether batch-1 predictions run through early_exit.onnx (one call) rather than the segment chain."""
        return self._single is not None

    def _run(self, x: np.ndarray, criterion: str, threshold: Threshold, early_exit: bool = True) -> List[Prediction]:
        n = x.shape[0]
        if n == 1:
            return [self._predict_batch1(x, criterion, threshold, early_exit)]
        last = len(self._segments) - 1
        classes = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float32)
        exits = np.empty(n, dtype=np.int64)
        active = np.arange(n)  # input positions of the samples still running
        feed = x
        marks = []
        start = time.perf_counter()
        thresholds = criteria.per_exit(threshold, self.num_exits)
        for k, segment in enumerate(self._segments):
            outputs = self._run_graph(segment, feed)
            probs = outputs[0]
            if k == last:
                leave = np.ones(len(active), dtype=bool)
            elif early_exit:
                leave = exit_mask(probs, criterion, thresholds[k])
            else:
                leave = np.zeros(len(active), dtype=bool)
            if leave.any():
                who = active[leave]
                p = probs[leave]
                classes[who] = p.argmax(axis=1)
                confidence[who] = p.max(axis=1)
                exits[who] = k
            marks.append(time.perf_counter())
            if k == last or leave.all():
                break
            if leave.any():  # compaction: only the samples still running go on
                keep = ~leave
                active = active[keep]
                feed = outputs[1][keep]
            else:
                feed = outputs[1]
        marks.insert(0, start)
        times_ms = [(b - a) * 1000.0 for a, b in zip(marks, marks[1:])]
        return [self._prediction(c, conf, e, times_ms)
                for c, conf, e in zip(classes.tolist(), confidence.tolist(), exits.tolist())]


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ErdeError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)
