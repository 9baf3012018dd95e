"""Quality benchmark: FELLRec vs FedAvg, FedProx, local, centralized, popularity and Markov.

    python bench/quality.py --profile cpu --out docs/results/quality-cpu \
        --run-config "data.dataset='games' data.path='/abs/path/amazon-games'" --seeds 2024

Every method gets the same data, model, seed and budget (rounds x local epochs). The
federated methods run the real ServerApp `main` and ClientApp against an in-process Grid
(no Ray: the numbers do not depend on the transport). Writes one run folder per method and
seed, then `comparison.{csv,md,png}` per seed and `quality.csv` / `quality.md` with mean ± std
over seeds of the overall metrics, the coefficient of variation across clients and the worst
client. `results.csv` holds, per seed, every method's paired-bootstrap 95% intervals over the
same test users (Recall/NDCG@10/20 and the difference to FedAvg, popularity and Markov):
method, profile, seed, metric, value, ci_low, ci_high, n_users.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pandas as pd

PROFILES = {
    # tiny LLaMA (public warm-up): the demo defaults of pyproject.toml, spelled out
    "cpu": {"num-server-rounds": 5, "train.local-epochs": 2, "train.lr": 0.003, "eval.interval": 1,
            "eval.decoding": "constrained", "model.tiny-layers": 4, "model.tiny-pretrain-prompts": 1000,
            "lora.r": 16, "lora.alpha": 32, "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
    # SmolLM2-135M (set model.name to the GGUF file or a local folder); GPU recommended; the paper's LoRA
    "pretrained": {"num-server-rounds": 5, "train.local-epochs": 1, "train.lr": 0.0003, "eval.interval": 1,
                   "eval.num-beams": 4, "eval.max-new-tokens": 32, "train.batch-size": 4,
                   "lora.r": 8, "lora.alpha": 16, "lora.target-modules": "q_proj,v_proj"},
}
METHODS = {
    "fellrec": {"strategy": "fellrec"},
    "fellrec-noheat": {"strategy": "fellrec", "fellrec.heating": False},
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "fellrec+": {"strategy": "fellrec+"},  # delta-w similarity, softmax kernel (README "FELLRec+")
    "ffa-lora": {"strategy": "ffa-lora"},  # A frozen at the shared init, B averaged
    "fedsa-lora": {"strategy": "fedsa-lora"},  # A averaged, B personal
    "local": {"strategy": "local"},
    "centralized": None,
    "popularity": None,
    "markov": None,
}
CLIENT_LAYERS = "<client layers of the split>"  # resolved per model in resolve_client_layers
# Ablations of FELLRec, one knob each against the `fellrec` defaults (alpha 0.7, beta 1,
# heating on, exponent t+1/beta, similarity on parameters, linear kernel, split off).
ABLATIONS = {
    "fellrec-sim-updates": {"strategy": "fellrec", "fellrec.similarity-basis": "updates"},
    "fellrec-sim-softmax": {"strategy": "fellrec", "fellrec.similarity-kernel": "softmax"},
    "fellrec-exp-paren": {"strategy": "fellrec", "fellrec.heating-exponent": "(t+1)/beta"},
    "fellrec-lr-scale": {"strategy": "fellrec", "fellrec.lr-scale": True},
    "fellrec-alpha0.3": {"strategy": "fellrec", "fellrec.alpha": 0.3},
    "fellrec-alpha0.9": {"strategy": "fellrec", "fellrec.alpha": 0.9},
    "fellrec-beta0.5": {"strategy": "fellrec", "fellrec.beta": 0.5},
    "fellrec-beta2": {"strategy": "fellrec", "fellrec.beta": 2.0},
    "fellrec-split": {"strategy": "fellrec", "split.enabled": True},
    # The fair "split off" twin of fellrec-split: a split client can only train LoRA on the layers
    # it holds, so this run puts LoRA on the same layers (front 1 + back 1) without the service.
    "fellrec-split-twin": {"strategy": "fellrec", "lora.layers": CLIENT_LAYERS},
}
METHODS.update(ABLATIONS)
PRESETS = {"main": [m for m in METHODS if m not in ABLATIONS], "ablation": ["fellrec", *ABLATIONS]}
HEADLINE = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "eval-loss")


def run_federated(run_config: dict) -> None:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.inprocess_grid import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    n = from_run_config(run_config).data.num_clients
    # Client state inside the run folder: benchmark runs in parallel never share a state file.
    state_dir = Path(run_config["out-dir"]) / run_config["run-name"] / "client-state"
    grid = InProcessGrid(client_app, n, run_config, node_config={"state-dir": str(state_dir)})
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


def run_method(method: str, run_config: dict) -> Path:
    from fellrec_flwr.train.centralized import run_baseline, run_centralized
    from fellrec_flwr.config import from_run_config

    run_dir = Path(run_config["out-dir"]) / run_config["run-name"]
    if (run_dir / "summary.json").exists():
        print(f"[quality] {run_dir.name}: already done, skipped")
        return run_dir
    t0 = time.time()
    if method == "centralized":
        run_centralized(from_run_config(run_config))
    elif method in ("popularity", "markov"):
        run_baseline(from_run_config(run_config), method)
    else:
        run_federated(resolve_client_layers({**run_config, **METHODS[method]}))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["method"], summary["wall_seconds"] = method, round(time.time() - t0, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"[quality] {run_dir.name}: {time.time() - t0:.0f}s overall={summary['overall']}")
    return run_dir


def balance_diagnostics(run_dir: Path) -> dict:
    """FELLRec's own weights in its last round, averaged over clients: how far the personalised
    aggregate is from a plain average (self-weight 1/N = uniform, 1 = local) and how much
    heating held clients back (warm weight 1 = no heating)."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    out = {}
    for name in ("self-weight", "warm-weight"):
        rows = metrics[metrics["metric"] == name]
        out[name] = rows[rows["round"] == rows["round"].max()]["value"].mean() if len(rows) else float("nan")
    return out


