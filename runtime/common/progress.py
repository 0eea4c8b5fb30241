"""Long steps say what they do: a live count on a terminal, and one line when a step took over 2 seconds.

    with progress.step("validation images through 3 exits", total=len(files)) as tick:
        for ...:
            tick(done)

On a terminal (stderr is a TTY) the count updates in place after the first second; anywhere, a step that
took at least ``LINE_AFTER_S`` ends with one line on stderr (what, how many, how long), so a log shows
every long step and a quick run prints nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Optional, TextIO

LINE_AFTER_S = 2.0
LIVE_AFTER_S = 1.0


@contextlib.contextmanager
def step(what: str, total: Optional[int] = None, stream: Optional[TextIO] = None) -> Iterator[Callable[[int], None]]:
    stream = stream or sys.stderr
    live = getattr(stream, "isatty", lambda: False)()
    start = time.perf_counter()
    shown = [0.0, 0]  # when the live line was last drawn; items done

    def tick(done: int) -> None:
        shown[1] = done
        now = time.perf_counter()
        if live and now - start >= LIVE_AFTER_S and now - shown[0] >= 0.2:
            shown[0] = now
            count = f"{done}/{total}" if total else str(done)
            stream.write(f"\r{what}: {count} ({now - start:.0f} s)")
            stream.flush()

    yield tick
    seconds = time.perf_counter() - start
    if live and shown[0]:
        stream.write("\r\033[K")
    if seconds >= LINE_AFTER_S:
        count = f" ({total or shown[1]})" if (total or shown[1]) else ""
        print(f"{what}{count}: {seconds:.1f} s", file=stream, flush=True)
