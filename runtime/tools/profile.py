"""Latency profiles: what each segment of a model folder costs, in milliseconds, on one machine.

MACs are the paper's currency; a user pays in milliseconds, and the two part
ways on narrow layers. A profile records, for one (CPU model, cores, threads,
onnxruntime version), the batch-1 latency of every segment (its ``run`` call
plus the exit test, as the engine runs it) and of ``full.onnx``. With the exit
shares of a threshold (from the calibration table) it gives the expected
latency per image: ``sum_k share_k * cumulative_ms[k]``.

Profiles live beside the manifest in ``latency_profile.json``, one entry per
machine key; they are tied to the model by the sha256s of its graphs. A
profile is never used on a machine it does not describe: ``find_profile``
raises ProfileError saying why (missing, corrupt, another CPU, thread count,
onnxruntime version or model).
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..common.machine import MachineKey
from ..common.errors import ErdeError
from ..common.files import MAX_MANIFEST_BYTES, UnsafePathError, json_depth_ok, read_capped, write_json_atomic
from ..core.manifest import Manifest, model_sha256
from ..common.ownership import check_updatable, record_files

PROFILE_NAME = "latency_profile.json"
PROFILE_FORMAT = "erde-latency-profile"
PROFILE_VERSION = 1
TRIM = 0.05  # the slowest 5% of calls (scheduler hiccups) are left out of each mean


class ProfileError(ErdeError):
    """A latency profile is missing, corrupt, or describes another machine or model."""


@dataclass(frozen=True)
class LatencyProfile:
    machine: MachineKey
    model_sha256: str  # of the segment and full graphs' sha256s, in manifest order
    segment_ms: Tuple[float, ...]  # added batch-1 latency of each exit: answering at k minus at k-1, trimmed means
    full_ms: Optional[float]  # full.onnx, batch 1, same trimming
    spread: float  # relative run-to-run spread of the all-segments latency across rounds, (max - min) / mean
    calls: int  # timed calls per graph
    measured: str  # UTC date and time

    @property
    def cumulative_ms(self) -> Tuple[float, ...]:
        return tuple(float(v) for v in np.cumsum(self.segment_ms))

    def expected_ms(self, exit_shares: Sequence[float]) -> float:
        """Expected latency per image when ``exit_shares[k]`` of the images leave at exit k."""
        if len(exit_shares) != len(self.segment_ms):
            raise ProfileError(f"{len(exit_shares)} exit shares for a profile of {len(self.segment_ms)} segments")
        return float(np.dot(np.asarray(exit_shares, dtype=np.float64), self.cumulative_ms))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---- measuring ------------------------------------------------------------------------------------


def _trimmed_mean(values: Sequence[float]) -> float:
    v = np.sort(np.asarray(values, dtype=np.float64))
    keep = max(1, int(round(len(v) * (1.0 - TRIM))))
    return float(v[:keep].mean())


def measure(engine, calls: int = 2000, rounds: int = 5, warmup: int = 50, seed: int = 0) -> LatencyProfile:
    """Time the answer at every exit (forced there) and full.onnx at batch 1, interleaved in rounds.

    ``engine.time_to_exit`` runs the model as ``predict`` does at batch 1 (the segment chain with its exit
    tests, or early_exit.onnx in one call), so the profile holds for either path; the Python work of a
    ``predict_array`` call around the graphs is measured too and added to every exit, so that the expected
    latency is the wall time of the call a user makes (what erde-bench times).

    Each round times every series in a block of consecutive calls, as erde-bench does. Calls alternated
    one by one would make each graph find its weights evicted by the others', and time them slower than
    they run on their own (benchmarks/results/README.md has the figures).
    """
    if calls < rounds or rounds < 1:
        raise ErdeError(f"need at least {rounds} calls (got {calls})")
    m = engine.manifest
    n_exits = m.num_exits
    x = np.random.default_rng(seed).standard_normal((1,) + engine._input_shape).astype(np.float32)
    clock = time.perf_counter

    def full_ms() -> float:
        t0 = clock()
        engine.run_full(x)
        return (clock() - t0) * 1000.0

    for _ in range(warmup):
        for k in range(n_exits):
            engine.time_to_exit(x, k)
        if engine.has_full:
            full_ms()
    def predict_ms() -> float:  # the whole call a user makes, result objects included
        t0 = clock()
        engine.predict_array(x, early_exit=False)
        return (clock() - t0) * 1000.0

    from ..common.progress import step

    cum: List[List[float]] = [[] for _ in range(n_exits)]
    full: List[float] = []
    whole: List[float] = []
    totals: List[float] = []
    per_round = max(1, calls // rounds)
    with step(f"timing {n_exits} exits and full.onnx in rounds of {per_round} calls", total=rounds) as tick:
        for r in range(rounds):  # each series in a block of consecutive calls, as a user's calls come
            for k in range(n_exits):
                cum[k] += [engine.time_to_exit(x, k) for _ in range(per_round)]
            last = [predict_ms() for _ in range(per_round)]
            whole += last
            if engine.has_full:
                full += [full_ms() for _ in range(per_round)]
            totals.append(_trimmed_mean(last))
            tick(r + 1)
    spread = (max(totals) - min(totals)) / float(np.mean(totals))
    # What predict adds around the graphs (argument checks, the Prediction) is paid at every exit alike.
    overhead = max(0.0, _trimmed_mean(whole) - _trimmed_mean(cum[-1]))
    cum_ms = [_trimmed_mean(c) + overhead for c in cum]
    segment_ms = [max(b - a, 1e-4) for a, b in zip([0.0] + cum_ms[:-1], cum_ms)]  # a tiny last step may be noise
    return LatencyProfile(
        machine=MachineKey.here(engine.threads), model_sha256=model_sha256(m), segment_ms=tuple(segment_ms),
        full_ms=_trimmed_mean(full) if full else None, spread=float(spread), calls=per_round * rounds,
        measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# ---- reading and writing --------------------------------------------------------------------------


def _from_dict(d: Any) -> LatencyProfile:
    try:
        mk = MachineKey(str(d["machine"]["cpu"]), int(d["machine"]["cores"]), int(d["machine"]["threads"]),
                        str(d["machine"]["onnxruntime"]), tuple(str(f) for f in d["machine"].get("flags", ["unknown"])),
                        str(d["machine"].get("arch", "unknown")))
        seg = tuple(float(v) for v in d["segment_ms"])
        full = None if d.get("full_ms") is None else float(d["full_ms"])
        p = LatencyProfile(mk, str(d["model_sha256"]), seg, full, float(d["spread"]), int(d["calls"]),
                           str(d["measured"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"an entry lacks or mistypes {e}") from None
    if not seg or not all(np.isfinite(v) and v > 0 for v in seg + ((full,) if full is not None else ())):
        raise ProfileError("latencies must be positive finite numbers")
    return p


def user_profile_path(manifest: Manifest) -> Path:
    """Where profiles go when the model folder may not be written (the installed bundle, a read-only folder):
    a per-user file named by the model's graphs, so it follows the model wherever its folder lies."""
    from ..common.datasets import cache_dir

    return cache_dir() / "profiles" / f"{model_sha256(manifest)[:32]}.json"


