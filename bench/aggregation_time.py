"""Time FELLRec's personalised aggregation (the pure math) for many clients and LoRA sizes.

For each (clients N, parameters D) it times, on random float32 uploads:
  balance   similarity (one Gram matrix), loss softmax, warm weights, W   (dynamic_balance)
  aggregate W @ X                                                        (one aggregate per client)
and with --with-records also the strategy's conversions around it: stacking the clients'
ArrayRecords into X, and turning each row of W @ X back into an ArrayRecord (LLaMA-7B-like
layout: 8 x 4096 and 4096 x 8 tensors).
Combinations whose matrices would need more than --max-gb of RAM are skipped.

    python bench/aggregation_time.py --clients 10,50,100
    # -> a table on stdout and bench/results/aggregation_time.csv

With --end-to-end it times the strategy's whole ``FellRec.aggregate_train``: N real Flower
reply Messages (ArrayRecord + MetricRecord) in, N personal ArrayRecords (and the mean) out,
conversions included (wall time, and the process CPU time, which does not count waiting for
a core on a shared machine), with the split balance (uploads streamed into the Gram matrix, W) /
W @ X + records (uploads streamed again; --personal-state disk: rows into files), and the peak memory
the call added (peak resident memory, a separate untimed pass) as a multiple of the
stacked (N, D) float32 matrix:

    nice -n 10 python bench/aggregation_time.py --end-to-end --clients 10,50,100,150,200 \
        --params 4194304 --out bench/results/aggregation_e2e.csv

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
from fellrec_flwr.config import PERSONAL_STATES, SIMILARITY_BASES, FellRecSettings  # noqa: E402
from strategies import fellrec_math  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "aggregation_time.csv"
COLUMNS = ["clients", "params", "basis", "gb_needed", "balance_s", "aggregate_s", "total_s",
           "stack_s", "unflatten_s", "repeats", "cpus"]
E2E_COLUMNS = ["clients", "params", "basis", "personal_state", "block_mb", "round", "end_to_end_s", "cpu_s", "balance_s", "mix_s",
               "balance_cpu_s", "mix_cpu_s", "peak_gb",
               "stacked_gb", "peak_over_stacked", "repeats", "blas_threads", "load_avg"]


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
    balance = fellrec_math.dynamic_balance(x, 1.0 + 0.1 * rng.random(n), 0, FellRecSettings())
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
    settings = FellRecSettings(similarity_basis=basis)
    out = np.empty_like(x)
    balance_times, aggregate_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        balance = fellrec_math.dynamic_balance(x, losses, 0, settings, reference=reference)
        t1 = time.perf_counter()
        fellrec_math.aggregate(balance.weights, x, out=out)
        t2 = time.perf_counter()
        balance_times.append(t1 - t0)
        aggregate_times.append(t2 - t1)
    return float(np.median(balance_times)), float(np.median(aggregate_times))


def reply_messages(n: int, d: int, rng: np.random.Generator) -> list:
    """n train replies as a Flower ServerApp receives them: arrays, train-loss, num-examples, client-key."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # needed to build Messages
    replies = []
    for i, record in enumerate(lora_like_records(n, d, rng)):
        instruction = Message(RecordDict(), dst_node_id=100 + i, message_type="train")
        metrics = MetricRecord({"train-loss": 1.0 + 0.1 * float(rng.random()), "num-examples": 100 + i,
                                "client-key": i})
        replies.append(Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction))
    return replies


