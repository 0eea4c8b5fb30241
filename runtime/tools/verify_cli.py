"""erde-verify: does this machine give the answers the model folder was built with?

    erde-verify [MODEL_DIR] [--threads N] [--json]

Runs the folder's self-test (``selftest.npz``: validation images and the probabilities every exit gave on
the machine that built the folder) here and prints one ✓/✗ line per check: class agreement, exit agreement
at the folder's threshold, and the largest probability difference, against tolerances for the folder's
precision. The verdict is remembered for this machine fingerprint (CPU, instruction-set flags, cores,
threads, onnxruntime version) and model, so that erde-run and the other tools check only once.
Exit codes: 0 passed; 3 this machine's answers differ; 2 bad input (see erde.runtime.common.errors).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence, TextIO

from ..common.cli import Parser, positive_int, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="erde-verify", description="Check that this machine gives the answers a model folder was built "
                                               "with (its self-test); exit 3 if it does not.")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model folder (default: the bundled model)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="onnxruntime threads (default: one per usable core)")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _run(args: argparse.Namespace, out: TextIO) -> int:
    from .run_cli import model_folder
    from ..core.engine import Engine
    from ..common.machine import MachineKey
    from ..core.selftest import MismatchError, remember, verify

    t0 = time.perf_counter()
    engine = Engine.load(model_folder(args.model_dir), threads=args.threads)
    verdict = verify(engine)
    ms = (time.perf_counter() - t0) * 1000.0
    remember(engine, args.threads, verdict)
    here = MachineKey.here(args.threads).describe()
    if args.json:
        print(json.dumps({"model_dir": str(engine.folder), "passed": verdict.passed, "precision": verdict.precision,
                          "images": verdict.images, "machine": here, "built_on": verdict.built_on, "ms": ms,
                          "checks": [{"name": c.name, "value": c.value, "limit": c.limit, "ok": c.ok}
                                     for c in verdict.checks]}), file=out)
    else:
        print(f"{engine.manifest.model_name} ({engine.folder}), {verdict.precision}, {verdict.images} self-test "
              f"images built on {verdict.built_on}; here: {here}", file=out)
        for c in verdict.checks:
            print(f"  {c.line()}", file=out)
        print(f"{'passed' if verdict.passed else 'FAILED'} in {ms:.0f} ms (loading the folder included)", file=out)
    if not verdict.passed:
        raise MismatchError(f"{engine.folder}: this machine's answers differ from the model folder's self-test "
                            f"({verdict.summary()}); do not use it here")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(lambda: _run(build_parser().parse_args(argv), sys.stdout), argv)


if __name__ == "__main__":
    sys.exit(main())