def load_profiles(folder: Union[str, Path], manifest: Optional[Manifest] = None) -> List[LatencyProfile]:
    """Every profile of the folder's latency_profile.json and, given the manifest, of the per-user file for
    its model ([] if there are none); ProfileError if one is corrupt."""
    found = _read_profiles(Path(folder) / PROFILE_NAME, folder)
    if manifest is not None:
        found += _read_profiles(user_profile_path(manifest), user_profile_path(manifest).parent)
    return found


def _read_profiles(path: Path, inside: Union[str, Path]) -> List[LatencyProfile]:
    if not path.exists() and not path.is_symlink():
        return []
    try:
        text = read_capped(path, MAX_MANIFEST_BYTES, inside=inside, what="latency profile").decode("utf-8")
        if not json_depth_ok(text):
            raise ValueError("nested too deeply")
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not an {PROFILE_FORMAT} file")
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"version {d.get('version')!r}, this erde reads version {PROFILE_VERSION}")
        return [_from_dict(e) for e in d["profiles"]]
    except ErdeError as e:
        raise ProfileError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: corrupt latency profile ({e}); measure again with erde-profile") from None


def save_profile(folder: Union[str, Path], profile: LatencyProfile, manifest: Optional[Manifest] = None) -> Path:
    """Add ``profile`` to the folder's profiles (replacing the one of the same machine key) and return the
    file written: the folder's latency_profile.json where erde may write it, else the per-user file."""
    folder = Path(folder)

    def is_profile(path: Path) -> bool:
        try:
            _read_profiles(path, path.parent)
        except ProfileError:
            return False
        return True

    try:
        check_updatable(folder, {PROFILE_NAME: is_profile}, "erde-profile", "")
        return _add_profile(folder / PROFILE_NAME, profile, record_in=folder)
    except (UnsafePathError, PermissionError, OSError):  # OSError: a read-only file system, say
        from ..core.manifest import load_manifest

        path = user_profile_path(manifest or load_manifest(folder))
        path.parent.mkdir(parents=True, exist_ok=True)
        return _add_profile(path, profile)