class _StepTimer:
    """Wall time spent in a few named functions during one call (patched in, then restored)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                cpu = label.replace("_s", "_cpu_s")
                self.seconds[cpu] = self.seconds.get(cpu, 0.0) + time.process_time() - c0

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc), so that the next
    call's allocations are fresh pages: what a server sees, and what VmHWM can count."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_during(call) -> int:
    """Bytes of resident memory the call added at its peak (needs Linux's /proc/self/clear_refs)."""
    release_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    call()
    return (_status_kb("VmHWM") - before) * 1024


def time_end_to_end(n: int, d: int, basis: str, repeats: int, rng: np.random.Generator,
                    block_mb: float = 64.0, state_dir: Path | None = None) -> list[dict]:
    """FellRec.aggregate_train on n real replies: median wall time, step split and peak memory.

    Steps (issue 23: the uploads are streamed, there is no stacking step any more): balance =
    ``round_balance`` (the uploads read block by block into the Gram matrix, then W); mix = the
    rest (the uploads read again, W @ each block, each row into the new ArrayRecords or files).
    """
    from strategies import FellRec
    from strategies import fellrec as fellrec_module

    def make() -> FellRec:
        return FellRec(FellRecSettings(similarity_basis=basis), aggregation_block_mb=block_mb,
                       state_dir=None if state_dir is None else Path(tempfile.mkdtemp(dir=state_dir)))

    replies = reply_messages(n, d, rng)
    # Memory first, in a fresh first-round pass (untimed): the peak resident memory the call
    # adds (Linux: VmHWM after resetting it).
    peak = peak_rss_during(lambda: make().aggregate_train(1, replies))
    release_memory()
    times, cpu, steps = [], [], []
    strategy = make()
    for repeat in range(repeats):  # one server, several rounds
        timer = _StepTimer()
        timer.wrap(fellrec_module, "round_balance", "balance_s")
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            out = strategy.aggregate_train(1 + repeat, replies)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        finally:
            timer.restore()
        assert out[0] is not None and len(strategy.personal) == n
        timer.seconds["mix_s"] = times[-1] - timer.seconds["balance_s"]
        timer.seconds["mix_cpu_s"] = cpu[-1] - timer.seconds["balance_cpu_s"]
        steps.append(timer.seconds)
        del out
    del strategy
    stacked = n * d * 4
    memory = {"peak_gb": round(peak / 1e9, 3), "stacked_gb": round(stacked / 1e9, 3),
              "peak_over_stacked": round(peak / stacked, 2)}
    rows = [{"round": "first", "end_to_end_s": round(times[0], 3), "cpu_s": round(cpu[0], 3),
             **{k: round(v, 3) for k, v in steps[0].items()}, **memory}]
    if repeats > 1:  # the median later round
        later = 1 + int(np.argsort(times[1:])[(repeats - 1) // 2])
        rows.append({"round": f"later (median of {repeats - 1})", "end_to_end_s": round(times[later], 3),
                     "cpu_s": round(cpu[later], 3), **{k: round(v, 3) for k, v in steps[later].items()}, **memory})
    return rows


def main_fedavg(args: argparse.Namespace) -> None:
    """FedAvg's streamed mean (RecordingFedAvg.aggregate_train) vs Flower's aggregate_arrayrecords."""
    import logging

    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from strategies import RecordingFedAvg

    logging.getLogger("flwr").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    rows = []
    for n in [int(c) for c in args.clients.split(",")]:
        for d in [int(p) for p in args.params.split(",")]:
            replies = reply_messages(n, d, rng)
            strategy = RecordingFedAvg(aggregation_block_mb=args.block_mb)
            calls = {"streamed (RecordingFedAvg.aggregate_train)": lambda: strategy.aggregate_train(1, replies),
                     "flower aggregate_arrayrecords": lambda: aggregate_arrayrecords(
                         [m.content for m in replies], "num-examples")}
            for name, call in calls.items():
                for repeat in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    call()
                    rows.append({"clients": n, "params": d, "aggregation": name, "repeat": repeat,
                                 "wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3),
                                 "load_avg": round(os.getloadavg()[0], 1)})
                    print(rows[-1], flush=True)
            del replies, strategy
            write_csv(rows, args.out, ["clients", "params", "aggregation", "repeat", "wall_s", "cpu_s", "load_avg"])
    print(f"written: {args.out}")


def main_end_to_end(args: argparse.Namespace) -> None:
    from strategies.fellrec_math import GRAM_BLAS_THREADS

    rng = np.random.default_rng(0)
    rows = []
    for n in [int(c) for c in args.clients.split(",")]:
        for d in [int(p) for p in args.params.split(",")]:
            gb = 2 * n * d * 4 / 1e9  # replies + new records (memory), the streamed blocks are small
            if gb > args.max_gb:
                print(f"skip N={n} D={d}: needs {gb:.1f} GB > --max-gb {args.max_gb}", flush=True)
                continue
            state_dir = None
            if args.personal_state == "disk":
                state_dir = Path(tempfile.mkdtemp(prefix="aggregation-time-", dir=args.state_tmp))
            for timed in time_end_to_end(n, d, args.basis, args.repeats, rng, args.block_mb, state_dir):
                row = {"clients": n, "params": d, "basis": args.basis, "repeats": args.repeats,
                       "personal_state": args.personal_state, "block_mb": args.block_mb,
                       "blas_threads": GRAM_BLAS_THREADS, "load_avg": round(os.getloadavg()[0], 1), **timed}
                rows.append(row)
                print(", ".join(f"{k} {row.get(k)}" for k in E2E_COLUMNS), flush=True)
            write_csv(rows, args.out, E2E_COLUMNS)  # after every size: partial results survive
    print(f"written: {args.out}")


def write_csv(rows: list[dict], path: Path, columns: list[str] = COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,50,100,200", help="comma-separated client counts")
    parser.add_argument("--params", default="18432,460800,4194304", help="comma-separated LoRA sizes")
    parser.add_argument("--basis", default="parameters", choices=SIMILARITY_BASES,
                        help="similarity basis (delta-w only with --end-to-end)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--max-gb", type=float, default=6.0, help="skip combinations needing more RAM")
    parser.add_argument("--with-records", action="store_true",
                        help="time the ArrayRecord conversions too (one pass, parameters basis)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time FellRec.aggregate_train on real reply Messages (see the module doc)")
    parser.add_argument("--fedavg", action="store_true",
                        help="time FedAvg's streamed mean against Flower's aggregate_arrayrecords (same replies)")
    parser.add_argument("--personal-state", default="memory", choices=PERSONAL_STATES,
                        help="--end-to-end: where the new personal adapters go (disk: files under --state-tmp)")
    parser.add_argument("--state-tmp", default=None, help="folder for the disk state (default: the system's temp)")
    parser.add_argument("--block-mb", type=float, default=64.0, help="--end-to-end: aggregation-block-mb")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.fedavg:
        args.out = args.out or RESULTS.with_name("aggregation_fedavg.csv")
        main_fedavg(args)
        return
    if args.end_to_end:
        args.out = args.out or RESULTS.with_name("aggregation_e2e.csv")
        main_end_to_end(args)
        return
    args.out = args.out or RESULTS

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
