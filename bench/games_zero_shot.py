"""Zero-shot SmolLM2-135M on real Amazon Games: constrained decoding vs the paper's beam-l2 vs baselines.

    nice -n 10 python bench/games_zero_shot.py                         # every phase, in order
    nice -n 10 python bench/games_zero_shot.py --phase constrained --users 1000
    nice -n 10 python bench/games_zero_shot.py --phase beam-l2 --l2-users 100
    python bench/games_zero_shot.py --phase report                     # tables, CIs and the plot

No training: the base model (no LoRA) on leave-one-out test users. The users are the
test split of the data the other Games benches use (games, iid, 5 clients, 1,000 test
users, seed 2024), shuffled with --seed; a run on --users N takes the first N of that
order, so a short run is a random sample and a later, longer run extends it (finished
users are kept in --out and not recomputed).

Phases (each writes under --out; `report` reads whatever is there):
- baselines: popularity and first-order Markov (`fellrec_flwr.eval.baselines`);
- constrained: catalogue-constrained beam search (`fellrec_flwr.eval.constrained`): the top 20
  titles per user by log-likelihood, history masked (the plain `constrained` list), plus
  up to --pool - 20 further titles the search finished on the way (the re-ranking pool);
- prior: every pooled title's log-likelihood under the neutral (empty-history) prompt;
  `constrained-prior-<w>` re-ranks each user's pool by score - w x prior;
- beam-l2: the paper's path (beam search, then L2 grounding with base-model embeddings)
  on the first --l2-users users;
- report: Recall/NDCG@10/20 with 95% paired-bootstrap CIs over the users every method
  has (`fellrec_flwr.eval.bootstrap`), differences to popularity and Markov, CPU seconds per
  user; writes games_zero_shot.csv/.json/.png under docs/results/.

Single-threaded (torch.set_num_threads(1)). Seconds per user are CPU seconds of this
process (time.process_time), which do not grow when other jobs share the cores; wall
seconds are recorded too. Needs ../shared (Games data, SmolLM2 GGUF); exits with a message
when it is absent.
"""

from __future__ import annotations

import argparse
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
K = max(KS)
PHASES = ("baselines", "constrained", "prior", "beam-l2", "report")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("all",) + PHASES, default="all")
    ap.add_argument("--games", default=str(SHARED / "data" / "amazon-games"))
    ap.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct"
                                           / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "games_zero_shot"),
                    help="per-user results (kept between runs)")
    ap.add_argument("--report-dir", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--users", type=int, default=1000, help="test users for the constrained search")
    ap.add_argument("--l2-users", type=int, default=100, help="test users for the (slow) beam-l2 path")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--beams", type=int, default=20, help="eval.constrained-beams")
    ap.add_argument("--pool", type=int, default=40, help="titles kept per user for the prior re-ranking: the top 20 + titles finished on the way")
    ap.add_argument("--prior-weights", default="0.5,1.0", help="comma-separated prior weights to report")
    ap.add_argument("--prior-users", type=int, default=0,
                    help="score the prior for the pools of the first N users only (0 = every searched user)")
    ap.add_argument("--prior-autocast", choices=("bf16", "off"), default="bf16",
                    help="bf16 autocast for the prior's teacher-forced batches (AMX/avx512_bf16 CPUs: several x "
                         "faster; the prior is a correction term, so bf16 rounding of it is harmless)")
    ap.add_argument("--num-beams", type=int, default=4, help="beam-l2: eval.num-beams")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="beam-l2: eval.max-new-tokens")
    ap.add_argument("--chunk", type=int, default=20, help="users per saved chunk")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- set-up


def config(args: argparse.Namespace):
    from fellrec_flwr.config import from_run_config

    return from_run_config({
        "model.name": args.model, "seed": 2024, "data.dataset": "games", "data.path": args.games,
        "data.partitioner": "iid", "data.num-clients": 5, "min-clients": 1, "data.train-samples": 0,
        "data.valid-users": 200, "data.test-users": 1000, "eval.constrained-beams": args.beams,
        "eval.decoding": "constrained",
    })


