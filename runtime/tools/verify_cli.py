"""erde-verify: does this machine give the answers the model folder was built with?

    erde-verify [--model DIR] [--threads N] [--json]

Runs the folder's self-test (``selftest.npz``: validation images and the probabilities every exit gave on
the machine that built the folder) here and prints one ✓/✗ line per check: class agreement, exit agreement
at the folder's threshold, and the largest probability difference, against tolerances for the folder's
precision. The verdict is remembered for this machine fingerprint (CPU, instruction-set flags, cores,
threads, onnxruntime version) and model, so that erde-run and the other tools check only once.
Exit codes: 0 passed; 3 this machine's answers differ; 2 bad input (see erde.runtime.common.errors).
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace
from typing import TextIO


from ..common.cli import command, console_script, json_option, model_option, threads_option


@command("erde-verify")
@model_option
@threads_option
@json_option("the verdict")
def cli(**kw) -> int:
    """Check that this machine gives the answers a model folder was built with (its self-test); exit 3 if it
    does not."""
    return _run(SimpleNamespace(**kw), sys.stdout)


def _run(args: SimpleNamespace, out: TextIO) -> int:
    from .run_cli import model_folder
    from ..core.engine import Engine
    from ..common.machine import MachineKey
    from ..core.selftest import MismatchError, remember, verify

    t0 = time.perf_counter()
    engine = Engine.load(model_folder(args.model), threads=args.threads)
    verdict = verify(engine)
    ms = (time.perf_counter() - t0) * 1000.0
    remember(engine, args.threads, verdict)
    here = MachineKey.here(args.threads).describe()
    if args.as_json:
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


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
