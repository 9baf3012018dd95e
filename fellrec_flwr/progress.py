"""Progress bars that stay readable in logs.

On a terminal a bar redraws in place. In a log (Flower's simulation log, a SuperNode's log, CI)
every redraw becomes a line of its own and buries the lines that matter, so when stderr is not
a terminal a bar updates at most every `LOG_INTERVAL_S` seconds (plus its last state).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

LOG_INTERVAL_S = 30.0


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """`tqdm.auto.tqdm` with a log-friendly update interval when not on a terminal."""
    if not _is_terminal():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return _tqdm(*args, **kwargs)