def load_data(cfg):
    from fellrec_flwr.runtime import prepare_data

    return prepare_data(cfg)


def user_order(data, seed: int) -> list:
    """The test examples in a fixed shuffled order (a prefix of it is a random sample)."""
    test = data.split("test")
    order = np.random.default_rng(seed).permutation(len(test))
    return [test[i] for i in order]


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, payload) -> None:
    from fellrec_flwr.atomic import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


def load_model(cfg, data):
    import torch

    from fellrec_flwr.model.loading import load_base_model

    model, tok = load_base_model(cfg.model, data.titles, data.path)
    model.eval()
    torch.manual_seed(0)
    return model, tok


def history_prompt_ids(tok, data, ex) -> list[int]:
    from fellrec_flwr.data.collate import prompt_token_ids
    from fellrec_flwr.data.prompts import build_prompt

    return prompt_token_ids(tok, build_prompt([data.titles[i] for i in ex.history]))


# --------------------------------------------------------------------------- phases


def phase_baselines(args, cfg, data, out: Path) -> None:
    from fellrec_flwr.eval.baselines import FittedBaselines

    users = user_order(data, args.seed)
    fitted = FittedBaselines.fit(data.train_sequences, data.titles)
    for method in ("popularity", "markov"):
        t0 = time.process_time()
        ranks = fitted.ranks(method, users, K)
        cpu = time.process_time() - t0
        write_json(out / f"{method}.json", {"method": method, "user_ids": [ex.user_id for ex in users],
                                            "ranks": ranks.tolist(), "cpu_seconds_per_user": cpu / len(users)})
        print(f"[{method}] recall@10 {np.mean((ranks >= 0) & (ranks < 10)):.4f} on {len(users)} users", flush=True)


def phase_constrained(args, cfg, data, out: Path) -> None:
    """The pooled top titles per user, saved chunk by chunk (a rerun resumes)."""
    from fellrec_flwr.eval.constrained import build_title_trie, constrained_search
    from fellrec_flwr.eval.grounding import TitleGroups

    path = out / "constrained-pool.json"
    done = read_json(path, {"settings": {"beams": args.beams, "pool": args.pool}, "users": {}})
    if done["settings"] != {"beams": args.beams, "pool": args.pool}:
        raise SystemExit(f"{path} was made with {done['settings']}; use another --out or the same --beams/--pool.")
    users = [ex for ex in user_order(data, args.seed)[: args.users] if str(ex.user_id) not in done["users"]]
    if not users:
        print(f"[constrained] all {args.users} users done", flush=True)
        return
    model, tok = load_model(cfg, data)
    groups = TitleGroups.from_titles(data.titles)
    t0 = time.process_time()
    trie = build_title_trie(tok, groups.titles)
    done["trie"] = {"nodes": len(trie), "titles": trie.num_sequences, "max_depth": int(trie.max_depth[0]),
                    "build_cpu_seconds": time.process_time() - t0}
    for start in range(0, len(users), args.chunk):
        chunk = users[start:start + args.chunk]
        prompts = [history_prompt_ids(tok, data, ex) for ex in chunk]
        masked = [groups.group_index(ex.history).tolist() for ex in chunk]
        c0, w0 = time.process_time(), time.time()
        pooled, scores = constrained_search(model, prompts, trie, K, args.beams, masked, batch_users=4,
                                            pad_token_id=tok.pad_token_id, extra=args.pool - K)
        cpu, wall = (time.process_time() - c0) / len(chunk), (time.time() - w0) / len(chunk)
        for ex, g, s in zip(chunk, pooled, scores):
            done["users"][str(ex.user_id)] = {"groups": g.tolist(), "scores": [float(x) for x in s],
                                              "cpu_seconds": cpu, "wall_seconds": wall}
        write_json(path, done)
        print(f"[constrained] {len(done['users'])} users; this chunk {cpu:.2f} CPU s/user, {wall:.2f} wall s/user",
              flush=True)


