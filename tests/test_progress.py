"""Progress bars in logs update rarely; on a terminal they keep tqdm's default."""

from __future__ import annotations

import io

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
