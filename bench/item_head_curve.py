"""Learning curve and costs of the item-token head on Amazon Games (SmolLM2-135M), against the
retrieval head's published points on the same 1,000 test users.

    nice python bench/item_head_curve.py --prepared-dir DIR --all-users-dir DIR2 [--epochs 3] [--threads 1]
    python bench/item_head_curve.py --prepared-dir DIR --all-users-dir DIR2 --epochs 0 --out /tmp/costs   # costs only

What it measures, on the library's own trainer and evaluator (`train_item_head`,
`evaluate_item_head`; the verdict table itself comes from the centralized command and
`flwr run`, see docs/results.md):

- test Recall@10 / NDCG@10 after 0, 1k, 3k, 10k, 30k, 100k windows and after every epoch over
  all training windows, on the 1,000 test users of the retrieval head's runs
  (docs/results/games_retrieval/*.json, docs/results/games_federated/eval/centralized-r*.json),
  whose points are drawn beside it, and on the verdict's test users (--verdict-run);
- CPU-s per training window, CPU-s per ranked test user, peak RSS, the one-time item-vector cost.

DIR is the verdict's prepared folder (its model, item vectors and training sequences are used);
DIR2 a folder of the same source and history length prepared with ``--test-users 0``, whose test
rows give the retrieval head's 1,000 users (checked: both folders hold the same training data). Writes
docs/results/games-full/curve.{csv,json,png}. Figures are CPU-dependent: the CPU model is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "docs" / "results" / "games-full"
RETRIEVAL_POINTS = [  # (file, examples seen) of the retrieval head on the same 1,000 users
    ("docs/results/games_retrieval/retrieval-zero-shot.json", 0),
    ("docs/results/games_retrieval/retrieval-trained.json", None),  # its "train" block says how many
    ("docs/results/games_federated/eval/centralized-r1.json", 2000),
    ("docs/results/games_federated/eval/centralized-r2.json", 4000),
    ("docs/results/games_federated/eval/centralized-r3.json", 6000),
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def retrieval_points() -> tuple[list[dict], list[int]]:
    points, users = [], None
    for rel, seen in RETRIEVAL_POINTS:
        d = json.loads((ROOT / rel).read_text())
        block = d.get("test", d)
        ranks = np.asarray(block["ranks"])
        ids = list(map(int, block["user_ids"]))
        users = users or ids
        if sorted(ids) != sorted(users):
            raise SystemExit(f"{rel} has other users than the first retrieval file")
        seen = seen if seen is not None else int(d["train"]["examples"])
        points.append({"head": "retrieval", "windows": seen, "recall@10": float(((ranks >= 0) & (ranks < 10)).mean()),
                       "n_users": len(ids), "source": rel})
    return points, users


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared-dir", type=Path, help="the verdict's prepared folder (needed unless --from-log)")
    ap.add_argument("--all-users-dir", required=True, type=Path, help="prepared with --test-users 0")
    ap.add_argument("--model", default=str(SMOLLM))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verdict-run", type=Path, default=OUT / "centralized",
                    help="a run folder whose per_user.csv names the verdict's test users")
    ap.add_argument("--run-config", default="", help="extra overrides (Flower syntax) for the head's settings")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--from-log", type=Path, help="redraw curve.csv/.png from the JSON lines an earlier run printed "
                                                  "(e.g. one stopped early), without training")
    args = ap.parse_args()
    if args.from_log:
        redraw(args.from_log, args.out, curve_baselines(args.all_users_dir))
        return

    import torch
    from flwr.common.config import parse_config_args

    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics
    from fellrec_flwr.model.item_head import evaluate_item_head, group_sequences, train_item_head
    from fellrec_flwr.runtime import get_runtime
    from bench.item_head_settings import VERDICT_SETTINGS

    torch.set_num_threads(args.threads)
    overrides = {**VERDICT_SETTINGS, "model.name": args.model, "data.prepared-dir": str(args.prepared_dir),
                 "train.local-epochs": 1}
    overrides.update(parse_config_args([args.run_config]) if args.run_config else {})
    cfg = from_run_config(overrides)
    c0 = time.process_time()
    rt = get_runtime(cfg)  # computes (or reads) the item vectors
    setup_cpu = time.process_time() - c0
    retrieval, curve_users = retrieval_points()
    from fellrec_flwr.data.prepared import PreparedData

    every = PreparedData.load(args.all_users_dir)
    if every.sequences() != rt.data.sequences() or every.titles != rt.data.titles:
        raise SystemExit(f"{args.all_users_dir} holds other training data or titles than {args.prepared_dir}")
    test = {ex.user_id: ex for ex in every.split("test")}
    missing = [u for u in curve_users if u not in test]
    if missing:
        raise SystemExit(f"{len(missing)} curve users have no test row in {args.prepared_dir}: prepare it with "
                         "--test-users 0")
    curve_examples = [test[u] for u in curve_users]
    verdict_examples = []
    if (args.verdict_run / "per_user.csv").exists():
        import pandas as pd

        pu = pd.read_csv(args.verdict_run / "per_user.csv")
        verdict_examples = [test[int(u)] for u in sorted(set(pu.loc[pu["split"] == "test", "user_id"]))]
    fitted = FittedBaselines.fit(rt.data.train_sequences, rt.data.titles)
    baselines = {m: float(ranking_metrics(fitted.ranks(m, curve_examples))["recall@10"])
                 for m in ("popularity", "markov")}

    sequences = group_sequences(rt.data.sequences(), rt.groups)
    total = sum(len(s) - 1 for s in sequences)
    checkpoints = [1_000, 3_000, 10_000, 30_000, 100_000]
    rows: list[dict] = []
    costs = {"eval_cpu": 0.0, "eval_users": 0}

    def evaluate(seen: int, epoch: float) -> None:
        c = time.process_time()
        m, _ = evaluate_item_head(rt.model, curve_examples, rt.groups)
        costs["eval_cpu"] += time.process_time() - c
        costs["eval_users"] += len(curve_examples)
        row = {"head": "item", "windows": seen, "epoch": round(epoch, 3), "recall@10": m["recall@10"],
               "ndcg@10": m["ndcg@10"], "eval-loss": m["eval-loss"], "n_users": len(curve_examples)}
        if verdict_examples and seen in marks_full:
            c = time.process_time()
            v, _ = evaluate_item_head(rt.model, verdict_examples, rt.groups)
            costs["eval_cpu"] += time.process_time() - c
            costs["eval_users"] += len(verdict_examples)
            row.update({"verdict_recall@10": v["recall@10"], "verdict_users": len(verdict_examples)})
        rows.append(row)
        print(json.dumps(row), flush=True)

    marks_full: set[int] = {0}
    evaluate(0, 0.0)
    train_cpu = 0.0
    done = 0
    for epoch in range(args.epochs):
        pending = [c for c in checkpoints if c > done] if epoch == 0 else []

        def on_step(step: int, loss: float, seen: int) -> None:
            while pending and done + seen >= pending[0]:
                evaluate(done + seen, (done + seen) / total)
                pending.pop(0)

        c = time.process_time()
        eval_before = costs["eval_cpu"]
        result = train_item_head(rt.model, sequences, cfg.train, cfg.item_head, seed=epoch, progress=False,
                                 on_step=on_step)
        train_cpu += time.process_time() - c - (costs["eval_cpu"] - eval_before)
        done += result.num_examples
        marks_full.add(done)
        evaluate(done, done / total)

    summary = {
        "cpu": cpu_model(), "threads": args.threads, "windows_per_epoch": total, "epochs": args.epochs,
        "settings": overrides, "setup_cpu_seconds": setup_cpu,
        "train_cpu_seconds_per_window": train_cpu / done if done else None,
        "train_cpu_minutes_per_epoch": train_cpu / args.epochs / 60 if args.epochs else None,
        "eval_cpu_seconds_per_user": costs["eval_cpu"] / max(1, costs["eval_users"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baselines_on_curve_users": baselines, "retrieval_points": retrieval, "item_points": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(summary, indent=2))
    import pandas as pd

    pd.DataFrame(rows + retrieval).to_csv(args.out / "curve.csv", index=False, float_format="%.5f")
    plot(rows, retrieval, baselines, args.out / "curve.png", len(curve_examples))
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("points")}, indent=2))


def curve_baselines(all_users_dir: Path) -> dict[str, float]:
    """Popularity and Markov Recall@10 on the retrieval head's 1,000 test users (no model needed)."""
    from fellrec_flwr.data.prepared import PreparedData
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics

    every = PreparedData.load(all_users_dir)
    _, users = retrieval_points()
    test = {ex.user_id: ex for ex in every.split("test")}
    examples = [test[u] for u in users]
    fitted = FittedBaselines.fit(every.train_sequences, every.titles)
    return {m: float(ranking_metrics(fitted.ranks(m, examples))["recall@10"]) for m in ("popularity", "markov")}


