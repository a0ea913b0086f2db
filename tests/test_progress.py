"""Progress bars: throttled in logs, off when asked."""

import io
import sys

from common.progress import progress_bar


def test_bar_in_a_log_redraws_at_most_every_30_s(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(range(1000), desc="x")
    assert bar.mininterval == 30.0
    assert sum(1 for _ in bar) == 1000
    assert log.getvalue().count("\r") <= 3  # opening draw and closing draw, not one per step


def test_disabled_bar_writes_nothing_and_still_iterates(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress_bar(range(5), enabled=False)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""
