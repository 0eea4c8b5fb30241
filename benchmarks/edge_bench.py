"""erde-bench: latency, throughput, cold start and memory of an early-exit model folder on this machine.

Needs only the runtime extra (onnxruntime, numpy, Pillow); matplotlib (plot)
and torch (the PyTorch eager early-exit loop, with ``--checkpoint``) are used
when importable, and the output says what was skipped and why.

Measured after a warm-up, on the same images (read from ``--images``,
preprocessed once, cycled):
- batch 1, per image (wall time of one call): p50 / p95 / p99 / mean for the
  engine at each threshold, the engine forced through all segments, the
  static student ``full.onnx`` in one session, and the PyTorch eager loop;
  the mean latency per exit taken, the exit histogram and the mean MACs.
- batch N: throughput (images/s) for the engine at each threshold and ``full.onnx``.
- cold start: process start to the first result of ``erde-run --json`` in a
  fresh process (median of ``--cold-starts`` runs), and that process's peak RSS.
- peak RSS of this process (onnxruntime only, and at the end).

The onnxruntime methods run in rounds (each method a block of images per
round), so that a clock or temperature drift spreads over all of them; the
PyTorch loop runs after them, so its thread pool does not compete with them.

Output in ``--out``: results.csv, summary.md, plot.png (written atomically).
Exit codes: 0 done; 2 nothing could be measured (bad option, model folder, images).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np

from erde.runtime import criteria
from erde.runtime.files import write_atomic
from erde.runtime.cliargs import Parser, run_cli
from erde.runtime.errors import ErdeError
from erde.runtime.manifest import CRITERIA

DEFAULT_THRESHOLDS: Dict[str, Tuple[float, ...]] = {
    "max-prob": (0.5, 0.8, 0.9, 0.95, 0.99),
    "entropy": (0.5, 0.3, 0.2, 0.1, 0.05),
}
ENGINE, ENGINE_ALL, FULL, TORCH = "engine", "engine-all-segments", "full-onnx", "torch-eager"
EXIT_OK, EXIT_USAGE = 0, 2


# ----------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Series:
    """Timed calls of one (method, threshold, batch size)."""

    method: str
    threshold: Optional[float]
    batch: int
    run: Callable[[np.ndarray], List[int]]  # input -> exit index per image (-1: no exits, e.g. full.onnx)
    threshold_source: str = ""
    times_ms: List[float] = field(default_factory=list)  # one per call
    exits: List[int] = field(default_factory=list)  # one per image


@dataclass(frozen=True)
class Row:
    method: str
    threshold: Optional[float]
    threshold_source: str
    batch: int
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float
    mean_macs: float
    macs_fraction: float
    exit_shares: Tuple[float, ...]  # empty for full.onnx
    exit_mean_ms: Tuple[float, ...]  # mean latency per exit taken (batch 1); nan where no image left there


def _timed(series: Sequence[Series], inputs: Sequence[np.ndarray], warmup: int, repeats: int,
           rounds: int = 5) -> None:
    """Warm up every series, then time ``repeats`` calls of each, in rounds, on the same inputs."""
    n = len(inputs)
    for s in series:
        for i in range(warmup):
            s.run(inputs[i % n])
    rounds = max(1, min(rounds, repeats))
    bounds = [round(repeats * r / rounds) for r in range(rounds + 1)]
    clock = time.perf_counter
    for r in range(rounds):
        for s in series:
            for i in range(bounds[r], bounds[r + 1]):
                x = inputs[i % n]
                t0 = clock()
                exits = s.run(x)
                s.times_ms.append((clock() - t0) * 1000.0)
                s.exits.extend(exits)


def summarize(s: Series, cum_macs: Sequence[int], full_macs: int) -> Row:
    t = np.asarray(s.times_ms, dtype=np.float64)
    ex = np.asarray(s.exits, dtype=np.int64)
    num_exits = len(cum_macs)
    if len(ex) and ex.min() >= 0:
        mean_macs = float(np.asarray(cum_macs, dtype=np.float64)[ex].mean())
        shares = tuple(float(v) for v in np.bincount(ex, minlength=num_exits) / len(ex))
    else:
        mean_macs, shares = float(full_macs), ()
    per_exit: Tuple[float, ...] = ()
    if s.batch == 1 and shares:
        per_exit = tuple(float(t[ex == k].mean()) if (ex == k).any() else math.nan for k in range(num_exits))
    p50, p95, p99 = (float(v) for v in np.percentile(t, [50, 95, 99]))
    return Row(s.method, s.threshold, s.threshold_source, s.batch, len(t), p50, p95, p99, float(t.mean()),
               s.batch * len(t) / (t.sum() / 1000.0), mean_macs, mean_macs / full_macs, shares, per_exit)


# ----------------------------------------------------------------------------------------------------------
# Inputs


def find_images(folder: Union[str, Path]) -> List[Path]:
    """Image files under ``folder`` (recursively), hidden ones skipped, sorted by path."""
    from erde.runtime.preprocess import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise ErdeError(f"{folder}: {'no such folder' if not folder.exists() else 'not a folder'}; "
                        "pass --images DIR, a folder of images")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise ErdeError(f"{folder}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    return found


def load_inputs(files: Sequence[Path], pre, max_images: int) -> Tuple[np.ndarray, List[Path], List[str]]:
    """Preprocess up to ``max_images`` files (a seeded sample across the whole folder).

    Returns (array [N, 3, H, W], the files used, one line per unreadable file)."""
    from erde.runtime.preprocess import preprocess_one

    files = list(files)
    if len(files) > max_images:
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:max_images])
        files = [files[i] for i in keep]
    arrays, used, bad = [], [], []
    for p in files:
        try:
            arrays.append(preprocess_one(p, pre))
            used.append(p)
        except ErdeError as e:
            bad.append(str(e))
    if not arrays:
        raise ErdeError(f"none of the {len(files)} image files could be read (first: {bad[0]})")
    return np.stack(arrays), used, bad


def _batches(x: np.ndarray, batch: int) -> List[np.ndarray]:
    """Batches of ``batch`` images cut from x (views where possible; x is cycled if it is smaller)."""
    n = len(x)
    if n < batch:
        return [np.ascontiguousarray(x[np.arange(batch) % n])]
    return [x[s:s + batch] for s in range(0, n - batch + 1, batch)]


# ----------------------------------------------------------------------------------------------------------
# Methods


def engine_series(engine, thresholds: Sequence[Tuple[float, str]], criterion: str, batch: int) -> List[Series]:
    out = []
    for t, source in thresholds:
        def run(x: np.ndarray, t: float = t) -> List[int]:
            return [p.exit_index for p in engine.predict_array(x, t, criterion)]
        out.append(Series(ENGINE, t, batch, run, source))
    return out


def torch_eager(checkpoint: Path, manifest, threads: Optional[int], criterion: str, sample: np.ndarray
                ) -> Tuple[Callable[[float], Callable[[np.ndarray], List[int]]], Dict[str, str], np.ndarray]:
    """The PyTorch eager early-exit loop over the checkpoint's student.

    Returns (threshold -> run function, facts for the summary, every exit's
    probabilities [E, N, K] for ``sample``, to compare with the ONNX graphs).
    Raises ImportError without torch, ErdeError for a checkpoint that does not
    match the model folder."""
    import torch

    from erde.training.checkpoint import load_model

    model, ckpt = load_model(checkpoint)
    if model.cfg.num_exits != manifest.num_exits or list(ckpt["class_names"]) != list(manifest.class_names):
        raise ErdeError(f"{checkpoint}: {model.cfg.num_exits} exits and classes {ckpt['class_names']} do not match "
                        f"the model folder ({manifest.num_exits} exits); pass the checkpoint it was exported from")
    if threads is not None:
        torch.set_num_threads(threads)
    last = manifest.num_exits - 1
    facts = {"torch": str(torch.__version__), "torch_threads": str(torch.get_num_threads())}
    want = manifest.source.get("checkpoint_sha256", "")
    have = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    if want and want != have:
        facts["warning"] = (f"{checkpoint} is not the checkpoint this model folder was exported from "
                            "(sha256 differs from manifest source.checkpoint_sha256)")

    def make(t: float) -> Callable[[np.ndarray], List[int]]:
        def run(x_np: np.ndarray) -> List[int]:
            x = torch.from_numpy(x_np)
            with torch.inference_mode():
                for k in range(last + 1):
                    x, logits = model.run_segment(k, x)
                    if k == last:
                        return [k]
                    p = torch.softmax(logits, dim=1).numpy()
                    if criteria.passes(p, criterion, t).all():
                        return [k]
            return [last]
        return run

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(sample))
        probs = []
        for k in range(last + 1):
            x, logits = model.run_segment(k, x)
            probs.append(torch.softmax(logits, dim=1).numpy())
    return make, facts, np.stack(probs)


# ----------------------------------------------------------------------------------------------------------
# Cold start and memory


def _rss_mb(maxrss: float) -> float:
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, KiB else


def peak_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:
        return None
    return _rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def erde_run_command() -> List[str]:
    script = Path(sys.executable).parent / ("erde-run.exe" if os.name == "nt" else "erde-run")
    return [str(script)] if script.exists() else [sys.executable, "-m", "erde.runtime.cli"]


@dataclass(frozen=True)
class ColdStart:
    command: str
    times_ms: Tuple[float, ...]
    peak_rss_mb: Optional[float]  # the largest of the runs

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))


# Runs in a small launcher process: a child's peak RSS (ru_maxrss) starts at the RSS of the process that forked
# it, so erde-run is started from this small process, not from the benchmark (which holds models, maybe torch).
_LAUNCHER = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
first = p.stdout.readline()
ms = (time.perf_counter() - t0) * 1000.0
p.stdout.read()
err = p.stderr.read()
rss = None
if hasattr(os, "wait4"):
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
    rss = usage.ru_maxrss
else:
    p.wait()
print(json.dumps({"ms": ms, "first": first, "rc": p.returncode, "maxrss": rss, "err": err[-4000:]}))
"""


