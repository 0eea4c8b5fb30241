"""erde-profile: measure a model folder's per-segment latency on this machine and store the profile beside it.

    erde-profile [--model DIR] --threads 1

Writes (or updates) DIR/latency_profile.json with one entry for this
CPU model, core count, thread count and onnxruntime version. ``erde-run`` then
shows the expected latency at its threshold, and ``erde-calibrate`` chooses
thresholds in milliseconds. Measure on a quiet machine: nothing else running.
Exit codes as every erde command (see erde.runtime.common.cli).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace
from typing import TextIO

import click

from ..common.cli import POSITIVE, command, console_script, json_option, model_option, no_verify_option


@command("erde-profile")
@model_option
@click.option("--threads", type=POSITIVE, default=None, metavar="N",
              help="onnxruntime threads (default: one per core); a profile holds for this count only.")
@click.option("--calls", type=POSITIVE, default=2000, metavar="N", help="Timed calls per graph (default 2000).")
@json_option("the profile")
@no_verify_option
def cli(**kw) -> int:
    """Measure each segment's batch-1 latency (and full.onnx's) on this machine and store it beside the
    manifest."""
    return _run(SimpleNamespace(**kw), sys.stdout)


def _run(args: SimpleNamespace, out: TextIO) -> int:
    from .run_cli import model_folder
    from ..core.engine import Engine
    from .profile import measure, save_profile
    from ..core.selftest import require_verified

    engine = Engine.load(model_folder(args.model), threads=args.threads)
    if not args.no_verify:
        require_verified(engine, args.threads)
    prof = measure(engine, calls=max(args.calls, 5))
    path = save_profile(engine.folder, prof, engine.manifest)
    if args.as_json:
        print(json.dumps(dict(prof.to_dict(), cumulative_ms=list(prof.cumulative_ms), file=str(path))), file=out)
        return 0
    m = engine.manifest
    print(f"{m.model_name} on {prof.machine.describe()} ({prof.calls} calls per graph, "
          f"run-to-run spread {prof.spread * 100:.1f}%)", file=out)
    print("exit  segment ms  cumulative ms  cumulative MACs", file=out)
    for k, (s, c, seg) in enumerate(zip(prof.segment_ms, prof.cumulative_ms, m.segments)):
        print(f"{k + 1:>4}  {s:10.3f}  {c:13.3f}  {seg.cumulative_macs:>15,}", file=out)
    if prof.full_ms is not None:
        print(f"full.onnx: {prof.full_ms:.3f} ms for {m.full_macs:,} MACs; all segments cost "
              f"{prof.cumulative_ms[-1] / prof.full_ms:.2f}x full.onnx", file=out)
    print(f"wrote {path}", file=out)
    return 0


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
