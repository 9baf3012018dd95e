"""Where the project keeps its machine-local files (a leaf module: it imports nothing of ours).

Every module that needs the cache folder imports it from here, so that no module has to
import `runtime` (or the apps) just to find a path — that created import cycles.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Prepared data sets, converted models, client state: ``$FELLREC_CACHE`` or ~/.cache/fellrec-flwr."""
    return Path(os.environ.get("FELLREC_CACHE", Path.home() / ".cache" / "fellrec-flwr"))


def default_secret_file() -> Path:
    """The split service's secret in a local simulation; simulated clients derive their tokens from it."""
    return cache_root() / "split-secret.txt"