def cold_start(model_dir: Path, image: Path, threads: Optional[int], runs: int, timeout_s: float = 300.0) -> ColdStart:
    """Process start to the first result line of ``erde-run --json``, in fresh processes."""
    cmd = erde_run_command() + ["--model", str(model_dir), "--image", str(image), "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    times, rss = [], []
    for _ in range(runs):
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _LAUNCHER] + cmd, capture_output=True, text=True,
                                  timeout=timeout_s)
            res = json.loads(proc.stdout)
        except subprocess.TimeoutExpired:
            raise ErdeError(f"erde-run took more than {timeout_s:g} s in the cold-start run: {shlex.join(cmd)}") from None
        except ValueError:
            raise ErdeError(f"the cold-start launcher failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}") from None
        try:
            ok = res["rc"] == 0 and "exit_index" in json.loads(res["first"])
        except ValueError:
            ok = False
        if not ok:
            why = (res["err"].strip().splitlines() or [f"exit code {res['rc']}"])[-1]
            raise ErdeError(f"erde-run failed in the cold-start run ({why}): {shlex.join(cmd)}")
        times.append(float(res["ms"]))
        if res["maxrss"] is not None:
            rss.append(_rss_mb(res["maxrss"]))
    return ColdStart(shlex.join(cmd), tuple(times), max(rss) if rss else None)


