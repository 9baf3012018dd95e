"""Server memory and aggregation time of FELLRec with many clients (issue 23).

Each setting (registered clients K, clients sampled per round M, personal-state) runs R
rounds of the app's own strategy (``strategies.make_strategy`` on a run config: FELLRec,
``data.partitioner = "dirichlet"``, ``data.num-clients = K``, ``fraction-train = M / K``) in
Flower's loop (``Strategy.start``) over an in-process Grid of K nodes, in a fresh process of
its own, so that its peak resident memory (VmHWM) is its own. What is real and what is not:

- real: the strategy classes and Flower's loop (per-node messages, node identification,
  each client's adapter read from the personal store, the streamed aggregation, checkpoints
  of the strategy state each round), the tiny model's LoRA layout (``initial_lora(cfg)``,
  the ServerApp's own start), the clients' sizes (users per client of a Dirichlet(alpha = 1)
  partition of 20 demo users per client, by the project's partitioner);
- synthetic: the ClientApps do not train; each uploads what it received plus seeded noise
  with a made-up train-loss. A ``flwr run`` with 1,000 SuperNodes that train the tiny model is
  beyond this 2-core box shared with other jobs (each round would train M models);
  evaluation is off (Flower's loop with fraction-evaluate = 1 would send all K adapters at once).

    nice -n 19 python bench/scale_run.py --sizes-dir /tmp   # the default grid below
    # -> docs/results/scale/scale_run.{csv,json,png}

Every registered client starts with an adapter of its own in the personal store (``--no-prefill``
to start empty): the steady state of a long run, where a memory store holds K adapters and a
disk store K files. Memory: ``peak_rss_mb`` is the process's peak resident memory (Python,
numpy, Flower: ~0.15 GB before any round, plus a memory
store's adapters); ``rounds_peak_mb`` what the rounds added on top of the memory after setup
(VmHWM reset after setup, Linux only). Aggregation: wall and process CPU seconds of
``aggregate_train`` (the CPU time does not count waiting for a core on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "results" / "scale"
COLUMNS = ["registered", "per_round", "personal_state", "prefilled", "params", "rounds", "aggregate_s_median",
           "aggregate_s_max", "aggregate_cpu_s_median", "round_s_median", "peak_rss_mb", "rounds_peak_mb", "disk_mb", "load_avg"]
# (registered, per round): per-round sweep at 1,000 registered; registered sweep at 10 and 100 per round
GRID = [(1000, 10), (1000, 50), (1000, 100), (1000, 200), (100, 10), (100, 100)]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def dirichlet_sizes(num_clients: int, alpha: float, seed: int, users_per_client: int = 20) -> np.ndarray:
    """Users per client of the project's Dirichlet partition of demo users (taste group = category)."""
    from data_prep.demo import generate_users
    from data_prep.partitioners import assign_clients, make_partitioner, user_dataset

    sequences, groups = generate_users(num_users=users_per_client * num_clients)
    ids = list(sequences)
    partitioner = make_partitioner("dirichlet", num_clients, seed, alpha, len(ids))
    client_of = assign_clients(partitioner, user_dataset(ids, np.zeros((len(ids), 1)), groups))
    return np.bincount([client_of[u] for u in ids], minlength=num_clients)


def initial_lora_of(hidden: int, layers: int) -> dict[str, np.ndarray]:
    """The tiny model's initial LoRA, as the ServerApp builds it (``initial_lora(cfg)``; the tokenizer
    comes from the demo data prepared with the default 5 clients: the LoRA's shapes do not depend on
    the partition)."""
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.runtime import initial_lora

    state = initial_lora(from_run_config({"model.tiny-hidden": hidden, "model.tiny-layers": layers}))
    return {key: np.asarray(value, dtype=np.float32) for key, value in state.items()}