def phase_prior(args, cfg, data, out: Path) -> None:
    from fellrec_flwr.data.collate import prompt_token_ids
    from fellrec_flwr.eval.constrained import TitlePrior, build_title_trie
    from fellrec_flwr.eval.grounding import TitleGroups, model_fingerprint
    from fellrec_flwr.data.prompts import build_prompt

    pool = read_json(out / "constrained-pool.json", None)
    if pool is None:
        raise SystemExit("run --phase constrained first.")
    model, tok = load_model(cfg, data)
    groups = TitleGroups.from_titles(data.titles)
    trie = build_title_trie(tok, groups.titles)
    prior = TitlePrior(model, prompt_token_ids(tok, build_prompt([])), trie, pad_token_id=tok.pad_token_id,
                       cache_file=out / "prior-cache.json", model_key=model_fingerprint(model))
    import torch

    order = [str(ex.user_id) for ex in user_order(data, args.seed)]
    searched = [u for u in order if u in pool["users"]]
    chosen = searched[: args.prior_users] if args.prior_users else searched
    wanted = sorted({g for u in chosen for g in pool["users"][u]["groups"] if g >= 0})
    todo = [g for g in wanted if g not in prior.values]
    print(f"[prior] {len(wanted)} distinct pooled titles, {len(todo)} to score", flush=True)
    t0 = time.process_time()
    for start in range(0, len(todo), 256):  # the cache file is written after every block: resumable
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.prior_autocast == "bf16"):
            prior(np.asarray(todo[start:start + 256]))
        print(f"[prior] {min(start + 256, len(todo))}/{len(todo)}", flush=True)
    meta = read_json(out / "prior-meta.json", {"cpu_seconds": 0.0, "titles": 0})
    meta = {"cpu_seconds": meta["cpu_seconds"] + time.process_time() - t0, "titles": len(prior.values),
            "autocast": args.prior_autocast}
    write_json(out / "prior-meta.json", meta)


def phase_beam_l2(args, cfg, data, out: Path) -> None:
    from dataclasses import replace

    from fellrec_flwr.eval.evaluate import evaluate_recommender
    from fellrec_flwr.eval.grounding import Catalogue

    path = out / "beam-l2.json"
    done = read_json(path, {"users": {}})
    users = [ex for ex in user_order(data, args.seed)[: args.l2_users] if str(ex.user_id) not in done["users"]]
    if not users:
        print(f"[beam-l2] all {args.l2_users} users done", flush=True)
        return
    model, tok = load_model(cfg, data)
    t0 = time.process_time()
    catalogue = Catalogue.build(model, tok, data.titles, cache_dir=Path(os.environ.get(
        "FELLREC_CACHE", ROOT / ".cache" / "fellrec")) / "catalogue", model_id="smollm2-135m-instruct", batch_size=64)
    done["catalogue_cpu_seconds"] = done.get("catalogue_cpu_seconds", 0.0) + time.process_time() - t0
    eval_cfg = replace(cfg.eval, decoding="beam-l2", num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                       batch_size=4)
    for start in range(0, len(users), args.chunk):
        chunk = users[start:start + args.chunk]
        c0, w0 = time.process_time(), time.time()
        _, rows = evaluate_recommender(model, tok, chunk, data.titles, catalogue, eval_cfg, progress=False)
        cpu, wall = (time.process_time() - c0) / len(chunk), (time.time() - w0) / len(chunk)
        for ex, row in zip(chunk, rows):
            done["users"][str(ex.user_id)] = {"rank": row["target_rank"], "generated": row["generated"],
                                              "valid": row["valid_title"], "top10": row["top10"],
                                              "cpu_seconds": cpu, "wall_seconds": wall}
        write_json(path, done)
        print(f"[beam-l2] {len(done['users'])} users; this chunk {cpu:.2f} CPU s/user, {wall:.2f} wall s/user",
              flush=True)


# --------------------------------------------------------------------------- report