# ----------------------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    names = []
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            names.append(m.group(1).strip())
            break
    try:
        board = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
        if board and board not in names:
            names.append(board)
    except OSError:
        pass
    if not names:
        names.append(platform.processor() or platform.machine() or "unknown")
    return "; ".join(names)


def machine_facts(threads: Optional[int], provider: str) -> Dict[str, str]:
    import onnxruntime
    import PIL

    try:
        usable = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "threads": str(threads) if threads is not None else "onnxruntime default (one per physical core)",
        "provider": provider,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "Pillow": PIL.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------------
# Writing


def results_csv(rows: Sequence[Row], criterion: str, num_exits: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "criterion", "threshold", "threshold_source", "batch", "calls", "p50_ms", "p95_ms",
                "p99_ms", "mean_ms", "throughput_ips", "mean_macs", "macs_fraction"]
               + [f"exit_{k + 1}_share" for k in range(num_exits)]
               + [f"exit_{k + 1}_mean_ms" for k in range(num_exits)])
    for r in rows:
        shares = [f"{v:.4f}" for v in r.exit_shares] or [""] * num_exits
        per_exit = [("" if math.isnan(v) else f"{v:.4f}") for v in r.exit_mean_ms] or [""] * num_exits
        w.writerow([r.method, criterion if r.threshold is not None else "",
                    "" if r.threshold is None else f"{r.threshold:g}", r.threshold_source, r.batch, r.calls,
                    f"{r.p50_ms:.4f}", f"{r.p95_ms:.4f}", f"{r.p99_ms:.4f}", f"{r.mean_ms:.4f}",
                    f"{r.throughput_ips:.2f}", f"{r.mean_macs:.1f}", f"{r.macs_fraction:.4f}"] + shares + per_exit)
    return buf.getvalue()


