"""What a split client holds and costs: parameters, bytes on disk, peak memory of a training step,
bytes on the wire per step — measured for tiny and SmolLM2-135M, by arithmetic for LLaMA-7B.

    python bench/split_resources.py                 # tiny + smollm, cut (1, 1); writes the CSV
    python bench/split_resources.py --models tiny --cuts 1:1,2:2

Peak memory is the peak resident set (ru_maxrss) of a fresh subprocess that loads the model
(the whole model locally, or only the client's tensors for the split), adds LoRA r=8 on
q_proj/v_proj of the client layers and runs one training step (batch 4 x 128 tokens); the
`above_import` columns subtract the peak reached after importing torch/transformers/peft.
The split subprocess trains against a service process on loopback. `held` is the resident
set after the step minus the resident set after the imports (what the model, LoRA, optimiser
state and retained buffers hold); the import peak can hide the peak of small clients.

LLaMA-7B (hidden 4096, 32 layers, vocab 32000, untied head) is counted on the meta device;
its bytes assume fp16 weights; wire bytes per step = 5 hidden-state tensors (forward: out
and back; backward: input again, gradient, gradient back) + mask and positions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fellrec_flwr.split.plan import default_work_dir  # noqa: E402
from split_overhead import (  # noqa: E402
    RESULTS, add_lora, make_batch, model_folder, service_client, service_process, train_step, write_csv,
)

MB = 1 << 20


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _rss_kb() -> int:
    """Current resident set (KiB). Unlike the peak it is not hidden by transient import spikes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(kind: str, folder: str, front_k: int, back_k: int, url: str, batch: int, seq: int) -> None:
    """Runs in a fresh process: load, one training step, print memory figures as JSON."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401 — part of the import baseline
    import peft  # noqa: F401 — part of the import baseline

    from fellrec_flwr.split.plan import load_client_model, load_config, plan_split
    from fellrec_flwr.split.client import make_split_model

    torch.set_num_threads(2)
    base, base_rss = _peak_kb(), _rss_kb()
    config = load_config(folder)
    plan = plan_split(config.num_hidden_layers, front_k, back_k)
    client = None
    if kind == "local":
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = load_client_model(folder, front_k, back_k)
    model = add_lora(model, plan.client_layers)
    if kind == "split":
        client = service_client(url)
        model = make_split_model(model, plan, client)
    loaded = _peak_kb()
    sent_before = client.stats["bytes_sent"] + client.stats["bytes_received"] if client else 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = make_batch(config.vocab_size, batch, seq, int(config.pad_token_id or 0))
    train_step(model, opt, data)
    print(json.dumps({"import_kb": base, "loaded_kb": loaded, "peak_kb": _peak_kb(),
                      "held_kb": _rss_kb() - base_rss,
                      "wire_bytes": (client.stats["bytes_sent"] + client.stats["bytes_received"]
                                     - sent_before) if client else 0}))


def _run_child(kind: str, folder: Path, front_k: int, back_k: int, url: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", str(folder), "--cuts",
                          f"{front_k}:{back_k}", "--url", url, "--batch", str(args.batch), "--seq", str(args.seq)],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def meta_counts(config: Any, front_k: int, back_k: int) -> dict[str, int]:
    """Parameter counts of the whole model and of the client part, on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    from fellrec_flwr.split.plan import PassThrough, plan_split

    plan = plan_split(config.num_hidden_layers, front_k, back_k)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unique = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    total = unique(model)
    for i in plan.server_layers:
        model.model.layers[i] = PassThrough()
    return {"total": total, "client": unique(model)}


