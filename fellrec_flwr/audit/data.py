"""The audit's inputs: the public catalogue and the real users whose prompts are attacked.

``games`` and ``demo`` are read with the data_prep readers (same title cleaning as the
prepared data); each audited user's prompt is their leave-one-out TEST prompt (last
``history_len`` items before the last one, target = the last item), as data_prep builds it.
``prepared`` reads a prepared folder's test split through ``fellrec_flwr.data.prepared``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fellrec_flwr.audit.sequences import AuditError, real_examples

DEFAULT_GAMES = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-games"
Example = tuple[int, list[int], int]


def load_audit_data(data: str, data_path: str | Path = "", eval_users: int = 100, history_len: int = 10,
                    seed: int = 0) -> tuple[dict[int, str], list[Example]]:
    """(catalogue item id -> title, ``eval_users`` sampled real users' (user, history, target))."""
    if data == "prepared":
        return _from_prepared(Path(data_path), eval_users, seed)
    if data not in ("demo", "games"):
        raise AuditError(f"--data {data!r} is not one of games, demo, prepared.")
    from fellrec_flwr.data.on_demand import read_raw_source

    source = read_raw_source(data, data_path or DEFAULT_GAMES)
    titles = dict(zip(source.items["item_id"].tolist(), source.items["title"].tolist()))
    return titles, real_examples(source.sequences, eval_users, history_len, seed)


def _from_prepared(path: Path, eval_users: int, seed: int) -> tuple[dict[int, str], list[Example]]:
    try:
        from fellrec_flwr.data.prepared import PreparedData
    except ImportError as err:
        raise AuditError("--data prepared needs fellrec_flwr.data.prepared; use --data games or demo.") from err
    if not (path / "manifest.json").exists():
        raise AuditError(f"{path} is not a prepared folder (no manifest.json); run data_prep first "
                         "or use --data games|demo.")
    prepared = PreparedData.load(path)
    rows: Sequence = prepared.split("test")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(rows), size=min(eval_users, len(rows)), replace=False).tolist())
    examples = [(int(rows[i].user_id), [int(h) for h in rows[i].history], int(rows[i].target)) for i in picked]
    return dict(prepared.titles), examples
