"""``erde-run --video FILE`` and ``--camera INDEX``: one line per frame (or per ``--every`` frames) with the time
split into decode, preprocess and inference, then a summary with frames per second, the p50/p95 of each stage,
exit shares, class counts and the frames skipped (a live source always serves its newest frame).
"""

from __future__ import annotations

import json
import time
from typing import Optional, TextIO

from ..common.errors import EXIT_FAILED, EXIT_OK
from ..core.preprocess import preprocess_one
from ..core.graphs import Prediction


def run_frames(engine, args, criterion: str, threshold: float, floor: Optional[float], out: TextIO,
               err: TextIO) -> int:
    """erde-run over a video file or a camera; returns the exit code."""
    from .run_cli import static_predictions
    from .run_summary import RunSummary
    from ..core.video import open_camera, open_video, quiet_opencv

    quiet_opencv()
    pre = engine.manifest.preprocessing
    source = open_video(args.video, pre, args.max_fps) if args.video else open_camera(args.camera, pre)
    summary = RunSummary(engine.manifest.class_names, engine.num_exits, what="frames")
    if not args.json:
        print(source.describe(), file=out)
    engine.warmup(1, include_full=args.static)
    clock = time.perf_counter
    try:
        with source:
            for n, frame in enumerate(source.frames(), 1):
                t0 = clock()
                x = preprocess_one(frame.image, pre)[None]  # scale and normalise: the image is already resized
                t1 = clock()
                pred = static_predictions(engine, x)[0] if args.static else \
                    engine.predict_array(x, threshold, criterion)[0]
                ms = {"decode": frame.decode_ms, "preprocess": frame.preprocess_ms + (t1 - t0) * 1000.0,
                      "inference": (clock() - t1) * 1000.0}
                unsure = floor is not None and pred.confidence < floor
                summary.add(pred, unsure, **ms)
                if (n - 1) % args.every == 0:
                    print(_frame_line(frame.index, pred, unsure, ms, args.json), file=out, flush=True)
                if args.max_frames and n >= args.max_frames:
                    break
    except KeyboardInterrupt:  # how a camera run ends: the frames so far are summarised
        pass
    summary.skipped = source.skipped
    print(json.dumps({"summary": summary.to_dict()}) if args.json else "\n".join(summary.lines()), file=out)
    if getattr(source, "truncated", False):
        out.flush()
        print(f"Error: {args.video}: the video ended after {source.frames_read + source.skipped} of "
              f"{source.frame_count} frames (truncated or corrupt); the frames read are summarised above", file=err)
        return EXIT_FAILED
    return EXIT_OK


def _frame_line(index: int, pred: Prediction, unsure: bool, ms: dict, as_json: bool) -> str:
    if as_json:
        d = {"frame": index, "class_index": pred.class_index, "class_name": pred.class_name,
             "confidence": pred.confidence, "unsure": unsure, "exit_index": pred.exit_index,
             "num_exits": pred.num_exits, **{f"{k}_ms": v for k, v in ms.items()}}
        return json.dumps(d)
    answer = f"unsure (best guess {pred.class_name} {pred.confidence:.2f})" if unsure else \
        f"{pred.class_name} ({pred.confidence:.2f})"
    return (f"frame {index}: {answer} exit {pred.exit_index + 1}/{pred.num_exits}, decode+preprocess "
            f"{ms['decode'] + ms['preprocess']:.2f} ms, inference {ms['inference']:.2f} ms")
