"""Per-run system costs from a run folder's metrics.csv: rounds per hour, client training time
and, on a GPU, each client's peak GPU memory.

    python bench/run_costs.py results/fellrec-games [more run folders] [--out bench/results/run_costs.csv]

Used for the GPU simulation benchmark (5 clients sharing one GPU through fractional
`client-resources-num-gpus`, see docs/results.md), and works on any run: CPU runs have no
`peak-gpu-mb` column. The numbers come from rows the strategy and the ClientApp record every
round: `round-seconds` (server wall time of a round, train + evaluation), `train-seconds`
and `peak-gpu-mb` (per client and round, from the train reply).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def run_costs(metrics: pd.DataFrame) -> dict[str, float]:
    """Summarise one run's metric rows (columns round, client, split, metric, value)."""
    missing = {"client", "metric", "value"} - set(metrics.columns)
    if missing:
        raise ValueError(f"metrics.csv lacks the columns {sorted(missing)}: pass a metrics.csv written by a run.")
    def rows(name: str) -> pd.DataFrame:
        return metrics[metrics["metric"] == name]

    rounds = rows("round-seconds")["value"]
    if rounds.empty:
        raise ValueError("no round-seconds rows: this run was recorded before round timing existed; rerun it.")
    out = {
        "rounds": float(len(rounds)),
        "mean_round_seconds": float(rounds.mean()),
        "rounds_per_hour": float(3600.0 / rounds.mean()),
    }
    train = rows("train-seconds")
    if not train.empty:
        per_client = train.groupby("client")["value"].mean()
        out["mean_client_train_seconds"] = float(per_client.mean())
        out["slowest_client_train_seconds"] = float(per_client.max())
    gpu = rows("peak-gpu-mb")
    if not gpu.empty:
        per_client = gpu.groupby("client")["value"].max()  # each client's peak over the rounds
        out["mean_client_peak_gpu_mb"] = float(per_client.mean())
        out["max_client_peak_gpu_mb"] = float(per_client.max())
    held = rows("held-gpu-mb")  # kept between messages (issue 22)
    if not held.empty:
        out["max_client_held_gpu_mb"] = float(held.groupby("client")["value"].max().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.csv)")
    parser.add_argument("--out", help="write the table as CSV here (and print it either way)")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        path = Path(run) / "metrics.csv"
        if not path.exists():
            parser.error(f"{path} does not exist: pass a run folder written by `flwr run .` or bench/quality.py.")
        rows.append({"run": Path(run).name, **run_costs(pd.read_csv(path))})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
