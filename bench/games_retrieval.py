"""The retrieval head (RecFormer-style) on real Amazon Games with SmolLM2-135M, on a CPU.

    nice -n 10 python bench/games_retrieval.py --train-minutes 40   # every phase, in order
    nice -n 10 python bench/games_retrieval.py --phase baselines    # phases can run separately
    python bench/games_retrieval.py --phase report                  # tables, CIs and the plot again

Phases (each writes its per-user ranks under --out; `report` reads whatever is there):
- baselines: popularity and first-order Markov (`fellrec_flwr.eval.baselines`) on the test users;
- model: LoRA sits in the last layers only (--lora-layers), so the frozen layers' states of
  every test user and every catalogue title are computed once (and kept under
  --states-cache for reruns); then the zero-shot adapter (LoRA B = 0, i.e. the base model)
  and, after a short centralized training with the retrieval loss (in-batch + sampled
  negatives, training windows drawn with the seed, stopped by --train-minutes), the trained
  adapter each rerun only the top layers; top-K by cosine over the whole catalogue, history
  masked, duplicate titles one group;
- report: Recall/NDCG@10/20 with 95% paired-bootstrap CIs (`fellrec_flwr.eval.bootstrap`) and each
  method's difference to popularity and to Markov; seconds per user; writes
  games_retrieval.csv, games_retrieval.json and games_retrieval.png (with the training loss).

Single-threaded (torch.set_num_threads(1)) unless --threads says otherwise. Needs
../shared (the Games data and the SmolLM2 GGUF); exits with a message when it is absent.
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
SHARED = Path(os.environ.get("FELLREC_SHARED", ROOT.parent / "shared"))
KS = (10, 20)
METHODS = ("retrieval-zero-shot", "retrieval-trained", "popularity", "markov")


def add_model_args(ap: argparse.ArgumentParser, cache_name: str) -> None:
    """The retrieval head's settings and the prefix-state cache, shared with bench/games_federated.py."""
    ap.add_argument("--lora-layers", default="26,27,28,29",
                    help="LoRA on the last layers only: the frozen prefix is computed once (SmolLM2 has 30 layers)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=16)
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--states-cache", default=os.path.join(os.environ.get("FELLREC_CACHE", ROOT / ".cache" / "fellrec"),
                                                           cache_name),
                    help="where the frozen prefix's states are kept between runs (0.9–1.4 GB for Games)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("all", "baselines", "model", "report"), default="all")
    ap.add_argument("--games", default=str(SHARED / "data" / "amazon-games"))
    ap.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "games_retrieval"))
    ap.add_argument("--test-users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--train-minutes", type=float, default=40.0, help="wall-clock budget of the training phase")
    ap.add_argument("--train-windows", type=int, default=20000, help="training windows sampled (the budget stops first)")
    add_model_args(ap, "games-retrieval")
    ap.add_argument("--autocast", choices=("bf16", "off"), default="bf16",
                    help="bf16 autocast: 2-3x faster on a CPU with AMX/avx512_bf16 (measured: item vectors agree to "
                         "cosine 0.99996); 'off' for float32 throughout")
    return ap.parse_args(argv)


def config(args: argparse.Namespace):
    from fellrec_flwr.config import from_run_config

    return from_run_config({
        "model.name": args.model, "model.head": "retrieval", "seed": args.seed,
        "data.dataset": "games", "data.path": args.games, "data.partitioner": "iid", "data.num-clients": 5,
        "min-clients": 1, "data.train-samples": 0, "data.valid-users": 200, "data.test-users": args.test_users,
        "lora.layers": args.lora_layers, "train.lr": args.lr, "train.batch-size": args.batch_size,
        "retrieval.negatives": args.negatives, "retrieval.pooling": args.pooling,
        "retrieval.temperature": args.temperature,
    })


def load_data(cfg):
    from fellrec_flwr.runtime import prepare_data

    return prepare_data(cfg)


def write_json(path: Path, payload: dict) -> None:
    from fellrec_flwr.atomic import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


def score_and_write(args, cfg, data, name: str, users, items, seconds: dict, extra: dict) -> None:
    """Rank the catalogue for every test user from their vectors, score, and write <name>.json."""
    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.model.retrieval import evaluate_retrieval

    test = data.split("test")
    t0 = time.time()
    metrics, rows = evaluate_retrieval(None, None, test, data.titles, cfg.retrieval, cfg.train.max_length,
                                       groups=TitleGroups.from_titles(data.titles), items=items, users=users, ks=KS)
    seconds = {**seconds, "ranking": time.time() - t0}
    top10 = [r["top10"] for r in rows]
    payload = {
        "method": name, "n_users": len(test), "metrics": metrics, "catalogue_titles": len(items),
        # a user's cost: its forward pass (prefix + top layers) plus its share of the ranking product
        "seconds_per_user": (seconds["users_prefix"] + seconds["users_top"] + seconds["ranking"]) / len(test),
        "seconds": seconds, "distinct_items_in_top10": len({i for t in top10 for i in t}),
        "user_ids": [r["user_id"] for r in rows], "ranks": [r["target_rank"] for r in rows],
        "top10_first_users": top10[:5], "autocast": args.autocast, **extra,
    }
    write_json(Path(args.out) / f"{name}.json", payload)
    print(f"[{name}] {metrics} ({payload['seconds_per_user']:.3f} s/user; {seconds})", flush=True)