def wire_bytes(config: Any, batch: int, seq: int, elem: int) -> int:
    hidden = batch * seq * config.hidden_size * elem
    return 5 * hidden + 2 * batch * seq + 2 * seq * 4  # + bool mask and int32 positions, forward and backward


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    from fellrec_flwr.split.plan import held_bytes_on_disk, load_config, plan_split

    rows = []
    for name in [m for m in args.models.split(",") if m]:
        folder = model_folder(name, Path(args.work_dir))
        config = load_config(folder)
        local = None
        for cut in args.cuts.split(","):
            front_k, back_k = map(int, cut.split(":"))
            plan = plan_split(config.num_hidden_layers, front_k, back_k)
            counts = meta_counts(config, front_k, back_k)
            with service_process(folder, front_k, back_k, threads=2) as url:
                split = _run_child("split", folder, front_k, back_k, url, args)
            local = local or _run_child("local", folder, front_k, back_k, "", args)
            rows.append({
                "model": name, "cut": f"{front_k}+{back_k} of {config.num_hidden_layers}", "source": "measured",
                "total_params": counts["total"], "client_params": counts["client"],
                "client_fraction": round(counts["client"] / counts["total"], 4),
                "client_disk_mb": round(held_bytes_on_disk(folder, plan, "client") / MB, 2),
                "server_disk_mb": round(held_bytes_on_disk(folder, plan, "server") / MB, 2),
                "local_peak_mb": round(local["peak_kb"] / 1024, 1),
                "split_peak_mb": round(split["peak_kb"] / 1024, 1),
                "local_above_import_mb": round((local["peak_kb"] - local["import_kb"]) / 1024, 1),
                "split_above_import_mb": round((split["peak_kb"] - split["import_kb"]) / 1024, 1),
                "local_held_mb": round(local["held_kb"] / 1024, 1),
                "split_held_mb": round(split["held_kb"] / 1024, 1),
                "wire_mb_per_step_fp32": round(split["wire_bytes"] / MB, 3),
                "wire_mb_per_step_fp16": round(wire_bytes(config, args.batch, args.seq, 2) / MB, 3),
            })
            print(rows[-1], flush=True)
    for cut in args.cuts.split(","):
        rows.append(llama7b_row(args, *map(int, cut.split(":"))))
        print(rows[-1], flush=True)
    return rows


def llama7b_row(args: argparse.Namespace, front_k: int, back_k: int) -> dict[str, Any]:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    counts = meta_counts(config, front_k, back_k)
    return {
        "model": "llama-7b (arithmetic)", "cut": f"{front_k}+{back_k} of 32", "source": "arithmetic, fp16 weights",
        "total_params": counts["total"], "client_params": counts["client"],
        "client_fraction": round(counts["client"] / counts["total"], 4),
        "client_disk_mb": round(2 * counts["client"] / MB, 1),
        "server_disk_mb": round(2 * (counts["total"] - counts["client"]) / MB, 1),
        "local_peak_mb": "", "split_peak_mb": "", "local_above_import_mb": "", "split_above_import_mb": "",
        "local_held_mb": "", "split_held_mb": "",
        "wire_mb_per_step_fp32": round(wire_bytes(config, args.batch, args.seq, 4) / MB, 3),
        "wire_mb_per_step_fp16": round(wire_bytes(config, args.batch, args.seq, 2) / MB, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm")
    ap.add_argument("--cuts", default="1:1", help="comma list of front:back")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--work-dir", default=str(default_work_dir()), help="where converted models are kept")
    ap.add_argument("--out", default=str(RESULTS / "split_resources.csv"))
    ap.add_argument("--child", choices=["local", "split"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        front_k, back_k = map(int, args.cuts.split(":"))
        return child(args.child, args.folder, front_k, back_k, args.url, args.batch, args.seq)
    rows = bench(args)
    write_csv(Path(args.out), rows)
    print(f"wrote {args.out}")
    if len(args.cuts.split(",")) > 1:
        plot_vs_k(rows, Path(args.out).with_suffix(".png"))


def plot_vs_k(rows: list[dict[str, Any]], path: Path) -> None:
    """Client share of the parameters and peak training memory against the decoder layers the client keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ks = [sum(map(int, r["cut"].split(" ")[0].split("+"))) for r in mine]  # "2+2 of 30" -> 4
        left.plot(ks, [100 * r["client_fraction"] for r in mine], marker="o", label=model)
        if mine[0]["split_held_mb"] != "":
            right.plot(ks, [r["split_held_mb"] for r in mine], marker="o", label=f"{model}: split client")
            right.axhline(mine[0]["local_held_mb"], linestyle="--", color=right.lines[-1].get_color(),
                          label=f"{model}: whole model locally")
    left.set(xlabel="decoder layers on the client (front k + back k)", ylabel="client share of parameters (%)",
             title="What the client holds")
    right.set(xlabel="decoder layers on the client (front k + back k)", ylabel="resident memory after a training step (MB)",
              title="Client memory (measured)")
    left.legend(), right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
