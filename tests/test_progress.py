"""Progress bars in logs update rarely; on a terminal they keep tqdm's default."""

from __future__ import annotations

import io
import sys

from fellrec_flwr import progress


def test_bars_in_a_log_update_at_most_every_log_interval(monkeypatch):
    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    bar = progress.tqdm(total=3, file=io.StringIO())
    assert bar.mininterval == progress.LOG_INTERVAL_S
    bar.close()
    bar = progress.tqdm(total=3, file=io.StringIO(), mininterval=1.0)  # an explicit choice wins
    assert bar.mininterval == 1.0
    bar.close()


def test_bars_on_a_terminal_keep_the_default(monkeypatch):
    monkeypatch.setattr(progress, "_is_terminal", lambda: True)
    bar = progress.tqdm(total=3, file=io.StringIO())
    assert bar.mininterval < progress.LOG_INTERVAL_S
    bar.close()


def _lines(text: str) -> list[str]:
    """What a log shows: every carriage return or newline starts a line of its own."""
    return [part for part in text.replace("\r", "\n").split("\n") if part.strip()]


def test_a_bar_with_postfix_updates_writes_at_most_two_lines_to_a_log(monkeypatch):
    """A 100-step bar whose loss is set each step (as the trainers do) used to write 101 lines."""
    log = io.StringIO()  # not a terminal: isatty() is False
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress.tqdm(total=100, desc="local training", leave=False)
    for step in range(100):
        bar.set_postfix(loss=f"{step:.4f}")
        bar.set_description("local training")
        bar.update(1)
    bar.close()
    lines = _lines(log.getvalue())
    assert 1 <= len(lines) <= 2, lines


def test_a_postfix_still_shows_on_the_next_timed_redraw(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress.tqdm(total=10, desc="local training", mininterval=0.0, miniters=1)
    bar.set_postfix(loss="0.1234")
    bar.update(1)
    bar.close()
    assert "loss=0.1234" in log.getvalue()
