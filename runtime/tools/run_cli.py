"""erde-run: classify images, a video or a camera with an early-exit model folder (onnxruntime, no torch).

Exit codes: 0 all images classified; 1 some image could not be read (each is
reported, the others still run); 2 nothing could run (bad option, bad model
folder, no image readable); 3 the folder's self-test fails here. Errors are one
``Error: ...`` line on stderr; ``--debug`` adds the traceback. A run over more
than one image ends with a summary (``erde.runtime.tools.run_summary``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, TextIO, Tuple

import click

import numpy as np

from .. import BUNDLED_MODELS
from ..common.cli import (FINITE, PATH, POSITIVE, THRESHOLD, UsageError, command, console_script, exclusive, json_option, model_option,
                          no_verify_option, threads_option)
from ..common.files import IMAGE_EXTENSIONS
from ..common.errors import EXIT_FAILED as EXIT_SOME_FAILED, EXIT_OK, EXIT_USAGE, ErdeError
from ..core.criteria import RULES, show
from ..core.manifest import CRITERIA, MANIFEST_NAME
from ..core.graphs import Prediction

BUNDLED_MODEL = BUNDLED_MODELS / "cifar10"  # what a command runs without a folder


@command("erde-run")
@click.argument("inputs", nargs=-1, type=PATH, metavar="[IMAGE|FOLDER]...")
@click.option("--image", multiple=True, type=PATH, metavar="FILE",
              help="An image file (repeatable); - reads one image from standard input.")
@click.option("--folder", multiple=True, type=PATH, metavar="DIR",
              help="A folder of images (" + " ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS) + ").")
@model_option
@click.option("--threshold", type=THRESHOLD, metavar="T",
              help="Exit threshold in [0, 1], or one per early exit as T1/T2/... (default: calibrated, else the "
                   "manifest's default).")
@click.option("--criterion", type=click.Choice(CRITERIA), help="; ".join(RULES.values()))
@click.option("--static", is_flag=True,
              help="Run full.onnx, the static network, without early exits (chosen by itself where the latency "
                   "profile of this machine expects it to answer sooner at the threshold).")
@click.option("--early-exit", is_flag=True,
              help="Run early exit even where the latency profile expects full.onnx to answer sooner.")
@click.option("--batch-size", type=POSITIVE, default=1, metavar="N", help="Images per batch (default 1).")
@threads_option
@click.option("--video", type=PATH, metavar="FILE", help="Classify every frame of a video file (needs erde[video]).")
@click.option("--camera", type=int, metavar="INDEX",
              help="Classify a camera's frames, always the newest (needs erde[video]); Ctrl-C ends it.")
@click.option("--every", type=POSITIVE, default=1, metavar="N",
              help="With --video or --camera: print every Nth frame's line (all frames count in the summary).")
@click.option("--max-fps", type=FINITE, metavar="F",
              help="With --video: take at most F frames per second of video (the rest count as skipped).")
@click.option("--max-frames", type=POSITIVE, metavar="N", help="With --video or --camera: stop after N frames.")
@click.option("--no-reject", is_flag=True,
              help="Always name a class, even below the model's \"unsure\" confidence floor.")
@json_option("one object per image (or frame), then a summary,")
@no_verify_option
def cli(inputs: Tuple[Path, ...], **kw) -> int:
    """Classify images, a video or a camera with an early-exit model folder (onnxruntime, no torch).

    IMAGE|FOLDER: image files and folders of images, as --image and --folder.
    """
    exclusive(static=kw["static"], early_exit=kw["early_exit"])
    args = SimpleNamespace(**kw)
    args.json = args.as_json
    args.image = [str(p) for p in args.image] + [str(p) for p in inputs if not p.is_dir()]
    args.folder = [str(p) for p in args.folder] + [str(p) for p in inputs if p.is_dir()]
    return _run(args, sys.stdout, sys.stderr)


def model_folder(arg: Optional[str]) -> Path:
    """The folder given, else the bundled model when it is installed."""
    if arg is not None:
        if not arg.strip():
            raise UsageError("--model is empty; pass a model folder, or leave --model out for the bundled model")
        return Path(arg)
    if (BUNDLED_MODEL / MANIFEST_NAME).is_file():
        return BUNDLED_MODEL
    raise ErdeError("no model folder given and no bundled model is installed; pass a folder written by "
                    "erde-export as --model DIR")


def expected_latency_line(engine, criterion: Optional[str], threshold: Optional[float], threads: Optional[int],
                          err: TextIO) -> str:
    """What this threshold (None: full.onnx) should cost here, from the latency profile and the calibration
    table ("" without a profile); it says so when full.onnx, or another thread count, is expected to be faster.

    A corrupt profile, or one of another machine, is ignored with a warning on stderr; never used silently.
    """
    from .calibrate import read_table, row_at
    from .profile import PROFILE_NAME, ProfileError, find_profile

    try:
        prof = find_profile(engine.folder, engine.manifest, threads)
    except ProfileError as e:
        if (engine.folder / PROFILE_NAME).exists():
            print(f"Warning: {e}; the profile is ignored", file=err)
        return ""
    if threshold is None:
        if not prof.full_ms:
            return ""
        return (f"expected latency: {prof.full_ms:.3f} ms per image for full.onnx, batch 1 ({prof.machine.describe()})"
                + _thread_hint(engine, threads, prof, lambda p: [(p.full_ms, "")]))
    full = f"; full.onnx {prof.full_ms:.3f} ms" if prof.full_ms else ""
    try:
        row = row_at(read_table(engine.folder, engine.num_exits), criterion, threshold)
    except ErdeError as e:
        print(f"Warning: {e}", file=err)
        row = None
    if row is None:
        return (f"expected latency: {prof.cumulative_ms[0]:.3f} to {prof.cumulative_ms[-1]:.3f} ms per image at batch 1 "
                f"(no validation exit shares at this threshold; run erde-calibrate){full}")
    expected_ms = prof.expected_ms(row.exit_shares)
    if prof.full_ms and prof.full_ms <= expected_ms:
        full += ", faster than early exit here: --static runs it"
    return (f"expected latency: {expected_ms:.3f} ms per image at this threshold, batch 1 "
            f"({prof.machine.describe()}; validation exit shares){full}"
            + _thread_hint(engine, threads, prof,
                           lambda p: [(p.expected_ms(row.exit_shares), ""), (p.full_ms, " --static")]))


def static_expected_faster(engine, criterion: str, threshold: float, threads: Optional[int]) -> Optional[str]:
    """Why full.onnx is expected to answer sooner than early exit at this threshold here (None if it is not, or
    if no latency profile of this machine fingerprint and no calibration table say so)."""
    from .calibrate import read_table, row_at
    from .profile import ProfileError, find_profile

    if not engine.has_full:
        return None
    try:
        prof = find_profile(engine.folder, engine.manifest, threads)
        row = row_at(read_table(engine.folder, engine.num_exits), criterion, threshold)
    except (ProfileError, ErdeError):
        return None
    if row is None or not prof.full_ms or prof.full_ms > prof.expected_ms(row.exit_shares):
        return None
    return (f"full.onnx expected {prof.full_ms:.3f} ms here against {prof.expected_ms(row.exit_shares):.3f} ms with "
            "early exit")


def _thread_hint(engine, threads: Optional[int], prof, options) -> str:
    """"; N threads expected faster here" for the fastest of ``options(profile)`` (pairs of ms and the extra
    flag: "" or " --static") in this machine's profiles at other thread counts, when it beats the best option
    at this one by more than both profiles' run-to-run spread ("" otherwise)."""
    from .profile import other_thread_counts

    here_ms = min((ms for ms, _ in options(prof) if ms), default=None)
    others = [(ms, flag, p) for p in other_thread_counts(engine.folder, engine.manifest, threads)
              for ms, flag in options(p) if ms]
    if not here_ms or not others:
        return ""
    best_ms, flag, best = min(others, key=lambda c: c[0])
    if best_ms >= here_ms * (1.0 - max(prof.spread, best.spread)):
        return ""
    n = best.machine.threads
    what = f"{n} thread{'s' * (n != 1)}" + (" with full.onnx" if flag else "")
    return f"; {what} expected faster here ({best_ms:.3f} ms): --threads {n}{flag}"


