"""Report of the CIFAR-10 study: CSV files, the claims derived from them, markdown and a plot.

Every claim in the summary is computed by ``summarize`` from the two CSV files alone, so
a test can re-derive the summary from the committed CSVs. With several seeds, a method's
curve is the mean over its seeds, and a difference between two methods counts as a win or
a loss only when it is larger than the seed-to-seed range (max - min) of either method at
that point; otherwise it is a tie ("no difference").
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from erde.benchmarks.bench_report import figure_png
from erde.runtime.common.files import write_atomic

POINTS_CSV = "points.csv"
EXITS_CSV = "exits.csv"
SUMMARY_JSON = "summary.json"
STUDENTS = ("erde", "kd", "ce", "erde_beta0")
WITHIN = 0.01  # "no accuracy loss": within 1 point of the teacher's final exit


def rows_from_results(results: Sequence[Dict]) -> (List[Dict], List[Dict]):
    points, exits = [], []
    for r in results:
        for p in r["points"]:
            row = {"method": r["method"], "seed": r.get("seed", 0), "criterion": p["criterion"],
                   "threshold": p["threshold"],
                   "test_accuracy": round(p["accuracy"], 6), "mean_macs": round(p["mean_macs"], 1)}
            if "mean_ms" in p:
                row["mean_ms"] = round(p["mean_ms"], 5)
            for k, s in enumerate(p["exit_shares"]):
                row[f"share_exit_{k + 1}"] = round(s, 6)
            points.append(row)
        for k, (a, m) in enumerate(zip(r["exit_accuracy"], r["cumulative_macs"])):
            row = {"method": r["method"], "seed": r.get("seed", 0), "exit": k + 1, "test_accuracy": round(a, 6),
                   "cumulative_macs": int(m), "full_macs": int(r["full_macs"])}
            if "cumulative_ms" in r:
                row.update(cumulative_ms=round(r["cumulative_ms"][k], 5), full_ms=round(r["full_ms"], 5))
            exits.append(row)
    return points, exits


def to_csv(rows: List[Dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_csv(path: Path) -> List[Dict]:
    def value(k, v):
        return v if k in ("method", "criterion") else int(v) if k in ("seed", "exit") else float(v)

    with open(path, newline="") as fh:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]


def over_seeds(rows: List[Dict], key: Sequence[str], values: Sequence[str]) -> List[Dict]:
    """Mean of ``values`` over the seeds of each ``key``; adds ``seeds`` and ``accuracy_range`` (max - min)."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), []).append(r)
    out = []
    for k, rs in groups.items():
        row = dict(zip(key, k))
        for v in values:
            row[v] = float(np.mean([r[v] for r in rs]))
        accs = [r["test_accuracy"] for r in rs]
        row.update(seeds=len(rs), accuracy_range=float(max(accs) - min(accs)))
        out.append(row)
    return out


def point_means(points: List[Dict]) -> List[Dict]:
    """points.csv rows averaged over seeds, one per (method, criterion, threshold)."""
    costs = ("mean_macs", "mean_ms") if points and "mean_ms" in points[0] else ("mean_macs",)
    return over_seeds(points, ("method", "criterion", "threshold"), ("test_accuracy",) + costs)


def exit_means(exits: List[Dict]) -> List[Dict]:
    """exits.csv rows averaged over seeds, one per (method, exit)."""
    ms = ("cumulative_ms", "full_ms") if exits and "full_ms" in exits[0] else ()
    return over_seeds(exits, ("method", "exit"), ("test_accuracy", "cumulative_macs", "full_macs") + ms)


def _curve(points: List[Dict], method: str, criterion: str, value: str = "test_accuracy", cost: str = "mean_macs"):
    pts = sorted((p[cost], p[value]) for p in points if p["method"] == method and p["criterion"] == criterion)
    return np.array([m for m, _ in pts]), np.array([a for _, a in pts])


BUDGETS = 11  # matched-cost comparisons: evenly spaced budgets over the range both curves cover