def model_and_tokenizer(cfg, data):
    from fellrec_flwr.model.loading import add_lora, load_base_model

    base, tok = load_base_model(cfg.model, data.titles, data.path)
    return add_lora(base, cfg.lora, seed=cfg.seed), tok


def training_windows(data, n: int, history_len: int, seed: int, client: int | None = None):
    """`n` (history, next item) windows drawn uniformly from every training sequence's positions
    (all users', or one client's users' when `client` is given)."""
    from fellrec_flwr.data.prepared import Example

    sequences = data.sequences(client)
    users = sorted(sequences)
    rng = np.random.default_rng(seed)
    # every position t >= 1 of every sequence is one window; draw positions, not users
    lengths = np.array([len(sequences[u]) for u in users])
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))])
    picks = rng.choice(starts[-1], size=min(n, int(starts[-1])), replace=False)
    out = []
    for p in picks:
        row = int(np.searchsorted(starts, p, side="right") - 1)
        seq = sequences[users[row]]
        t = int(p - starts[row]) + 1
        out.append(Example(users[row], tuple(seq[max(0, t - history_len):t]), int(seq[t])))
    return out, int(starts[-1])


def phase_model(args, cfg, data) -> None:
    """Zero-shot, then a short training, then the trained adapter; the frozen prefix is computed once."""
    import torch

    from fellrec_flwr.data.collate import lookup_titles
    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.model.retrieval import (encode_all_states, frozen_prefix_layers, item_token_ids, prefix_states,
                                        train_retrieval, user_token_ids)

    model, tok = model_and_tokenizer(cfg, data)
    dtype = torch.bfloat16 if args.autocast == "bf16" else None

    def cast():
        # a fresh block per use: autocast caches casts of trainable weights until its block ends
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)

    groups = TitleGroups.from_titles(data.titles)
    test = data.split("test")
    start = frozen_prefix_layers(model)
    print(f"frozen prefix: layers 0..{start - 1} computed once; LoRA layers {cfg.lora.layers}", flush=True)
    user_ids = [user_token_ids(tok, lookup_titles(ex.history, data.titles), cfg.train.max_length) for ex in test]
    item_ids = item_token_ids(tok, groups.titles, cfg.train.max_length)
    # The frozen prefix depends only on the base weights, the layer cut, the texts and the
    # autocast: kept on disk so a rerun (e.g. with a longer training) skips it.
    key = hashlib.sha256(json.dumps([args.model, start, args.autocast, user_ids, item_ids]).encode()).hexdigest()[:16]
    cache_file = Path(args.states_cache) / f"prefix-{key}.pt"
    if cache_file.exists():
        cached = torch.load(cache_file, weights_only=True)  # tensors and floats only: never unpickle code
        user_states, item_states, prefix_seconds = cached["users"], cached["items"], cached["seconds"]
        print(f"frozen prefix states read from {cache_file} (computed in {prefix_seconds})", flush=True)
    else:
        with cast():
            t0 = time.time()
            user_states = prefix_states(model, tok, user_ids, start, 16, progress=True, desc="users: frozen prefix")
            prefix_seconds = {"users_prefix": time.time() - t0}
            t0 = time.time()
            item_states = prefix_states(model, tok, item_ids, start, 64, progress=True, desc="catalogue: frozen prefix")
            prefix_seconds["catalogue_prefix"] = time.time() - t0
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"users": user_states, "items": item_states, "seconds": prefix_seconds}, cache_file)

    def top(name: str, extra: dict) -> None:
        with cast():
            t0 = time.time()
            users = encode_all_states(model, user_states, start, cfg.retrieval.pooling, 16, True, "users: top")
            t1 = time.time()
            items = encode_all_states(model, item_states, start, cfg.retrieval.pooling, 64, True, "catalogue: top")
        seconds = {**prefix_seconds, "users_top": t1 - t0, "catalogue_top": time.time() - t1}
        score_and_write(args, cfg, data, name, users, items, seconds, extra)

    top("retrieval-zero-shot", {})
    windows, available = training_windows(data, args.train_windows, cfg.data.history_len, args.seed)
    curve: list[tuple[int, float, float]] = []
    t0 = time.time()
    result = train_retrieval(model, tok, windows, data.titles, cfg.train, cfg.retrieval, seed=args.seed,
                             groups=groups, max_seconds=args.train_minutes * 60, autocast_to=dtype,
                             on_step=lambda step, loss: curve.append((step, loss, time.time() - t0)))
    seconds = time.time() - t0
    examples = result.steps * cfg.train.batch_size
    print(f"[train] {result.steps} steps, {examples} examples in {seconds:.0f} s ({examples / seconds:.2f} ex/s)",
          flush=True)
    top("retrieval-trained", {"train": {
        "steps": result.steps, "examples": examples, "available_windows": available, "seconds": seconds,
        "examples_per_second": examples / seconds, "curve": curve,
        "settings": {"lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "lora_layers": cfg.lora.layers,
                     "lora_r": cfg.lora.r, "targets": cfg.lora.target_modules,
                     "negatives": cfg.retrieval.negatives, "pooling": cfg.retrieval.pooling,
                     "temperature": cfg.retrieval.temperature}}})