def static_predictions(engine, x: np.ndarray) -> List[Prediction]:
    """full.onnx on a preprocessed batch: every image answered by the final exit, at the full MACs."""
    m = engine.manifest
    start = time.perf_counter()
    probs = engine.run_full(x)
    ms = (time.perf_counter() - start) * 1000.0
    last = engine.num_exits - 1
    return [Prediction(class_index=int(c), class_name=m.class_names[int(c)], confidence=float(p[c]), exit_index=last,
                       num_exits=engine.num_exits, macs=m.full_macs, macs_fraction=1.0, latency_ms=ms,
                       segment_latency_ms=(ms,)) for p, c in zip(probs, probs.argmax(axis=1))]


def _human(name: str, pred, ms: float, unsure: bool) -> str:
    pct = pred.macs_fraction * 100.0
    answer = (f"unsure (best guess {pred.class_name} {pred.confidence:.2f})" if unsure
              else f"{pred.class_name} ({pred.confidence:.2f})")
    return (f"{name}: {answer} exit {pred.exit_index + 1}/{pred.num_exits}, "
            f"{pct:.0f}% of full MACs ({max(100.0 - pct, 0.0):.0f}% saved), {ms:.2f} ms")


def _json_line(name: str, pred, criterion: Optional[str], threshold: Optional[float], ms: float, unsure: bool,
               batch: int) -> str:
    d = {"image": name}
    d.update(pred.to_dict())
    d.update(latency_ms=ms, batch_size=batch, unsure=unsure, criterion=criterion, threshold=threshold)
    return json.dumps(d)


