"""erde-bench's report: machine facts, results.csv, summary.md and plot.png (no host names or home paths)."""

from __future__ import annotations

import csv
import datetime
import io
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


from erde.runtime.common import machine
from erde.runtime.core.criteria import show
from .bench_measure import ENGINE, ENGINE_ALL, ENGINE_CMP, FULL, FULL_CMP, TORCH, Row
from .cold_start import ColdStart


# ----------------------------------------------------------------------------------------------------------
# Machine


def machine_facts(threads: Optional[int], provider: str) -> Dict[str, str]:
    import onnxruntime
    import PIL

    return {
        "cpu": machine.cpu_model(),
        "cpu flags (kernel-relevant)": " ".join(machine.isa_flags()),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cores": f"{os.cpu_count()} logical, {machine.usable_cores()} usable by this process",
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
                "p99_ms", "mean_ms", "throughput_ips", "mean_macs", "macs_fraction", "accuracy"]
               + [f"exit_{k + 1}_share" for k in range(num_exits)]
               + [f"exit_{k + 1}_mean_ms" for k in range(num_exits)])
    for r in rows:
        shares = [f"{v:.4f}" for v in r.exit_shares] or [""] * num_exits
        per_exit = [("" if math.isnan(v) else f"{v:.4f}") for v in r.exit_mean_ms] or [""] * num_exits
        w.writerow([r.method, criterion if r.threshold is not None else "",
                    "" if r.threshold is None else show(r.threshold), r.threshold_source, r.batch, r.calls,
                    f"{r.p50_ms:.4f}", f"{r.p95_ms:.4f}", f"{r.p99_ms:.4f}", f"{r.mean_ms:.4f}",
                    f"{r.throughput_ips:.2f}", f"{r.mean_macs:.1f}", f"{r.macs_fraction:.4f}",
                    "" if math.isnan(r.accuracy) else f"{r.accuracy:.4f}"] + shares + per_exit)
    return buf.getvalue()


def _label(r: Row) -> str:
    if r.threshold is None:
        return r.method
    shown = r.threshold_source in ("calibrated", "manifest default")
    return f"{r.method} @ {show(r.threshold)}" + (f" ({r.threshold_source})" if shown else "")


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
    compare: str = ""  # the --compare model folder, as given


