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


class _LogBar(_tqdm):
    """A bar for logs. tqdm's `set_postfix`/`set_description` redraw at once by default, which
    bypasses `mininterval` and wrote one log line per training step; here they only change
    what the next timed redraw shows."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description_str(desc, refresh=False)


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """`tqdm.auto.tqdm` with a log-friendly update interval when not on a terminal."""
    if _is_terminal():
        return _tqdm(*args, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return _LogBar(*args, **kwargs)