def _run(args: SimpleNamespace, out: TextIO, err: TextIO) -> int:
    # Imported here so that `erde-run --help` and option errors need no onnxruntime.
    from ..core.engine import MAX_RUN_BATCH, Engine
    from ..core.preprocess import STDIN, list_images, preprocess_one
    from .run_summary import RunSummary, label_of
    from ..core.selftest import require_verified
    from ..core.unsure import floor_of

    sources = [bool(args.image or args.folder), args.video is not None, args.camera is not None]
    if sum(sources) != 1:
        raise UsageError("pass one kind of input: --image FILE (- for standard input) and --folder DIR, or --video "
                         "FILE, or --camera INDEX (see erde-run --help)")
    if args.image.count(STDIN) > 1:
        raise UsageError("--image - (standard input) may be given once")
    missing = [p for p in args.image if p != STDIN and not Path(p).exists()]
    if missing and len(missing) == len(args.image) and not args.folder:  # nothing could run: say so before loading
        n = len(missing) - 1
        others = f" (nor {'is' if n == 1 else 'are'} the {n} other image{'s' * (n != 1)} given)" if n else ""
        raise ErdeError(f"{missing[0]}: no such file{others}; pass an image file or a folder of images")
    if args.static and (args.threshold is not None or args.criterion is not None):
        raise UsageError("--static runs full.onnx without early exits; drop --threshold and --criterion")
    engine = Engine.load(model_folder(args.model), threads=args.threads)
    if not args.no_verify:
        require_verified(engine, args.threads)
    if args.static and not engine.has_full:
        raise ErdeError(f"{engine.folder}: this model folder has no full.onnx (manifest 'full' is empty); "
                        "re-export it with erde-export, or leave --static out")
    criterion, threshold, source = engine.resolve_threshold(args.threshold, args.criterion)
    chosen = ""
    if not (args.static or args.early_exit or args.threshold is not None or args.criterion is not None):
        why = static_expected_faster(engine, criterion, threshold, args.threads)
        if why:  # the latency profile of this machine says early exit does not pay here: run the static graph
            args.static, chosen = True, f" (chosen: {why}; --early-exit runs early exit anyway)"
    floor = None if args.no_reject else floor_of(engine.manifest)
    paths: List[Path] = [Path(p) for p in args.image]
    for folder in args.folder:
        paths.extend(list_images(folder))
    if not args.json:
        m = engine.manifest
        rule = f"static full.onnx, no early exit{chosen}" if args.static else \
            f"criterion {criterion}, threshold {show(threshold)} ({source})"
        print(f"model {m.model_name} ({engine.folder}), {m.num_exits} exits; {rule}"
              + (f"; unsure below confidence {floor:.3f}" if floor is not None else ""), file=out)
        line = expected_latency_line(engine, None if args.static else criterion, None if args.static else threshold,
                                     args.threads, err)
        if line:
            print(line, file=out)
    if not sources[0]:
        from .run_frames import run_frames

        return run_frames(engine, args, criterion, threshold, floor, out, err)
    step = min(args.batch_size, MAX_RUN_BATCH)  # larger batches gain nothing and only cost memory
    engine.warmup(min(step, len(paths)), include_full=args.static)  # the first run allocates; keep it out of the reported times
    pre = engine.manifest.preprocessing
    summary = RunSummary(engine.manifest.class_names, engine.num_exits)
    failed = 0
    for start in range(0, len(paths), step):
        batch = paths[start:start + step]
        arrays, names, lines = [], [], []  # lines: output order, None where a prediction goes
        for path in batch:
            try:
                arrays.append(preprocess_one(path, pre))
                names.append("<stdin>" if str(path) == STDIN else str(path))
                lines.append(None)
            except (ErdeError, OSError, ValueError) as e:  # one bad image never stops the others
                failed += 1
                if args.debug:
                    traceback.print_exc(file=err)
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                lines.append(json.dumps({"image": str(path), "error": msg}) if args.json else ("ERR", msg))
        x = np.stack(arrays) if arrays else None
        t0 = time.perf_counter()
        preds = iter([] if x is None else static_predictions(engine, x) if args.static
                     else engine.predict_array(x, threshold, criterion))
        share_ms = (time.perf_counter() - t0) * 1000.0 / max(len(arrays), 1)  # a batch's time, per image
        name_it = iter(names)
        for line in lines:
            if line is None:
                name, pred = next(name_it), next(preds)
                ms = pred.latency_ms if len(arrays) == 1 else share_ms
                unsure = floor is not None and pred.confidence < floor
                summary.add(pred, unsure, label_of(name, engine.manifest.class_names), inference=ms)
                rule = (None, None) if args.static else (criterion, threshold)
                print(_json_line(name, pred, *rule, ms, unsure, len(arrays)) if args.json
                      else _human(name, pred, ms, unsure), file=out)
            elif isinstance(line, tuple):
                out.flush()
                print(f"Error: {line[1]}", file=err)
            else:
                print(line, file=out)
        out.flush()
    summary.failed = failed
    if len(paths) > 1 or args.folder:
        print(json.dumps({"summary": summary.to_dict()}) if args.json else "\n".join(summary.lines()), file=out)
    return EXIT_USAGE if failed == len(paths) else EXIT_SOME_FAILED if failed else EXIT_OK


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
