"""The Games verdict table of the item-token head, from the run folders bench/games_full.sh wrote.

    python bench/games_full_report.py [--out docs/results/games-full]

Reads each run folder's per_user.csv (its method's final test ranks and the popularity, Markov
and SASRec rows on the same users), aligns every method on the users all of them evaluated and
writes report.md / report.csv: Recall@10 and NDCG@10 with paired-bootstrap 95 % intervals, the
differences to Markov, SASRec, popularity and FedAvg, FELLRec's self-weights, and the training
costs recorded in metrics.csv. Breakdowns by history length and target popularity come from
`python -m fellrec_flwr.eval.breakdown` (breakdown.csv beside it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("centralized", "fedavg", "fellrec")
REFERENCES = ("markov", "sasrec", "popularity", "fedavg")


def fmt(row: pd.Series | None) -> str:
    if row is None:
        return "–"
    return f"{row['value']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"


def main() -> None:
    from fellrec_flwr.eval.breakdown import run_ranks
    from fellrec_flwr.eval.results import interval_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "games-full")
    args = ap.parse_args()
    runs = [args.out / r for r in RUNS if (args.out / r / "per_user.csv").exists()]
    ranks = run_ranks(runs)
    rows, warnings = interval_rows(ranks, ("recall@10", "ndcg@10", "recall@20", "ndcg@20"),
                                   tuple(r for r in REFERENCES if r in ranks), replicates=2000)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "report.csv", index=False, float_format="%.5f")

    def get(method: str, metric: str, ref: str = "") -> pd.Series | None:
        part = frame[(frame["method"] == method) & (frame["metric"] == metric) & (frame["reference"] == ref)]
        return None if part.empty else part.iloc[0]

    lines = [f"Amazon Games, every training window, {int(frame['n_users'].iloc[0]):,} test users (the users every "
             "method evaluated), 95 % paired-bootstrap intervals over users (2,000 replicates).", ""]
    if warnings:
        lines += [f"Alignment: {w}" for w in warnings] + [""]
    lines += ["| method | Recall@10 [95 % CI] | NDCG@10 | − Markov R@10 | − SASRec R@10 | − popularity R@10 | "
              "− FedAvg R@10 |", "|---|---|---|---|---|---|---|"]
    for method in [m for m in (*RUNS, "sasrec", "markov", "popularity") if m in ranks]:
        own, ndcg = get(method, "recall@10"), get(method, "ndcg@10")
        lines.append(f"| {method} | {own['value']:.4f} [{own['ci_low']:.4f}, {own['ci_high']:.4f}] | "
                     f"{ndcg['value']:.4f} | " + " | ".join(fmt(get(method, "recall@10", r)) for r in REFERENCES) + " |")
    lines += ["", "Costs recorded by the runs (metrics.csv):", ""]
    for run in runs:
        metrics = pd.read_csv(run / "metrics.csv")
        cpu = metrics[metrics["metric"] == "train-cpu-seconds"]["value"].sum()
        windows = metrics[(metrics["metric"] == "num-examples") & (metrics["split"] == "train")]["value"].sum()
        secs = metrics[metrics["metric"] == "train-seconds"]["value"]
        if cpu and windows:
            lines.append(f"- {run.name}: {cpu / 60:.1f} CPU-min of training for {int(windows):,} windows "
                         f"({cpu / windows * 1000:.2f} CPU-ms per window)")
        elif len(secs):
            lines.append(f"- {run.name}: client training {secs.sum() / 60:.1f} min wall in all "
                         f"({len(secs)} client-rounds)")
        self_w = metrics[metrics["metric"] == "self-weight"]
        warm = metrics[metrics["metric"] == "warm-weight"]
        if len(self_w):
            lines.append("  - FELLRec self-weights W_ii by round: " + "; ".join(
                f"round {int(k)}: {g['value'].min():.3f}–{g['value'].max():.3f}" for k, g in self_w.groupby("round"))
                + f" (1/N = {1 / self_w['client'].nunique():.3f}); smallest warm weight {warm['value'].min():.3f}")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