def synthetic_client_app(sizes: np.ndarray):
    """A ClientApp that 'trains' by adding seeded noise to what it received (no model)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        rng = np.random.default_rng([pid, server_round])
        arrays = {k: Array((a.numpy() + 0.01 * rng.standard_normal(a.shape)).astype(np.float32))
                  for k, a in msg.content["arrays"].items()}
        metrics = MetricRecord({"train-loss": float(1.0 + 0.2 * rng.random()), "num-examples": int(sizes[pid]),
                                "client-key": pid})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    @app.query()
    def _query(msg: Message, context) -> Message:  # node identification (strategies.clients)
        return Message(RecordDict({"metrics": MetricRecord({"client-key": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    return app


def run_one(registered: int, per_round: int, state: str, rounds: int, hidden: int, layers: int,
            block_mb: float, alpha: float, sizes_file: str, prefill: bool, initial_file: str) -> dict:
    import logging

    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.inprocess_grid import InProcessGrid
    from flwr.app import Array, ArrayRecord
    from fellrec_flwr.train.checkpoint import Checkpoint, save_checkpoint
    from strategies import make_strategy

    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # set by a SuperLink's ServerApp process
    cfg = from_run_config({
        "strategy": "fellrec", "data.partitioner": "dirichlet", "data.num-clients": registered,
        "data.dirichlet-alpha": alpha, "min-clients": registered, "fraction-train": per_round / registered,
        "personal-state": state, "aggregation-block-mb": block_mb, "num-server-rounds": rounds,
        "model.tiny-hidden": hidden, "model.tiny-layers": layers, "node-wait-timeout": 5.0,
    })
    sizes = np.load(sizes_file)  # dirichlet_sizes(registered, alpha, cfg.seed), drawn once by main()
    with np.load(initial_file) as saved:  # initial_lora_of(hidden, layers), built once by main()
        initial = ArrayRecord({key: Array(saved[key]) for key in saved.files})  # lora_state.state_to_record, without torch
    params = sum(int(np.prod(a.shape)) for a in initial.values())
    run_dir = Path(tempfile.mkdtemp(prefix="scale-run-", dir=os.environ.get("SCALE_RUN_TMP")))
    strategy = make_strategy(cfg, run_dir)
    strategy.fraction_evaluate = 0.0  # training rounds only (see the module doc)
    grid = InProcessGrid(synthetic_client_app(sizes), registered)
    if prefill:  # the steady state of a long run: every registered client has an adapter of its own
        rng = np.random.default_rng(0)
        for key in range(registered):
            strategy.personal.put(key, ArrayRecord({k: Array((a.numpy() + 0.01 * rng.standard_normal(a.shape))
                                                             .astype(np.float32)) for k, a in initial.items()}), 0)
    times: list[float] = []
    cpu: list[float] = []
    aggregate = strategy.aggregate_train

    def timed_aggregate(server_round, replies):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return aggregate(server_round, replies)
        finally:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)

    strategy.aggregate_train = timed_aggregate  # type: ignore[method-assign]
    round_seconds: list[float] = []

    def on_round_end(server_round: int, strat) -> None:
        grid.sent.clear()  # the test grid keeps every message for assertions; a SuperLink does not
        save_checkpoint(run_dir, Checkpoint(round=server_round, strategy_state=strat.state_dict(),
                                            global_arrays={}, metric_rows=[], config={}))
        round_seconds.append(time.perf_counter() - started[0])
        started[0] = time.perf_counter()

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the rounds' own peak from here
    before = status_kb("VmRSS")
    started = [time.perf_counter()]
    strategy.start(grid, initial, num_rounds=rounds, on_round_end=on_round_end)
    peak = status_kb("VmHWM")
    disk = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    return {"registered": registered, "per_round": per_round, "personal_state": state, "params": params,
            "rounds": rounds, "aggregate_s_median": round(float(np.median(times)), 3),
            "aggregate_s_max": round(max(times), 3), "aggregate_cpu_s_median": round(float(np.median(cpu)), 3),
            "prefilled": prefill, "round_s_median": round(float(np.median(round_seconds)), 3),
            "peak_rss_mb": round(peak / 1024), "rounds_peak_mb": round((peak - before) / 1024),
            "disk_mb": round(disk / 2**20, 1), "load_avg": round(os.getloadavg()[0], 1)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for state, marker in (("memory", "o"), ("disk", "s")):
        for registered, style in ((1000, "-"), (100, "--")):
            sel = sorted((r for r in rows if r["personal_state"] == state and r["registered"] == registered),
                         key=lambda r: r["per_round"])
            if not sel:
                continue
            x = [r["per_round"] for r in sel]
            label = f"{state}, {registered} registered"
            axes[0].plot(x, [r["peak_rss_mb"] for r in sel], style, marker=marker, label=label)
            axes[1].plot(x, [r["aggregate_cpu_s_median"] for r in sel], style, marker=marker, label=label)
    for state, marker in (("memory", "o"), ("disk", "s")):
        for per_round in sorted({r["per_round"] for r in rows}):
            sel = sorted((r for r in rows if r["personal_state"] == state and r["per_round"] == per_round),
                         key=lambda r: r["registered"])
            if len(sel) > 1:
                axes[2].plot([r["registered"] for r in sel], [r["peak_rss_mb"] for r in sel], marker=marker,
                             label=f"{state}, {per_round} per round")
    axes[0].set(xlabel="clients per round", ylabel="server peak RSS (MB)",
                title="peak RSS vs clients per round")
    axes[1].set(xlabel="clients per round", ylabel="aggregate_train CPU s (median round)",
                title="aggregation time (process CPU)")
    axes[2].set(xlabel="registered clients", ylabel="server peak RSS (MB)",
                title="peak RSS vs registered clients")
    axes[2].set_xscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    params = rows[0]["params"]
    fig.suptitle(f"FELLRec server, {params:,} LoRA parameters per client (tiny model), synthetic uploads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=",".join(f"{k}x{m}" for k, m in GRID),
                        help="registered x per-round settings, comma-separated")
    parser.add_argument("--states", default="memory,disk")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny-hidden", type=int, default=128, help="model.tiny-hidden (LoRA size = 32 x hidden x layers)")
    parser.add_argument("--tiny-layers", type=int, default=4)
    parser.add_argument("--block-mb", type=float, default=64.0)
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="data.dirichlet-alpha (0.5 fails for 1,000 clients: flwr-datasets' DirichletPartitioner "
                             "gives up after 10 draws with a client below the project's minimum share)")
    parser.add_argument("--no-prefill", action="store_true",
                        help="start with no personal adapters (default: every registered client has one, as after "
                             "a long run)")
    parser.add_argument("--sizes-dir", help="reuse the partitions saved there by an earlier run (they are slow to draw)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a JSON setting, run in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))), flush=True)
        return
    from fellrec_flwr.config import FellRecConfig

    rows = []
    settings = [tuple(int(v) for v in item.split("x")) for item in args.grid.split(",")]
    sizes_dir = Path(args.sizes_dir or tempfile.mkdtemp(prefix="scale-run-sizes-"))
    sizes_files = {}
    for registered in sorted({k for k, _ in settings}):  # the partition once per K (demo users: slow)
        seed = FellRecConfig().seed
        sizes_files[registered] = str(sizes_dir / f"sizes-{registered}-alpha{args.alpha:g}-seed{seed}.npy")
        if not Path(sizes_files[registered]).exists():
            np.save(sizes_files[registered], dirichlet_sizes(registered, args.alpha, seed))
    initial_file = str(sizes_dir / f"initial-lora-{args.tiny_hidden}x{args.tiny_layers}.npz")
    if not Path(initial_file).exists():  # once: it imports torch and transformers
        np.savez(initial_file, **initial_lora_of(args.tiny_hidden, args.tiny_layers))
    for registered, per_round in settings:
        for state in args.states.split(","):
            one = dict(registered=registered, per_round=per_round, state=state, rounds=args.rounds,
                       hidden=args.tiny_hidden, layers=args.tiny_layers, block_mb=args.block_mb, alpha=args.alpha,
                       sizes_file=sizes_files[registered], prefill=not args.no_prefill, initial_file=initial_file)
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True,
                                  text=True, check=False)
            if done.returncode:
                sys.exit(f"setting {one} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(", ".join(f"{k} {row[k]}" for k in COLUMNS), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    from fellrec_flwr.atomic import atomic_write_json, atomic_write_text

    atomic_write_text(args.out / "scale_run.csv", pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False), mode=0o644)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    atomic_write_json(args.out / "scale_run.json", {"cpu": cpu, "cpus": os.cpu_count(), "args": {
        k: str(v) for k, v in vars(args).items() if k != "one"}, "rows": rows})
    plot(rows, args.out / "scale_run.png")
    print(f"written: {args.out}/scale_run.{{csv,json,png}}")


if __name__ == "__main__":
    main()
