"""Side-by-side comparison of finished runs (FELLRec vs FedAvg vs FedProx vs local vs centralized).

    python -m fellrec_flwr.eval.compare results/fellrec-demo results/fedavg-demo ... --out results/compare

Reads each run's summary.json and writes, under --out: comparison.csv (one row per
method and client), comparison.md (a table per headline metric with the balance
statistics) and comparison.png (per-client Recall@10 bars, one group per client).

Where the runs hold per_user.csv (every evaluated user's target rank), it also reports,
on the users EVERY method evaluated, each method's number of test users and a 95% paired
bootstrap interval (over users) of Recall/NDCG@10/20 and of its difference to FedAvg,
popularity, Markov and SASRec (`fellrec_flwr.eval.bootstrap`); these baselines come
with every run folder, so one run alone is compared with them. The same numbers go to
results.csv: method, profile, seed, metric, value, ci_low, ci_high, n_users, where metric
is "recall@10" (the method's mean) or "recall@10 - fedavg" (method minus reference).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from fellrec_flwr.atomic import atomic_write_bytes
from fellrec_flwr.eval.results import BASELINE_METHODS, final_ranks, interval_rows, read_per_user

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
REFERENCES = ("fedavg", *BASELINE_METHODS)
RESULTS_COLUMNS = ["method", "profile", "seed", "metric", "value", "ci_low", "ci_high", "n_users"]


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished run folder?")
    summary = json.loads(path.read_text())
    summary.setdefault("method", Path(run_dir).name)
    return summary


def comparison_frame(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for s in summaries:
        for client, metrics in s.get("per_client", {}).items():
            rows.append({"method": s["method"], "client": str(client), **{m: metrics.get(m) for m in METRICS}})
        rows.append({"method": s["method"], "client": "overall", **{m: s.get("overall", {}).get(m) for m in METRICS}})
    return pd.DataFrame(rows)


def markdown_tables(summaries: list[dict[str, Any]], frame: pd.DataFrame) -> str:
    out = []
    for metric in METRICS:
        part = frame.pivot_table(index="method", columns="client", values=metric, aggfunc="first", sort=False)
        clients = sorted((c for c in part.columns if c != "overall"), key=int)
        part = part[clients + (["overall"] if "overall" in part.columns else [])]
        stats = []
        for s in summaries:
            b = s.get("balance", {}).get(metric, {})
            stats.append({"method": s["method"], "CV": b.get("cv"), "worst": b.get("worst_value"), "best-worst gap": b.get("gap")})
        table = part.join(pd.DataFrame(stats).set_index("method"))
        out.append(f"### {metric}\n\n{_to_markdown(table)}\n")
    return "\n".join(out)


def _to_markdown(table: pd.DataFrame) -> str:
    cols = ["method", *[str(c) for c in table.columns]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, row in table.iterrows():
        cells = [str(method)] + ["" if pd.isna(v) else f"{v:.4f}" for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def num_test_users(summaries: list[dict[str, Any]]) -> int:
    """Users behind the first run's final per-client metrics (sum of its clients' num-examples)."""
    per_client = summaries[0].get("per_client", {}) if summaries else {}
    return int(sum(m.get("num-examples", 0) for m in per_client.values()))


def plot_comparison(frame: pd.DataFrame, path: Path, metric: str = "recall@10", n_users: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = frame.pivot_table(index="client", columns="method", values=metric, aggfunc="first", sort=False)
    fig, ax = plt.subplots(figsize=(8, 4))
    table.plot.bar(ax=ax)
    ax.set_xlabel("client")
    ax.set_ylabel(metric)
    ax.set_title(f"per-client {metric} by method" + (f" ({n_users} test users)" if n_users else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def final_split_of(summary: dict[str, Any]) -> str:
    return str(summary.get("split") or "test")


def run_seed(run_dir: str | Path) -> Any:
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()).get("seed", "") if path.exists() else ""


def collect_user_ranks(run_dirs: list[str | Path],
                       summaries: list[dict[str, Any]]) -> tuple[dict[str, pd.Series], dict[str, Any]]:
    """{method: user_id -> final target rank} over all runs with per_user.csv, and each method's seed.

    A run contributes its own method; the baselines stored beside it are taken from the
    first run that has them (they are the same for runs on the same data).
    """
    ranks: dict[str, pd.Series] = {}
    seeds: dict[str, Any] = {}
    for run_dir, summary in zip(run_dirs, summaries):
        per_user = read_per_user(run_dir)
        if per_user is None:
            continue
        split = final_split_of(summary)
        own = summary["method"]
        for method in [own, *sorted(set(per_user["method"]) - {own})]:
            stored = final_ranks(per_user, method, split)
            if method not in ranks and len(stored):
                ranks[method], seeds[method] = stored, run_seed(run_dir)
    return ranks, seeds


def results_rows(rows: list[dict[str, Any]], profile: str, seeds: dict[str, Any]) -> pd.DataFrame:
    """results.csv: one row per (method, metric) mean and per (method, metric - reference) difference."""
    out = [{"method": r["method"], "profile": profile, "seed": seeds.get(r["method"], ""),
            "metric": r["metric"] + (f" - {r['reference']}" if r["reference"] else ""), "value": r["value"],
            "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n_users": r["n_users"]} for r in rows]
    return pd.DataFrame(out, columns=RESULTS_COLUMNS)


def interval_markdown(rows: list[dict[str, Any]], warnings: list[str]) -> str:
    """A table per metric: mean [95% CI] and the difference [CI] to each reference present."""
    if not rows:
        return ""
    frame = pd.DataFrame(rows)
    refs = [r for r in REFERENCES if r in set(frame["method"])]
    n_users = int(frame["n_users"].iloc[0])
    out = [f"## Paired bootstrap, {n_users} test users (the same users for every method; 95% CI)\n"]
    out += [f"- warning: {w}" for w in warnings]
    for metric in METRICS:
        part = frame[frame["metric"] == metric]
        if part.empty:
            continue
        cols = ["method", "n users", metric, *[f"− {r}" for r in refs]]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for method in dict.fromkeys(part["method"]):
            cells = [method, str(n_users)]
            for ref in ["", *refs]:
                hit = part[(part["method"] == method) & (part["reference"] == ref)]
                cells.append("" if hit.empty else _ci_cell(hit.iloc[0]))
            lines.append("| " + " | ".join(cells) + " |")
        out.append(f"### {metric}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(out)


def _ci_cell(row: pd.Series) -> str:
    return f"{row['value']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]" if row["reference"] else \
        f"{row['value']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"


def compare_intervals(run_dirs: list[str | Path], summaries: list[dict[str, Any]], out_dir: Path, profile: str = "",
                      replicates: int = 2000) -> str:
    """Write results.csv; return the markdown section ("" when no run has per_user.csv)."""
    ranks, seeds = collect_user_ranks(run_dirs, summaries)
    if not ranks:
        return ""
    rows, warnings = interval_rows(ranks, METRICS, REFERENCES, replicates=replicates)
    atomic_write_bytes(out_dir / "results.csv", results_rows(rows, profile, seeds).to_csv(index=False).encode())
    return interval_markdown(rows, warnings)


def compare(run_dirs: list[str | Path], out_dir: str | Path, profile: str = "") -> pd.DataFrame:
    summaries = [load_summary(d) for d in run_dirs]
    frame = comparison_frame(summaries)
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "comparison.csv", frame.to_csv(index=False).encode())
    intervals = compare_intervals(run_dirs, summaries, out_dir, profile)
    md = markdown_tables(summaries, frame) + ("\n" + intervals if intervals else "")
    md += balance_markdown(run_dirs, summaries)
    atomic_write_bytes(out_dir / "comparison.md", md.encode())
    plot_comparison(frame, out_dir / "comparison.png", n_users=num_test_users(summaries))
    return frame


def balance_markdown(run_dirs: list[str | Path], summaries: list[dict[str, Any]]) -> str:
    """Last round's aggregation weights of each run that records them (FELLRec): does it personalise?"""
    from fellrec_flwr.eval.balance_report import balance_summary

    lines = []
    for run_dir, summary in zip(run_dirs, summaries):
        path = Path(run_dir) / "metrics.csv"
        stats = balance_summary(pd.read_csv(path)) if path.exists() else None
        if stats is not None:
            lines.append(f"| {summary['method']} | {stats['round']} | {stats['clients']} | {stats['uniform']:.3f} | "
                         f"{stats['self_min']:.3f} / {stats['self_mean']:.3f} / {stats['self_max']:.3f} | "
                         f"{stats['warm_min']:.3f} |")
    if not lines:
        return ""
    header = ("\n### Aggregation weights (last round)\n\nself-weight W_ii near 1/N = a plain average, near 1 = local "
              "training; min warm weight 1 = heating has no effect. Heatmaps: each run's balance_weights.png.\n\n"
              "| method | round | clients | 1/N | self-weight min / mean / max | min warm weight |\n|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders holding summary.json")
    parser.add_argument("--out", required=True, help="folder for comparison.csv/.md/.png and results.csv")
    parser.add_argument("--profile", default="", help="profile name written to results.csv (e.g. cpu)")
    args = parser.parse_args(argv)
    compare(args.runs, args.out, args.profile)
    print((Path(args.out) / "comparison.md").read_text())


if __name__ == "__main__":
    main()