def redraw(log: Path, out: Path, baselines: dict[str, float]) -> None:
    """curve.csv/.png from the item points a run printed (JSON lines), with the retrieval head's points
    and the baselines on the same users; writes curve.json with what is known without the run's costs."""
    import pandas as pd

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"head": "item"')]
    retrieval, _ = retrieval_points()
    pd.DataFrame(rows + retrieval).to_csv(out / "curve.csv", index=False, float_format="%.5f")
    (out / "curve.json").write_text(json.dumps({"cpu": cpu_model(), "from_log": str(log.name),
                                                "baselines_on_curve_users": baselines, "retrieval_points": retrieval,
                                                "item_points": rows}, indent=2))
    plot(rows, retrieval, baselines, out / "curve.png", rows[0]["n_users"] if rows else 0)
    print(f"wrote {out / 'curve.csv'} and curve.png from {len(rows)} points of {log}")


def plot(item: list[dict], retrieval: list[dict], baselines: dict, path: Path, n_users: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = lambda pts: [max(p["windows"], 300) for p in pts]  # noqa: E731 -- 0 drawn at the axis' left end
    ax.plot(x(item), [p["recall@10"] for p in item], "o-", color="tab:red", label="item-token head (new)")
    ax.plot(x(retrieval), [p["recall@10"] for p in retrieval], "s--", color="tab:blue",
            label="retrieval head (published runs)")
    for (name, value), style in zip(baselines.items(), (":", "-.")):
        ax.axhline(value, color="grey" if name == "popularity" else "black", ls=style, label=f"{name} (same users)")
    ax.set_xscale("log")
    ax.set_xlabel("training windows seen (0 drawn at 300)")
    ax.set_ylabel("test Recall@10")
    ax.set_title(f"Amazon Games, SmolLM2-135M, the same {n_users} test users", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
