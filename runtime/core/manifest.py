"""The model-folder manifest: a small, typed, versioned schema.

The exporter writes ``manifest.json``; the runtime reads and validates it. The
schema lives here, with no third-party imports, so the runtime can check a
model folder on a board that has neither torch nor onnx.

MAC convention: ``macs`` counts multiply-accumulate operations (one
multiply-add = 1 MAC) of Conv and Linear/Gemm layers only; BatchNorm, ReLU,
pooling, additions and softmax are not counted. fvcore calls the same number
a "flop".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .criteria import CRITERIA, Threshold  # noqa: F401 (CRITERIA re-exported: the manifest names these criteria)
from ..common.errors import ErdeError, ManifestError
from .unsure import Unsure, from_dict as unsure_from_dict
from ..common.files import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, json_depth_ok, read_capped, write_json_atomic  # noqa: F401

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAC_CONVENTION = "multiply-accumulates of Conv and Linear/Gemm layers (1 multiply-add = 1 MAC)"
RESIZE_RULES = ("stretch", "shorter-side-center-crop")
PRECISIONS = ("fp32", "int8")

Dim = Union[int, str]  # an int, or the name of a dynamic axis such as "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: List[Dim]
    dtype: str = "float32"


@dataclass(frozen=True)
class Segment:
    """One ONNX graph: backbone blocks up to an exit, plus that exit's head.

    ``inputs[0]`` is the image (first segment) or the previous segment's feature
    map. Outputs are ``probs_output`` (softmax probabilities of the exit) and,
    except for the last segment, ``feature_output`` fed to the next segment.
    """

    file: str
    sha256: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    probs_output: str
    feature_output: Optional[str]
    backbone_macs: int  # MACs of this segment's backbone part, per image
    head_macs: int  # MACs of this segment's exit head, per image
    cumulative_macs: int  # MACs spent by an image that leaves at this exit
    precision: str = "fp32"  # "fp32", or "int8" (static QDQ quantization, erde-quantize)


@dataclass(frozen=True)
class FullGraph:
    """The static student: the whole backbone and the final exit, no early exits."""

    file: str
    sha256: str
    input_name: str
    probs_output: str
    macs: int
    precision: str = "fp32"


@dataclass(frozen=True)
class EarlyExitGraph:
    """The whole model as one graph for batch 1 (nested If nodes; see erde.export.early_exit_graph).

    Inputs ``image`` [1,3,H,W], ``thresholds`` [E-1] float32 and ``criterion`` (int64, a position in CRITERIA);
    outputs ``probs``
    [1,K] and ``exit`` [1] int64. Optional: the engine falls back to the segment chain without it.
    """

    file: str
    sha256: str


@dataclass(frozen=True)
class Preprocessing:
    input_size: Tuple[int, int]  # (height, width)
    mean: Tuple[float, float, float]  # per channel, on 0..1 pixel values
    std: Tuple[float, float, float]
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize: str = "stretch"  # one of RESIZE_RULES; bilinear resampling


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen on the validation split (see erde-calibrate)."""

    criterion: str
    threshold: Threshold  # one for every early exit, or one per early exit
    mode: str  # "accuracy-drop" or "mac-budget"
    target: float
    val_accuracy: float
    val_mean_macs: float
    table_file: str = ""
    val_expected_ms: Optional[float] = None  # with a latency profile: expected batch-1 latency per image
    profile: str = ""  # the machine the latency profile describes ("" when MACs were the cost)
    confidence: float = 0.5  # accuracy-drop: level of the bound on the drop (0.5, older manifests: the estimate)


