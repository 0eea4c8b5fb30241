"""The "unsure" floor of a model folder, measured: coverage against accuracy on the answered images, on the
validation split (where the floor was chosen) and on the test split, and how many non-CIFAR photos it
answers "unsure".

    python scripts/unsure_report.py --data ../shared/datasets/cifar10 --out benchmarks/results/unsure

Writes OUT/README.md and OUT/curve.csv for the bundled fp32 and int8 models (or --model DIR ...). Torch-free.
The photos are scikit-image's sample photos (none of the ten CIFAR-10 classes), kept as 128-pixel uint8 arrays in
tests/data/photos.npz, one array per photo name.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from erde.runtime.common.cli import Parser, run_cli

ROOT = Path(__file__).resolve().parents[1]
FLOORS = np.round(np.arange(0.0, 1.0001, 0.05), 2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = Parser(prog="python scripts/unsure_report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, action="append", help="model folder (default: both bundled ones)")
    ap.add_argument("--photos", type=Path, default=ROOT / "tests" / "data" / "photos.npz")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args, argv), argv)


def _run(args, argv) -> int:
    from erde.runtime import bundled_model
    from erde.runtime.common import machine
    from erde.runtime.tools.calibrate import default_val_fraction, validation_files, validation_probs
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.core.engine import Engine
    from erde.runtime.common.errors import ErdeError
    from erde.runtime.common.ownership import BENCH_TOOLS, build_folder
    from erde.runtime.core.preprocess import preprocess
    from erde.runtime.core.unsure import answers, curve

    models = args.model or [bundled_model("cifar10"), bundled_model("cifar10-int8")]
    with np.load(args.photos, allow_pickle=False) as z:
        photos = {name: z[name] for name in sorted(z.files)}
    rows, md = [], []
    for folder in models:
        e = Engine.load(folder)
        m, (crit, t, _) = e.manifest, e.resolve_threshold()
        if m.unsure is None:
            raise ErdeError(f"{folder}: no unsure floor; calibrate it with erde-calibrate --unsure-coverage C")
        vd = validation_files(args.data, m.class_names, default_val_fraction(m))
        test = image_folder_split(args.data, "test")
        result = {}
        for split, files, labels in (("validation", vd.files, vd.labels), ("test", test.files, test.labels)):
            cls, conf = answers(validation_probs(e, files), crit, t)
            right = cls == labels
            for f, cov, acc in curve(conf, right, FLOORS):
                rows.append([folder.name, split, f"{f:.2f}", f"{cov:.4f}", f"{acc:.4f}"])
            (_, cov, acc), = curve(conf, right, [m.unsure.floor])
            result[split] = (cov, acc, right.mean())
        cls, conf = answers(e.exit_probs(preprocess(list(photos.values()), m.preprocessing)), crit, t)
        unsure = conf < m.unsure.floor
        md += [f"### `{folder.name}` (floor {m.unsure.floor:.3f}, chosen for {m.unsure.target} "
               f"{m.unsure.target_value:g} on the validation split)", "",
               "| split | answered | accuracy on the answered | accuracy on all |", "|---|---:|---:|---:|"]
        md += [f"| {s} | {100 * c:.2f}% | {100 * a:.2f}% | {100 * o:.2f}% |" for s, (c, a, o) in result.items()]
        md += ["", f"Non-CIFAR photos answered \"unsure\": **{int(unsure.sum())} of {len(photos)}** "
               f"({100 * unsure.mean():.0f}%). Each: " + ", ".join(
                   f"{p} {'unsure' if u else m.class_names[c]} {x:.2f}"
                   for p, c, x, u in zip(photos, cls, conf, unsure)), ""]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["model", "split", "floor", "coverage", "accuracy_answered"]] + rows)
    head = ["# The \"unsure\" floor, measured", "",
            f"`python scripts/unsure_report.py {' '.join(argv or sys.argv[1:])}`", "",
            f"Machine: {machine.describe()}. The floor was chosen on the validation split only (`erde-calibrate "
            "--unsure-coverage`); the test split and the photos were read afterwards. `curve.csv` holds coverage "
            "against accuracy on the answered images at floors 0 to 1 in steps of 0.05, on both splits.", ""]

    def build(tmp: Path) -> None:
        (tmp / "README.md").write_text("\n".join(head + md))
        (tmp / "curve.csv").write_text(buf.getvalue())

    build_folder(args.out, True, "erde-record", BENCH_TOOLS, build)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
