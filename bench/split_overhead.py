"""Training-step time through the split service on loopback vs the same step on the whole local model.

    python bench/split_overhead.py                       # tiny and SmolLM2-135M (GGUF from ../shared)
    python bench/split_overhead.py --models tiny --steps 10

One step = forward + backward + AdamW on a batch of `--batch` x `--seq` random tokens (left
padding, labels on every real token), LoRA r=8 on q_proj/v_proj of the client-held layers (the
same adapters in both runs, so the work is identical). The split client is loaded from the
safetensors checkpoint with only its own tensors; the service runs as its own process
(`python -m server_app.split_service`) on 127.0.0.1 with the same number of torch threads.
Local and split steps alternate so that load from other processes hits both alike; medians are
reported. Service modes: `cached` (the service keeps the forward graph for the matching backward)
and `recompute` (Petals-style stateless backward: the middle forward runs again).

Columns of bench/results/split_overhead.csv: model, service (process|thread), threads,
omp_wait_policy (the OMP_WAIT_POLICY environment variable of both processes), mode, wire, batch, seq, steps, local_s,
split_s, ratio, bytes_per_step, requests_per_step, service_compute_s, client_wait_s, transport_s
(= client_wait - service_compute: serialisation + gRPC + copies), client_compute_s
(= split_s - client_wait_s).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/split_overhead.py` from the repository root
    sys.path.insert(0, str(ROOT))

from fellrec_flwr.atomic import atomic_write_text  # noqa: E402
from fellrec_flwr.split.plan import default_work_dir  # noqa: E402

SHARED = Path(os.environ.get("FELLREC_SHARED", ROOT.parent / "shared"))
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"
RESULTS = ROOT / "bench" / "results"
SECRET = b"bench-secret-not-for-production-0123"
KEY = "bench-client"
MODES = {"cached": [], "recompute": ["--activation-cache-mb", "0"]}


# -- shared with bench/split_resources.py ---------------------------------------------------


def model_folder(name: str, work_dir: Path) -> Path:
    """A safetensors folder for 'tiny' (built with the default ModelConfig and saved once) or
    'smollm' (the GGUF converted once, the same copy model.load_base_model uses)."""
    from fellrec_flwr.model.loading import resolve_checkpoint
    from fellrec_flwr.split.plan import save_full_model

    if name == "tiny":
        out = work_dir / "split-models" / "tiny-bench"
        if not (out / "config.json").exists():
            from fellrec_flwr.config import ModelConfig
            from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer

            titles = [f"Game {i} Deluxe Edition" for i in range(300)] + ["Super Mario Odyssey", "Halo 3"]
            d = ModelConfig()
            tok = train_tokenizer(titles, d.tiny_vocab, work_dir / "split-models" / "tiny-bench-tokenizer")
            save_full_model(build_tiny_model(tok, d.tiny_hidden, d.tiny_layers, d.tiny_heads), out, tok)
        return out
    if name == "smollm":
        if not any(SMOLLM_DIR.glob("*.gguf")):
            raise SystemExit(f"needs the SmolLM2 GGUF under {SMOLLM_DIR} (../shared is absent?)")
        return resolve_checkpoint(SMOLLM_DIR, work_dir)
    return resolve_checkpoint(name, work_dir)


@contextmanager
def service_process(folder: Path, front_k: int, back_k: int, threads: int,
                    extra: list[str] | tuple[str, ...] = ()) -> Iterator[str]:
    """`python -m server_app.split_service` on loopback in its own process; yields its URL."""
    from fellrec_flwr.split.auth import write_secret

    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret.txt"
        write_secret(secret_file, SECRET)
        cmd = [sys.executable, "-m", "server_app.split_service", "--model", str(folder), "--front-k", str(front_k),
               "--back-k", str(back_k), "--port", "0", "--secret-file", str(secret_file), "--threads", str(threads),
               "--log-level", "WARNING", *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"the split service did not start: {line!r}")
            yield line.split("listening on ")[1].split()[0]
        finally:
            proc.terminate()
            proc.wait(30)


def service_client(url: str) -> Any:
    from fellrec_flwr.split.auth import issue_token
    from fellrec_flwr.split.client import SplitServiceClient

    return SplitServiceClient(url, KEY, issue_token(SECRET, KEY))


def add_lora(model: Any, layers: list[int], r: int = 8) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def make_batch(vocab: int, batch: int, seq: int, pad_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens left-padded to `seq` (real lengths 3/4 seq .. seq); labels -100 on padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        pad = int(torch.randint(0, seq // 4 + 1, (1,), generator=gen))
        ids[row, :pad], mask[row, :pad] = pad_id, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    opt.step()
    return float(loss)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# -- the benchmark -----------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import LlamaForCausalLM

    from fellrec_flwr.split.plan import load_client_model, load_config, plan_split
    from fellrec_flwr.split.client import make_split_model

    folder = model_folder(name, Path(args.work_dir))
    config = load_config(folder)
    plan = plan_split(config.num_hidden_layers, args.front_k, args.back_k)
    batch = make_batch(config.vocab_size, args.batch, args.seq, int(config.pad_token_id or 0))
    local = add_lora(LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32), plan.client_layers)
    local_opt = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for mode, wire in [(m, w) for m in args.modes.split(",") for w in args.wires.split(",")]:
        with _service(folder, plan, args, mode) as url:
            client = service_client(url)
            split = make_split_model(add_lora(load_client_model(folder, plan.front_k, plan.back_k),
                                              plan.client_layers), plan, client, wire=wire)
            opt = torch.optim.AdamW([p for p in split.parameters() if p.requires_grad], lr=1e-4)
            for _ in range(args.warmup):
                train_step(local, local_opt, batch), train_step(split, opt, batch)
            t_local, t_split = [], []
            before, server_before = dict(client.stats), client.info(refresh=True)["stats"]
            for _ in tqdm(range(args.steps), desc=f"{name} {mode} {wire}", unit="step"):
                start = time.perf_counter()
                train_step(local, local_opt, batch)
                t_local.append(time.perf_counter() - start)
                start = time.perf_counter()
                train_step(split, opt, batch)
                t_split.append(time.perf_counter() - start)
            server_after = client.info(refresh=True)["stats"]
            after = client.stats
            n = args.steps
            per = lambda k: (after[k] - before[k]) / n  # noqa: E731
            wait = per("wait_s") - 0.0
            compute = (server_after["compute_s"] - server_before["compute_s"]) / n
            local_s, split_s = statistics.median(t_local), statistics.median(t_split)
            rows.append({
                "model": name, "service": "thread" if args.in_process else "process", "threads": args.threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                "mode": mode, "wire": wire, "batch": args.batch, "seq": args.seq, "steps": n,
                "local_s": round(local_s, 4), "split_s": round(split_s, 4), "ratio": round(split_s / local_s, 3),
                "bytes_per_step": int(per("bytes_sent") + per("bytes_received")),
                "requests_per_step": round(per("requests") - 1 / n, 2),  # minus the info() call
                "service_compute_s": round(compute, 4), "client_wait_s": round(wait, 4),
                "transport_s": round(wait - compute, 4), "client_compute_s": round(statistics.mean(t_split) - wait, 4),
            })
            print(rows[-1], flush=True)
            client.close()
    return rows


@contextmanager
def _service(folder: Path, plan: Any, args: argparse.Namespace, mode: str) -> Iterator[str]:
    """The service in its own process (default), or in a thread of this one (--in-process: no
    scheduling differences between two processes, so only the protocol's own cost remains)."""
    if not args.in_process:
        with service_process(folder, plan.front_k, plan.back_k, args.threads, MODES[mode]) as url:
            yield url
        return
    from server_app.split_service import ServiceLimits, start_service

    limits = ServiceLimits(activation_cache_bytes=0) if mode == "recompute" else ServiceLimits()
    handle = start_service(str(folder), SECRET, plan.front_k, plan.back_k, limits=limits)
    try:
        yield handle.url
    finally:
        handle.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm", help="comma list: tiny, smollm, or a checkpoint path")
    ap.add_argument("--modes", default="cached,recompute")
    ap.add_argument("--wires", default="float32", help="comma list of float32, float16, bfloat16")
    ap.add_argument("--front-k", type=int, default=1)
    ap.add_argument("--back-k", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the client and of the service")
    ap.add_argument("--in-process", action="store_true", help="run the service in a thread of this process")
    ap.add_argument("--work-dir", default=str(default_work_dir()), help="where converted models are kept")
    ap.add_argument("--out", default=str(RESULTS / "split_overhead.csv"))
    ap.add_argument("--append", action="store_true", help="add rows to an existing CSV")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args)
    out = Path(args.out)
    if args.append and out.exists():
        with open(out, newline="") as fh:
            rows = list(csv.DictReader(fh)) + rows
    write_csv(out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
