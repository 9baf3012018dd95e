"""Where a method wins: paired intervals by history length and by target popularity.

    python -m fellrec_flwr.eval.breakdown RUN_DIR [RUN_DIR ...] [--prepared-dir DIR] [--out DIR]

The literature says an LLM recommender's gain shows on short histories and rare items; this
checks it on a run's own users. Each finished run folder's per_user.csv holds its method's
final test ranks and the baselines' (popularity, Markov, SASRec) on the same users; the
prepared data (from the run's config.json, or --prepared-dir) gives each test user's history
length and the target's training popularity. Buckets:

- history length: 1–2, 3–5, 6–10 and 11+ items (as the model saw them: the last data.history-len);
- target popularity: **head** = the target's title group is among the most interacted-with
  groups that together hold half of the training interactions; **tail** = the rest.

For every bucket and method: Recall@10 / NDCG@10 with a paired-bootstrap 95 % interval over
the bucket's users, and the difference to every reference (`fellrec_flwr.eval.bootstrap`).
Writes breakdown.csv and breakdown.png (bars with intervals) into --out (default: the first run).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from fellrec_flwr.atomic import atomic_write_bytes
from fellrec_flwr.eval.results import final_ranks, interval_rows, read_per_user

HISTORY_BUCKETS = ((1, 2), (3, 5), (6, 10), (11, 10**9))
HEAD_SHARE = 0.5  # head groups hold this share of the training interactions
COLUMNS = ["bucket", "method", "metric", "reference", "value", "ci_low", "ci_high", "n_users"]


def history_bucket(length: int) -> str:
    for low, high in HISTORY_BUCKETS:
        if low <= length <= high:
            return f"history {low}-{high}" if high < 10**9 else f"history {low}+"
    raise ValueError(f"history length {length} must be >= 1.")


def head_groups(group_counts: np.ndarray, share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean (G,): the most interacted-with groups that together hold `share` of all interactions
    (at least one group; ties broken by group index)."""
    counts = np.asarray(group_counts, dtype=np.float64)
    if counts.sum() <= 0:
        return np.zeros(len(counts), dtype=bool)
    order = np.argsort(-counts, kind="stable")
    cumulative = np.cumsum(counts[order]) / counts.sum()
    n_head = int(np.searchsorted(cumulative, share) + 1)
    out = np.zeros(len(counts), dtype=bool)
    out[order[:n_head]] = True
    return out


def user_buckets(data: Any, split: str = "test") -> pd.DataFrame:
    """user_id, history (bucket name), popularity ("head target" / "tail target") of `split`'s users."""
    from fellrec_flwr.eval.baselines import group_counts
    from fellrec_flwr.eval.grounding import TitleGroups

    groups = TitleGroups.from_titles(data.titles)
    head = head_groups(group_counts(data.train_sequences, groups))
    frame = data.split_frame(split)
    targets = groups.group_index(frame["target"].astype(int).tolist())
    return pd.DataFrame({"user_id": frame["user_id"].astype(int).to_numpy(),
                         "history": [history_bucket(len(h)) for h in frame["history"]],
                         "popularity": np.where(head[targets], "head target", "tail target")})


def breakdown(ranks_by_method: Mapping[str, pd.Series], buckets: pd.DataFrame,
              references: Sequence[str] = ("markov", "sasrec", "popularity"),
              metrics: Iterable[str] = ("recall@10", "ndcg@10"), replicates: int = 2000) -> pd.DataFrame:
    """One row per bucket, method, metric and reference ('' = the method's own mean)."""
    by_user = buckets.set_index("user_id")
    rows: list[dict[str, Any]] = []
    for column in ("all", "history", "popularity"):
        names = ["all users"] if column == "all" else sorted(by_user[column].unique(), key=_bucket_order)
        for name in names:
            users = by_user.index if column == "all" else by_user.index[by_user[column] == name]
            part = {m: r[r.index.isin(users)] for m, r in ranks_by_method.items()}
            found, _ = interval_rows(part, tuple(metrics), tuple(r for r in references if r in part), replicates)
            rows += [{"bucket": name, **row} for row in found]
    return pd.DataFrame(rows, columns=COLUMNS)


def _bucket_order(name: str) -> tuple[int, str]:
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return (int(digits[0]) if digits else 0, name)


def run_ranks(run_dirs: Sequence[Path], split: str = "test") -> dict[str, pd.Series]:
    """Final ranks of every run's own method and of the baselines in its per_user.csv."""
    out: dict[str, pd.Series] = {}
    for run_dir in run_dirs:
        per_user = read_per_user(run_dir)
        if per_user is None:
            raise FileNotFoundError(f"{run_dir} has no per_user.csv: is it a finished run folder?")
        for method in per_user["method"].unique():
            ranks = final_ranks(per_user, method, split)
            if len(ranks) and method not in out:
                out[str(method)] = ranks
    return out


def plot_breakdown(frame: pd.DataFrame, path: Path, metric: str = "recall@10") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = frame[(frame["metric"] == metric) & (frame["reference"] == "")]
    buckets = list(dict.fromkeys(own["bucket"]))
    methods = list(dict.fromkeys(own["method"]))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(buckets)), 4))
    for i, method in enumerate(methods):
        part = own[own["method"] == method].set_index("bucket").reindex(buckets)
        x = np.arange(len(buckets)) + i * width
        err = np.vstack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]])
        ax.bar(x, part["value"], width, yerr=err, capsize=2, label=method)
    counts = own.drop_duplicates("bucket").set_index("bucket")["n_users"].reindex(buckets)
    ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{b}\n{int(n)} users" for b, n in counts.items()], fontsize=7)
    ax.set_ylabel(f"{metric} (95 % CI)")
    ax.legend(fontsize=7)
    ax.set_title(f"{metric} by history length and target popularity", fontsize=9)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def main(argv: list[str] | None = None) -> int:
    import sys

    from fellrec_flwr.data.prepared import PreparedData

    ap = argparse.ArgumentParser(prog="python -m fellrec_flwr.eval.breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (per_user.csv, config.json)")
    ap.add_argument("--prepared-dir", type=Path, help="the prepared data (default: data.prepared-dir of the first run)")
    ap.add_argument("--out", type=Path, help="where breakdown.csv/.png go (default: the first run folder)")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    prepared = args.prepared_dir
    if prepared is None:
        config = json.loads((args.runs[0] / "config.json").read_text())
        prepared = Path(config.get("data.prepared-dir") or "")
        if not str(prepared) or not prepared.is_dir():
            print(f"error: {args.runs[0]}/config.json names no prepared folder; pass --prepared-dir.", file=sys.stderr)
            return 2
    data = PreparedData.load(prepared)
    frame = breakdown(run_ranks(args.runs, args.split), user_buckets(data, args.split))
    out = args.out or args.runs[0]
    atomic_write_bytes(out / "breakdown.csv", frame.to_csv(index=False, float_format="%.4f").encode())
    plot_breakdown(frame, out / "breakdown.png")
    print(f"wrote {out / 'breakdown.csv'} and breakdown.png ({len(frame)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
