"""Side-by-side comparison of finished runs (FELLRec vs FedAvg vs FedProx vs local vs centralized).

    python -m fellrec_flwr.compare results/fellrec-demo results/fedavg-demo ... --out results/compare

Reads each run's summary.json and writes, under --out: comparison.csv (one row per
method and client), comparison.md (a table per headline metric with the balance
statistics) and comparison.png (per-client Recall@10 bars, one group per client).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from fellrec_flwr.atomic import atomic_write_bytes

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


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


def plot_comparison(frame: pd.DataFrame, path: Path, metric: str = "recall@10") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = frame.pivot_table(index="client", columns="method", values=metric, aggfunc="first", sort=False)
    fig, ax = plt.subplots(figsize=(8, 4))
    table.plot.bar(ax=ax)
    ax.set_ylabel(metric)
    ax.set_title(f"per-client {metric} by method")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> pd.DataFrame:
    summaries = [load_summary(d) for d in run_dirs]
    frame = comparison_frame(summaries)
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "comparison.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "comparison.md", markdown_tables(summaries, frame).encode())
    plot_comparison(frame, out_dir / "comparison.png")
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders holding summary.json")
    parser.add_argument("--out", required=True, help="folder for comparison.csv/.md/.png")
    args = parser.parse_args(argv)
    compare(args.runs, args.out)
    print((Path(args.out) / "comparison.md").read_text())


if __name__ == "__main__":
    main()
