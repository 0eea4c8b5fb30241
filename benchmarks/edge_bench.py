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

Output in ``--out``: results.csv, summary.md, plot.png (the folder swapped into place whole;
an existing one replaced only as ``erde.runtime.common.ownership`` allows).
Exit codes: 0 done; 2 nothing could be measured (bad option, model folder, images).
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, TextIO, Tuple

import click

import numpy as np

from erde.runtime.common.cli import (COUNT, PATH, POSITIVE, command, command_line, console_script, force_option, model_option,
                                    no_verify_option)
from erde.runtime.common.errors import ErdeError
from erde.runtime.common.files import write_atomic
from erde.runtime.common.ownership import BENCH_TOOLS, build_folder, check_replaceable
from erde.runtime.core.criteria import Threshold, show
from erde.runtime.core.manifest import CRITERIA

from .bench_measure import (DEFAULT_THRESHOLDS, ENGINE, ENGINE_ALL, ENGINE_CMP, FULL, FULL_CMP, TORCH, Series,
                            _batches, _timed, accuracies, engine_series, find_images, labels_of, load_inputs,
                            summarize, torch_eager)
from .bench_report import Report, _fmt_ratio, key_ratios, machine_facts, plot_png, results_csv, summary_md
from .cold_start import cold_start, peak_rss_mb

EXIT_OK, EXIT_USAGE = 0, 2


# ----------------------------------------------------------------------------------------------------------
# CLI