def constrained_ranks(data, pool: dict, prior: dict[int, float] | None, weight: float) -> dict[int, tuple[int, list]]:
    """user id -> (target rank in the top 20, top-10 group ids) from the pooled titles."""
    from fellrec_flwr.eval.constrained import rerank_with_prior
    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.eval.metrics import target_ranks

    groups = TitleGroups.from_titles(data.titles)
    targets = {ex.user_id: ex.target for ex in data.split("test")}
    out = {}
    for uid, u in pool["users"].items():
        g = np.asarray([u["groups"]], dtype=np.int64)
        s = np.asarray([u["scores"]], dtype=np.float64)
        if prior is not None:
            p = np.asarray([[prior.get(int(x), 0.0) for x in g[0]]])
            g, s = rerank_with_prior(g, s, p, weight, K)
        top = g[0, :K]
        ids = np.where(top >= 0, groups.rep_ids[np.maximum(top, 0)], -1)
        rank = target_ranks(ids[None], np.asarray([targets[int(uid)]]), canonical=groups.canonical)[0]
        out[int(uid)] = (int(rank), top[:10].tolist())
    return out


def phase_report(args, cfg, data, out: Path) -> None:
    from fellrec_flwr.eval.bootstrap import paired_bootstrap
    from fellrec_flwr.eval.metrics import ndcg_from_ranks, recall_from_ranks

    methods: dict[str, dict[int, int]] = {}
    cost: dict[str, float] = {}
    top10s: dict[str, list] = {}
    for name in ("popularity", "markov"):
        res = read_json(out / f"{name}.json", None)
        if res:
            methods[name] = dict(zip(res["user_ids"], res["ranks"]))
            cost[name] = res["cpu_seconds_per_user"]
    pool = read_json(out / "constrained-pool.json", None)
    prior_file = read_json(out / "prior-cache.json", None)
    if pool and pool["users"]:
        ranked = constrained_ranks(data, pool, None, 0.0)
        methods["constrained"] = {u: r for u, (r, _) in ranked.items()}
        top10s["constrained"] = [t for _, t in ranked.values()]
        cost["constrained"] = float(np.mean([u["cpu_seconds"] for u in pool["users"].values()]))
        if prior_file:
            prior = {int(g): v for g, v in prior_file["values"].items()}
            covered = {"settings": pool["settings"], "users": {
                u: r for u, r in pool["users"].items() if all(g in prior for g in r["groups"] if g >= 0)}}
            for w in [float(x) for x in args.prior_weights.split(",") if x.strip()]:
                ranked = constrained_ranks(data, covered, prior, w)
                name = f"constrained-prior-{w:g}"
                methods[name] = {u: r for u, (r, _) in ranked.items()}
                top10s[name] = [t for _, t in ranked.values()]
                cost[name] = cost["constrained"]  # + the prior, computed once per model (prior-meta.json)
    l2 = read_json(out / "beam-l2.json", None)
    if l2 and l2["users"]:
        methods["beam-l2"] = {int(u): r["rank"] for u, r in l2["users"].items()}
        cost["beam-l2"] = float(np.mean([r["cpu_seconds"] for r in l2["users"].values()]))
    if not methods:
        raise SystemExit(f"nothing to report in {out}; run the other phases first.")
    rows, summary = [], {"comparisons": []}
    # Each comparison pairs methods on the users all of them have: the constrained search's users,
    # the users whose pools the prior covers, and the beam-l2 subset.
    base = [m for m in ("popularity", "markov", "constrained") if m in methods]
    priors = [m for m in methods if m.startswith("constrained-prior-")]
    sets = [("constrained users", base), ("prior users", base + priors), ("beam-l2 users", base + ["beam-l2"])]
    for label, names in sets:
        names = [m for m in names if m in methods]
        if (label == "prior users" and not priors) or (label == "beam-l2 users" and "beam-l2" not in names):
            continue
        common = sorted(set.intersection(*(set(methods[m]) for m in names)))
        if not common:
            continue
        per = {m: np.array([methods[m][u] for u in common]) for m in names}
        entry = {"users": label, "n_users": len(common), "methods": {}}
        for k in KS:
            for metric, fn in (("recall", recall_from_ranks), ("ndcg", ndcg_from_ranks)):
                key = f"{metric}@{k}"
                ci = paired_bootstrap({m: fn(r, k) for m, r in per.items()}, references=("popularity", "markov"),
                                      seed=args.seed)
                for (m, ref), iv in ci.items():
                    rows.append({"users": label, "method": m, "metric": key, "vs": ref or "",
                                 "value": iv.value, "ci_low": iv.low, "ci_high": iv.high, "n_users": iv.n_users,
                                 "cpu_seconds_per_user": cost.get(m, float("nan"))})
                    entry["methods"].setdefault(m, {})[key if ref is None else f"{key}-minus-{ref}"] = \
                        [iv.value, iv.low, iv.high]
        for m in names:
            entry["methods"][m]["cpu_seconds_per_user"] = cost.get(m)
            if m in top10s:
                lists = [t for u, t in zip(methods[m], top10s[m]) if u in set(common)]
                flat = [g for t in lists for g in t]
                entry["methods"][m]["distinct_titles_in_top10"] = len(set(flat))
                entry["methods"][m]["most_common_top10_share"] = \
                    max(np.bincount(flat)) / len(lists) if flat else 0.0
        summary["comparisons"].append(entry)
    summary["prior"] = read_json(out / "prior-meta.json", None)
    summary["trie"] = pool.get("trie") if pool else None
    summary["settings"] = {"beams": args.beams, "pool": args.pool, "seed": args.seed, "num_beams": args.num_beams,
                           "max_new_tokens": args.max_new_tokens}
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(report / "games_zero_shot.csv", index=False)
    write_json(report / "games_zero_shot.json", summary)
    plot(summary, report / "games_zero_shot.png")
    for entry in summary["comparisons"]:
        print(f"\n{entry['users']}: n = {entry['n_users']}")
        for m, v in entry["methods"].items():
            print(f"  {m:24s} R@10 {fmt(v['recall@10'])}  N@10 {fmt(v['ndcg@10'])}  R@20 {fmt(v['recall@20'])}  "
                  f"N@20 {fmt(v['ndcg@20'])}  CPU s/user {v['cpu_seconds_per_user'] or 0:.3f}")
            for ref in ("popularity", "markov"):
                if f"recall@10-minus-{ref}" in v:
                    print(f"  {'':24s} - {ref}: R@10 {fmt(v[f'recall@10-minus-{ref}'])}  "
                          f"R@20 {fmt(v[f'recall@20-minus-{ref}'])}")


