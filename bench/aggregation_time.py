"""Time FELLRec's personalised aggregation (the pure math) for many clients and LoRA sizes.

For each (clients N, parameters D) it times, on random float32 uploads:
  balance   similarity (one Gram matrix), loss softmax, warm weights, W   (dynamic_balance)
  aggregate W @ X                                                        (one aggregate per client)
and with --with-records also the strategy's conversions around it: stacking the clients'
ArrayRecords into X, and turning each row of W @ X back into an ArrayRecord (LLaMA-7B-like
layout: 8 x 4096 and 4096 x 8 tensors).
Combinations whose matrices would need more than --max-gb of RAM are skipped.

    /tmp/venv/bin/python bench/aggregation_time.py --clients 10,50,100
    # -> a table on stdout and bench/results/aggregation_time.csv

Sizes: 18,432 = a small LoRA; 460,800 = SmolLM2-135M with r=8 on q,v;
4,194,304 = LLaMA-7B with r=8 on q,v (the paper's setting).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from strategies import fellrec_math  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "aggregation_time.csv"
COLUMNS = ["clients", "params", "basis", "gb_needed", "balance_s", "aggregate_s", "total_s",
           "stack_s", "unflatten_s", "repeats", "cpus"]


def needed_gb(n: int, d: int, basis: str, with_records: bool = False) -> float:
    """Uploads X and the aggregates W @ X (plus the received arrays for the updates basis,
    plus the clients' ArrayRecords and the new personal ones with --with-records)."""
    matrices = 2 + (basis == "updates") + 2 * with_records
    return matrices * n * d * 4 / 1e9


def lora_like_records(n: int, d: int, rng: np.random.Generator) -> list:
    """n ArrayRecords of about d float32 values in A (r x h) / B (h x r) pairs: r = 8, h = 4096
    as in LLaMA-7B (4,194,304 = 32 layers x q,v x A,B = 128 tensors per client)."""
    from flwr.app import Array, ArrayRecord

    r, h = 8, 4096
    pairs = max(1, d // (2 * r * h))
    records = []
    for _ in range(n):
        arrays = {}
        for i in range(pairs):
            arrays[f"layer{i}.lora_A"] = Array(rng.standard_normal((r, h), dtype=np.float32))
            arrays[f"layer{i}.lora_B"] = Array(rng.standard_normal((h, r), dtype=np.float32))
        records.append(ArrayRecord(arrays))
    return records


def time_records(n: int, d: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """One pass as FellRec.personalise does it: stack, balance, aggregate, unflatten."""
    from strategies.arrays import FlatLayout

    records = lora_like_records(n, d, rng)
    t0 = time.perf_counter()
    layout = FlatLayout.of(records[0])
    x = layout.stack(records)
    t1 = time.perf_counter()
    balance = fellrec_math.dynamic_balance(x, 1.0 + 0.1 * rng.random(n), 0)
    t2 = time.perf_counter()
    y = fellrec_math.aggregate(balance.weights, x)
    t3 = time.perf_counter()
    personal = [layout.unflatten(y[i]) for i in range(n)]
    t4 = time.perf_counter()
    del personal
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def time_one(n: int, d: int, basis: str, repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    x = rng.standard_normal((n, d), dtype=np.float32)
    reference = rng.standard_normal((n, d), dtype=np.float32) if basis == "updates" else None
    losses = 1.0 + 0.1 * rng.random(n)
    out = np.empty_like(x)
    balance_times, aggregate_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        balance = fellrec_math.dynamic_balance(x, losses, 0, reference=reference)
        t1 = time.perf_counter()
        fellrec_math.aggregate(balance.weights, x, out=out)
        t2 = time.perf_counter()
        balance_times.append(t1 - t0)
        aggregate_times.append(t2 - t1)
    return float(np.median(balance_times)), float(np.median(aggregate_times))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,50,100,200", help="comma-separated client counts")
    parser.add_argument("--params", default="18432,460800,4194304", help="comma-separated LoRA sizes")
    parser.add_argument("--basis", default="parameters", choices=["parameters", "updates"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--max-gb", type=float, default=6.0, help="skip combinations needing more RAM")
    parser.add_argument("--with-records", action="store_true",
                        help="time the ArrayRecord conversions too (one pass, parameters basis)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    combos = [(int(n), int(d)) for n in args.clients.split(",") for d in args.params.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    cpus = os.cpu_count() or 1
    for n, d in tqdm(combos, desc="aggregation timing"):
        gb = needed_gb(n, d, args.basis, args.with_records)
        if gb > args.max_gb:
            tqdm.write(f"skip N={n} D={d}: needs {gb:.1f} GB > --max-gb {args.max_gb}")
            continue
        stack_s = unflatten_s = float("nan")
        if args.with_records:
            stack_s, balance_s, aggregate_s, unflatten_s = time_records(n, d, rng)
            repeats = 1
        else:
            balance_s, aggregate_s = time_one(n, d, args.basis, args.repeats, rng)
            repeats = args.repeats
        rows.append({"clients": n, "params": d, "basis": args.basis, "gb_needed": round(gb, 2),
                     "balance_s": round(balance_s, 4), "aggregate_s": round(aggregate_s, 4),
                     "total_s": round(balance_s + aggregate_s, 4), "stack_s": round(stack_s, 4),
                     "unflatten_s": round(unflatten_s, 4), "repeats": repeats, "cpus": cpus})
    write_csv(rows, args.out)

    print(f"\nFELLRec aggregation time ({platform.processor() or platform.machine()}, {cpus} CPUs, "
          f"numpy {np.__version__}, basis={args.basis}, "
          f"{'one pass' if args.with_records else f'median of {args.repeats}'}, load avg {os.getloadavg()[0]:.1f})")
    print(f"{'clients':>8} {'params':>10} {'GB':>6} {'balance s':>10} {'aggregate s':>12} {'total s':>9}"
          f" {'stack s':>8} {'unflatten s':>12}")
    for r in rows:
        print(f"{r['clients']:>8} {r['params']:>10} {r['gb_needed']:>6} {r['balance_s']:>10.4f} "
              f"{r['aggregate_s']:>12.4f} {r['total_s']:>9.4f} {r['stack_s']:>8.3f} {r['unflatten_s']:>12.3f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