def phase_baselines(args, cfg, data) -> None:
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics

    test = data.split("test")
    fitted = FittedBaselines.fit(data.train_sequences, data.titles)
    for method in ("popularity", "markov"):
        t0 = time.time()
        ranks = fitted.ranks(method, test, max(KS))
        write_json(Path(args.out) / f"{method}.json", {
            "method": method, "n_users": len(test), "metrics": ranking_metrics(ranks, KS),
            "seconds_per_user": (time.time() - t0) / len(test),
            "user_ids": [ex.user_id for ex in test], "ranks": ranks.tolist()})


def per_user_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    from fellrec_flwr.eval.metrics import ndcg_from_ranks, recall_from_ranks

    kind, k = metric.split("@")
    return (recall_from_ranks if kind == "recall" else ndcg_from_ranks)(ranks, int(k))


def phase_report(args) -> None:
    import pandas as pd

    from fellrec_flwr.eval.bootstrap import paired_bootstrap

    out = Path(args.out)
    found = {m: json.loads((out / f"{m}.json").read_text()) for m in METHODS if (out / f"{m}.json").exists()}
    if not found:
        raise SystemExit(f"no phase results under {out}; run the other phases first.")
    users = next(iter(found.values()))["user_ids"]
    for m, r in found.items():
        if r["user_ids"] != users:
            raise SystemExit(f"{m} was evaluated on other users than {next(iter(found))}; rerun it with the same seed.")
    rows, summary = [], {"n_users": len(users), "seed": args.seed, "methods": {}}
    for metric in [f"{kind}@{k}" for k in KS for kind in ("recall", "ndcg")]:
        values = {m: per_user_values(np.asarray(r["ranks"]), metric) for m, r in found.items()}
        cis = paired_bootstrap(values, references=("popularity", "markov"), seed=args.seed)
        for (method, ref), ci in cis.items():
            rows.append({"method": method, "versus": ref or "", "metric": metric, "value": ci.value,
                         "ci_low": ci.low, "ci_high": ci.high, "n_users": ci.n_users})
    frame = pd.DataFrame(rows)
    frame.to_csv(out.with_suffix(".csv"), index=False)
    for m, r in found.items():
        summary["methods"][m] = {k: v for k, v in r.items() if k not in ("user_ids", "ranks")}
    write_json(out.with_suffix(".json"), summary)
    curve = found.get("retrieval-trained", {}).get("train", {}).get("curve", [])
    plot(frame, out.with_suffix(".png"), len(users), curve)
    pd.set_option("display.width", 200)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def plot(frame, path: Path, n_users: int, curve: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = frame[frame["versus"] == ""]
    metrics = list(dict.fromkeys(means["metric"]))
    methods = list(dict.fromkeys(means["method"]))
    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        part = means[means["method"] == method].set_index("metric").loc[metrics]
        x = np.arange(len(metrics)) + i * width
        ax.bar(x, part["value"], width, label=method,
               yerr=[part["value"] - part["ci_low"], part["ci_high"] - part["value"]], capsize=3)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(methods) - 1) / 2, metrics)
    ax.set_title(f"Games, SmolLM2-135M retrieval head vs baselines ({n_users} test users, 95% bootstrap CI)",
                 fontsize=9)
    ax.legend(fontsize=8)
    if curve:  # the training loss per step (in-batch + sampled negatives), and a running mean
        steps, losses = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
        window = max(1, len(losses) // 10)
        ax_curve.plot(steps, losses, alpha=0.4, label="step loss")
        ax_curve.plot(steps[window - 1:], np.convolve(losses, np.ones(window) / window, "valid"),
                      label=f"mean of {window}")
        ax_curve.set_xlabel("optimiser step")
        ax_curve.set_title("retrieval training loss", fontsize=9)
        ax_curve.legend(fontsize=8)
    else:
        ax_curve.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase != "report" and not (Path(args.games).is_dir() and Path(args.model).exists()):
        raise SystemExit(f"needs the Games data at {args.games} and the GGUF at {args.model} (../shared); "
                         "pass --games/--model to point elsewhere.")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        return phase_report(args)
    cfg = config(args)
    data = load_data(cfg)
    phases = ("baselines", "model") if args.phase == "all" else (args.phase,)
    for phase in phases:
        {"baselines": phase_baselines, "model": phase_model}[phase](args, cfg, data)
    if args.phase == "all":
        phase_report(args)


if __name__ == "__main__":
    main()