def _at_budgets(points, a: str, b: str, criterion: str, cost: str) -> List[Dict]:
    """Both methods' accuracy at BUDGETS evenly spaced costs (linear interpolation of each curve)."""
    ac, aa = _curve(points, a, criterion, cost=cost)
    bc, ba = _curve(points, b, criterion, cost=cost)
    if len(ac) == 0 or len(bc) == 0:
        return []
    _, ar = _curve(points, a, criterion, "accuracy_range", cost)
    _, br = _curve(points, b, criterion, "accuracy_range", cost)
    lo, hi = max(ac[0], bc[0]), min(ac[-1], bc[-1])
    if hi < lo:
        return []
    out = []
    for c in np.linspace(lo, hi, BUDGETS):
        va, vb = float(np.interp(c, ac, aa)), float(np.interp(c, bc, ba))
        noise = max(float(np.interp(c, ac, ar)), float(np.interp(c, bc, br)))
        out.append({cost: float(c), a: va, b: vb, "difference": va - vb, "seed_range": noise,
                    "verdict": _verdict(va - vb, noise)})
    return out


def _verdict(difference: float, noise: float) -> int:
    """+1 a win, -1 a loss, 0 a tie: a difference within the seed-to-seed range is no difference."""
    return 0 if abs(difference) <= noise else (1 if difference > 0 else -1)


def _matched(points, a: str, b: str, criterion: str) -> List[Dict]:
    """Each point of method a against method b's accuracy interpolated at the same mean MACs."""
    bm, ba = _curve(points, b, criterion)
    _, br = _curve(points, b, criterion, "accuracy_range")
    out = []
    for p in points:
        if p["method"] != a or p["criterion"] != criterion:
            continue
        if len(bm) == 0 or not bm[0] <= p["mean_macs"] <= bm[-1]:
            continue  # outside b's MAC range: no interpolation
        other = float(np.interp(p["mean_macs"], bm, ba))
        noise = max(p["accuracy_range"], float(np.interp(p["mean_macs"], bm, br)))
        d = p["test_accuracy"] - other
        out.append({"threshold": p["threshold"], "mean_macs": p["mean_macs"], a: p["test_accuracy"], b: other,
                    "difference": d, "seed_range": noise, "verdict": _verdict(d, noise)})
    return out


def _per_threshold(points, a: str, b: str, criterion: str) -> List[Dict]:
    pa = {p["threshold"]: p for p in points if p["method"] == a and p["criterion"] == criterion}
    pb = {p["threshold"]: p for p in points if p["method"] == b and p["criterion"] == criterion}
    out = []
    for t in sorted(set(pa) & set(pb)):
        d = pa[t]["test_accuracy"] - pb[t]["test_accuracy"]
        noise = max(pa[t]["accuracy_range"], pb[t]["accuracy_range"])
        out.append({"threshold": t, f"{a}_accuracy": pa[t]["test_accuracy"], f"{b}_accuracy": pb[t]["test_accuracy"],
                    f"{a}_mean_macs": pa[t]["mean_macs"], f"{b}_mean_macs": pb[t]["mean_macs"],
                    "accuracy_difference": d, "seed_range": noise, "verdict": _verdict(d, noise)})
    return out