def _thresholds(ctx, param, text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            t = float(part)
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise click.BadParameter(f"threshold {part.strip()} is not a number in [0, 1]")
        out.append(t)
    return out


def default_out(model_name: str = "model", threads: Optional[int] = None) -> Path:
    """$ERDE_CACHE/bench/edge-<model>-<cpu>-<N>t: the same wherever erde-bench runs from."""
    from erde.runtime.common import machine
    from erde.runtime.common.datasets import cache_dir

    cpu = re.sub(r"[^A-Za-z0-9]+", "-", machine.cpu_model()).strip("-").lower()[:40] or "cpu"
    return cache_dir() / "bench" / f"edge-{model_name}-{cpu}-{machine.effective_threads(threads)}t"


@command("erde-bench")
@model_option
@click.option("--images", type=PATH, required=True, metavar="DIR", help="Folder of images (searched recursively).")
@click.option("--thresholds", callback=_thresholds, metavar="T,T,...",
              help="Exit thresholds to measure (default: " + "; ".join(
                  f"{','.join(f'{t:g}' for t in ts)} for {c}" for c, ts in DEFAULT_THRESHOLDS.items())
              + "); the calibrated threshold is always added.")
@click.option("--criterion", type=click.Choice(CRITERIA),
              help="Exit rule (default: the calibrated one, else the manifest's default).")
@click.option("--threads", type=POSITIVE, metavar="N",
              help="onnxruntime, erde-run and torch threads (default: one per core).")
@click.option("--provider", default="CPUExecutionProvider", metavar="NAME", help="onnxruntime execution provider.")
@click.option("--batch-size", type=POSITIVE, default=32, metavar="N", help="Batch size for throughput (default 32).")
@click.option("--repeats", type=POSITIVE, default=200, metavar="N",
              help="Timed images per method at batch 1 (default 200); at batch N, ceil(repeats / N) batches, at least 3.")
@click.option("--warmup", type=COUNT, default=20, metavar="N", help="Untimed calls per method first (default 20).")
@click.option("--max-images", type=POSITIVE, default=512, metavar="N",
              help="Preprocess at most N images, a seeded sample of the folder (default 512).")
@click.option("--cold-starts", type=COUNT, default=5, metavar="N",
              help="Fresh erde-run processes timed for the cold start (default 5; 0 skips).")
@click.option("--compare", metavar="DIR", help="A second model folder of the same model (e.g. its int8 copy from "
              "erde-quantize), timed in the same rounds at its own calibrated threshold.")
@click.option("--checkpoint", metavar="FILE", help="The student checkpoint (.pt) the folder was exported from, for "
              "the PyTorch eager loop (needs torch).")
@click.option("--out", metavar="DIR", help="Output folder: new or empty, or with --force one erde-bench wrote "
              "(default $ERDE_CACHE/bench/edge-<model>-<cpu>-<threads>t, replaced if erde-bench wrote it).")
@force_option
@click.option("--no-plot", is_flag=True, help="Do not draw plot.png.")
@no_verify_option
def cli(**kw) -> int:
    """Benchmark an early-exit model folder on this machine: latency percentiles, throughput, cold start and
    memory, against full.onnx and (with --checkpoint and torch) a PyTorch eager early-exit loop."""
    return _run(SimpleNamespace(**kw), command_line(), sys.stdout)


def _say(out: TextIO, text: str) -> None:
    print(text, file=out)
    out.flush()


def _run(args: SimpleNamespace, command: str, out: TextIO) -> int:
    from erde.runtime.tools.run_cli import model_folder
    from erde.runtime.core.engine import Engine

    if args.provider not in _available_providers():
        raise ErdeError(f"onnxruntime provider {args.provider!r} is not available here; available: "
                        f"{', '.join(_available_providers())}")
    files = find_images(args.images)
    from erde.runtime.core.selftest import require_verified

    engine = Engine.load(model_folder(args.model), threads=args.threads, providers=[args.provider])
    if not args.no_verify:
        require_verified(engine, args.threads)
    m = engine.manifest
    out_dir = Path(args.out) if args.out else default_out(m.model_name, args.threads)
    force = args.force or not args.out  # the default folder is erde-bench's own: replaced if it wrote it
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ErdeError(f"{out_dir.parent}: cannot create the output folder ({e.strerror or e}); pass --out DIR") from None
    check_replaceable(out_dir, force, "erde-bench", BENCH_TOOLS)  # before measuring, so a refusal costs nothing
    skipped: List[str] = []

    # Thresholds: the given (or default) list, plus the calibrated one; the reference is the calibrated one,
    # else the first given, else the manifest's default.
    cal = m.calibration
    criterion = args.criterion or (cal.criterion if cal is not None else m.default_criterion)
    ts: List[Tuple[Threshold, str]] = [(float(t), "given") for t in (args.thresholds or [])]
    if not ts:
        ts = [(t, "default list") for t in DEFAULT_THRESHOLDS[criterion]]
    if cal is not None and cal.criterion == criterion:
        reference = (cal.threshold, "calibrated")
    else:
        if cal is not None:
            skipped.append(f"calibrated threshold ({cal.criterion} {show(cal.threshold)}): --criterion {criterion} "
                           "differs")
        if args.thresholds:
            reference = (ts[0][0], "given")
        elif m.default_criterion == criterion:
            reference = (m.default_threshold, "manifest default")
        else:
            reference = (ts[0][0], "first of the list")
    sources = dict(ts)
    sources[reference[0]] = reference[1]
    ts = sorted(sources.items(), key=lambda item: _order(item[0]))
    for t, _ in ts:
        engine.resolve_threshold(t, criterion)  # range check with the criterion in the message

    x, used, bad = load_inputs(files, m.preprocessing, args.max_images)
    if bad:
        skipped.append(f"{len(bad)} unreadable image file(s), e.g. {bad[0]}")
    _say(out, f"model {m.model_name} ({engine.folder}), {m.num_exits} exits; {len(used)} images from {args.images}; "
              f"criterion {criterion}, thresholds {', '.join(show(t) for t, _ in ts)} "
              f"(reference {show(reference[0])}, {reference[1]})")
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
    cmp_engine, cmp_t, cmp_crit = None, None, criterion
    if args.compare:
        cmp_engine, cmp_crit, cmp_t = _compare_series(args.compare, engine, criterion, reference, args, series)
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
    labels = labels_of(used, m.class_names)
    if labels is None:
        skipped.append("accuracy: the images are not all in folders named after the model's classes")
    else:
        at, final = accuracies(engine, x, labels, criterion, [t for t, _ in ts])
        cmp_at, cmp_final = accuracies(cmp_engine, x, labels, cmp_crit, [cmp_t]) if cmp_engine else ({}, None)
        rows = [replace(r, accuracy=cmp_final if r.method == FULL_CMP else cmp_at[r.threshold]
                        if r.method == ENGINE_CMP else final if r.threshold is None else at[r.threshold])
                for r in rows]
    order = {ENGINE: 0, TORCH: 1, ENGINE_ALL: 2, FULL: 3, ENGINE_CMP: 4, FULL_CMP: 5}
    rows.sort(key=lambda r: (r.batch, order[r.method], _order(r.threshold)))
    ratios = key_ratios(rows, reference[0], full_macs, cum[-1])
    settings = {"threads": str(args.threads) if args.threads else "library defaults",
                "provider": args.provider, "batch size (throughput)": str(args.batch_size),
                "repeats (batch 1)": str(args.repeats), "warm-up calls": str(args.warmup)}
    if torch_facts.get("max_abs_prob_diff_vs_onnx"):
        settings["PyTorch eager vs ONNX, max probability difference (every exit, up to 16 images)"] = \
            torch_facts["max_abs_prob_diff_vs_onnx"]
    rep = Report(
        command=command, machine=machine_facts(args.threads, args.provider),
        model_dir=engine.folder, manifest=m, criterion=criterion, reference=reference,
        images=f"{len(used)} of {len(files)} files under {args.images}", settings=settings, rows=rows, cold=cold,
        rss_ort_mb=rss_ort, rss_end_mb=peak_rss_mb(), torch_facts=torch_facts, skipped=skipped, ratios=ratios,
        compare=args.compare or "")

    plot_note, png = None, None
    if args.no_plot:
        plot_note = "plot.png: --no-plot"
    else:
        try:
            png = plot_png(rows, f"{m.model_name}, {rep.machine['cpu']}", full_macs)
        except ImportError as e:
            plot_note = f"plot.png: matplotlib cannot be imported ({e})"
    if plot_note:
        skipped.append(plot_note)

    def build(tmp: Path) -> None:
        if png is not None:
            write_atomic(tmp / "plot.png", png)
        write_atomic(tmp / "results.csv", results_csv(rows, criterion, m.num_exits))
        write_atomic(tmp / "summary.md", summary_md(rep))

    build_folder(out_dir, force, "erde-bench", BENCH_TOOLS, build)

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


def _order(threshold: Optional[Threshold]) -> Tuple[float, str]:
    """Rows and thresholds sorted by threshold (per-exit ones by their mean), full.onnx first."""
    return (-1.0, "") if threshold is None else (float(np.mean(threshold)), show(threshold))


def _compare_series(folder: str, engine, criterion: str, reference: Tuple[Threshold, str], args,
                    series: List[Series]):
    """Add the --compare folder's engine (at its calibrated rule, criterion included) and full.onnx to ``series``;
    returns (its engine, the criterion, the threshold)."""
    from erde.runtime.core.engine import Engine

    from erde.runtime.core.selftest import require_verified

    other = Engine.load(folder, threads=args.threads, providers=[args.provider])
    if not args.no_verify:
        require_verified(other, args.threads)
    a, b = engine.manifest, other.manifest
    if list(a.class_names) != list(b.class_names) or a.preprocessing != b.preprocessing:
        raise ErdeError(f"{folder}: its classes or preprocessing differ from {engine.folder}; --compare takes a "
                        "copy of the same model (e.g. erde-quantize's int8 folder)")
    cal = b.calibration
    crit, t, source = ((cal.criterion, cal.threshold, "calibrated" if cal.criterion == criterion
                        else f"calibrated, criterion {cal.criterion}") if cal is not None
                       else (criterion, reference[0], "not calibrated: the main model's threshold"))
    series.append(Series(ENGINE_CMP, t, 1, lambda x: [p.exit_index for p in other.predict_array(x, t, crit)], source))
    if other.has_full:
        series.append(Series(FULL_CMP, None, 1, lambda x: [-1] * len(other.run_full(x))))
    return other, crit, t


def _available_providers() -> List[str]:
    try:
        import onnxruntime
    except ImportError:
        raise ErdeError("onnxruntime is not installed; install the runtime with: pip install 'erde[runtime]'") from None
    return list(onnxruntime.get_available_providers())


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