def preprocessing_from_dict(d: Dict[str, Any]) -> Preprocessing:
    """The Preprocessing a checkpoint stores (``dataclasses.asdict`` of it; older ones lack layout)."""
    return Preprocessing(tuple(d["input_size"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                         d.get("channel_order", "RGB"), d.get("layout", "NCHW"), d.get("resize", "stretch"))


@dataclass(frozen=True)
class Manifest:
    model_name: str
    class_names: List[str]
    preprocessing: Preprocessing
    segments: List[Segment]
    full: Optional[FullGraph] = None
    default_criterion: str = "max-prob"
    default_threshold: Threshold = 0.9
    calibration: Optional[Calibration] = None
    opset: int = 17
    mac_convention: str = MAC_CONVENTION
    metrics: Dict[str, float] = field(default_factory=dict)  # e.g. test accuracy per exit
    source: Dict[str, str] = field(default_factory=dict)  # checkpoint hash, package versions
    quantization: Dict[str, Any] = field(default_factory=dict)  # settings of erde-quantize; {} for fp32
    early_exit_graph: Optional[EarlyExitGraph] = None
    unsure: Optional[Unsure] = None  # the confidence floor below which erde-run answers "unsure" (erde.runtime.core.unsure)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def full_macs(self) -> int:
        """MACs of the static student (no exit heads), the reference for savings."""
        if self.full is not None:
            return self.full.macs
        return sum(s.backbone_macs for s in self.segments) + self.segments[-1].head_macs

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _check(cond: bool, msg: str, errors: List[str]) -> bool:
    if not cond:
        errors.append(msg)
    return cond


def _typed(d: Dict[str, Any], key: str, kind: Any, where: str, errors: List[str], default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            errors.append(f"{where}.{key}: missing")
        return None if default is ... else default
    value = d[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    _check(ok, f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}", errors)
    return value if ok else None


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "object", list: "list", str: "string", int: "int", float: "float", type(None): "null"}
    return " or ".join(names.get(k, getattr(k, "__name__", str(k))) for k in kinds)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..")


def _tensor(d: Any, where: str, errors: List[str]) -> Optional[TensorSpec]:
    if not _check(isinstance(d, dict), f"{where}: expected an object", errors):
        return None
    name = _typed(d, "name", str, where, errors)
    shape = _typed(d, "shape", list, where, errors)
    if shape is not None:
        for i, dim in enumerate(shape):
            _check(isinstance(dim, (int, str)) and not isinstance(dim, bool), f"{where}.shape[{i}]: bad dim {dim!r}", errors)
    dtype = _typed(d, "dtype", str, where, errors, "float32")
    return TensorSpec(name, list(shape or []), dtype) if name is not None and shape is not None else None


def _segment(d: Any, where: str, errors: List[str]) -> Optional[Segment]:
    if not _check(isinstance(d, dict), f"{where}: expected an object", errors):
        return None
    n_err = len(errors)
    inputs = [_tensor(t, f"{where}.inputs[{i}]", errors) for i, t in enumerate(_typed(d, "inputs", list, where, errors) or [])]
    outputs = [_tensor(t, f"{where}.outputs[{i}]", errors) for i, t in enumerate(_typed(d, "outputs", list, where, errors) or [])]
    seg = dict(
        file=_typed(d, "file", str, where, errors),
        sha256=_typed(d, "sha256", str, where, errors),
        probs_output=_typed(d, "probs_output", str, where, errors),
        feature_output=_typed(d, "feature_output", (str, type(None)), where, errors, None),
        backbone_macs=_typed(d, "backbone_macs", int, where, errors),
        head_macs=_typed(d, "head_macs", int, where, errors),
        cumulative_macs=_typed(d, "cumulative_macs", int, where, errors),
        precision=_typed(d, "precision", str, where, errors, "fp32"),
    )
    _check(seg["precision"] in PRECISIONS, f"{where}.precision: {seg['precision']!r} is not one of {PRECISIONS}",
           errors)
    _check(bool(inputs), f"{where}.inputs: empty", errors)
    for key in ("backbone_macs", "head_macs", "cumulative_macs"):
        if seg[key] is not None:
            _check(seg[key] >= 0, f"{where}.{key}: must not be negative", errors)
    if len(errors) > n_err:
        return None
    out_names = {t.name for t in outputs if t}
    _check(seg["probs_output"] in out_names, f"{where}.probs_output: {seg['probs_output']!r} is not an output", errors)
    if seg["feature_output"] is not None:
        _check(seg["feature_output"] in out_names, f"{where}.feature_output: {seg['feature_output']!r} is not an output", errors)
    _check(_plain_file_name(seg["file"]),
           f"{where}.file: {seg['file']!r} must be a plain file name inside the model folder", errors)
    return Segment(inputs=[t for t in inputs if t], outputs=[t for t in outputs if t], **seg)


def manifest_from_dict(d: Any) -> Manifest:
    """Validate a parsed manifest; raise one ManifestError listing every problem."""
    errors: List[str] = []
    if not isinstance(d, dict):
        raise ManifestError("manifest: expected a JSON object")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ManifestError(
            f"manifest schema_version is {version!r}, this runtime reads version {SCHEMA_VERSION}; "
            "re-export the model with a matching erde version"
        )
    where = "manifest"
    model_name = _typed(d, "model_name", str, where, errors)
    class_names = _typed(d, "class_names", list, where, errors)
    if class_names is not None:
        _check(len(class_names) >= 2 and all(isinstance(c, str) for c in class_names),
               "manifest.class_names: expected at least 2 strings", errors)
    p = _typed(d, "preprocessing", dict, where, errors)
    pre = None
    if p is not None:
        w = "manifest.preprocessing"
        size, mean, std = (_typed(p, k, list, w, errors) for k in ("input_size", "mean", "std"))
        ok = size is not None and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        _check(ok, f"{w}.input_size: expected [height, width] of positive ints", errors)
        for name, vals in (("mean", mean), ("std", std)):
            good = vals is not None and len(vals) == 3 and all(_is_number(v) for v in vals)
            _check(good and (name == "mean" or all(v > 0 for v in vals)), f"{w}.{name}: expected 3 numbers", errors)
        resize = _typed(p, "resize", str, w, errors, "stretch")
        _check(resize in RESIZE_RULES, f"{w}.resize: {resize!r} is not one of {RESIZE_RULES}", errors)
        order = _typed(p, "channel_order", str, w, errors, "RGB")
        _check(order in ("RGB", "BGR"), f"{w}.channel_order: {order!r} is not RGB or BGR", errors)
        layout = _typed(p, "layout", str, w, errors, "NCHW")
        _check(layout == "NCHW", f"{w}.layout: only NCHW is supported", errors)
        if not any(e.startswith(w) for e in errors):
            pre = Preprocessing(tuple(size), tuple(float(v) for v in mean), tuple(float(v) for v in std), order, layout, resize)
    segs_raw = _typed(d, "segments", list, where, errors) or []
    _check(len(segs_raw) >= 1, "manifest.segments: expected at least one segment", errors)
    segments = [_segment(s, f"manifest.segments[{i}]", errors) for i, s in enumerate(segs_raw)]
    full = None
    f = _typed(d, "full", (dict, type(None)), where, errors, None)
    if f is not None:
        w = "manifest.full"
        vals = {k: _typed(f, k, t, w, errors) for k, t in
                (("file", str), ("sha256", str), ("input_name", str), ("probs_output", str), ("macs", int))}
        if None not in vals.values():
            _check(_plain_file_name(vals["file"]), f"{w}.file: {vals['file']!r} must be a plain file name inside the model folder", errors)
            _check(vals["macs"] > 0, f"{w}.macs: must be positive", errors)
            prec = _typed(f, "precision", str, w, errors, "fp32")
            _check(prec in PRECISIONS, f"{w}.precision: {prec!r} is not one of {PRECISIONS}", errors)
            full = FullGraph(precision=prec, **vals)
    one_graph = None
    g = _typed(d, "early_exit_graph", (dict, type(None)), where, errors, None)
    if g is not None:
        w = "manifest.early_exit_graph"
        vals = {k: _typed(g, k, str, w, errors) for k in ("file", "sha256")}
        if None not in vals.values():
            _check(_plain_file_name(vals["file"]), f"{w}.file: {vals['file']!r} must be a plain file name inside the "
                   "model folder", errors)
            one_graph = EarlyExitGraph(**vals)
    crit = _typed(d, "default_criterion", str, where, errors, "max-prob")
    _check(crit in CRITERIA, f"manifest.default_criterion: {crit!r} is not one of {CRITERIA}", errors)
    thr = _threshold(_typed(d, "default_threshold", (int, float, list), where, errors, 0.9),
                     "manifest.default_threshold", len(segments), errors)
    cal = None
    c = _typed(d, "calibration", (dict, type(None)), where, errors, None)
    if c is not None:
        w = "manifest.calibration"
        vals = {k: _typed(c, k, t, w, errors) for k, t in
                (("criterion", str), ("threshold", (int, float, list)), ("mode", str), ("target", (int, float)),
                 ("val_accuracy", (int, float)), ("val_mean_macs", (int, float)))}
        table = _typed(c, "table_file", str, w, errors, "")
        ms = _typed(c, "val_expected_ms", (int, float, type(None)), w, errors, None)
        prof = _typed(c, "profile", str, w, errors, "")
        level = _typed(c, "confidence", (int, float), w, errors, 0.5)
        if None not in vals.values():
            _check(vals["criterion"] in CRITERIA, f"{w}.criterion: {vals['criterion']!r} is not one of {CRITERIA}", errors)
            vals["threshold"] = _threshold(vals["threshold"], f"{w}.threshold", len(segments), errors)
            _check(_is_number(level) and 0.5 <= level < 1.0, f"{w}.confidence: {level!r} is not a number in [0.5, 1)",
                   errors)
            cal = Calibration(table_file=table, val_expected_ms=ms, profile=prof or "",
                              confidence=float(level) if _is_number(level) else 0.5, **vals)
    opset = _typed(d, "opset", int, where, errors, 17)
    metrics = _typed(d, "metrics", dict, where, errors, {})
    source = _typed(d, "source", dict, where, errors, {})
    quantization = _typed(d, "quantization", dict, where, errors, {})
    unsure = None
    u = _typed(d, "unsure", (dict, type(None)), where, errors, None)
    if u is not None:
        try:
            unsure = unsure_from_dict(u)
        except ErdeError as e:
            errors.append(str(e))
    if segments and all(segments):
        for i, s in enumerate(segments[:-1]):
            _check(s.feature_output is not None, f"manifest.segments[{i}]: only the last segment may lack feature_output", errors)
        _check(segments[-1].feature_output is None, "manifest.segments[-1]: the last segment must not have feature_output", errors)
        cum = [s.cumulative_macs for s in segments]
        _check(cum == sorted(cum), "manifest.segments: cumulative_macs must not decrease", errors)
        files = [s.file for s in segments] + ([full.file] if full is not None else []) + ([one_graph.file] if one_graph else [])
        dupes = sorted({f for f in files if files.count(f) > 1})
        _check(not dupes, f"manifest: file name(s) {dupes} used by more than one graph", errors)
        if full is None:
            _check(sum(s.backbone_macs for s in segments) + segments[-1].head_macs > 0,
                   "manifest.segments: the MACs of the full model add up to 0; the exporter must record MACs", errors)
    if errors:
        raise ManifestError("invalid manifest: " + "; ".join(errors))
    return Manifest(
        model_name=model_name, class_names=list(class_names), preprocessing=pre, segments=segments, full=full,
        default_criterion=crit, default_threshold=thr, calibration=cal, opset=opset,
        mac_convention=d.get("mac_convention", MAC_CONVENTION), metrics=dict(metrics), source=dict(source),
        quantization=dict(quantization or {}), early_exit_graph=one_graph, unsure=unsure, schema_version=version,
    )


def load_manifest(folder: Union[str, Path]) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise ManifestError(f"{path}: no manifest; is this a model folder written by erde-export?")
    try:
        text = read_capped(path, MAX_MANIFEST_BYTES, inside=folder, what="manifest").decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text file; is this a model folder written by erde-export?") from None
    if not json_depth_ok(text):
        raise ManifestError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not an erde-export manifest")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    try:
        return manifest_from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def save_manifest(folder: Union[str, Path], manifest: Manifest) -> Path:
    manifest_from_dict(json.loads(json.dumps(manifest.to_dict())))  # never write what we could not read back
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path


def _threshold(value: Any, what: str, num_segments: int, errors: List[str]) -> Threshold:
    """A threshold read from JSON: a number in [0, 1], or a list of them, one per early exit (a tuple)."""
    if value is None:
        return 0.9  # its absence or type is already in ``errors``
    values = value if isinstance(value, list) else [value]
    ok = all(_is_number(v) and 0.0 <= v <= 1.0 for v in values)
    _check(ok, f"{what}: {value!r} is not a number in [0, 1]" + (" or a list of them" if isinstance(value, list)
                                                                 else ""), errors)
    if isinstance(value, list):
        _check(len(values) == max(num_segments - 1, 1), f"{what}: {len(values)} thresholds for "
               f"{num_segments - 1} early exits", errors)
        return tuple(float(v) for v in values) if ok else 0.9
    return float(value) if ok else 0.9


def model_sha256(manifest: Manifest) -> str:
    import hashlib

    parts = [s.sha256 for s in manifest.segments] + ([manifest.full.sha256] if manifest.full else [])
    parts += [manifest.early_exit_graph.sha256] if manifest.early_exit_graph else []
    return hashlib.sha256(",".join(parts).encode()).hexdigest()


def default_val_fraction(manifest: Manifest) -> float:
    """The manifest's ``source.val_fraction`` if the exporter recorded one, else 0.1 (erde-train's default)."""
    try:
        v = float(manifest.source.get("val_fraction", 0.1))
    except (TypeError, ValueError):
        return 0.1
    return v if 0 < v < 1 else 0.1
