"""What a run leaves behind: config, metrics.csv, summary.json, plots, checkpoints.

Layout of ``<out-dir>/<run-name>/``::

    config.json          the resolved configuration
    metrics.csv          round, client, split, metric, value (one row per measurement)
    summary.json         final per-client and overall metrics + balance statistics
    recall_by_round.png  per-client Recall@10 over rounds
    final_by_client.png  final per-client Recall@10 / NDCG@10 bars
    checkpoint.pt        strategy state + per-client LoRA after the last finished round
    adapters/client-<k>/ each client's final LoRA, saved with peft ``save_pretrained``

Everything is rewritten atomically, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from fellrec_flwr.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from fellrec_flwr.balance import balance_stats

METRIC_COLUMNS = ["round", "client", "split", "metric", "value"]
HEADLINE = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def metrics_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
    return frame.sort_values(["round", "client", "split", "metric"], kind="stable").reset_index(drop=True)


def write_metrics_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    frame = metrics_frame(rows)
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return frame


def summarise(frame: pd.DataFrame, split: str, sizes: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Final per-client metrics of `split` (latest round that has it) + balance statistics."""
    part = frame[(frame["split"] == split)]
    if part.empty:
        return {"split": split, "round": None, "per_client": {}, "overall": {}, "balance": {}}
    last_round = int(part["round"].max())
    part = part[part["round"] == last_round]
    per_client: dict[str, dict[str, float]] = {}
    for (client, metric), value in part.groupby(["client", "metric"])["value"].last().items():
        per_client.setdefault(str(int(client)), {})[metric] = float(value)
    clients = sorted(per_client, key=int)
    weights = np.array([float(per_client[c].get("num-examples", (sizes or {}).get(int(c), 1))) for c in clients])
    overall: dict[str, float] = {}
    balance: dict[str, Any] = {}
    for metric in sorted({m for c in clients for m in per_client[c]}):
        if metric == "num-examples" or not all(metric in per_client[c] for c in clients):
            continue
        values = np.array([per_client[c][metric] for c in clients])
        overall[metric] = float(np.average(values, weights=weights)) if weights.sum() > 0 else float(values.mean())
        if metric in HEADLINE:
            balance[metric] = balance_stats(dict(zip([int(c) for c in clients], values.tolist())))
    return {"split": split, "round": last_round, "per_client": per_client, "overall": overall, "balance": balance}


def plot_run(frame: pd.DataFrame, run_dir: str | Path, title: str) -> list[Path]:
    """Per-client Recall@10 over rounds (valid) and final per-client bars. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written: list[Path] = []
    valid = frame[(frame["split"] == "valid") & (frame["metric"] == "recall@10")]
    if not valid.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for client, part in valid.groupby("client"):
            ax.plot(part["round"], part["value"], marker="o", label=f"client {int(client)}")
        ax.set_xlabel("round")
        ax.set_ylabel("Recall@10 (valid)")
        ax.set_title(title)
        ax.legend(fontsize=7)
        written.append(_save_fig(fig, run_dir / "recall_by_round.png"))
        plt.close(fig)
    for split in ("test", "valid"):
        final = frame[(frame["split"] == split) & frame["metric"].isin(["recall@10", "ndcg@10"])]
        if final.empty:
            continue
        final = final[final["round"] == final["round"].max()]
        table = final.pivot_table(index="client", columns="metric", values="value", aggfunc="last")
        fig, ax = plt.subplots(figsize=(6, 4))
        table.plot.bar(ax=ax)
        ax.set_xlabel("client")
        ax.set_ylabel(f"final {split} metric")
        ax.set_title(f"{title} — final {split}")
        written.append(_save_fig(fig, run_dir / "final_by_client.png"))
        plt.close(fig)
        break
    return written


def _save_fig(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path
