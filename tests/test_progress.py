"""runtime/common/progress.py: long steps show a count on a terminal and leave one line; quick ones print nothing."""

import io

from erde.runtime.common import progress
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_quick_step_prints_nothing(monkeypatch):
    out = io.StringIO()
    with progress.step("quick", total=3, stream=out) as tick:
        tick(3)
    assert out.getvalue() == ""


def test_a_long_step_leaves_one_line_and_a_live_count_on_a_terminal(monkeypatch):
    clock = iter([0.0, 1.5, 1.6, 3.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = Terminal()
    with progress.step("images through 3 exits", total=100, stream=out) as tick:
        tick(50)  # 1.5 s in: drawn
        tick(60)  # 0.1 s later: not drawn again yet
    text = out.getvalue()
    assert "\rimages through 3 exits: 50/100 (2 s)" in text and "60/100" not in text
    assert text.endswith("images through 3 exits (100): 3.0 s\n")
