"""What the item-token head's uploads reveal (`model.head = item`, issue 25 item 4).

An item-head client sends no activation or gradient: only its trainable state after local training
(LoRA of the top layers, `item_in`, `item_out`, `id_proj` and the item-id table `id_emb`). The
honest-but-curious aggregation server knows the state it sent (the round's global state) and the
one the client returns, so it can read the per-row update of `id_emb`:

    u_i = id_emb_uploaded[i] - id_emb_sent[i]   for every title group i

A row gets a gradient through the input side when item i is in one of the client's training windows,
and through the output side from the full-catalogue softmax, every row, every step: a push down
(p_i x the user state, projected) for every item that is not the next one, a pull up (1 - p_i) for
the true next items. So every row moves (with `train.weight-decay = 0`, the default, weight decay
adds nothing), and AdamW's per-coordinate normalisation makes the rows' update *sizes* alike. But
the items that are never the client's targets or inputs all get the same kind of gradient, so they
all move the same way; the client's items move differently. The attack scores each row by its
distance from the coordinate-wise median update, s_i = || u_i - median_j u_j ||, and reads the rows
with the largest scores as the client's item set (`attack_rows`). That works while the client's items
are a minority of the catalogue (the median row is then a non-item's). A client whose users touched
most of the catalogue turns it round: there the items are the rows whose updates are *smallest*
(their gradients change sign between steps, pulled up as targets and pushed down otherwise, and
AdamW's steps cancel, while a never-seen item is pushed the same way every step). So three scores are
reported: ``median``, ``norm`` (largest ||u_i||, the naive attack) and ``norm-small`` (smallest
||u_i||). The server can tell which one applies by simulating a client itself (it has the model, the
initial state and the training code); an AUC far from 0.5 in either direction is leakage.

Scores per client (`attack_rows`): with S = the title groups in the client's training sequences,
`precision@|S|` (= recall@|S|: the share of the |S| largest updates that are the client's items),
`auc` (probability that a client item's row moved more than a non-item's), `rows_moved` (share of
rows with any change: 1.0 means the naive "which rows changed" attack reads nothing by itself).
A client that is a single user (a person training on their own device) is the worst case: S is then
that user's history.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

SCORES = ("median", "norm", "norm-small")
ID_TABLE = "id_emb"  # the state key fragment of the item-id table (model/item_head.py)


def id_table(state: dict[str, Any]) -> np.ndarray:
    """The (G, d) item-id table in a trainable state, without its padding row (row G)."""
    keys = [k for k in state if ID_TABLE in k]
    if len(keys) != 1:
        raise ValueError(f"expected one {ID_TABLE} tensor in the item head's state, found {keys or 'none'}.")
    table = np.asarray(state[keys[0]], dtype=np.float64)
    return table[:-1]


def attack_rows(sent: np.ndarray, uploaded: np.ndarray, items: Sequence[int], score: str = "median") -> dict[str, float]:
    """The server's guess of a client's item set from the rows of its id-table update (see module doc).

    ``sent`` / ``uploaded``: (G, d) tables; ``items``: the client's true title groups; ``score``:
    'median' (distance from the median row update), 'norm' (size of the row update, largest first) or
    'norm-small' (smallest first)."""
    if sent.shape != uploaded.shape:
        raise ValueError(f"sent {sent.shape} and uploaded {uploaded.shape} id tables differ in shape.")
    truth = np.zeros(len(sent), dtype=bool)
    truth[list(set(int(i) for i in items))] = True
    n = int(truth.sum())
    if n == 0 or n == len(truth):
        raise ValueError("the client's item set must be a non-empty, proper subset of the catalogue.")
    delta = uploaded - sent
    moved = np.linalg.norm(delta, axis=1) > 0
    if score == "median":
        update = np.linalg.norm(delta - np.median(delta, axis=0), axis=1)
    elif score == "norm":
        update = np.linalg.norm(delta, axis=1)
    elif score == "norm-small":
        update = -np.linalg.norm(delta, axis=1)
    else:
        raise ValueError(f"score={score!r} is not 'median', 'norm' or 'norm-small'.")
    order = np.argsort(-update, kind="stable")
    top = truth[order[:n]]
    # AUC by ranks (ties count half): P(update of an item row > update of a non-item row)
    ranks = pd.Series(update).rank(method="average").to_numpy()
    auc = (ranks[truth].sum() - n * (n + 1) / 2) / (n * (len(truth) - n))
    return {"items": n, "precision_at_n": float(top.mean()), "recall_at_2n": float(truth[order[:2 * n]].sum() / n),
            "auc": float(auc), "rows_moved": float(moved.mean())}


def _scored(client: str, users: int, sent: np.ndarray, uploaded: np.ndarray, items: Sequence[int]) -> list[dict]:
    return [{"client": client, "users": users, "score": s, **attack_rows(sent, uploaded, items, s)}
            for s in SCORES]


@dataclass(frozen=True)
class UploadAuditSettings:
    single_users: int = 20  # users audited as one-user clients (a person's own device)
    seed: int = 0


def audit_item_uploads(cfg: Any, settings: UploadAuditSettings = UploadAuditSettings()) -> pd.DataFrame:
    """One row per audited client: each of the config's clients (its data partition), then
    ``single_users`` users each trained alone, all from the same global state, one local training
    call (`train.local-epochs`) each, as a round of the federated run would."""
    from fellrec_flwr.heads import train_head
    from fellrec_flwr.model.item_head import group_sequences, train_item_head
    from fellrec_flwr.model.lora_state import get_lora_state, set_lora_state
    from fellrec_flwr.runtime import get_runtime
    from fellrec_flwr.seeding import derive_seed

    if cfg.model.head != "item":
        raise ValueError("audit_item_uploads audits model.head='item'; set it in the config.")
    rt = get_runtime(cfg)
    sent_state = copy.deepcopy(rt.initial_lora)
    sent = id_table(sent_state)
    rows = []

    def upload_after(train) -> np.ndarray:
        set_lora_state(rt.model, sent_state)
        train()
        return id_table(get_lora_state(rt.model))

    for client in range(cfg.data.num_clients):
        seqs = group_sequences(rt.data.sequences(client), rt.groups)
        items = {i for s in seqs for i in s}
        uploaded = upload_after(lambda: train_head(cfg, rt, client, seed=derive_seed(settings.seed, "client", client)))
        rows += _scored(f"partition {client}", len(seqs), sent, uploaded, items)
    everyone = rt.data.sequences(None)
    rng = np.random.default_rng(derive_seed(settings.seed, "single-users"))
    users = sorted(u for u, s in everyone.items() if len(s) >= 2)
    for user in rng.choice(users, size=min(settings.single_users, len(users)), replace=False):
        seq = group_sequences({int(user): everyone[int(user)]}, rt.groups)
        uploaded = upload_after(lambda: train_item_head(rt.model, seq, cfg.train, cfg.item_head,
                                                        seed=derive_seed(settings.seed, "user", int(user)),
                                                        progress=False))
        rows += _scored(f"user {int(user)}", 1, sent, uploaded, seq[0])
    set_lora_state(rt.model, sent_state)
    return pd.DataFrame(rows)