def resolve_client_layers(run_config: dict) -> dict:
    """Replace the CLIENT_LAYERS placeholder by the layers a split client would hold."""
    if run_config.get("lora.layers") != CLIENT_LAYERS:
        return run_config
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.split.plan import plan_split

    cfg = from_run_config({k: v for k, v in run_config.items() if k != "lora.layers"})
    if cfg.model.name != "tiny":
        raise SystemExit("fellrec-split-twin resolves its LoRA layers for the tiny model only; for another model "
                         "run fellrec with -c \"lora.layers='<front layers>,<back layers>'\" instead.")
    held = plan_split(cfg.model.tiny_layers, cfg.split.front_k, cfg.split.back_k).client_layers
    return {**run_config, "lora.layers": ",".join(str(i) for i in held)}


def table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    agg = frame.groupby("method", sort=False).agg(["mean", "std", "count"])
    out = pd.DataFrame(index=agg.index)
    for col in [c for c in frame.columns if c not in ("method", "seed")]:
        mean, std = agg[(col, "mean")], agg[(col, "std")].fillna(0.0)
        out[col] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(mean, std)]
    out["seeds"] = agg[(frame.columns[2], "count")]
    return out


def main() -> None:
    from fellrec_flwr.config import parse_overrides

    from fellrec_flwr.eval.compare import compare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--run-config", "-c", action="append", default=[])
    parser.add_argument("--methods", default="main",
                        help=f"comma-separated methods, or a preset: {', '.join(PRESETS)}; all: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="2024")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    overrides = parse_overrides(args.run_config)
    rows = []
    results: list[pd.DataFrame] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dirs = []
        for method in PRESETS.get(args.methods, args.methods.split(",")):
            if method not in METHODS:
                parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)} or a preset {', '.join(PRESETS)}")
            rc = {**PROFILES[args.profile], **overrides, "seed": seed, "out-dir": str(out / "runs"),
                  "run-name": f"{method}-s{seed}"}
            run_dirs.append(run_method(method, rc))
        compare(run_dirs, out / f"compare-s{seed}", profile=args.profile)
        intervals = out / f"compare-s{seed}" / "results.csv"
        if intervals.exists():
            results.append(pd.read_csv(intervals))
        for d in run_dirs:
            s = json.loads((d / "summary.json").read_text())
            row = {"method": s["method"], "seed": seed}
            row.update({m: s["overall"].get(m) for m in HEADLINE})
            row["cv recall@10"] = s["balance"].get("recall@10", {}).get("cv")
            row["worst recall@10"] = s["balance"].get("recall@10", {}).get("worst_value")
            losses = [c["eval-loss"] for c in s["per_client"].values() if "eval-loss" in c]
            row["worst eval-loss"] = max(losses) if losses else None  # the client the model fits least
            row.update(balance_diagnostics(d))
            row["minutes"] = s.get("wall_seconds", 0) / 60
            rows.append(row)
    pd.DataFrame(rows).to_csv(out / "quality.csv", index=False)
    if results:
        pd.concat(results, ignore_index=True).to_csv(out / "results.csv", index=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (f"Command: `python bench/quality.py --profile {args.profile} {' '.join(repr(c) for c in args.run_config)} "
              f"--methods {args.methods} --seeds {args.seeds}`  \nCommit {commit}, {platform.machine()} {os.cpu_count()} cores, "
              f"{time.strftime('%Y-%m-%d')}\n\n")
    md = table(rows)
    lines = ["| method | " + " | ".join(md.columns) + " |", "|---" * (len(md.columns) + 1) + "|"]
    lines += ["| " + str(i) + " | " + " | ".join(str(v) for v in r) + " |" for i, r in md.iterrows()]
    (out / "quality.md").write_text(header + "\n".join(lines) + "\n")
    print((out / "quality.md").read_text())


if __name__ == "__main__":
    main()
