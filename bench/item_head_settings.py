"""The Games verdict's run config (bench/games_full.toml), for benchmarks that build the same model."""

from __future__ import annotations

import tomllib
from pathlib import Path

VERDICT_TOML = Path(__file__).with_name("games_full.toml")
VERDICT_SETTINGS: dict = tomllib.loads(VERDICT_TOML.read_text())


def as_run_config(settings: dict | None = None) -> str:
    """The settings as one `--run-config` string (Flower takes a .toml file or key=value pairs, not both)."""
    settings = VERDICT_SETTINGS if settings is None else settings
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in settings.items())


if __name__ == "__main__":
    import sys

    from fellrec_flwr.config import parse_overrides

    # KEY=VALUE arguments replace the file's values (read as one string: Flower's parser, given them one by one,
    # keeps only the last argument's keys of a table, e.g. of train.*)
    print(as_run_config({**VERDICT_SETTINGS, **parse_overrides(sys.argv[1:])}))
