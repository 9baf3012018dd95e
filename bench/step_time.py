"""Time one LoRA training step (forward + backward + AdamW) of the trainer, on CPU by default.

    python bench/step_time.py --model tiny
    python bench/step_time.py --model ../shared/models/smollm2-135m-instruct --steps 5

The batch is `--batch` sequences of exactly `--tokens` random token ids, every token
labelled (train_on_inputs=True): the cost of a step depends only on these shapes. The step is
fellrec_flwr.train.trainer.optimizer_step, the one train_local runs. A GGUF model is converted
once to safetensors under bench/results/tmp/ (the first run includes that in the load time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fellrec_flwr.config import QUANTIZATIONS, LoraSettings, ModelConfig  # noqa: E402
from fellrec_flwr.model.loading import add_lora, load_base_model  # noqa: E402
from fellrec_flwr.train.trainer import model_device, optimizer_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, a .gguf file/folder, or a local HF folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                    help="bitsandbytes base model (needs --device cuda)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--work-dir", default=str(ROOT / "bench" / "results" / "tmp"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    titles = {i: f"Benchmark Game {i} - Deluxe Edition" for i in range(200)}  # only the tiny tokenizer uses them
    t0 = time.perf_counter()
    base, tokenizer = load_base_model(ModelConfig(name=args.model, dtype=args.dtype, device=args.device,
                                                  quantization=args.quantization),
                                      titles, args.work_dir)
    load_s = time.perf_counter() - t0
    model = add_lora(base, LoraSettings(r=args.r, target_modules=args.targets), seed=0)
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tokenizer), (args.batch, args.tokens), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer_step(model, optimizer, [batch], params, [], 0.0, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    report = {
        "model": args.model, "device": str(device), "dtype": args.dtype, "quantization": args.quantization, "threads": torch.get_num_threads(),
        "batch": args.batch, "tokens": args.tokens, "lora_r": args.r, "targets": args.targets,
        "trainable_params": sum(p.numel() for p in params), "load_s": round(load_s, 2),
        "step_s_median": round(statistics.median(times), 4), "step_s_mean": round(statistics.mean(times), 4),
        "step_s_min": round(min(times), 4), "steps": len(times), "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
