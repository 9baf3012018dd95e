"""The library's one door to `data_prep`: data prepared, or a raw source read, when a run needs it.

The library reads prepared folders (:mod:`fellrec_flwr.data.prepared`); `data_prep` writes them
and builds on the library's config and folder format. One arrow must still point back: every
Flower process (a ServerApp, each simulated ClientApp, the centralized baseline, the audit)
has to be able to get its data from the run config alone, with no separate preparation step,
and only `data_prep` knows how (readers, partitioners, the demo generator). That arrow goes
through this module only, with imports inside the functions, so that

- a process that reads a finished folder never imports pandas readers, scikit-learn or
  flwr-datasets, and
- `data_prep` never imports this module (tests/test_imports.py checks both the one door and
  that no import cycle runs through it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_prep.readers import SourceData
    from fellrec_flwr.config import DataSettings


def prepare_folder(settings: DataSettings, cache_root: str | Path, seed: int) -> Path:
    """The prepared folder for these settings, prepared now if it is not there yet."""
    from data_prep.prepare import prepare

    return prepare(settings, cache_root, seed=seed)


def read_raw_source(name: str, path: str | Path) -> SourceData:
    """A raw source as data_prep's readers give it (titles cleaned): "demo" (generated) or "games"."""
    if name == "demo":
        from data_prep.demo import read_demo

        return read_demo()
    from data_prep.readers import read_games

    return read_games(path)


def public_demo_title_sequences(num_users: int, seed_offset: int = 0) -> list[list[str]]:
    """Title sequences of synthetic PUBLIC demo users (the demo generator's public seed plus
    `seed_offset`): the same world as the clients' users, none of them."""
    from data_prep.demo import PUBLIC_SEED, public_title_sequences

    return public_title_sequences(num_users, seed=PUBLIC_SEED + seed_offset)
