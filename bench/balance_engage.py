"""Does FELLRec's balance engage? Self-weights and warm weights per similarity setting, on the tiny demo.

    nice -n 10 python bench/balance_engage.py --rounds 3 --out bench/results/balance_engage.csv

Each setting is a real federated run (the project's ClientApp on the in-process Grid, the
same data, model, seed and training budget); only the strategy's similarity basis, kernel
and heating loss differ. No evaluation is run: the question is only what weights the
strategy computes. Per round and setting it reports the self-weights W_ii over clients
(min / mean / max; 1/N means a plain average, 1 means local training), the largest
off-diagonal weight, and the smallest warm weight w_i (1 = heating has no effect).
A setting "engages" when its self-weights move well away from 1/N.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "balance_engage.csv"
# (name, fellrec.* overrides); the first is the paper's method
SETTINGS = [
    ("paper: parameters, linear, raw", {}),
    ("updates, linear", {"fellrec.similarity-basis": "updates"}),
    ("delta-w, linear", {"fellrec.similarity-basis": "delta-w"}),
    ("parameters, softmax", {"fellrec.similarity-kernel": "softmax"}),
    ("updates, softmax", {"fellrec.similarity-basis": "updates", "fellrec.similarity-kernel": "softmax"}),
    ("delta-w, softmax", {"fellrec.similarity-basis": "delta-w", "fellrec.similarity-kernel": "softmax"}),
    ("delta-w, softmax, normalised loss", {"fellrec.similarity-basis": "delta-w",
                                           "fellrec.similarity-kernel": "softmax",
                                           "fellrec.heating-loss": "normalised"}),
    ("delta-w, softmax tau 0.3", {"fellrec.similarity-basis": "delta-w", "fellrec.similarity-kernel": "softmax",
                                  "fellrec.similarity-temperature": 0.3}),
    ("delta-w, softmax tau 0.5", {"fellrec.similarity-basis": "delta-w", "fellrec.similarity-kernel": "softmax",
                                  "fellrec.similarity-temperature": 0.5}),
]
# The quality bench's CPU profile (tiny LLaMA on the demo data), minus evaluation.
BASE = {"train.local-epochs": 1, "train.lr": 0.003, "model.tiny-layers": 4}


def run_setting(overrides: dict, rounds: int, seed: int, workdir: Path) -> list[dict]:
    """One federated run of `rounds` rounds; returns the strategy's records."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from client_app.app import app as client_app
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.inprocess_grid import InProcessGrid
    from fellrec_flwr.model.lora_state import state_to_record
    from fellrec_flwr.runtime import get_runtime
    from strategies import make_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as bench/quality.py
    run_config = {**BASE, **overrides, "seed": seed, "num-server-rounds": rounds, "out-dir": str(workdir)}
    cfg = from_run_config(run_config)
    strategy = make_strategy(cfg)
    strategy.fraction_evaluate = 0.0  # weights only: no evaluation
    grid = InProcessGrid(client_app, cfg.data.num_clients, run_config,
                         node_config={"state-dir": str(workdir / f"state-{time.time_ns()}")})
    initial = state_to_record(get_runtime(cfg).initial_lora)
    strategy.start(grid, initial, num_rounds=rounds, train_config=ConfigRecord({"seed": seed}))
    return strategy.metric_rows()


def summarise(name: str, rows: list[dict], n_clients: int) -> list[dict]:
    frame = pd.DataFrame(rows)
    out = []
    for rnd, part in frame.groupby("round"):
        self_w = part[(part["metric"] == "self-weight")]["value"].to_numpy()
        warm = part[(part["metric"] == "warm-weight")]["value"].to_numpy()
        weights = part[(part["split"] == "balance")]
        off = weights[weights["metric"] != weights["client"].map(lambda c: f"weight:{int(c)}")]["value"]
        out.append({"setting": name, "round": int(rnd), "clients": n_clients, "uniform": 1 / n_clients,
                    "self_min": self_w.min(), "self_mean": self_w.mean(), "self_max": self_w.max(),
                    "offdiag_max": float(off.max()), "offdiag_min": float(off.min()), "warm_min": warm.min()})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--only", default="", help="comma-separated setting indices (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    chosen = [SETTINGS[int(i)] for i in args.only.split(",")] if args.only else SETTINGS
    summary: list[dict] = pd.read_csv(args.out).to_dict("records") if args.append and args.out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in chosen:
            t0 = time.time()
            rows = run_setting(overrides, args.rounds, args.seed, Path(tmp))
            summary.extend(summarise(name, rows, 5))
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)
            table = pd.DataFrame(summary)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.out, index=False, float_format="%.4f")  # after every setting: partial results survive
    table = pd.DataFrame(summary)
    print(f"\nSelf-weights W_ii over clients (uniform = {1 / 5:.3f}); seed {args.seed}, {args.rounds} rounds, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