def _label(r: Row) -> str:
    if r.threshold is None:
        return r.method
    shown = r.threshold_source in ("calibrated", "manifest default")
    return f"{r.method} @ {r.threshold:g}" + (f" ({r.threshold_source})" if shown else "")


def _fmt_ratio(v: Optional[float], unit: str = "") -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}{unit}"


def _fmt_macs(v: float) -> str:
    return f"{v / 1e6:.3g} M"


@dataclass
class Report:
    command: str
    machine: Dict[str, str]
    model_dir: Path
    manifest: Any
    criterion: str
    reference: Tuple[float, str]  # threshold and its source
    images: str
    settings: Dict[str, str]
    rows: List[Row]
    cold: Optional[ColdStart]
    rss_ort_mb: Optional[float]
    rss_end_mb: Optional[float]
    torch_facts: Dict[str, str]
    skipped: List[str]
    ratios: Dict[str, Optional[float]]


def key_ratios(rows: Sequence[Row], reference: float, full_macs: int, all_macs: int) -> Dict[str, Optional[float]]:
    one = [r for r in rows if r.batch == 1]
    ref = next((r for r in one if r.method == ENGINE and r.threshold == reference), None)
    full = next((r for r in one if r.method == FULL), None)
    allseg = next((r for r in one if r.method == ENGINE_ALL), None)
    torch_ref = next((r for r in one if r.method == TORCH and r.threshold == reference), None)
    out: Dict[str, Optional[float]] = dict.fromkeys(
        ("tracking_vs_full", "tracking_vs_all_segments", "overhead_all_segments_vs_full",
         "overhead_all_segments_vs_full_p50", "speedup_vs_full",
         "speedup_vs_torch", "speedup_vs_all_segments"))
    if ref is not None and full is not None:
        out["tracking_vs_full"] = (ref.mean_ms / full.mean_ms) / (ref.mean_macs / full_macs)
        out["speedup_vs_full"] = full.mean_ms / ref.mean_ms
    if ref is not None and allseg is not None:
        out["tracking_vs_all_segments"] = (ref.mean_ms / allseg.mean_ms) / (ref.mean_macs / all_macs)
        out["speedup_vs_all_segments"] = allseg.mean_ms / ref.mean_ms
    if allseg is not None and full is not None:
        out["overhead_all_segments_vs_full"] = allseg.mean_ms / full.mean_ms
        out["overhead_all_segments_vs_full_p50"] = allseg.p50_ms / full.p50_ms  # robust to a few slow calls
    if ref is not None and torch_ref is not None:
        out["speedup_vs_torch"] = torch_ref.mean_ms / ref.mean_ms
    return out


