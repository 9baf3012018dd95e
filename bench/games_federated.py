"""Games verdict: centralized, local, FedAvg, FELLRec and FELLRec+ with the retrieval head (SmolLM2-135M, CPU).

Issue 13 item 7. Every method trains the same LoRA (r=8, q/v of the last 4 of 30 layers) with
the retrieval loss on the same cached frozen-prefix states, with the same per-client budget
(examples seen), and is evaluated on the same 1,000 test users against the whole catalogue.

    # every phase, in order (resumable: a finished piece is read back, not recomputed)
    nice -n 5 python bench/games_federated.py --phase all
    # or piece by piece, two processes at a time (see docs/results.md for the exact commands run)
    python bench/games_federated.py --phase states --parts valid,windows --clients 0,1,2
    python bench/games_federated.py --phase train --methods fedavg
    python bench/games_federated.py --phase eval --methods fedavg --rounds-to-eval all
    python bench/games_federated.py --phase baselines
    python bench/games_federated.py --phase report     # CSV, JSON and PNG from the per-user ranks

Phases:
- states: the frozen prefix (layers 0..25, bf16 autocast) of the catalogue's title groups, the
  test users, the validation users and a fixed pool of --windows-per-client training windows
  per client (drawn with the seed from that client's own users' training sequences), kept as
  safetensors under --states-cache (never pickled; the previous games_retrieval cache, a torch
  file, is read once with weights_only=True when its key matches);
- train: `fellrec_flwr.model.retrieval.train_retrieval_states` runs only the top 4 layers.
  Federated methods: R rounds of the project's own strategy class (`strategies.make_strategy`,
  as the ServerApp builds it: FedAvg, FELLRec with the paper's defaults, FELLRec+ =
  the preset of `strategies.fellrec_plus.PRESET`, local) in Flower's own round loop
  (`StrategyBase.start`) over an in-process Grid (`fellrec_flwr.inprocess_grid`); its ClientApp
  (`bench_client_app`) trains one local epoch over the client's pool from the adapter it
  received (a fresh AdamW per round, as a Flower client does). So the aggregation is the
  strategies' code, not a copy of it (tests/test_bench_strategy_path.py). A round's end saves
  every client's adapter and the strategy's checkpoint (resumable). Round 1 starts from the
  same seeded LoRA init with the same batches for every federated method, so it is trained once
  and shared (FedProx and an lr-scale other than 1 train it anew). Centralized: one
  adapter, one epoch over the union of the pools per "round" (the same examples per client).
  Adapters per round are kept (safetensors) under --states-cache;
- eval: per method and round, the catalogue's top layers are re-encoded with each adapter and
  every test user is scored with its own client's adapter (one adapter for FedAvg and
  centralized); history masked, title groups ranked. Also the validation users (for the
  full-catalogue validation loss and to choose gamma of the popularity-grounded variant:
  score = cos / tau + gamma * log(1 + training count), BIGRec's popularity injection, gamma
  chosen on validation users only, reported separately from the LLM alone);
- baselines: popularity and first-order Markov on the same training interactions and users;
- report: Recall/NDCG@10/20 with 95 % paired-bootstrap CIs (same users for all methods) and
  each method's difference to popularity, Markov and FedAvg; per-client Recall@10; writes
  games_federated.{csv,json,png} under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SHARED = Path(os.environ.get("FELLREC_SHARED", ROOT.parent / "shared"))
KS = (10, 20)
from fellrec_flwr.config import PARTITIONERS  # noqa: E402
from games_retrieval import add_model_args  # noqa: E402 (bench/ is on the path above)

METHODS = ("centralized", "local", "fedavg", "fellrec", "fellrec+")
FEDERATED = ("local", "fedavg", "fellrec", "fellrec+")
GAMMAS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("all", "states", "train", "eval", "baselines", "report", "speed"), default="all")
    ap.add_argument("--games", default=str(SHARED / "data" / "amazon-games"))
    ap.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "games_federated"))
    ap.add_argument("--partitioner", default="iid", choices=PARTITIONERS)
    ap.add_argument("--num-clients", type=int, default=5)
    ap.add_argument("--test-users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--windows-per-client", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds-to-eval", default="final", help="'final', 'all' or a comma list of rounds (0 = init)")
    ap.add_argument("--parts", default="catalogue,test,valid,windows")
    ap.add_argument("--report-name", default="games_federated",
                    help="report phase: base name of its CSV/JSON/PNG/MD (e.g. a later round's report beside the verdict)")
    ap.add_argument("--clients", default="", help="states phase: the clients whose windows to compute (default all)")
    add_model_args(ap, "games-federated")
    ap.add_argument("--old-cache", default=os.path.join(os.environ.get("FELLREC_CACHE", ROOT / ".cache" / "fellrec"),
                                                        "games-retrieval"),
                    help="bench/games_retrieval.py's prefix cache: reused for catalogue and test users when its key matches")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- setup


class Setup:
    """Config, data, model, tokenizer, title groups and the layer cut, loaded once per process."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from fellrec_flwr.config import from_run_config
        from fellrec_flwr.eval.grounding import TitleGroups
        from fellrec_flwr.model.loading import add_lora, load_base_model
        from fellrec_flwr.model.lora_state import get_lora_state
        from fellrec_flwr.model.retrieval import frozen_prefix_layers
        from fellrec_flwr.runtime import prepare_data

        self.args = args
        self.run_config = {
            "model.name": args.model, "model.head": "retrieval", "seed": args.seed,
            "data.dataset": "games", "data.path": args.games, "data.partitioner": args.partitioner,
            "data.num-clients": args.num_clients, "min-clients": 1, "data.train-samples": 0,
            "data.valid-users": 200, "data.test-users": args.test_users, "lora.layers": args.lora_layers,
            "train.lr": args.lr, "train.batch-size": args.batch_size, "train.local-epochs": 1,
            "retrieval.negatives": args.negatives, "retrieval.pooling": args.pooling,
            "retrieval.temperature": args.temperature,
        }
        self.cfg = from_run_config(self.run_config)
        self.data = prepare_data(self.cfg)
        base, self.tok = load_base_model(self.cfg.model, self.data.titles, self.data.path)
        self.model = add_lora(base, self.cfg.lora, seed=self.cfg.seed)
        self.init_state = get_lora_state(self.model)
        self.groups = TitleGroups.from_titles(self.data.titles)
        self.start = frozen_prefix_layers(self.model)
        self.dtype = torch.bfloat16
        self.cache = Path(args.states_cache)
        self.cache.mkdir(parents=True, exist_ok=True)

    def cast(self):
        import torch

        # a fresh block per use: autocast caches casts of trainable weights until its block ends
        return torch.autocast("cpu", dtype=torch.bfloat16)