def summarize(points: List[Dict], exits: List[Dict]) -> Dict:
    """All claims of the summary, from the CSV rows only (means over seeds)."""
    points = point_means(points)
    exits = exit_means(exits)
    seeds = {p["method"]: p["seeds"] for p in points}
    teacher_final = max((e for e in exits if e["method"] == "teacher"), key=lambda e: e["exit"])
    t_acc, t_macs = teacher_final["test_accuracy"], teacher_final["full_macs"]
    s = {"teacher_final_accuracy": t_acc, "teacher_full_macs": t_macs, "seeds_per_method": seeds,
         "comparisons": {}}
    has_ms = "full_ms" in teacher_final
    if has_ms:
        s["teacher_full_ms"] = teacher_final["full_ms"]
        s["matched_latency"] = {}
        for a, b in (("erde", "kd"), ("erde", "ce"), ("erde", "erde_beta0"), ("kd", "ce")):
            rows = _at_budgets(points, a, b, "max-prob", "mean_ms")
            s["matched_latency"][f"{a} vs {b} (max-prob)"] = {
                "budgets": rows, "wins": sum(r["verdict"] > 0 for r in rows),
                "ties": sum(r["verdict"] == 0 for r in rows), "losses": sum(r["verdict"] < 0 for r in rows),
                "not_worse": sum(r["verdict"] >= 0 for r in rows)}
    for a, b in (("erde", "kd"), ("erde", "ce"), ("erde", "erde_beta0"), ("kd", "ce")):
        for criterion in ("max-prob", "entropy"):
            per_t = _per_threshold(points, a, b, criterion)
            matched = _matched(points, a, b, criterion)
            s["comparisons"][f"{a} vs {b} ({criterion})"] = {
                "per_threshold": per_t,
                "wins_at_threshold": sum(r["verdict"] > 0 for r in per_t),
                "ties_at_threshold": sum(r["verdict"] == 0 for r in per_t),
                "losses_at_threshold": sum(r["verdict"] < 0 for r in per_t),
                "matched_macs": matched,
                "wins_at_matched_macs": sum(r["verdict"] > 0 for r in matched),
                "ties_at_matched_macs": sum(r["verdict"] == 0 for r in matched),
                "losses_at_matched_macs": sum(r["verdict"] < 0 for r in matched),
                "mean_difference_at_matched_macs": (float(np.mean([r["difference"] for r in matched]))
                                                    if matched else None),
            }
    s["largest_mac_reduction_within_1_point"] = _largest_reduction(points, t_acc, "mean_macs", t_macs)
    if has_ms:
        s["largest_latency_reduction_within_1_point"] = _largest_reduction(points, t_acc, "mean_ms",
                                                                           teacher_final["full_ms"])
    return s


def _largest_reduction(points: List[Dict], t_acc: float, cost: str, teacher_cost: float) -> Dict:
    """Per method (the teacher's own exits too): the cheapest point within 1 point of the teacher's final exit."""
    best = {}
    for method in ("teacher",) + STUDENTS:
        ok = [p for p in points if p["method"] == method and p["test_accuracy"] >= t_acc - WITHIN]
        pick = min(ok, key=lambda p: p[cost]) if ok else None
        top = max((p for p in points if p["method"] == method), key=lambda p: p["test_accuracy"], default=None)
        best[method] = {
            "within_1_point": pick is not None,
            "reduction_vs_teacher": (teacher_cost / pick[cost]) if pick else None,
            "point": pick,
            "best_accuracy": top["test_accuracy"] if top else None,
            "best_accuracy_point": top,
        }
    return best


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{v * 100:.2f}%"


def _pct_range(row: Dict) -> str:
    """Mean accuracy, with the seed-to-seed range when there are several seeds."""
    if row["seeds"] < 2:
        return _pct(row["test_accuracy"])
    return f"{row['test_accuracy'] * 100:.2f}% (range {row['accuracy_range'] * 100:.2f})"


def _seeds_line(seeds: Dict[str, int]) -> str:
    students = sorted({n for m, n in seeds.items() if m != "teacher"})
    if students == [1]:
        return ("- One seed per student: the spread between seeds is not measured, so small differences may be "
                "noise.")
    return (f"- Seeds per student: {', '.join(f'{m} {n}' for m, n in seeds.items() if m != 'teacher')} (one "
            "teacher). Accuracies are means over seeds; a difference no larger than the seed-to-seed range "
            "(max - min) of either method is counted as a tie, not a win or a loss.")


