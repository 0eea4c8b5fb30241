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
from types import SimpleNamespace

import numpy as np

import click

from erde.runtime.common.cli import PATH, command, command_line, console_script, data_option

ROOT = Path(__file__).resolve().parents[1]
FLOORS = np.round(np.arange(0.0, 1.0001, 0.05), 2)


@command("python scripts/unsure_report.py")
@data_option(True, "CIFAR-10 image folder")
@click.option("--model", type=PATH, multiple=True, help="Model folder, repeatable (default: both bundled ones).")
@click.option("--photos", type=PATH, default=ROOT / "tests" / "data" / "photos.npz", help="Non-CIFAR photos (.npz).")
@click.option("--out", type=PATH, required=True, help="Record folder to write.")
def cli(**kw) -> int:
    """How often the "unsure" floor answers, and how right the answers are, on validation, test and photos."""
    return _run(SimpleNamespace(**kw), command_line())


main = console_script(cli)


def _run(args, command: str) -> int:
    from erde.runtime import bundled_model
    from erde.runtime.common import machine
    from erde.runtime.common.datasets import validation_files
    from erde.runtime.core.manifest import default_val_fraction
    from erde.runtime.tools.calibrate import validation_probs
    from erde.runtime.common.datasets import image_folder_split
    from erde.runtime.core.engine import Engine
    from erde.runtime.common.errors import ErdeError
    from erde.runtime.common.ownership import write_record
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
            f"`{command}`", "",
            f"Machine: {machine.describe()}. The floor was chosen on the validation split only (`erde-calibrate "
            "--unsure-coverage`); the test split and the photos were read afterwards. `curve.csv` holds coverage "
            "against accuracy on the answered images at floors 0 to 1 in steps of 0.05, on both splits.", ""]

    write_record(args.out, {"README.md": "\n".join(head + md), "curve.csv": buf.getvalue()})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
