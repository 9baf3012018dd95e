"""Training throughput of each CPU speed option, and the loss after the same budget.

    python -m data_prep --dataset games --path ../shared/data/amazon-games --partitioner iid \
        --num-clients 1 --train-samples 256 --valid-users 32 --test-users 32 \
        --out bench/results/tmp/games-speed --quiet
    python bench/train_speed.py            # nice 10; 2 threads if the machine is idle, else 1
    python bench/train_speed.py --configs "" --time-budget 45 --curve --baseline-csv docs/train_speed.csv \
        --time-configs "all-options (LoRA last layers)" \
        --out docs/train_speed_curve.csv     # held-out loss vs CPU time: speed-up at equal loss

Every configuration trains a fresh LoRA (same seed, same init) of SmolLM2-135M on the same
`--examples` real Games training prompts for `--rounds` calls of train_local with
`--epochs` local epochs each, as rounds of a federated run would (a prefix cache is built
inside the timing of the first call and reused by later ones, as in a simulation process).
Time is the process's CPU time (time.process_time): on cores shared with other jobs it
measures the work, where wall time measures the neighbours; wall seconds are reported too.
Reported: training examples per CPU-second over all calls (cache building included), CPU
seconds per round, the mean training loss of the last round, and the loss on `--held-out`
validation prompts after the budget, computed in full precision by the exact paths (labelled
logits only, prefix cache) for every row alike. With `--time-budget S`, the `--time-configs` also train
for S CPU-seconds each (rounds of `--epochs` epochs until the time is up) and report the
held-out loss then: what the same CPU time buys.
Writes docs/train_speed.csv and prints a markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fellrec_flwr.data.collate import TrainCollator, encode_examples, pad_token_id_of  # noqa: E402
from fellrec_flwr.config import LoraSettings, ModelConfig, TrainSettings  # noqa: E402
from fellrec_flwr.model.loading import add_lora, load_base_model  # noqa: E402
from fellrec_flwr.data.prepared import PreparedData  # noqa: E402
import fellrec_flwr.model.speed as speed_module  # noqa: E402
from fellrec_flwr.model.speed import describe  # noqa: E402
from fellrec_flwr.train.trainer import eval_loss, fast_forward, model_device, train_local  # noqa: E402

EXACT_EVAL = dict(autocast="off", length_bucketing=False, labelled_logits_only=True, prefix_cache_mb=1024)  # all exact
PLAIN = dict(autocast="off", length_bucketing=False, labelled_logits_only=False, prefix_cache_mb=0)
FAST = dict(autocast="auto", length_bucketing=True, labelled_logits_only=True, prefix_cache_mb=1024)
# name -> (train settings, LoRA on the last n layers only (0 = every layer))
CONFIGS = {
    "baseline": (PLAIN, 0),
    "autocast-bf16": ({**PLAIN, "autocast": "bf16"}, 0),
    "length-bucketing": ({**PLAIN, "length_bucketing": True}, 0),
    "labelled-logits-only": ({**PLAIN, "labelled_logits_only": True}, 0),
    "lora-last-layers": (PLAIN, -1),
    "lora-last-layers+prefix-cache": ({**PLAIN, "prefix_cache_mb": 1024}, -1),
    "all-options (LoRA every layer)": (FAST, 0),
    "all-options (LoRA last layers)": (FAST, -1),
}


def default_threads() -> int:
    return 2 if os.getloadavg()[0] < 0.5 else 1  # the machine's 2 cores are shared: 1 unless idle


def lora_for(last_n: int, num_layers: int, r: int, targets: str) -> LoraSettings:
    layers = "" if last_n == 0 else ",".join(str(i) for i in range(num_layers - last_n, num_layers))
    return LoraSettings(r=r, alpha=2 * r, target_modules=targets, dropout=0.0, layers=layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--prepared", default=str(ROOT / "bench" / "results" / "tmp" / "games-speed"))
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=16, help="validation prompts for the held-out loss")
    ap.add_argument("--rounds", type=int, default=1, help="train_local calls (rounds) per configuration")
    ap.add_argument("--epochs", type=int, default=1, help="local epochs per call")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r); the paper's 8")
    ap.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules (the paper's)")
    ap.add_argument("--last-layers", type=int, default=4, help="n of the 'LoRA on the last n layers' rows")
    ap.add_argument("--train-on-inputs", choices=["true", "false"], default="false",
                    help="loss on the prompt too (authors) or on the response only")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--time-budget", type=float, default=0.0, help="CPU seconds per --time-configs row (0 = none)")
    ap.add_argument("--time-configs", default="baseline,all-options (LoRA last layers)")
    ap.add_argument("--curve", action="store_true",
                    help="time rows: held-out loss after every round (not counted in CPU time), and the CPU "
                         "seconds each row needs to reach the first time row's final loss")
    ap.add_argument("--baseline-csv", default="",
                    help="with --curve: take the target loss and the baseline's CPU seconds to reach it from the "
                         "'baseline' row of this CSV (the first command's output) instead of a baseline time row")
    ap.add_argument("--threads", type=int, default=0, help="0 = 2 if the machine is idle, else 1")
    ap.add_argument("--out", default=str(ROOT / "docs" / "train_speed.csv"))
    ap.add_argument("--work-dir", default=str(ROOT / "bench" / "results" / "tmp"))
    args = ap.parse_args()
    os.nice(10)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)

    data = PreparedData.load(args.prepared)
    train = data.split("train")[: args.examples]
    held_out = data.split("valid")[: args.held_out]
    base, tok = load_base_model(ModelConfig(name=args.model), data.titles, args.work_dir)
    num_layers = int(base.config.num_hidden_layers)
    settings = TrainSettings(batch_size=args.batch, lr=args.lr, local_epochs=args.epochs, max_length=256,
                             train_on_inputs=args.train_on_inputs == "true")
    measure_cfg = replace(settings, **EXACT_EVAL)
    feats = encode_examples(tok, train, data.titles, settings.max_length, settings.train_on_inputs)
    mean_tokens = sum(len(f.input_ids) for f in feats) / len(feats)

    untrained = add_lora(base, lora_for(0, num_layers, args.lora_r, args.targets), seed=0)  # LoRA B = 0: the base model's loss
    start_loss = round(eval_loss(untrained, tok, held_out, data.titles, measure_cfg), 4)
    base = untrained.unload()
    print(f"held-out loss before training: {start_loss}", flush=True)

    def rows_for(names: str, time_budget: float) -> list[dict]:
        nonlocal base
        out = []
        for name in [c.strip() for c in names.split(",") if c.strip()]:
            model = add_lora(base, lora_for(_last_n(name), num_layers, args.lora_r, args.targets), seed=0)
            out.append(measure(name, model, time_budget))
            base = model.unload()  # the base model without this configuration's LoRA, for the next one
        return out

    def _last_n(name: str) -> int:
        return args.last_layers if CONFIGS[name][1] == -1 else CONFIGS[name][1]

    def measure(name: str, model, time_budget: float) -> dict:
        speed, _ = CONFIGS[name]
        last_n = _last_n(name)
        cfg = replace(settings, **speed)
        speed_module._CACHES.clear()  # every configuration builds its own prefix cache, inside its timing
        chosen = describe(fast_forward(model, cfg, model_device(model), feats, TrainCollator(pad_token_id_of(tok)),
                                       backward=True))
        load0 = os.getloadavg()[0]
        round_s, losses, curve = [], [], []
        wall0 = time.perf_counter()
        while (len(round_s) < args.rounds) if not time_budget else (sum(round_s) < time_budget):
            t0 = time.process_time()  # CPU seconds of this process: robust to other jobs on shared cores
            result = train_local(model, tok, train, data.titles, cfg, seed=len(round_s), progress=False)
            round_s.append(time.process_time() - t0)
            losses.append(result.loss)
            if time_budget and args.curve:
                curve.append((sum(round_s), eval_loss(model, tok, held_out, data.titles, measure_cfg)))
        seconds = sum(round_s)
        wall = time.perf_counter() - wall0
        seen = len(train) * args.epochs * len(round_s)
        row = {
            "config": name, "budget": f"{time_budget:.0f} CPU s" if time_budget else f"{seen} examples",
            "autocast": chosen["autocast"], "length_bucketing": cfg.length_bucketing,
            "labelled_logits_only": cfg.labelled_logits_only,
            "lora_layers": f"last {last_n}" if last_n else f"all {num_layers}",
            "prefix_layers_cached": chosen["prefix_layers_cached"], "threads": threads,
            "train_on_inputs": cfg.train_on_inputs, "examples": len(train), "mean_tokens": round(mean_tokens, 1),
            "rounds": len(round_s), "epochs": args.epochs, "cpu_seconds": round(seconds, 2), "wall_seconds": round(wall, 2),
            "round_seconds": " ".join(f"{s:.1f}" for s in round_s),
            "examples_per_s": round(seen / seconds, 3), "s_per_example": round(seconds / seen, 3),
            "train_loss_last_round": round(losses[-1], 4),
            "valid_loss_before": start_loss,
            "valid_loss": round(eval_loss(model, tok, held_out, data.titles, measure_cfg), 4),
            "load_avg_1min": f"{load0:.2f}-{os.getloadavg()[0]:.2f}",
            "curve_cpu_s_loss": " ".join(f"{s:.1f}:{v:.4f}" for s, v in curve),
        }
        print(row, flush=True)
        return row

    rows = rows_for(args.configs, 0.0)
    if args.time_budget:
        rows += rows_for(args.time_configs, args.time_budget)

    time_rows = [r for r in rows if r["curve_cpu_s_loss"]]
    if time_rows:  # equal-loss speed-up: CPU seconds to reach the baseline's final loss
        if args.baseline_csv:
            with open(args.baseline_csv) as fh:
                baseline = next(r for r in csv.DictReader(fh) if r["config"] == "baseline")
            target, base_time = float(baseline["valid_loss"]), float(baseline["cpu_seconds"])
        else:
            target, base_time = time_rows[0]["valid_loss"], None
        for row in time_rows:
            points = [(float(s), float(v)) for s, v in (x.split(":") for x in row["curve_cpu_s_loss"].split())]
            row["target_loss"] = target
            row["cpu_s_to_target_loss"] = next((s for s, v in points if v <= target + 1e-4), "")
        base_time = base_time or time_rows[0]["cpu_s_to_target_loss"]
        for row in time_rows:
            reached = row["cpu_s_to_target_loss"]
            row["speedup_at_equal_loss"] = round(base_time / reached, 2) if reached and base_time else ""
        print(f"target held-out loss {target}: " + "; ".join(
            f"{r['config']} reaches it after {r['cpu_s_to_target_loss']} CPU s" for r in time_rows))
    base_speed = next((r["examples_per_s"] for r in rows if r["config"] == "baseline"), None)  # first: fixed examples
    for row in rows:
        row["speedup"] = round(row["examples_per_s"] / base_speed, 2) if base_speed else ""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.out}\n")
    print(f"held-out loss before training: {start_loss}; {threads} thread(s)\n")
    print("| configuration | budget | autocast | LoRA layers | ex per CPU-s | CPU-s/ex | speed-up | rounds (CPU s) | "
          "train loss (last round) | held-out loss |")
    print("|---|---|---|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['budget']} | {r['autocast']} | {r['lora_layers']} | {r['examples_per_s']} | "
              f"{r['s_per_example']} | {r['speedup']}x | {r['round_seconds']} | {r['train_loss_last_round']} | "
              f"{r['valid_loss']} |")


if __name__ == "__main__":
    main()