def fmt(v) -> str:
    return f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = summary["comparisons"]
    fig, axes = plt.subplots(1, len(comps), figsize=(6 * len(comps), 4), squeeze=False)
    for ax, entry in zip(axes[0], comps):
        names = list(entry["methods"])
        x = np.arange(len(names))
        for j, key in enumerate(("recall@10", "recall@20")):
            vals = np.array([entry["methods"][m][key] for m in names])
            ax.bar(x + (j - 0.5) * 0.38, vals[:, 0], 0.38, label=key,
                   yerr=[vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]], capsize=3)
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"Games zero-shot, {entry['users']} (n = {entry['n_users']}), 95% bootstrap CI", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.games).exists() or not Path(args.model).exists():
        raise SystemExit(f"needs the Games data ({args.games}) and the SmolLM2 GGUF ({args.model}); "
                         "set FELLREC_SHARED or --games/--model.")
    if args.pool < K:
        raise SystemExit(f"--pool={args.pool} must be >= {K}.")
    import torch

    torch.set_num_threads(args.threads)
    cfg = config(args)
    data = load_data(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = PHASES if args.phase == "all" else (args.phase,)
    for phase in phases:
        {"baselines": phase_baselines, "constrained": phase_constrained, "prior": phase_prior,
         "beam-l2": phase_beam_l2, "report": phase_report}[phase](args, cfg, data, out)


if __name__ == "__main__":
    main()