def _add_profile(path: Path, profile: LatencyProfile, record_in: Optional[Path] = None) -> Path:
    try:
        others = [p for p in _read_profiles(path, path.parent) if p.machine != profile.machine]
    except ProfileError:
        others = []  # a corrupt file of erde's format is replaced by a good one
    write_json_atomic(path, {"format": PROFILE_FORMAT, "version": PROFILE_VERSION,
                             "profiles": [p.to_dict() for p in others + [profile]]})
    if record_in is not None:
        record_files(record_in, "erde-profile", [PROFILE_NAME])
    return path


def find_profile(folder: Union[str, Path], manifest: Manifest, threads: Optional[int]) -> LatencyProfile:
    """The profile of this model on this machine at ``threads``; ProfileError saying why there is none."""
    here = MachineKey.here(threads)
    profiles = load_profiles(folder, manifest)
    fix = f"measure one with: erde-profile {folder} --threads {here.threads}"
    if not profiles:
        raise ProfileError(f"{Path(folder) / PROFILE_NAME}: no latency profile; {fix}")
    sha = model_sha256(manifest)
    for p in profiles:
        if p.machine == here and p.model_sha256 == sha:
            if len(p.segment_ms) != manifest.num_exits:
                raise ProfileError(f"{Path(folder) / PROFILE_NAME}: profile has {len(p.segment_ms)} segments, "
                                   f"the model {manifest.num_exits}; {fix}")
            return p
    mine = [p for p in profiles if p.model_sha256 == sha]
    if not mine:
        why = "measured on other graphs (the model was re-exported)"
    else:
        why = "measured for " + "; ".join(p.machine.describe() for p in mine)
    raise ProfileError(f"{Path(folder) / PROFILE_NAME}: no profile for this machine ({here.describe()}): {why}; {fix}")


def other_thread_counts(folder: Union[str, Path], manifest: Manifest, threads: Optional[int]) -> List[LatencyProfile]:
    """Profiles of this model on this machine at thread counts other than ``threads`` ([] if none or corrupt)."""
    here = MachineKey.here(threads)
    try:
        profiles = load_profiles(folder, manifest)
    except ProfileError:
        return []
    sha = model_sha256(manifest)
    return [p for p in profiles if p.model_sha256 == sha and len(p.segment_ms) == manifest.num_exits
            and replace(p.machine, threads=here.threads) == here and p.machine.threads != here.threads]
