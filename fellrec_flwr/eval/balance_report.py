"""Does a personalised strategy personalise? The client x client weights from a run's metrics.

FELLRec records every round, per client i, ``self-weight`` (W_ii), ``warm-weight`` (w_i) and
``loss-prob`` (split "train") and the full row of W as ``weight:<j>`` (split "balance").
This module reads those rows back (pure pandas) and draws them: a heatmap of the last
round's W next to the self-weights over rounds, with 1/N (a plain average) marked.
Runs of strategies that record no weights are skipped quietly.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fellrec_flwr.atomic import atomic_write_bytes

BALANCE_SPLIT = "balance"
WEIGHT_PREFIX = "weight:"
HEATMAP_FILE = "balance_weights.png"


def weight_matrix(frame: pd.DataFrame, round_: int | None = None) -> pd.DataFrame | None:
    """W of one round (default: the last with weights) as a client x client frame; None without weights."""
    rows = frame[(frame["split"] == BALANCE_SPLIT) & frame["metric"].astype(str).str.startswith(WEIGHT_PREFIX)]
    if rows.empty:
        return None
    round_ = int(rows["round"].max()) if round_ is None else round_
    rows = rows[rows["round"] == round_]
    if rows.empty:
        return None
    to = rows["metric"].str.slice(len(WEIGHT_PREFIX)).astype(int)
    matrix = rows.assign(to=to).pivot_table(index="client", columns="to", values="value", aggfunc="last")
    matrix.index = matrix.index.astype(int)
    matrix.attrs["round"] = round_
    return matrix.sort_index().sort_index(axis=1)


def balance_summary(frame: pd.DataFrame) -> dict[str, Any] | None:
    """Last round with weights: clients, 1/N, self-weight min/mean/max, smallest warm weight."""
    matrix = weight_matrix(frame)
    if matrix is None:
        return None
    round_ = matrix.attrs["round"]
    self_w = np.array([matrix.loc[c, c] for c in matrix.index if c in matrix.columns])
    warm = frame[(frame["metric"] == "warm-weight") & (frame["round"] == round_)]["value"]
    return {"round": round_, "clients": len(matrix), "uniform": 1.0 / len(matrix),
            "self_min": float(self_w.min()), "self_mean": float(self_w.mean()), "self_max": float(self_w.max()),
            "warm_min": float(warm.min()) if len(warm) else float("nan")}


def plot_balance(frame: pd.DataFrame, run_dir: str | Path, title: str) -> Path | None:
    """balance_weights.png in run_dir: last round's W (heatmap) and self-weights by round; None without weights."""
    matrix = weight_matrix(frame)
    if matrix is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrix)
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(10, 4.2))
    image = ax_w.imshow(matrix.to_numpy(), cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax_w, fraction=0.046)
    if n <= 12:  # readable numbers only for a few clients
        for i in range(n):
            for j in range(matrix.shape[1]):
                ax_w.text(j, i, f"{matrix.iat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ticks = range(n) if n <= 20 else range(0, n, max(1, n // 10))
    ax_w.set_xticks(list(ticks), [str(matrix.columns[t]) for t in ticks])
    ax_w.set_yticks(list(ticks), [str(matrix.index[t]) for t in ticks])
    ax_w.set_xlabel("weight on client j")
    ax_w.set_ylabel("aggregate of client i")
    ax_w.set_title(f"W in round {matrix.attrs['round']} (rows sum to 1)", fontsize=9)

    self_rows = frame[frame["metric"] == "self-weight"]
    for client, part in self_rows.groupby("client"):
        ax_s.plot(part["round"], part["value"], marker="o", lw=0.8, alpha=0.7, label=f"client {int(client)}")
    ax_s.axhline(1.0 / n, color="black", ls="--", lw=1, label=f"1/N = {1 / n:.3f} (plain average)")
    ax_s.set_ylim(0, 1.02)
    ax_s.set_xlabel("round")
    ax_s.set_ylabel("self-weight W_ii")
    ax_s.set_title("self-weight by round (1 = local training)", fontsize=9)
    if n <= 12:
        ax_s.legend(fontsize=7)
    fig.suptitle(f"{title}: does the balance personalise?", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(run_dir) / HEATMAP_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path