def key_of(payload) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def write_json(path: Path, payload: dict) -> None:
    from fellrec_flwr.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


def save_states(path: Path, states, **arrays) -> None:
    """Variable-length [len, d] states as one concatenated tensor and offsets (safetensors)."""
    import torch
    from safetensors.torch import save_file

    lengths = torch.tensor([len(s) for s in states], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tensors = {"states": torch.cat(list(states)).contiguous(), "offsets": offsets}
    tensors.update({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_states(path: Path):
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    offsets = tensors.pop("offsets").tolist()
    flat = tensors.pop("states")
    states = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return states, {k: v.numpy() for k, v in tensors.items()}


# --------------------------------------------------------------------------- examples


def client_of_users(data) -> dict[int, int]:
    frame = data.train_sequences
    return {int(u): int(c) for u, c in zip(frame["user_id"], frame["client"])}


def client_windows(data, client: int, n: int, history_len: int, seed: int):
    from fellrec_flwr.seeding import derive_seed
    from games_retrieval import training_windows

    return training_windows(data, n, history_len, derive_seed(seed, "pool", client), client=client)


def token_ids_of(setup: Setup, examples) -> list[list[int]]:
    from fellrec_flwr.data.collate import lookup_titles
    from fellrec_flwr.model.retrieval import user_token_ids

    return [user_token_ids(setup.tok, lookup_titles(ex.history, setup.data.titles), setup.cfg.train.max_length)
            for ex in examples]


def part_path(setup: Setup, part: str, ids) -> Path:
    return setup.cache / f"{part}-{key_of([setup.args.model, setup.start, 'bf16', ids])}.safetensors"


# --------------------------------------------------------------------------- phase: states


def phase_states(setup: Setup) -> None:
    import torch

    from fellrec_flwr.model.retrieval import item_token_ids, prefix_states

    args, data = setup.args, setup.data
    parts = [p for p in args.parts.split(",") if p]
    test_ids = token_ids_of(setup, data.split("test"))
    item_ids = item_token_ids(setup.tok, setup.groups.titles, setup.cfg.train.max_length)
    timing_file = Path(args.out) / "seconds-states.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    # the previous centralized run's cache holds exactly these catalogue and test states
    old = Path(args.old_cache) / f"prefix-{key_of([args.model, setup.start, 'bf16', test_ids, item_ids])}.pt"
    targets = {"catalogue": (part_path(setup, "catalogue", item_ids), item_ids, 64),
               "test": (part_path(setup, "test", test_ids), test_ids, 16)}
    if old.exists() and not all(targets[p][0].exists() for p in targets):
        t0 = time.time()
        cached = torch.load(old, weights_only=True)
        save_states(targets["catalogue"][0], cached["items"])
        save_states(targets["test"][0], cached["users"])
        timing["catalogue"] = {"wall": cached["seconds"]["catalogue_prefix"], "source": str(old.name)}
        timing["test"] = {"wall": cached["seconds"]["users_prefix"], "source": str(old.name)}
        print(f"catalogue and test states converted from {old} in {time.time() - t0:.0f} s", flush=True)
    todo: list[tuple[str, Path, list, int, dict]] = []
    for part in ("catalogue", "test"):
        if part in parts:
            todo.append((part, *targets[part], {}))
    if "valid" in parts:
        valid = data.split("valid")
        ids = token_ids_of(setup, valid)
        todo.append(("valid", part_path(setup, "valid", ids), ids, 16, {}))
    if "windows" in parts:
        clients = [int(c) for c in args.clients.split(",")] if args.clients else range(args.num_clients)
        for c in clients:
            windows, available = client_windows(data, c, args.windows_per_client, setup.cfg.data.history_len,
                                                args.seed)
            ids = token_ids_of(setup, windows)
            history = np.full((len(windows), setup.cfg.data.history_len), -1, dtype=np.int64)
            for row, ex in enumerate(windows):
                g = setup.groups.group_index(ex.history)
                history[row, : len(g)] = g
            extra = {"targets": setup.groups.group_index([ex.target for ex in windows]), "history": history,
                     "user_ids": np.array([ex.user_id for ex in windows], dtype=np.int64),
                     "available": np.array([available], dtype=np.int64)}
            todo.append((f"windows-c{c}", part_path(setup, f"windows-c{c}", ids), ids, 16, extra))
    for name, path, ids, batch, extra in todo:
        if path.exists():
            print(f"[{name}] {path.name} exists", flush=True)
            continue
        t0, c0 = time.time(), time.process_time()
        with setup.cast():
            states = prefix_states(setup.model, setup.tok, ids, setup.start, batch, progress=True, desc=name)
        save_states(path, states, **extra)
        timing = json.loads(timing_file.read_text()) if timing_file.exists() else timing
        timing[name] = {"wall": time.time() - t0, "cpu": time.process_time() - c0, "texts": len(ids),
                        "tokens": int(sum(len(i) for i in ids))}
        write_json(timing_file, timing)
        print(f"[{name}] {len(ids)} texts in {timing[name]}", flush=True)


def windows_of(setup: Setup, client: int):
    """(states, targets, histories, user_ids) of one client's pool, from the cache."""
    windows, _ = client_windows(setup.data, client, setup.args.windows_per_client, setup.cfg.data.history_len,
                                setup.args.seed)
    path = part_path(setup, f"windows-c{client}", token_ids_of(setup, windows))
    if not path.exists():
        raise SystemExit(f"{path} is missing: run --phase states --parts windows first.")
    states, extra = load_states(path)
    histories = [[int(g) for g in row if g >= 0] for row in extra["history"]]
    return states, extra["targets"].tolist(), histories


# --------------------------------------------------------------------------- phase: train


def adapter_path(setup: Setup, name: str) -> Path:
    return setup.cache / "adapters" / f"{name}.safetensors"


def save_adapter(path: Path, state: dict) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def load_adapter(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def train_once(setup: Setup, state: dict, pool, seed_tags: tuple, item_states, lr_scale: float = 1.0,
               proximal_mu: float = 0.0) -> tuple[dict, dict]:
    """One local epoch over `pool` from `state`; returns the new state and its log."""
    from fellrec_flwr.model.lora_state import get_lora_state, set_lora_state
    from fellrec_flwr.model.retrieval import train_retrieval_states
    from fellrec_flwr.seeding import derive_seed

    states, targets, histories = pool
    set_lora_state(setup.model, state)
    curve: list[float] = []
    t0, c0 = time.time(), time.process_time()
    result = train_retrieval_states(setup.model, setup.start, states, targets, histories, item_states,
                                    setup.cfg.train, setup.cfg.retrieval, seed=derive_seed(setup.args.seed, *seed_tags),
                                    proximal_mu=proximal_mu, lr_scale=lr_scale,
                                    on_step=lambda step, loss: curve.append(loss), autocast_to=setup.dtype)
    log = {"loss": result.loss, "steps": result.steps, "examples": len(states), "wall": time.time() - t0,
           "cpu": time.process_time() - c0, "curve": curve}
    print(f"  train {seed_tags}: loss {result.loss:.4f}, {result.steps} steps, {log['cpu']:.0f} CPU-s "
          f"({log['cpu'] / len(states):.3f} CPU-s/example)", flush=True)
    return get_lora_state(setup.model), log


# --------------------------------------------------------------------------- the server: the strategy classes
# The federated methods run through the project's strategies in Flower's own round loop
# (`StrategyBase.start`), with an in-process Grid in place of the SuperLink: the same code
# `flwr run` runs, so a change to a strategy moves this benchmark's numbers
# (tests/test_bench_strategy_path.py checks one round against the in-process ServerApp).


def bench_client_app(train_client):
    """A Flower ClientApp whose training is `train_client(client, server_round, state, lr_scale,
    proximal_mu) -> (new_state, log)` (the bench's cached-prefix training; the log has "loss" and
    "examples"). It answers train messages as client_app/app.py does (arrays, "train-loss",
    "num-examples", "client-key") and identification queries; there is no evaluate: the bench
    evaluates every round's adapters itself (phase eval)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fellrec_flwr.model.lora_state import record_to_state, state_to_record

    app = ClientApp()

    @app.query()
    def query(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"client-key": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg, context):
        key = int(context.node_config["partition-id"])
        config = msg.content["config"]
        if config.get("freeze-lora-a", False):
            raise ValueError("this benchmark's training does not freeze LoRA A (FFA-LoRA); run that strategy "
                             "with flwr run.")
        new, entry = train_client(key, int(config["server-round"]), record_to_state(msg.content["arrays"]),
                                  float(config.get("lr-scale", 1.0)), float(config.get("proximal-mu", 0.0)))
        metrics = MetricRecord({"train-loss": float(entry["loss"]), "num-examples": int(entry["examples"]),
                                "client-key": key})
        return Message(RecordDict({"arrays": state_to_record(new), "metrics": metrics}), reply_to=msg)

    return app


def federated_rounds(cfg, initial_state: dict, grid, rounds: int, on_round_end=None, resume_from: Path | None = None):
    """Rounds 1..`rounds` of strategy `cfg.strategy` (built by `strategies.make_strategy(cfg)`, as
    the ServerApp builds it) over `grid`, starting from `initial_state` or, with `resume_from`, from
    that checkpoint (``fellrec_flwr.train.checkpoint``). Returns the strategy: its
    ``personal_arrays(client)`` are each client's adapter, its recorder the per-round metrics
    (FELLRec's weights under split "balance"). No evaluation rounds: the bench evaluates apart."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fellrec_flwr.model.lora_state import state_to_record
    from fellrec_flwr.train.checkpoint import load_checkpoint
    from strategies import make_strategy

    # Flower refuses to build a Message outside a Flower process without a task identity (bench/quality.py)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    strategy = make_strategy(cfg)
    strategy.fraction_evaluate = 0.0  # the bench's eval phase scores every round's adapters on its own users
    initial = state_to_record(initial_state)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        strategy.load_state_dict(ckpt.strategy_state)
        initial = state_to_record(ckpt.global_arrays)
    remaining = rounds - strategy.round_offset
    if remaining > 0:
        strategy.start(grid, initial, num_rounds=remaining, train_config=ConfigRecord({"seed": cfg.seed}),
                       on_round_end=on_round_end)
    return strategy


def recorded_weights(strategy, server_round: int, clients: list[int]) -> np.ndarray | None:
    """W of `server_round` as the strategy recorded it (FELLRec: split "balance", "weight:<j>"); None
    for strategies that record none (FedAvg: the size-weighted mean; local: no mixing)."""
    rows = {(r["client"], r["metric"]): r["value"] for r in strategy.records
            if r["round"] == server_round and r["split"] == "balance"}
    if not rows:
        return None
    return np.array([[rows[(i, f"weight:{j}")] for j in clients] for i in clients])


def strategy_config(setup: Setup, method: str):
    """The bench's run config with `strategy` = this method: its strategy settings (fellrec.*,
    proximal-mu...) are what `flwr run` would use with the same keys."""
    from fellrec_flwr.config import from_run_config

    return from_run_config({**setup.run_config, "strategy": method})


def phase_train(setup: Setup, methods: list[str]) -> None:
    from fellrec_flwr.inprocess_grid import InProcessGrid
    from fellrec_flwr.model.lora_state import record_to_state
    from fellrec_flwr.train.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint

    args = setup.args
    item_states, _ = load_states(part_path(setup, "catalogue", _item_ids(setup)))
    pools = [windows_of(setup, c) for c in range(args.num_clients)]
    clients = list(range(args.num_clients))
    for method in methods:
        log_file = Path(args.out) / "train" / f"{method}.json"
        log = json.loads(log_file.read_text()) if log_file.exists() else {"method": method, "rounds": []}
        if method == "centralized":
            union = tuple(sum((list(p[i]) for p in pools), []) for i in range(3))
            state = setup.init_state
            for r in range(1, args.rounds + 1):
                path = adapter_path(setup, f"centralized-r{r}")
                if path.exists():
                    state = load_adapter(path)
                    continue
                state, entry = train_once(setup, state, union, ("central", r), item_states)
                save_adapter(path, state)
                log["rounds"].append({"round": r, "clients": {"all": entry}})
                write_json(log_file, log)
            continue
        if all(adapter_path(setup, f"{method}-r{r}-c{c}").exists() for r in range(1, args.rounds + 1) for c in clients):
            continue
        entries: dict[int, dict] = {}

        def train_client(c: int, r: int, state: dict, lr_scale: float, proximal_mu: float) -> tuple[dict, dict]:
            # round 1 starts from the shared init with the same batches for every federated method
            shared = adapter_path(setup, f"round1-c{c}")
            shared_log = Path(args.out) / "train" / f"round1-c{c}.json"
            c0 = time.process_time()
            if r == 1 and shared.exists() and lr_scale == 1.0 and proximal_mu == 0.0:
                new, entry = load_adapter(shared), json.loads(shared_log.read_text())
            else:
                new, entry = train_once(setup, state, pools[c], ("round", r, "client", c), item_states,
                                        lr_scale=lr_scale, proximal_mu=proximal_mu)
                if r == 1 and lr_scale == 1.0 and proximal_mu == 0.0:
                    save_adapter(shared, new)
                    write_json(shared_log, entry)
            entries[c] = entry
            client_cpu[0] += time.process_time() - c0
            return new, entry

        checkpoint_dir = setup.cache / "strategies" / method
        round_cpu, client_cpu = [time.process_time()], [0.0]  # this round's, and its clients' part of it

        def on_round_end(r: int, strategy) -> None:
            for c in clients:
                save_adapter(adapter_path(setup, f"{method}-r{r}-c{c}"), record_to_state(strategy.personal_arrays(c)))
            weights = recorded_weights(strategy, r, clients)
            server_cpu = time.process_time() - round_cpu[0] - client_cpu[0]  # aggregation and messages
            log["rounds"].append({"round": r, "clients": {str(c): entries[c] for c in sorted(entries)},
                                  **({"weights": weights.tolist()} if weights is not None else {}),
                                  "server_cpu": server_cpu})
            write_json(log_file, log)
            save_checkpoint(checkpoint_dir, Checkpoint(round=r, strategy_state=strategy.state_dict(),
                                                       global_arrays=record_to_state(strategy.global_arrays)))
            if weights is not None:
                print(f"[{method}] round {r}: self-weights {np.round(np.diag(weights), 3).tolist()}", flush=True)
            entries.clear()
            round_cpu[0], client_cpu[0] = time.process_time(), 0.0

        resume = checkpoint_dir if (checkpoint_dir / CHECKPOINT_NAME).exists() else None
        done = load_checkpoint(resume).round if resume is not None else 0  # rounds the log keeps
        log["rounds"] = [e for e in log["rounds"] if e["round"] <= done]
        federated_rounds(strategy_config(setup, method), setup.init_state,
                         InProcessGrid(bench_client_app(train_client), args.num_clients), args.rounds,
                         on_round_end=on_round_end, resume_from=resume)


def _item_ids(setup: Setup):
    from fellrec_flwr.model.retrieval import item_token_ids

    return item_token_ids(setup.tok, setup.groups.titles, setup.cfg.train.max_length)


# --------------------------------------------------------------------------- phase: eval


def adapters_of(setup: Setup, method: str, r: int) -> dict[int, dict]:
    """client -> adapter state of `method` after round r (round 0: the shared init)."""
    n = setup.args.num_clients
    if r == 0:
        return {c: setup.init_state for c in range(n)}
    if method == "centralized":
        state = load_adapter(adapter_path(setup, f"centralized-r{r}"))
        return {c: state for c in range(n)}
    return {c: load_adapter(adapter_path(setup, f"{method}-r{r}-c{c}")) for c in range(n)}


def same_adapter(a: dict, b: dict) -> bool:
    return a is b or (a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a))


def phase_eval(setup: Setup, methods: list[str]) -> None:
    from fellrec_flwr.eval.baselines import group_counts
    from fellrec_flwr.eval.metrics import ranking_metrics
    from fellrec_flwr.model.lora_state import set_lora_state
    from fellrec_flwr.model.retrieval import (encode_all_states, evaluate_retrieval, full_catalogue_loss,
                                              popularity_grounded_ranks)

    args, data, groups = setup.args, setup.data, setup.groups
    item_states, _ = load_states(part_path(setup, "catalogue", _item_ids(setup)))
    splits = {}
    for split in ("test", "valid"):
        examples = data.split(split)
        states, _ = load_states(part_path(setup, split, token_ids_of(setup, examples)))
        owner = client_of_users(data)
        splits[split] = (examples, states, np.array([owner[ex.user_id] for ex in examples]))
    counts = group_counts(data.train_sequences, groups)
    temperature = setup.cfg.retrieval.temperature
    for method in methods:
        if args.rounds_to_eval == "final":
            rounds = [args.rounds]
        elif args.rounds_to_eval == "all":
            rounds = list(range(0, args.rounds + 1))
        else:
            rounds = [int(r) for r in args.rounds_to_eval.split(",")]
        for r in rounds:
            name = "zero-shot" if r == 0 else method
            out_file = Path(args.out) / "eval" / f"{name}-r{r}.json"
            if out_file.exists():
                print(f"[eval] {out_file.name} exists", flush=True)
                continue
            adapters = adapters_of(setup, method, r)
            distinct: dict[int, list[int]] = {}  # one catalogue encoding per distinct adapter (FedAvg: one)
            for c, state in adapters.items():
                twin = next((d for d in distinct if same_adapter(adapters[d], state)), None)
                distinct.setdefault(c if twin is None else twin, []).append(c)
            width = setup.model.config.hidden_size if hasattr(setup.model, "config") else 576
            vecs = {split: np.zeros((len(splits[split][0]), width), dtype=np.float32) for split in splits}
            seconds = {"catalogue_top": 0.0, "users_top": 0.0}
            cpu0 = time.process_time()
            items_of = {}
            for lead, clients in distinct.items():
                set_lora_state(setup.model, adapters[lead])
                t0 = time.time()
                with setup.cast():
                    items_of[lead] = encode_all_states(setup.model, item_states, setup.start,
                                                       setup.cfg.retrieval.pooling, 64)
                seconds["catalogue_top"] += time.time() - t0
                t0 = time.time()
                for split, (examples, states, owners) in splits.items():
                    rows = np.flatnonzero(np.isin(owners, clients))
                    if len(rows):
                        with setup.cast():
                            vecs[split][rows] = encode_all_states(setup.model, [states[i] for i in rows],
                                                                  setup.start, setup.cfg.retrieval.pooling, 16)
                seconds["users_top"] += time.time() - t0
            lead_of = {c: lead for lead, cs in distinct.items() for c in cs}
            payload = {"method": name, "trained_as": method, "round": r, "distinct_adapters": len(distinct),
                       "seconds": seconds}
            ranks_by_gamma: dict[str, dict[float, np.ndarray]] = {}
            for split, (examples, states, owners) in splits.items():
                ranks = {g: np.full(len(examples), -1, dtype=np.int64) for g in GAMMAS}
                loss = np.zeros(len(examples))
                llm = np.full(len(examples), -1, dtype=np.int64)
                for lead, clients in distinct.items():
                    rows = np.flatnonzero(np.isin(owners, clients))
                    if not len(rows):
                        continue
                    sub = [examples[i] for i in rows]
                    _, result_rows = evaluate_retrieval(None, None, sub, data.titles, setup.cfg.retrieval, 256,
                                                        groups=groups, items=items_of[lead], users=vecs[split][rows],
                                                        ks=KS)
                    llm[rows] = [row["target_rank"] for row in result_rows]
                    masks = groups.history_mask([list(ex.history) for ex in sub])
                    targets = groups.group_index([ex.target for ex in sub])
                    loss[rows] = full_catalogue_loss(vecs[split][rows], items_of[lead], targets, masks, temperature)
                    for g in GAMMAS:
                        ranks[g][rows] = popularity_grounded_ranks(vecs[split][rows], items_of[lead], temperature,
                                                                   g, counts, masks, targets, max(KS))
                agree = float((ranks[0.0] == llm).mean())
                if agree < 0.99:
                    raise SystemExit(f"{name} r{r} {split}: gamma=0 ranks agree with evaluate_retrieval on only "
                                     f"{agree:.3f} of users")
                ranks_by_gamma[split] = ranks
                payload[split] = {"n_users": len(examples), "metrics": ranking_metrics(llm, KS),
                                  "loss": float(loss.mean()), "gamma0_agreement": agree,
                                  "user_ids": [ex.user_id for ex in examples], "clients": owners.tolist(),
                                  "ranks": llm.tolist()}
            # gamma of the popularity-grounded variant: chosen on the validation users only
            grid = {str(g): ranking_metrics(ranks_by_gamma["valid"][g], KS) for g in GAMMAS}
            best = max(GAMMAS, key=lambda g: (grid[str(g)]["ndcg@20"], -g))
            payload["gamma_grid_valid"] = grid
            payload["gamma"] = best
            payload["test"]["ranks_popularity_grounded"] = ranks_by_gamma["test"][best].tolist()
            payload["test"]["metrics_popularity_grounded"] = ranking_metrics(ranks_by_gamma["test"][best], KS)
            payload["cpu"] = time.process_time() - cpu0
            write_json(out_file, payload)
            print(f"[eval] {name} r{r}: test {payload['test']['metrics']} loss {payload['test']['loss']:.3f}; "
                  f"valid loss {payload['valid']['loss']:.3f}; gamma {best} -> "
                  f"{payload['test']['metrics_popularity_grounded']}; {seconds}", flush=True)


# --------------------------------------------------------------------------- phase: speed


def phase_speed(setup: Setup, n: int = 64) -> None:
    """CPU-s per example of the full-model trainer and of the cached-prefix trainer on the SAME
    n new windows with the same seed (identical batches, so equal loss by construction, up to
    float rounding: both step-loss curves are recorded), plus the prefix's CPU-s for them."""
    from fellrec_flwr.model.lora_state import set_lora_state
    from fellrec_flwr.model.retrieval import prefix_states, train_retrieval, train_retrieval_states

    args = setup.args
    windows, _ = client_windows(setup.data, 0, args.windows_per_client, setup.cfg.data.history_len, args.seed)
    windows = windows[:n]
    item_states, _ = load_states(part_path(setup, "catalogue", _item_ids(setup)))
    out: dict = {"examples": n, "batch_size": setup.cfg.train.batch_size}
    set_lora_state(setup.model, setup.init_state)
    curve: list[float] = []
    c0 = time.process_time()
    train_retrieval(setup.model, setup.tok, windows, setup.data.titles, setup.cfg.train, setup.cfg.retrieval,
                    seed=args.seed, progress=False, groups=setup.groups, autocast_to=setup.dtype,
                    on_step=lambda step, loss: curve.append(loss))
    out["full_model"] = {"cpu": time.process_time() - c0, "curve": curve}
    c0 = time.process_time()  # part of the above: train_retrieval tokenises the whole catalogue once per call
    _item_ids(setup)
    out["full_model"]["catalogue_tokenisation_cpu"] = time.process_time() - c0
    set_lora_state(setup.model, setup.init_state)
    c0 = time.process_time()
    with setup.cast():
        states = prefix_states(setup.model, setup.tok, token_ids_of(setup, windows), setup.start, 16)
    out["prefix_cpu"] = time.process_time() - c0
    curve = []
    c0 = time.process_time()
    train_retrieval_states(setup.model, setup.start, states,
                           setup.groups.group_index([ex.target for ex in windows]).tolist(),
                           [setup.groups.group_index(ex.history).tolist() for ex in windows], item_states,
                           setup.cfg.train, setup.cfg.retrieval, seed=args.seed, autocast_to=setup.dtype,
                           on_step=lambda step, loss: curve.append(loss))
    out["cached_prefix"] = {"cpu": time.process_time() - c0, "curve": curve}
    full, cached = out["full_model"]["cpu"] / n, (out["cached_prefix"]["cpu"] + out["prefix_cpu"]) / n
    full_net = (out["full_model"]["cpu"] - out["full_model"]["catalogue_tokenisation_cpu"]) / n
    out.update({"full_cpu_per_example": full, "full_cpu_per_example_without_tokenisation": full_net,
                "speedup_new_without_tokenisation": full_net / cached, "cached_cpu_per_new_example": cached,
                "cached_cpu_per_seen_example": out["cached_prefix"]["cpu"] / n, "speedup_new": full / cached,
                "speedup_seen": full / (out["cached_prefix"]["cpu"] / n),
                "max_step_loss_difference": float(np.max(np.abs(np.subtract(out["full_model"]["curve"], curve))))})
    write_json(Path(args.out) / "speed.json", out)
    print({k: v for k, v in out.items() if k not in ("full_model", "cached_prefix")}, flush=True)


# --------------------------------------------------------------------------- phase: baselines


def phase_baselines(setup_or_args) -> None:
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics

    data = setup_or_args.data
    test = data.split("test")
    owner = client_of_users(data)
    fitted = FittedBaselines.fit(data.train_sequences, data.titles)
    for method in ("popularity", "markov"):
        ranks = fitted.ranks(method, test, max(KS))
        write_json(Path(setup_or_args.args.out) / "eval" / f"{method}.json", {
            "method": method, "test": {"n_users": len(test), "metrics": ranking_metrics(ranks, KS),
                                       "user_ids": [ex.user_id for ex in test],
                                       "clients": [owner[ex.user_id] for ex in test], "ranks": ranks.tolist()}})


class DataOnly:
    def __init__(self, args) -> None:
        from fellrec_flwr.config import from_run_config
        from fellrec_flwr.runtime import prepare_data

        self.args = args
        cfg = from_run_config({
            "model.name": args.model, "model.head": "retrieval", "seed": args.seed, "data.dataset": "games",
            "data.path": args.games, "data.partitioner": args.partitioner, "data.num-clients": args.num_clients,
            "min-clients": 1, "data.train-samples": 0, "data.valid-users": 200, "data.test-users": args.test_users})
        self.data = prepare_data(cfg)


# --------------------------------------------------------------------------- phase: report


def per_user_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    from fellrec_flwr.eval.metrics import ndcg_from_ranks, recall_from_ranks

    kind, k = metric.split("@")
    return (recall_from_ranks if kind == "recall" else ndcg_from_ranks)(ranks, int(k))


LABELS = {"centralized": "centralized", "local": "local", "fedavg": "FedAvg", "fellrec": "FELLRec (paper)",
          "fellrec+": "FELLRec+", "zero-shot": "zero-shot (init)", "popularity": "popularity", "markov": "Markov"}


def phase_report(args) -> None:
    import pandas as pd

    from fellrec_flwr.eval.bootstrap import paired_bootstrap

    out = Path(args.out)
    ev = out / "eval"
    final: dict[str, dict] = {}
    for m in ("zero-shot",) + METHODS:
        f = ev / (f"{m}-r0.json" if m == "zero-shot" else f"{m}-r{args.rounds}.json")
        if f.exists():
            final[m] = json.loads(f.read_text())
    for m in ("popularity", "markov"):
        if (ev / f"{m}.json").exists():
            final[m] = json.loads((ev / f"{m}.json").read_text())
    if not final:
        raise SystemExit(f"nothing under {ev}; run the other phases first.")
    users = next(iter(final.values()))["test"]["user_ids"]
    per_method: dict[str, np.ndarray] = {}
    for m, r in final.items():
        if r["test"]["user_ids"] != users:
            raise SystemExit(f"{m} was evaluated on other users; rerun it with the same seed.")
        per_method[LABELS[m]] = np.asarray(r["test"]["ranks"])
        if "ranks_popularity_grounded" in r["test"]:
            per_method[f"{LABELS[m]} + popularity (gamma={r['gamma']})"] = np.asarray(
                r["test"]["ranks_popularity_grounded"])
    clients = np.asarray(next(iter(final.values()))["test"]["clients"])
    rows = []
    for metric in [f"{kind}@{k}" for k in KS for kind in ("recall", "ndcg")]:
        values = {m: per_user_values(ranks, metric) for m, ranks in per_method.items()}
        cis = paired_bootstrap(values, references=("popularity", "Markov", "FedAvg"), seed=args.seed)
        for (method, ref), ci in cis.items():
            rows.append({"method": method, "versus": ref or "", "metric": metric, "value": ci.value,
                         "ci_low": ci.low, "ci_high": ci.high, "n_users": ci.n_users})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"{args.report_name}.csv", index=False)
    # per-client Recall@10 (the balance) and per-round curves
    per_client = {m: {int(c): float(per_user_values(ranks[clients == c], "recall@10").mean())
                      for c in np.unique(clients)} for m, ranks in per_method.items()}
    curves: dict[str, list] = {}
    for m in METHODS:
        points = []
        for r in range(0, args.rounds + 1):
            f = ev / (f"zero-shot-r0.json" if r == 0 else f"{m}-r{r}.json")
            if f.exists():
                e = json.loads(f.read_text())
                points.append({"round": r, "recall@10": e["test"]["metrics"]["recall@10"],
                               "ndcg@10": e["test"]["metrics"]["ndcg@10"], "test_loss": e["test"]["loss"],
                               "valid_loss": e["valid"]["loss"], "gamma": e.get("gamma"),
                               "recall@10_popularity_grounded": e["test"]["metrics_popularity_grounded"]["recall@10"]})
        curves[m] = points
    train = {}
    for m in METHODS:
        f = out / "train" / f"{m}.json"
        if f.exists():
            t = json.loads(f.read_text())
            train[m] = [{"round": e["round"],
                         "loss": {c: v["loss"] for c, v in e["clients"].items()},
                         "cpu": sum(v["cpu"] for v in e["clients"].values()),
                         "examples": sum(v["examples"] for v in e["clients"].values()),
                         "self_weights": np.diag(e["weights"]).tolist() if "weights" in e else None}
                        for e in t["rounds"]]
    seconds = {}
    for f in sorted(out.glob("seconds-*.json")):
        seconds[f.stem] = json.loads(f.read_text())
    budget = extrapolate_budget(frame, curves, train, seconds, args)
    summary = {"n_users": len(users), "seed": args.seed, "per_client_recall@10": per_client, "curves": curves,
               "train": train, "seconds": seconds, "budget_extrapolation": budget,
               "methods": {m: {k: v for k, v in r.items() if k not in ("test", "valid")} | {
                   "test_metrics": r["test"]["metrics"]} for m, r in final.items()}}
    write_json(out / f"{args.report_name}.json", summary)
    plot(frame, out / f"{args.report_name}.png", len(users), curves, per_client, train)
    (out / f"{args.report_name}.md").write_text(markdown_table(frame, len(users), per_client))
    pd.set_option("display.width", 220)
    print(frame[frame["metric"].isin(["recall@10", "ndcg@10"])].to_string(index=False,
                                                                          float_format=lambda v: f"{v:.4f}"))


def markdown_table(frame, n_users: int, per_client: dict) -> str:
    """The verdict table (Recall@10, NDCG@10, differences to popularity / FedAvg / Markov) as markdown."""
    def cell(method: str, metric: str, versus: str = "", digits: int = 3) -> str:
        row = frame[(frame["method"] == method) & (frame["metric"] == metric) & (frame["versus"] == versus)]
        if row.empty:
            return "–"
        r = row.iloc[0]
        sign = "+" if versus else ""
        f = f"{{:{sign}.{digits}f}}"
        return f"{f.format(r['value'])} [{f.format(r['ci_low'])}, {f.format(r['ci_high'])}]"

    lines = [f"| method ({n_users} test users) | Recall@10 | NDCG@10 | Recall@20 | − popularity (R@10) | "
             "− FedAvg (R@10) | − Markov (R@10) | per-client R@10 (min–max) |",
             "|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(frame["method"]):
        pc = per_client.get(method, {})
        spread = f"{min(pc.values()):.3f}–{max(pc.values()):.3f}" if pc else "–"
        lines.append(f"| {method} | {cell(method, 'recall@10')} | {cell(method, 'ndcg@10', digits=4)} | "
                     f"{cell(method, 'recall@20')} | {cell(method, 'recall@10', 'popularity')} | "
                     f"{cell(method, 'recall@10', 'FedAvg')} | {cell(method, 'recall@10', 'Markov')} | {spread} |")
    return "\n".join(lines) + "\n"


def extrapolate_budget(frame, curves: dict, train: dict, seconds: dict, args) -> dict:
    """An EXTRAPOLATION, stated as such: centralized test Recall@10 against examples seen (log-linear
    fit through the measured rounds), and the examples / CPU-hours at which it would clear
    popularity by the half-width of the measured CI of the difference (what significance needs)."""
    points = [(p["round"] * args.windows_per_client * args.num_clients, p["recall@10"])
              for p in curves.get("centralized", []) if p["round"] > 0]
    means = frame[(frame["versus"] == "") & (frame["metric"] == "recall@10")].set_index("method")["value"]
    diff = frame[(frame["method"] == "centralized") & (frame["versus"] == "popularity")
                 & (frame["metric"] == "recall@10")]
    if len(points) < 2 or "popularity" not in means.index or diff.empty:
        return {"note": "needs centralized rounds >= 2 and popularity"}
    x = np.log10([p[0] for p in points])
    y = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    half_width = float((diff["ci_high"].iloc[0] - diff["ci_low"].iloc[0]) / 2)
    goal = float(means["popularity"]) + half_width
    out = {"points": points, "fit": {"intercept": float(intercept), "slope_per_decade": float(slope)},
           "popularity": float(means["popularity"]), "ci_half_width": half_width, "goal_recall@10": goal,
           "markov": float(means.get("Markov", float("nan")))}
    cpu = [e["cpu"] / e["examples"] for e in train.get("centralized", [])]
    states = seconds.get("seconds-states", {})
    prefix = [v["cpu"] / v["texts"] for k, v in states.items() if k.startswith("windows") and "cpu" in v]
    cost = (float(np.mean(cpu)) if cpu else float("nan")) + (float(np.mean(prefix)) if prefix else 0.0)
    out["cpu_seconds_per_new_example"] = cost
    if slope > 0:
        for name, target in (("popularity_significantly", goal), ("markov", out["markov"])):
            need = 10 ** ((target - intercept) / slope)
            out[name] = {"examples": float(need), "cpu_hours": float(need * cost / 3600)}
    else:
        out["note"] = "no upward trend between the measured rounds: no extrapolation"
    # FedAvg: its held-out loss against examples seen (log-linear through its rounds), extrapolated to
    # the test loss at which centralized was measured significantly above popularity (its last round)
    fed = [(p["round"] * args.windows_per_client * args.num_clients, p["recall@10"], p["test_loss"])
           for p in curves.get("fedavg", []) if p["round"] > 0]
    central = [p for p in curves.get("centralized", []) if p["round"] > 0]
    if len(fed) >= 2 and central:
        lx = np.log10([f[0] for f in fed])
        loss_slope, loss_intercept = np.polyfit(lx, [f[2] for f in fed], 1)
        rec_slope, rec_intercept = np.polyfit(lx, [f[1] for f in fed], 1)
        target_loss = central[-1]["test_loss"]
        block = {"points": fed, "loss_fit": {"intercept": float(loss_intercept), "slope_per_decade": float(loss_slope)},
                 "recall_fit": {"intercept": float(rec_intercept), "slope_per_decade": float(rec_slope)},
                 "target_test_loss (centralized, last round)": target_loss}
        if loss_slope < 0:
            need = 10 ** ((target_loss - loss_intercept) / loss_slope)
            block["examples_to_reach_target_loss"] = float(need)
            block["rounds_to_reach_target_loss"] = float(need / (args.windows_per_client * args.num_clients))
            block["cpu_hours"] = float(need * cost / 3600)
        if rec_slope > 0:
            block["examples_for_recall_goal (recall fit)"] = float(10 ** ((goal - rec_intercept) / rec_slope))
        out["fedavg"] = block
    return out


def plot(frame, path: Path, n_users: int, curves: dict, per_client: dict, train: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    for m, points in curves.items():
        if points:
            ax.plot([p["round"] for p in points], [p["recall@10"] for p in points], marker="o", label=LABELS[m])
    means = frame[(frame["versus"] == "") & (frame["metric"] == "recall@10")].set_index("method")
    for ref, style in (("popularity", ":"), ("Markov", "--")):
        if ref in means.index:
            ax.axhline(means.loc[ref, "value"], color="grey", linestyle=style, label=f"{ref} (test)")
    ax.set_xlabel("round (one local epoch each; 0 = shared init)")
    ax.set_ylabel("test Recall@10")
    ax.set_title(f"Games, SmolLM2-135M retrieval head, {n_users} test users", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    shown = [m for m in per_client if "+ popularity" not in m and m != "zero-shot (init)"]
    width = 0.8 / max(1, len(shown))
    for i, m in enumerate(shown):
        cs = sorted(per_client[m])
        ax.bar(np.arange(len(cs)) + i * width, [per_client[m][c] for c in cs], width, label=m)
    ax.set_xlabel("client")
    ax.set_ylabel("test Recall@10 of the client's users")
    ax.set_title("per-client balance (final round)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    for m, points in curves.items():
        if points:
            ax.plot([p["round"] for p in points], [p["valid_loss"] for p in points], marker="o", label=LABELS[m])
    ax.set_xlabel("round")
    ax.set_ylabel("full-catalogue loss, validation users")
    ax.set_title("held-out retrieval loss per round", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}.")
    if args.phase != "report" and not (Path(args.games).is_dir() and Path(args.model).exists()):
        raise SystemExit(f"needs the Games data at {args.games} and the GGUF at {args.model} (../shared).")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        return phase_report(args)
    if args.phase == "baselines":
        return phase_baselines(DataOnly(args))
    setup = Setup(args)
    if args.phase == "speed":
        return phase_speed(setup)
    phases = ("states", "baselines", "train", "eval") if args.phase == "all" else (args.phase,)
    for phase in phases:
        t0, c0 = time.time(), time.process_time()
        if phase == "states":
            phase_states(setup)
        elif phase == "baselines":
            phase_baselines(setup)
        elif phase == "train":
            phase_train(setup, methods)
        elif phase == "eval":
            phase_eval(setup, methods)
        tag = f"{phase}-{'-'.join(methods) if phase in ('train', 'eval') else args.parts.replace(',', '-')}"
        log_file = Path(args.out) / "seconds-phases.json"
        log = json.loads(log_file.read_text()) if log_file.exists() else {}
        log.setdefault(tag, []).append({"wall": time.time() - t0, "cpu": time.process_time() - c0,
                                        "clients": args.clients, "rounds_to_eval": args.rounds_to_eval})
        write_json(log_file, log)
    if args.phase == "all":
        args.rounds_to_eval = "all"
        phase_report(args)


if __name__ == "__main__":
    main()