def summary_md(rep: Report) -> str:
    m = rep.manifest
    t_ref, src = rep.reference
    rr = rep.ratios
    L: List[str] = [f"# Edge benchmark: {m.model_name} on {rep.machine['host']}", ""]
    L += ["## Machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in rep.machine.items()]
    if rep.torch_facts.get("torch"):
        L.append(f"| torch | {rep.torch_facts['torch']} ({rep.torch_facts.get('torch_threads', '?')} threads) |")
    L += ["", "Command:", "", "```", rep.command, "```", ""]
    cum = ", ".join(_fmt_macs(s.cumulative_macs) for s in m.segments)
    L += ["## Model and settings", "",
          f"- model folder: `{rep.model_dir}` ({m.model_name}, {m.num_exits} exits, {len(m.class_names)} classes)",
          f"- MACs per image: full model {_fmt_macs(m.full_macs)}; cumulative at each exit: {cum}",
          f"- criterion: {rep.criterion}; reference threshold {t_ref:g} ({src})"
          + (f"; calibration: {m.calibration.mode}, target {m.calibration.target:g}, val accuracy "
             f"{100 * m.calibration.val_accuracy:.2f}%" if m.calibration else ""),
          f"- images: {rep.images}"]
    L += [f"- {k}: {v}" for k, v in rep.settings.items()]
    if rep.torch_facts.get("warning"):
        L.append(f"- WARNING: {rep.torch_facts['warning']}")
    L += ["", "## Key numbers", "",
          f"At threshold {t_ref:g} ({src}), batch 1:", "",
          f"- tracking ratio (mean latency / full.onnx latency) / (mean MACs / full MACs): "
          f"**{_fmt_ratio(rr['tracking_vs_full'])}** (1.0 = latency tracks the MACs spent; above 1 = the early "
          "exit saves less time than MACs)",
          f"- the same against the engine through all segments (its own MACs, heads included): "
          f"{_fmt_ratio(rr['tracking_vs_all_segments'])}",
          f"- overhead of the engine through all segments / full.onnx: {_fmt_ratio(rr['overhead_all_segments_vs_full'])}"
          f" on mean latency, {_fmt_ratio(rr['overhead_all_segments_vs_full_p50'])} on p50",
          f"- speed-up of the engine over full.onnx: {_fmt_ratio(rr['speedup_vs_full'], 'x')}; over the PyTorch "
          f"eager loop at the same threshold: {_fmt_ratio(rr['speedup_vs_torch'], 'x')}"]
    if rep.cold is not None:
        L.append(f"- cold start (process start to first result of erde-run, median of {len(rep.cold.times_ms)}): "
                 f"{rep.cold.median_ms:.0f} ms; runs: {', '.join(f'{t:.0f}' for t in rep.cold.times_ms)} ms; "
                 f"peak RSS of that process: {_mb(rep.cold.peak_rss_mb)}; command: `{rep.cold.command}`")
    L.append(f"- peak RSS of this process: {_mb(rep.rss_ort_mb)} with onnxruntime only, "
             f"{_mb(rep.rss_end_mb)} at the end" + (" (torch loaded)" if rep.torch_facts.get("torch") else ""))
    L += ["", "## Batch 1 latency (ms per image)", "",
          "| method | p50 | p95 | p99 | mean | MACs % of full | exits (%) | mean ms per exit taken |",
          "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in (r for r in rep.rows if r.batch == 1):
        shares = "/".join(f"{100 * s:.0f}" for s in r.exit_shares) or "-"
        per_exit = "/".join("-" if math.isnan(v) else f"{v:.3f}" for v in r.exit_mean_ms) or "-"
        L.append(f"| {_label(r)} | {r.p50_ms:.3f} | {r.p95_ms:.3f} | {r.p99_ms:.3f} | {r.mean_ms:.3f} | "
                 f"{100 * r.macs_fraction:.1f} | {shares} | {per_exit} |")
    batch_rows = [r for r in rep.rows if r.batch > 1]
    if batch_rows:
        L += ["", f"## Batch {batch_rows[0].batch} throughput", "",
              "| method | images/s | mean ms per batch | MACs % of full |", "|---|---:|---:|---:|"]
        L += [f"| {_label(r)} | {r.throughput_ips:.1f} | {r.mean_ms:.3f} | {100 * r.macs_fraction:.1f} |"
              for r in batch_rows]
    if rep.skipped:
        L += ["", "## Skipped", ""] + [f"- {s}" for s in rep.skipped]
    L += ["", "Latency is the wall time of one call (`Engine.predict_array`, `Engine.run_full`, or the eager loop) "
          f"on preprocessed input; preprocessing is not included. MACs: {m.mac_convention}.", ""]
    return "\n".join(L)


def _mb(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.0f} MB"


def plot_png(rows: Sequence[Row], title: str, full_macs: int) -> bytes:
    """Mean batch-1 latency against the MACs fraction, and batch-N throughput (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = [r for r in rows if r.batch == 1]
    many = [r for r in rows if r.batch > 1]
    fig, axes = plt.subplots(1, 2 if many else 1, figsize=(11 if many else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for method, style in ((ENGINE, "o-"), (TORCH, "s--")):
        pts = sorted((r.macs_fraction, r.mean_ms, r.threshold) for r in one if r.method == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
            for f, ms, t in pts:
                ax.annotate(f"{t:g}", (f, ms), textcoords="offset points", xytext=(4, 4), fontsize=7)
    full = next((r for r in one if r.method == FULL), None)
    allseg = next((r for r in one if r.method == ENGINE_ALL), None)
    if allseg is not None:
        ax.plot([allseg.macs_fraction], [allseg.mean_ms], "x", ms=9, label="engine, all segments")
    if full is not None:
        ax.plot([1.0], [full.mean_ms], "*", ms=12, label="full.onnx")
        xs = np.linspace(0, max([1.0] + [r.macs_fraction for r in one]), 20)
        ax.plot(xs, xs * full.mean_ms, ":", color="grey", label="latency proportional to MACs")
    ax.set_xlabel("mean MACs / full MACs")
    ax.set_ylabel("mean latency per image, batch 1 (ms)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    if many:
        ax2 = axes[0][1]
        labels = [_label(r).replace(" (", "\n(") for r in many]
        ax2.bar(range(len(many)), [r.throughput_ips for r in many])
        ax2.set_xticks(range(len(many)))
        ax2.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax2.set_ylabel(f"images/s at batch {many[0].batch}")
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# CLI


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _thresholds(text: str) -> List[float]:
    out = []
    for part in text.split(","):
        try:
            t = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise argparse.ArgumentTypeError(f"threshold {part.strip()} is not a number in [0, 1]")
        out.append(t)
    return out


def default_out() -> Path:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown"
    return Path("benchmarks") / "results" / f"edge-{host}"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="erde-bench", description="Benchmark an early-exit model folder on this machine: latency "
                "percentiles, throughput, cold start and memory, against full.onnx and (with --checkpoint and "
                "torch) a PyTorch eager early-exit loop.")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="model folder written by erde-export (default: the bundled CIFAR-10 model)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--thresholds", type=_thresholds, metavar="T,T,...",
                   help="exit thresholds to measure (default: 0.5,0.8,0.9,0.95,0.99 for max-prob, "
                        "0.5,0.3,0.2,0.1,0.05 for entropy); the calibrated threshold is always added")
    p.add_argument("--criterion", choices=CRITERIA,
                   help="exit rule (default: the calibrated one, else the manifest's default)")
    p.add_argument("--threads", type=_int(1), metavar="N", help="threads for onnxruntime, erde-run and torch "
                   "(default: each library's default)")
    p.add_argument("--provider", default="CPUExecutionProvider", metavar="NAME", help="onnxruntime execution provider")
    p.add_argument("--batch-size", type=_int(1), default=32, metavar="N", help="batch size for throughput (default 32)")
    p.add_argument("--repeats", type=_int(1), default=200, metavar="N", help="timed images per method at batch 1 "
                   "(default 200); at batch N, ceil(repeats / N) batches, at least 3")
    p.add_argument("--warmup", type=_int(0), default=20, metavar="N", help="untimed calls per method first (default 20)")
    p.add_argument("--max-images", type=_int(1), default=512, metavar="N",
                   help="preprocess at most N images, a seeded sample of the folder (default 512)")
    p.add_argument("--cold-starts", type=_int(0), default=5, metavar="N",
                   help="fresh erde-run processes timed for the cold start (default 5; 0 skips)")
    p.add_argument("--checkpoint", metavar="FILE", help="the student checkpoint (.pt) the folder was exported "
                   "from, for the PyTorch eager loop (needs torch)")
    p.add_argument("--out", metavar="DIR", help="output folder (default benchmarks/results/edge-<hostname>)")
    p.add_argument("--no-plot", action="store_true", help="do not draw plot.png")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _say(out: TextIO, text: str) -> None:
    print(text, file=out)
    out.flush()


def _run(args: argparse.Namespace, argv: Sequence[str], out: TextIO) -> int:
    from erde.runtime.cli import model_folder
    from erde.runtime.engine import Engine

    if args.provider not in _available_providers():
        raise ErdeError(f"onnxruntime provider {args.provider!r} is not available here; available: "
                        f"{', '.join(_available_providers())}")
    files = find_images(args.images)
    engine = Engine.load(model_folder(args.model_dir), threads=args.threads, providers=[args.provider])
    m = engine.manifest
    out_dir = Path(args.out) if args.out else default_out()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ErdeError(f"{out_dir}: cannot create the output folder ({e.strerror or e}); pass --out DIR") from None
    skipped: List[str] = []

    # Thresholds: the given (or default) list, plus the calibrated one; the reference is the calibrated one,
    # else the first given, else the manifest's default.
    cal = m.calibration
    criterion = args.criterion or (cal.criterion if cal is not None else m.default_criterion)
    ts: List[Tuple[float, str]] = [(float(t), "given") for t in (args.thresholds or [])]
    if not ts:
        ts = [(t, "default list") for t in DEFAULT_THRESHOLDS[criterion]]
    if cal is not None and cal.criterion == criterion:
        reference = (float(cal.threshold), "calibrated")
    else:
        if cal is not None:
            skipped.append(f"calibrated threshold ({cal.criterion} {cal.threshold:g}): --criterion {criterion} "
                           "differs")
        if args.thresholds:
            reference = (ts[0][0], "given")
        elif m.default_criterion == criterion:
            reference = (float(m.default_threshold), "manifest default")
        else:
            reference = (ts[0][0], "first of the list")
    sources = dict(ts)
    sources[reference[0]] = reference[1]
    ts = sorted(sources.items())
    for t, _ in ts:
        engine.resolve_threshold(t, criterion)  # range check with the criterion in the message

    x, used, bad = load_inputs(files, m.preprocessing, args.max_images)
    if bad:
        skipped.append(f"{len(bad)} unreadable image file(s), e.g. {bad[0]}")
    _say(out, f"model {m.model_name} ({engine.folder}), {m.num_exits} exits; {len(used)} images from {args.images}; "
              f"criterion {criterion}, thresholds {', '.join(f'{t:g}' for t, _ in ts)} "
              f"(reference {reference[0]:g}, {reference[1]})")
    cum = [s.cumulative_macs for s in m.segments]
    full_macs = m.full_macs

    # Batch 1: onnxruntime methods, in rounds.
    singles = [x[i:i + 1] for i in range(len(x))]
    series = engine_series(engine, ts, criterion, 1)
    series.append(Series(ENGINE_ALL, None, 1,
                         lambda a: [p.exit_index for p in engine.predict_array(a, early_exit=False)]))
    if engine.has_full:
        series.append(Series(FULL, None, 1, lambda a: [-1] * len(engine.run_full(a))))
    else:
        skipped.append("full.onnx: the model folder has none (manifest 'full' is empty); the tracking and "
                       "overhead ratios against it are not available")
    _say(out, f"batch 1: {len(series)} onnxruntime methods x {args.repeats} images (warm-up {args.warmup})")
    _timed(series, singles, args.warmup, args.repeats)
    rss_ort = peak_rss_mb()

    # Batch N.
    batch_series: List[Series] = []
    if args.batch_size > 1:
        batches = _batches(x, args.batch_size)
        batch_series = engine_series(engine, ts, criterion, args.batch_size)
        if engine.has_full:
            batch_series.append(Series(FULL, None, args.batch_size, lambda a: [-1] * len(engine.run_full(a))))
        n_calls = max(3, math.ceil(args.repeats / args.batch_size))
        _say(out, f"batch {args.batch_size}: {len(batch_series)} methods x {n_calls} batches")
        _timed(batch_series, batches, max(1, math.ceil(args.warmup / args.batch_size)) if args.warmup else 0,
               n_calls)
    else:
        skipped.append("batch-N throughput: --batch-size is 1")

    # PyTorch eager loop, after the onnxruntime methods.
    torch_facts: Dict[str, str] = {}
    torch_series: List[Series] = []
    if not args.checkpoint:
        skipped.append("PyTorch eager loop: no --checkpoint given")
    else:
        try:
            make, torch_facts, eager = torch_eager(Path(args.checkpoint), m, args.threads, criterion, x[:16])
        except ImportError as e:
            skipped.append(f"PyTorch eager loop: torch (or erde.training) cannot be imported ({e})")
        except ErdeError as e:
            skipped.append(f"PyTorch eager loop: {e}")
        else:
            diff = float(np.abs(eager - engine.exit_probs(x[:16])).max())
            torch_facts["max_abs_prob_diff_vs_onnx"] = f"{diff:.2e}"
            torch_series = [Series(TORCH, t, 1, make(t), s) for t, s in ts]
            time.sleep(0.2)  # let onnxruntime's pool threads stop spinning
            _say(out, f"batch 1: PyTorch eager loop x {len(torch_series)} thresholds x {args.repeats} images")
            _timed(torch_series, singles, args.warmup, args.repeats)
            if "warning" in torch_facts:
                _say(out, f"warning: {torch_facts['warning']}")

    # Cold start.
    cold = None
    if args.cold_starts:
        if args.provider != "CPUExecutionProvider":
            skipped.append(f"cold start runs erde-run, which uses CPUExecutionProvider, not {args.provider}")
        _say(out, f"cold start: {args.cold_starts} fresh erde-run processes")
        cold = cold_start(engine.folder, used[0], args.threads, args.cold_starts)
    else:
        skipped.append("cold start: --cold-starts 0")

    rows = [summarize(s, cum, full_macs) for s in series + torch_series + batch_series]
    order = {ENGINE: 0, TORCH: 1, ENGINE_ALL: 2, FULL: 3}
    rows.sort(key=lambda r: (r.batch, order[r.method], -1 if r.threshold is None else r.threshold))
    ratios = key_ratios(rows, reference[0], full_macs, cum[-1])
    settings = {"threads": str(args.threads) if args.threads else "library defaults",
                "provider": args.provider, "batch size (throughput)": str(args.batch_size),
                "repeats (batch 1)": str(args.repeats), "warm-up calls": str(args.warmup)}
    if torch_facts.get("max_abs_prob_diff_vs_onnx"):
        settings["PyTorch eager vs ONNX, max probability difference (every exit, up to 16 images)"] = \
            torch_facts["max_abs_prob_diff_vs_onnx"]
    rep = Report(
        command=" ".join(["erde-bench"] + [shlex.quote(a) for a in argv]), machine=machine_facts(args.threads, args.provider),
        model_dir=engine.folder, manifest=m, criterion=criterion, reference=reference,
        images=f"{len(used)} of {len(files)} files under {args.images}", settings=settings, rows=rows, cold=cold,
        rss_ort_mb=rss_ort, rss_end_mb=peak_rss_mb(), torch_facts=torch_facts, skipped=skipped, ratios=ratios)

    plot_note = None
    if args.no_plot:
        plot_note = "plot.png: --no-plot"
    else:
        try:
            png = plot_png(rows, f"{m.model_name}, {rep.machine['cpu']}", full_macs)
        except ImportError as e:
            plot_note = f"plot.png: matplotlib cannot be imported ({e})"
        else:
            write_atomic(out_dir / "plot.png", png)
    if plot_note:
        skipped.append(plot_note)
    write_atomic(out_dir / "results.csv", results_csv(rows, criterion, m.num_exits))
    write_atomic(out_dir / "summary.md", summary_md(rep))

    t = reference[0]
    _say(out, f"at threshold {t:g} ({reference[1]}): tracking ratio {_fmt_ratio(ratios['tracking_vs_full'])}, "
              f"overhead all segments / full.onnx {_fmt_ratio(ratios['overhead_all_segments_vs_full'])} "
              f"(p50: {_fmt_ratio(ratios['overhead_all_segments_vs_full_p50'])}), "
              f"speed-up vs full.onnx {_fmt_ratio(ratios['speedup_vs_full'], 'x')}, "
              f"vs PyTorch eager {_fmt_ratio(ratios['speedup_vs_torch'], 'x')}")
    if cold is not None:
        _say(out, f"cold start: {cold.median_ms:.0f} ms (median of {len(cold.times_ms)})")
    for s in skipped:
        _say(out, f"skipped: {s}")
    _say(out, f"wrote {out_dir / 'results.csv'}, {out_dir / 'summary.md'}"
              + ("" if plot_note else f", {out_dir / 'plot.png'}"))
    return EXIT_OK


def _available_providers() -> List[str]:
    try:
        import onnxruntime
    except ImportError:
        raise ErdeError("onnxruntime is not installed; install the runtime with: pip install 'erde[runtime]'") from None
    return list(onnxruntime.get_available_providers())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _run(build_parser().parse_args(argv), argv, sys.stdout), argv)


if __name__ == "__main__":
    sys.exit(main())