def summary_markdown(s: Dict, exits: List[Dict], meta: Dict) -> str:
    b = meta["budget_config"]
    exits = exit_means(exits)
    n_exits = max(e["exit"] for e in exits)
    lines = [
        "# CIFAR-10 study: ERDE vs KD vs CE (generated by `scripts/cifar10_study.py`)",
        "",
        f"- Command: `{meta['command']}` (budget `{meta['budget']}`), git commit `{meta['git_commit']}`",
        f"- Machine: {meta['machine']}",
        f"- Teacher `{b['teacher_arch']}` ({b['teacher_epochs']} epochs); students `{b['student_arch']}` "
        f"({b['student_epochs']} epochs each, same seeds and schedule, only the loss differs)",
        f"- Test split: {meta['test_images']} images, evaluated with the ONNX Runtime engine on the exported models.",
        "- MACs: multiply-accumulates of Conv and Linear layers per image.",
        _seeds_line(s["seeds_per_method"]),
        f"- beta (entropy weight) chosen on the validation split: **{meta['beta_choice']['beta']}** — "
        f"{meta['beta_choice']['rule']} Scores: {meta['beta_choice']['scores']}. alpha = {b['alpha']}, "
        f"T = {b['temperature']}.",
        "",
        "## Per-exit test accuracy",
        "",
        "| model | " + " | ".join(f"exit {k}" for k in range(1, n_exits + 1)) + " | MACs to each exit |",
        "|---|" + "---|" * (n_exits + 1),
    ]
    for method in ("teacher",) + STUDENTS:
        rows = sorted((e for e in exits if e["method"] == method), key=lambda e: e["exit"])
        if rows:
            lines.append(f"| {method} | " + " | ".join(_pct_range(e) for e in rows) + " | "
                         + ", ".join(f"{e['cumulative_macs'] / 1e6:.2f}M" for e in rows) + " |")
    lines += ["", f"Teacher final exit: {_pct(s['teacher_final_accuracy'])} at "
              f"{s['teacher_full_macs'] / 1e6:.2f}M MACs (static network).", "",
              "## Largest MAC reduction against the teacher within 1 point of its final-exit accuracy", ""]
    lines += _reduction_lines(s["largest_mac_reduction_within_1_point"], "mean_macs", "fewer MACs",
                              lambda v: f"{v / 1e6:.2f}M MACs")
    if "teacher_full_ms" in s:
        lines += ["", "## Largest latency reduction against the teacher's full.onnx within 1 point of its final exit",
                  "", f"Expected milliseconds per image from each model's latency profile (batch 1, "
                  f"{meta.get('profile_threads', 1)} thread(s), this machine) and the exit shares on the test split. "
                  f"Teacher full.onnx: {s['teacher_full_ms']:.3f} ms.", ""]
        lines += _reduction_lines(s["largest_latency_reduction_within_1_point"], "mean_ms", "less time",
                                  lambda v: f"{v:.3f} ms")
        lines += ["", f"## ERDE against the baselines at {BUDGETS} matched latency budgets (max-prob)", "",
                  "Each method's mean curve (over seeds) is interpolated at evenly spaced expected latencies over the "
                  "range both curves cover; a difference within the seed-to-seed range is a tie.", "",
                  "| comparison | wins | ties | losses | not worse |", "|---|---|---|---|---|"]
        for name, c in s["matched_latency"].items():
            lines.append(f"| {name} | {c['wins']} | {c['ties']} | {c['losses']} | {c['not_worse']} of "
                         f"{len(c['budgets'])} |")
    lines += ["", "## ERDE against the baselines", "",
              "| comparison | wins / ties / losses at the same threshold | wins / ties / losses at matched MACs | "
              "mean accuracy difference at matched MACs |", "|---|---|---|---|"]
    for name, c in s["comparisons"].items():
        mean = c["mean_difference_at_matched_macs"]
        lines.append(f"| {name} | {c['wins_at_threshold']} / {c['ties_at_threshold']} / {c['losses_at_threshold']} | "
                     f"{c['wins_at_matched_macs']} / {c['ties_at_matched_macs']} / {c['losses_at_matched_macs']} | "
                     f"{'—' if mean is None else f'{mean * 100:+.2f} points'} |")
    lines += ["", "### ERDE vs KD, max-prob criterion, threshold by threshold", "",
              "| t | ERDE acc | ERDE MACs | KD acc | KD MACs | difference | seed range |",
              "|---|---|---|---|---|---|---|"]
    for r in s["comparisons"]["erde vs kd (max-prob)"]["per_threshold"]:
        lines.append(f"| {r['threshold']:g} | {_pct(r['erde_accuracy'])} | {r['erde_mean_macs'] / 1e6:.2f}M | "
                     f"{_pct(r['kd_accuracy'])} | {r['kd_mean_macs'] / 1e6:.2f}M | "
                     f"{r['accuracy_difference'] * 100:+.2f} | {r['seed_range'] * 100:.2f} |")
    lines += ["", "`erde_beta0` is the ablation: KD masked to teacher-right images, without the entropy term.",
              "", "## Time (seconds, this machine)", "",
              "Wall time of each step of the study command (a step reused from an earlier run counts only the "
              "check):", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in meta["timings_s"].items()]
    lines += ["", "Training time recorded in each checkpoint (sum over its epochs, whichever session ran them; "
              "epochs that shared the CPU with other work took longer):", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in meta.get("train_seconds_from_checkpoints", {}).items()]
    lines += ["", f"Files: `{POINTS_CSV}` (every method, criterion and threshold), `{EXITS_CSV}` "
              f"(per-exit accuracy), `{SUMMARY_JSON}` (these claims), `plot.png`.", ""]
    return "\n".join(lines)