def key_ratios(rows: Sequence[Row], reference: float, full_macs: int, all_macs: int) -> Dict[str, Optional[float]]:
    one = [r for r in rows if r.batch == 1]
    ref = next((r for r in one if r.method == ENGINE and r.threshold == reference), None)
    full = next((r for r in one if r.method == FULL), None)
    allseg = next((r for r in one if r.method == ENGINE_ALL), None)
    torch_ref = next((r for r in one if r.method == TORCH and r.threshold == reference), None)
    cmp_engine = next((r for r in one if r.method == ENGINE_CMP), None)
    cmp_full = next((r for r in one if r.method == FULL_CMP), None)
    out: Dict[str, Optional[float]] = dict.fromkeys(
        ("tracking_vs_full", "tracking_vs_all_segments", "overhead_all_segments_vs_full",
         "overhead_all_segments_vs_full_p50", "speedup_vs_full", "compare_engine_speedup", "compare_full_speedup",
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
    if ref is not None and cmp_engine is not None:
        out["compare_engine_speedup"] = ref.mean_ms / cmp_engine.mean_ms
    if full is not None and cmp_full is not None:
        out["compare_full_speedup"] = full.mean_ms / cmp_full.mean_ms
    return out


def summary_md(rep: Report) -> str:
    m = rep.manifest
    t_ref, src = rep.reference
    rr = rep.ratios
    L: List[str] = [f"# Edge benchmark: {m.model_name} on {rep.machine['cpu']}", ""]
    L += ["## Machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in rep.machine.items()]
    if rep.torch_facts.get("torch"):
        L.append(f"| torch | {rep.torch_facts['torch']} ({rep.torch_facts.get('torch_threads', '?')} threads) |")
    L += ["", "Command:", "", "```", rep.command, "```", ""]
    cum = ", ".join(_fmt_macs(s.cumulative_macs) for s in m.segments)
    L += ["## Model and settings", "",
          f"- model folder: `{rep.model_dir}` ({m.model_name}, {m.num_exits} exits, {len(m.class_names)} classes)",
          f"- MACs per image: full model {_fmt_macs(m.full_macs)}; cumulative at each exit: {cum}",
          f"- criterion: {rep.criterion}; reference threshold {show(t_ref)} ({src})"
          + (f"; calibration: {m.calibration.mode}, target {m.calibration.target:g}, val accuracy "
             f"{100 * m.calibration.val_accuracy:.2f}%" if m.calibration else ""),
          f"- images: {rep.images}"]
    L += [f"- {k}: {v}" for k, v in rep.settings.items()]
    if rep.torch_facts.get("warning"):
        L.append(f"- WARNING: {rep.torch_facts['warning']}")
    L += ["", "## Key numbers", "",
          f"At threshold {show(t_ref)} ({src}), batch 1:", "",
          f"- tracking ratio (mean latency / full.onnx latency) / (mean MACs / full MACs): "
          f"**{_fmt_ratio(rr['tracking_vs_full'])}** (1.0 = latency tracks the MACs spent; above 1 = the early "
          "exit saves less time than MACs)",
          f"- the same against the engine through all segments (its own MACs, heads included): "
          f"{_fmt_ratio(rr['tracking_vs_all_segments'])}",
          f"- overhead of the engine through all segments / full.onnx: {_fmt_ratio(rr['overhead_all_segments_vs_full'])}"
          f" on mean latency, {_fmt_ratio(rr['overhead_all_segments_vs_full_p50'])} on p50",
          f"- speed-up of the engine over full.onnx: {_fmt_ratio(rr['speedup_vs_full'], 'x')}; over the PyTorch "
          f"eager loop at the same threshold: {_fmt_ratio(rr['speedup_vs_torch'], 'x')}"]
    ref = next((r for r in rep.rows if r.batch == 1 and r.method == ENGINE and r.threshold == t_ref), None)
    full = next((r for r in rep.rows if r.batch == 1 and r.method == FULL), None)
    if ref is not None and full is not None and not math.isnan(ref.accuracy):
        L.append(f"- accuracy: {100 * ref.accuracy:.2f}% at this threshold, {100 * full.accuracy:.2f}% for full.onnx "
                 f"(the final exit): {100 * (full.accuracy - ref.accuracy):+.2f} points lost by leaving early")
    cmp = next((r for r in rep.rows if r.batch == 1 and r.method == ENGINE_CMP), None)
    if cmp is not None and rep.compare:
        acc = "" if math.isnan(cmp.accuracy) or ref is None else \
            f"; accuracy {100 * cmp.accuracy:.2f}% against {100 * ref.accuracy:.2f}%"
        L.append(f"- compared model `{rep.compare}`: its engine at threshold {show(cmp.threshold)} "
                 f"({cmp.threshold_source}) is {_fmt_ratio(rr['compare_engine_speedup'], 'x')} as fast as this engine "
                 f"at {t_ref:g}{acc}; its full.onnx is {_fmt_ratio(rr['compare_full_speedup'], 'x')} as fast as this one")
    if rep.cold is not None:
        L.append(f"- cold start (process start to first result of erde-run, median of {len(rep.cold.times_ms)}): "
                 f"{rep.cold.median_ms:.0f} ms; runs: {', '.join(f'{t:.0f}' for t in rep.cold.times_ms)} ms; "
                 f"peak RSS of that process: {_mb(rep.cold.peak_rss_mb)}; command: `{rep.cold.command}`")
    L.append(f"- peak RSS of this process: {_mb(rep.rss_ort_mb)} with onnxruntime only, "
             f"{_mb(rep.rss_end_mb)} at the end" + (" (torch loaded)" if rep.torch_facts.get("torch") else ""))
    L += ["", "## Batch 1 latency (ms per image)", "",
          "| method | accuracy | p50 | p95 | p99 | mean | MACs % of full | exits (%) | mean ms per exit taken |",
          "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in (r for r in rep.rows if r.batch == 1):
        shares = "/".join(f"{100 * s:.0f}" for s in r.exit_shares) or "-"
        per_exit = "/".join("-" if math.isnan(v) else f"{v:.3f}" for v in r.exit_mean_ms) or "-"
        acc = "-" if math.isnan(r.accuracy) else f"{100 * r.accuracy:.2f}%"
        L.append(f"| {_label(r)} | {acc} | {r.p50_ms:.3f} | {r.p95_ms:.3f} | {r.p99_ms:.3f} | {r.mean_ms:.3f} | "
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
    """Accuracy against mean batch-1 latency (the primary axis) and against MACs, and batch-N throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = [r for r in rows if r.batch == 1]
    many = [r for r in rows if r.batch > 1]
    has_acc = any(not math.isnan(r.accuracy) for r in one)
    fig, axes = plt.subplots(1, 3 if many else 2, figsize=(16 if many else 11, 4.2), squeeze=False)
    full = next((r for r in one if r.method == FULL), None)
    allseg = next((r for r in one if r.method == ENGINE_ALL), None)
    y_of = (lambda r: 100 * r.accuracy) if has_acc else (lambda r: r.mean_ms)
    for ax, x_of, xlabel in ((axes[0][0], lambda r: r.mean_ms, "mean latency per image, batch 1 (ms)"),
                             (axes[0][1], lambda r: r.macs_fraction, "mean MACs / full MACs")):
        for method, style in ((ENGINE, "o-"), (TORCH, "s--")):
            pts = sorted(((x_of(r), y_of(r), show(r.threshold)) for r in one if r.method == method))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
                for px, py, t in pts:
                    ax.annotate(t, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if allseg is not None:
            ax.plot([x_of(allseg)], [y_of(allseg)], "x", ms=9, label="engine, all segments")
        for method, marker in ((ENGINE_CMP, "D"), (FULL_CMP, "P")):
            for r in (r for r in one if r.method == method):
                ax.plot([x_of(r)], [y_of(r)], marker, ms=8, label=method)
        if full is not None:
            ax.plot([x_of(full)], [y_of(full)], "*", ms=12, label="full.onnx (static)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)" if has_acc else "mean latency per image, batch 1 (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(title, fontsize=9)
    if many:
        ax2 = axes[0][2]
        labels = [_label(r).replace(" (", "\n(") for r in many]
        ax2.bar(range(len(many)), [r.throughput_ips for r in many])
        ax2.set_xticks(range(len(many)))
        ax2.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax2.set_ylabel(f"images/s at batch {many[0].batch}")
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def figure_png(fig, dpi: int = 120) -> bytes:
    """A matplotlib figure as PNG bytes (then written atomically by the caller); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
