"""What a run of erde-run over many images or frames adds up to: the summary printed at its end.

Images (or frames), latency per stage (mean, p50, p95), exit shares, "unsure" answers and class counts;
with labels (a folder whose sub-folders are class names), accuracy, also on the answered images, and a
confusion table; for a stream, frames per second and the frames skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


def label_of(path: str, class_names: Sequence[str]) -> Optional[int]:
    """The class an image's folder names (``.../cat/x.png`` -> "cat"), or None."""
    name = Path(path).parent.name
    return list(class_names).index(name) if name in class_names else None


@dataclass
class RunSummary:
    class_names: Sequence[str]
    num_exits: int
    what: str = "images"  # or "frames"
    stage_ms: Dict[str, List[float]] = field(default_factory=dict)  # e.g. {"inference": [...]}
    exits: List[int] = field(default_factory=list)
    classes: List[int] = field(default_factory=list)
    unsure: List[bool] = field(default_factory=list)
    labels: List[Optional[int]] = field(default_factory=list)
    skipped: int = 0
    failed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, pred, unsure: bool, label: Optional[int] = None, **stage_ms: float) -> None:
        self.exits.append(pred.exit_index)
        self.classes.append(pred.class_index)
        self.unsure.append(unsure)
        self.labels.append(label)
        for name, ms in stage_ms.items():
            self.stage_ms.setdefault(name, []).append(ms)

    def to_dict(self) -> dict:
        n = len(self.exits)
        d: dict = {self.what: n, "failed": self.failed, "wall_s": time.perf_counter() - self.started}
        if self.what == "frames":
            d.update(fps=n / d["wall_s"] if d["wall_s"] > 0 else None, skipped=self.skipped)
        d["ms"] = {k: {"mean": float(np.mean(v)), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
                   for k, v in self.stage_ms.items() if v}
        d["exit_shares"] = [self.exits.count(k) / n if n else 0.0 for k in range(self.num_exits)]
        d["unsure"] = sum(self.unsure)
        d["class_counts"] = {c: self.classes.count(i) for i, c in enumerate(self.class_names) if i in self.classes}
        if n and all(lab is not None for lab in self.labels):
            right = np.array(self.classes) == np.array(self.labels)
            answered = ~np.array(self.unsure)
            d["accuracy"] = float(right.mean())
            d["accuracy_answered"] = float(right[answered].mean()) if answered.any() else None
            confusion = np.zeros((len(self.class_names),) * 2, dtype=int)
            np.add.at(confusion, (np.array(self.labels), np.array(self.classes)), 1)
            d["confusion"] = confusion.tolist()
        return d

    def lines(self) -> List[str]:
        d = self.to_dict()
        n = d[self.what]
        head = f"summary: {n} {self.what}" + (f", {d['failed']} failed" if d["failed"] else "")
        if self.what == "frames" and d["fps"]:
            head += f", {d['fps']:.1f} frames/s, {d['skipped']} skipped"
        out = [head]
        for k, v in d["ms"].items():
            out.append(f"  {k} ms per {self.what[:-1]}: mean {v['mean']:.2f}, p50 {v['p50']:.2f}, p95 {v['p95']:.2f}")
        if n:
            out.append("  exits: " + " / ".join(f"{100 * s:.0f}%" for s in d["exit_shares"])
                       + f"; unsure: {d['unsure']} ({100 * d['unsure'] / n:.0f}%)")
            out.append("  classes: " + ", ".join(f"{c} {k}" for c, k in d["class_counts"].items()))
        if "accuracy" in d:
            ans = d["accuracy_answered"]
            out.append(f"  accuracy (folder names are classes): {100 * d['accuracy']:.2f}%"
                       + (f"; on the answered ones {100 * ans:.2f}%" if ans is not None else ""))
            if len(self.class_names) <= 12:
                w = min(10, max(len(c) for c in self.class_names))
                out.append("  confusion (rows: true class, columns: answer):")
                out.append("  " + " " * w + "".join(f" {c[:w]:>{w}}" for c in self.class_names))
                for c, row in zip(self.class_names, d["confusion"]):
                    out.append(f"  {c[:w]:<{w}}" + "".join(f" {v:>{w}}" for v in row))
        return out