def _reduction_lines(best: Dict, cost: str, unit: str, fmt) -> List[str]:
    lines = []
    for method, r in best.items():
        if r["within_1_point"]:
            p = r["point"]
            lines.append(f"- {method}: **{r['reduction_vs_teacher']:.2f}x** {unit} "
                         f"({p['criterion']} t={p['threshold']:g}: {_pct(p['test_accuracy'])}, {fmt(p[cost])})")
        else:
            p = r["best_accuracy_point"]
            lines.append(f"- {method}: never within 1 point of the teacher; its best is {_pct(r['best_accuracy'])} "
                         f"({p['criterion']} t={p['threshold']:g}, {fmt(p[cost])})")
    return lines


def plot(points: List[Dict], exits: List[Dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = point_means(points)
    t = max((e for e in exits if e["method"] == "teacher"), key=lambda e: e["exit"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if "mean_ms" in points[0]:  # latency first, MACs beside
        panels = ((axes[0], ("teacher",) + STUDENTS, "mean_ms", 1.0, "expected latency per image (ms, batch 1)"),
                  (axes[1], ("teacher",) + STUDENTS, "mean_macs", 1e6, "mean MACs per image (millions)"))
    else:  # right: the students' MAC range, where their curves crowd together
        panels = ((axes[0], ("teacher",) + STUDENTS, "mean_macs", 1e6, "mean MACs per image (millions)"),
                  (axes[1], STUDENTS, "mean_macs", 1e6, "mean MACs per image (millions)"))
    for ax, methods, cost, scale, label in panels:
        for method in methods:
            style = {"teacher": "k-", "erde": "C0-", "kd": "C1-", "ce": "C2-", "erde_beta0": "C3--"}[method]
            m, a = _curve(points, method, "max-prob", cost=cost)
            _, r = _curve(points, method, "max-prob", "accuracy_range", cost)
            if len(m):
                ax.plot(m / scale, a * 100, style, marker="o", ms=3, label=method)
                if r.any():  # several seeds: shade mean +- half the range
                    ax.fill_between(m / scale, (a - r / 2) * 100, (a + r / 2) * 100, color=style[:2], alpha=0.15,
                                    lw=0)
        ax.set_xlabel(label)
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.axhline(t["test_accuracy"] * 100 - 1, color="gray", lw=0.8, ls=":", label="teacher final exit - 1 point")
        ax.set_title("max-prob sweep, mean over seeds (shade: seed range)")
        ax.legend()
    fig.tight_layout()
    write_atomic(path, figure_png(fig, dpi=120))
    return True


def _write_claims(folder: Path, meta: Dict) -> Dict:
    points, exits = read_csv(folder / POINTS_CSV), read_csv(folder / EXITS_CSV)  # claims come from the CSVs
    s = summarize(points, exits)
    write_atomic(folder / SUMMARY_JSON, json.dumps({"summary": s, "meta": meta}, indent=2))
    write_atomic(folder / "README.md", summary_markdown(s, exits, meta))
    plot(points, exits, folder / "plot.png")
    return s


def write_report(folder: Path, results: Sequence[Dict], meta: Dict) -> Dict:
    folder.mkdir(parents=True, exist_ok=True)
    points, exits = rows_from_results(results)
    write_atomic(folder / POINTS_CSV, to_csv(points))
    write_atomic(folder / EXITS_CSV, to_csv(exits))
    return _write_claims(folder, meta)


def regenerate(folder: Path) -> Dict:
    """Summary, README and plot again from a results folder's CSVs and the run facts kept in summary.json."""
    meta = json.loads((folder / SUMMARY_JSON).read_text())["meta"]
    return _write_claims(folder, meta)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        regenerate(Path(arg))
        print(f"regenerated {arg} from its CSVs")
