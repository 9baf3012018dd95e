"""What a run leaves behind: config, metrics.csv, summary.json, plots, checkpoints.

Layout of ``<out-dir>/<run-name>/``::

    config.json          the resolved configuration
    metrics.csv          round, client, split, metric, value (one row per measurement)
    per_user.csv         method, round, split, client, user_id, original_user_id (the id in
                         the source data), target_rank: every evaluated
                         user's 0-based target rank in the top 20 (-1 = not there), for the
                         run's method and the popularity / Markov / SASRec baselines on the same users
                         (paired bootstrap intervals in `python -m fellrec_flwr.eval.compare`);
                         target and top10 (item ids; top10 a JSON list, best first, one id
                         per title group) and original_target_item / original_top10 (the
                         same items by their ids in the source data)
    summary.json         final per-client and overall metrics + balance statistics
    recall_by_round.png  per-client Recall@10 over rounds
    final_by_client.png  final per-client Recall@10 / NDCG@10 bars
    checkpoint.safetensors  strategy state (JSON metadata) + per-client LoRA after the last finished round
    adapters/client-<k>/ each client's final LoRA, saved with peft ``save_pretrained``

Everything is rewritten atomically, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from fellrec_flwr.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from fellrec_flwr.eval.balance import balance_stats

METRIC_COLUMNS = ["round", "client", "split", "metric", "value"]
HEADLINE = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
PER_USER_COLUMNS = ["method", "round", "split", "client", "user_id", "target_rank"]
# Written for every method's rows that carry them (the run's method and every baseline alike).
ITEM_COLUMNS = ["target", "top10"]
TOP_ITEMS = 10
PER_USER_FILE = "per_user.csv"
# The non-LLM baselines written next to every run's own rows (fitted in fellrec_flwr.eval.baselines,
# which imports this name: the dependency runs one way).
BASELINE_METHODS = ("popularity", "markov", "sasrec")


def metrics_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
    return frame.sort_values(["round", "client", "split", "metric"], kind="stable").reset_index(drop=True)


def write_metrics_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    frame = metrics_frame(rows)
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return frame


def per_user_rows(method: str, round_: int, split: str, client: int, user_ids: Iterable[int],
                  target_ranks: Iterable[int], targets: Iterable[int] | None = None,
                  top_items: Iterable[Iterable[int]] | None = None) -> list[dict[str, Any]]:
    """per_user.csv rows for one evaluation of one client; `targets` and `top_items` (each
    user's recommended item ids, best first; -1 = empty slot) are optional, for any method."""
    user_ids, target_ranks = list(user_ids), list(target_ranks)
    if len(user_ids) != len(target_ranks):
        raise ValueError(f"{len(user_ids)} user ids but {len(target_ranks)} target ranks: one rank per user.")
    n = len(user_ids)
    targets = [None] * n if targets is None else [int(t) for t in targets]
    tops = [None] * n if top_items is None else [[int(i) for i in top if int(i) >= 0][:TOP_ITEMS]
                                                  for top in top_items]
    if len(targets) != n or len(tops) != n:
        raise ValueError(f"{n} users but {len(targets)} targets and {len(tops)} top-item lists: one each per user.")
    return [{"method": method, "round": int(round_), "split": split, "client": int(client), "user_id": int(u),
             "target_rank": int(r), "target": t, "top10": top}
            for u, r, t, top in zip(user_ids, target_ranks, targets, tops)]


def flat_top_items(top_items: Iterable[Iterable[int]]) -> list[int]:
    """Each user's first TOP_ITEMS item ids, padded with -1, as one flat list (an evaluate
    reply's ConfigRecord holds no nested lists); :func:`nested_top_items` undoes it."""
    flat: list[int] = []
    for top in top_items:
        top = [int(i) for i in top][:TOP_ITEMS]
        flat += top + [-1] * (TOP_ITEMS - len(top))
    return flat


def nested_top_items(flat: Iterable[int]) -> list[list[int]]:
    flat = [int(i) for i in flat]
    if len(flat) % TOP_ITEMS:
        raise ValueError(f"{len(flat)} top item ids are not {TOP_ITEMS} per user.")
    return [flat[i:i + TOP_ITEMS] for i in range(0, len(flat), TOP_ITEMS)]


def _json_list(items: Any) -> str:
    return json.dumps(list(items)) if isinstance(items, (list, tuple)) else ""


def write_per_user_csv(path: str | Path, rows: Iterable[Mapping[str, Any]],
                       original_user_ids: Mapping[int, str] | None = None,
                       original_item_ids: Mapping[int, str] | None = None) -> pd.DataFrame:
    """With `original_user_ids` / `original_item_ids` (``PreparedData.original_user_ids`` /
    ``original_item_ids``) the ``original_user_id``, ``original_target_item`` and
    ``original_top10`` columns give the ids in the source data, to join results back to it.
    Item columns are filled for every row that carries them, whatever its method."""
    frame = pd.DataFrame(list(rows), columns=PER_USER_COLUMNS + ITEM_COLUMNS)
    frame = frame.sort_values(["method", "split", "round", "client", "user_id"], kind="stable").reset_index(drop=True)
    if original_user_ids is not None:
        frame.insert(frame.columns.get_loc("user_id") + 1, "original_user_id",
                     [original_user_ids.get(int(u), "") for u in frame["user_id"]])
    frame["target"] = frame["target"].astype("Int64")  # empty where a method gave no targets
    if original_item_ids is not None:
        frame.insert(frame.columns.get_loc("target") + 1, "original_target_item",
                     [original_item_ids.get(int(t), "") if pd.notna(t) else "" for t in frame["target"]])
        frame["original_top10"] = [[original_item_ids.get(int(i), "") for i in top]
                                   if isinstance(top, (list, tuple)) else None for top in frame["top10"]]
        frame["original_top10"] = frame["original_top10"].map(_json_list)
    frame["top10"] = frame["top10"].map(_json_list)
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return frame


def read_per_user(run_dir: str | Path) -> pd.DataFrame | None:
    """A run's per_user.csv, or None for a run written before per-user results existed."""
    path = Path(run_dir) / PER_USER_FILE
    if not path.exists():
        return None
    frame = pd.read_csv(path)
    missing = [c for c in PER_USER_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; it was not written by this code. Rerun the run.")
    return frame


def final_ranks(per_user: pd.DataFrame, method: str, split: str) -> pd.Series:
    """user_id -> target rank of `method` on `split`, from its latest round with that split."""
    part = per_user[(per_user["method"] == method) & (per_user["split"] == split)]
    if part.empty:
        return pd.Series(dtype=np.int64)
    part = part[part["round"] == part["round"].max()]
    return part.drop_duplicates("user_id", keep="last").set_index("user_id")["target_rank"].sort_index()


def overall_by_round(per_user: pd.DataFrame, split: str, k: int = 10) -> pd.DataFrame:
    """method, round, recall@k, n_users: the mean over every evaluated user of each round."""
    part = per_user[per_user["split"] == split]
    hits = ((part["target_rank"] >= 0) & (part["target_rank"] < k)).astype(float)
    grouped = part.assign(hit=hits).groupby(["method", "round"], sort=True)["hit"]
    return grouped.agg(["mean", "size"]).rename(columns={"mean": f"recall@{k}", "size": "n_users"}).reset_index()


def metric_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user values of "recall@K" or "ndcg@K" from 0-based target ranks (-1 = miss)."""
    from fellrec_flwr.eval.metrics import ndcg_from_ranks, recall_from_ranks

    name, _, k = metric.partition("@")
    if name not in ("recall", "ndcg") or not k.isdigit():
        raise ValueError(f"metric {metric!r}: use recall@K or ndcg@K.")
    return (recall_from_ranks if name == "recall" else ndcg_from_ranks)(np.asarray(ranks), int(k))


def align_users(ranks_by_method: Mapping[str, pd.Series]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every method's ranks on the users ALL methods evaluated (sorted by user id), plus warnings.

    A paired comparison is only fair on common users; a failed client or a different
    data setting leaves a method with other users, which the warnings name.
    """
    common: set[int] | None = None
    for ranks in ranks_by_method.values():
        common = set(ranks.index) if common is None else common & set(ranks.index)
    users = sorted(common or set())
    warnings = [f"{m}: {len(r)} users, {len(r) - len(users)} of them not evaluated by every method (left out)"
                for m, r in ranks_by_method.items() if len(r) != len(users)]
    return {m: r.loc[users].to_numpy() for m, r in ranks_by_method.items()}, warnings


def interval_rows(ranks_by_method: Mapping[str, pd.Series], metrics: Iterable[str] = HEADLINE,
                  references: tuple[str, ...] = ("fedavg", "popularity", "markov"), replicates: int = 2000,
                  seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Paired bootstrap 95% intervals of every method's mean and of its difference to each reference.

    Rows: method, metric, reference ("" for the method's own mean; else the difference
    method - reference), value, ci_low, ci_high, n_users. Also returns alignment warnings.
    """
    from fellrec_flwr.eval.bootstrap import paired_bootstrap

    aligned, warnings = align_users(ranks_by_method)
    n_users = len(next(iter(aligned.values()))) if aligned else 0
    if n_users == 0:
        return [], warnings + ["no user was evaluated by every method: no intervals"]
    rows = []
    for metric in metrics:
        values = {m: metric_values(r, metric) for m, r in aligned.items()}
        for (method, ref), iv in paired_bootstrap(values, references, replicates, seed).items():
            rows.append({"method": method, "metric": metric, "reference": ref or "", "value": iv.value,
                         "ci_low": iv.low, "ci_high": iv.high, "n_users": iv.n_users})
    return rows, warnings


def run_per_user_rows(method: str, user_ranks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """per_user.csv rows from a strategy's `user_ranks` (round, client, split, user_ids, target_ranks,
    and when the clients sent them, targets and top10 as :func:`flat_top_items` packed them)."""
    rows: list[dict[str, Any]] = []
    for r in user_ranks:
        top = nested_top_items(r["top10"]) if "top10" in r else None
        rows += per_user_rows(method, r["round"], r["split"], r["client"], r["user_ids"], r["target_ranks"],
                              r.get("targets"), top)
    return rows


def final_intervals(per_user: pd.DataFrame, method: str, split: str) -> dict[str, Any]:
    """summary.json's "intervals": the method's final metrics and differences to the baselines, paired."""
    ranks = {m: final_ranks(per_user, m, split) for m in dict.fromkeys([method, *BASELINE_METHODS])}
    ranks = {m: r for m, r in ranks.items() if len(r)}
    if method not in ranks:
        return {}
    rows, warnings = interval_rows(ranks, references=BASELINE_METHODS)
    out: dict[str, Any] = {"split": split, "n_users": rows[0]["n_users"] if rows else 0, "warnings": warnings}
    for row in rows:
        if row["method"] == method:
            key = row["metric"] + (f" - {row['reference']}" if row["reference"] else "")
            out[key] = [row["value"], row["ci_low"], row["ci_high"]]
        elif not row["reference"]:
            out[f"{row['method']} {row['metric']}"] = [row["value"], row["ci_low"], row["ci_high"]]
    return out


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


def plot_run(frame: pd.DataFrame, run_dir: str | Path, title: str, per_user: pd.DataFrame | None = None) -> list[Path]:
    """Per-client Recall@10 over rounds (valid) and final per-client bars. Returns the PNG paths.

    With `per_user` (per_user.csv rows) the round plot also shows the run's overall Recall@10
    over all validation users and the baselines on the same users as dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written: list[Path] = []
    valid = frame[(frame["split"] == "valid") & (frame["metric"] == "recall@10")]
    if not valid.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for client, part in valid.groupby("client"):
            ax.plot(part["round"], part["value"], marker="o", lw=0.8, alpha=0.6, label=f"client {int(client)}")
        n_users = _plot_overall(ax, per_user)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set_ylabel("Recall@10 (valid)")
        ax.set_title(f"{title}: valid Recall@10" + (f", {n_users} users" if n_users else ""), fontsize=9)
        _note(ax, zero_note({"Recall@10": valid["value"]}))
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
        n_users = frame[(frame["split"] == split) & (frame["metric"] == "num-examples")
                        & (frame["round"] == final["round"].max())]["value"].sum()
        ax.set_title(f"{title} — final {split}" + (f", {int(n_users)} users" if n_users else ""), fontsize=9)
        _note(ax, zero_note({m: table[m] for m in table.columns}))
        written.append(_save_fig(fig, run_dir / "final_by_client.png"))
        plt.close(fig)
        break
    return written


_BASELINE_COLOURS = {"popularity": "grey", "markov": "black", "sasrec": "tab:blue"}


def _plot_overall(ax: Any, per_user: pd.DataFrame | None) -> int:
    """Overall valid Recall@10 per round (thick) and baselines (dashed); returns the users of the last round."""
    if per_user is None or per_user.empty:
        return 0
    curves = overall_by_round(per_user, "valid")
    if curves.empty:
        return 0
    rounds = curves.loc[~curves["method"].isin(BASELINE_METHODS), "round"]
    span = (rounds.min(), rounds.max()) if len(rounds) else (0, 1)
    n_users = 0
    for method, part in curves.groupby("method"):
        if method in BASELINE_METHODS:
            ax.hlines(part["recall@10"].iloc[-1], *span, linestyles="--", colors=_BASELINE_COLOURS.get(method, "black"),
                      label=f"{method} (same users)")
        else:
            ax.plot(part["round"], part["recall@10"], marker="s", lw=2.5, color="tab:red", label=f"{method}, all users")
            n_users = int(part["n_users"].iloc[-1])
    return n_users


def zero_note(values: Mapping[str, Any]) -> str:
    """A line for a plot whose metric is 0 for every client, so an empty chart does not look broken."""
    zero = [name for name, v in values.items() if len(v) and not np.any(np.asarray(v, dtype=float))]
    if not zero:
        return ""
    return (f"{' and '.join(zero)} = 0 for every client: no evaluated user's target\n"
            "was ranked in the top 10 (an untrained or too small model)")


def _note(ax: Any, text: str) -> None:
    if text:
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})


def _save_fig(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path
