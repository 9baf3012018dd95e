"""Why does (or doesn't) the tiny model learn the demo? Measure what it generates.

    python bench/demo_diagnosis.py --out docs/results/demo-diagnosis [--epochs 4] [-c "eval.decoding='constrained'"]

Builds the run's runtime (prepared data, tiny model after its public warm-up, LoRA at its
seeded start), then trains ONE LoRA on every client's training prompts (as the centralized
baseline does) for --epochs passes, and after the warm-up and after each pass measures on
the validation users:

- Recall@10 / NDCG@10 of the configured evaluation, and popularity / Markov on the same users;
- distinct generated texts and distinct items over all users' top-10 lists;
- share of generated texts that are exactly a catalogue title, that equal the target's
  title, and that copy a title from the user's own history;
- train loss (mean over the pass) and validation loss;
- a few users' history, target and generation.

Writes diagnosis.json and diagnosis.md under --out. Single-threaded (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generation_stats(rows: Sequence[dict[str, Any]], examples: Sequence[Any], titles: dict[int, str]) -> dict[str, float]:
    """Shares over users of: exact catalogue title, target's title, a history title; distinct outputs."""
    if not rows:
        return {}
    catalogue = set(titles.values())
    generated = [r["generated"] for r in rows]
    history = [{titles[i] for i in ex.history} for ex in examples]
    top = [i for r in rows for i in r["top10"] if i >= 0]
    return {
        "users": len(rows),
        "distinct-generated": len(set(generated)),
        "distinct-top10-items": len(set(top)),
        "exact-title-share": float(np.mean([g in catalogue for g in generated])),
        "target-title-share": float(np.mean([g == titles[ex.target] for g, ex in zip(generated, examples)])),
        "history-copy-share": float(np.mean([g in h for g, h in zip(generated, history)])),
    }


def measure(rt: Any, cfg: Any, examples: Sequence[Any], label: str, train_loss: float | None) -> dict[str, Any]:
    from fellrec_flwr.eval.evaluate import evaluate_recommender
    from fellrec_flwr.train.trainer import eval_loss

    t0 = time.time()
    loss = eval_loss(rt.model, rt.tokenizer, examples, rt.data.titles, cfg.train)
    metrics, rows = evaluate_recommender(rt.model, rt.tokenizer, examples, rt.data.titles, rt.catalogue, cfg.eval,
                                         progress=False)
    out = {"stage": label, "train-loss": train_loss, "valid-loss": float(loss),
           **{k: float(v) for k, v in metrics.items() if k.startswith(("recall@", "ndcg@"))},
           **generation_stats(rows, examples, rt.data.titles), "eval-seconds": round(time.time() - t0, 1),
           "examples": [{"history": [rt.data.titles[i] for i in ex.history][-4:], "target": rt.data.titles[ex.target],
                         "generated": r["generated"]} for ex, r in list(zip(examples, rows))[:5]]}
    print(f"[diagnosis] {label}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in out.items() if k != "examples"), flush=True)
    return out


def baselines(rt: Any, examples: Sequence[Any]) -> dict[str, float]:
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics

    fitted = FittedBaselines.fit(rt.data.train_sequences, rt.data.titles)
    return {f"{m} {k}": v for m in ("popularity", "markov")
            for k, v in ranking_metrics(fitted.ranks(m, examples)).items() if k in ("recall@10", "ndcg@10")}


def markdown(result: dict[str, Any]) -> str:
    cols = ["stage", "train-loss", "valid-loss", "recall@10", "ndcg@10", "distinct-generated", "distinct-top10-items",
            "exact-title-share", "target-title-share", "history-copy-share", "eval-seconds"]
    lines = [f"Command: `{result['command']}`  \nCommit {result['commit']}, {result['machine']}, {result['date']}; "
             f"{result['users']} validation users. Baselines on the same users: "
             + ", ".join(f"{k} {v:.4f}" for k, v in result["baselines"].items()) + "\n",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in result["stages"]:
        lines.append("| " + " | ".join("" if s.get(c) is None else (f"{s[c]:.4f}" if isinstance(s[c], float) else str(s[c]))
                                       for c in cols) + " |")
    lines.append("\nExample generations (last stage):\n")
    for ex in result["stages"][-1]["examples"]:
        lines.append(f"- history …{ex['history']} → target {ex['target']!r}; generated {ex['generated']!r}")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch
    from flwr.common.config import parse_config_args

    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.lora_state import set_lora_state
    from fellrec_flwr.runtime import derive_seed, get_runtime
    from fellrec_flwr.train.trainer import train_local

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", "-c", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=3, help="passes of centralized LoRA training")
    parser.add_argument("--users", type=int, default=0, help="evaluate only the first N validation users (0 = all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = from_run_config(parse_config_args(args.run_config) if args.run_config else {})
    t0 = time.time()
    rt = get_runtime(cfg)
    print(f"[diagnosis] runtime ready in {time.time() - t0:.0f}s", flush=True)
    set_lora_state(rt.model, rt.initial_lora)
    examples = rt.data.split("valid")
    examples = examples[: args.users] if args.users else examples
    train = rt.data.split("train")
    stages = [measure(rt, cfg, examples, "after warm-up", None)]
    for epoch in range(1, args.epochs + 1):
        result = train_local(rt.model, rt.tokenizer, train, rt.data.titles, cfg.train,
                             seed=derive_seed(cfg.seed, epoch, "diagnosis"), progress=False)
        stages.append(measure(rt, cfg, examples, f"LoRA pass {epoch}", float(result.loss)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"command": "python bench/demo_diagnosis.py " + " ".join(sys.argv[1:]), "commit": commit,
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
           "users": len(examples), "train-prompts": len(train), "baselines": baselines(rt, examples), "stages": stages,
           "seconds": round(time.time() - t0, 1)}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "diagnosis.json").write_text(json.dumps(out, indent=2))
    (folder / "diagnosis.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
