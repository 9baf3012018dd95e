"""GPU memory per client and for the split service, ESTIMATED from the model's shapes (docs/gpu.md).

    python bench/gpu_memory.py                 # SmolLM2-135M and LLaMA-7B, bf16/fp16, 8-bit, 4-bit, k = 1, 2, 4
    python bench/gpu_memory.py --config path/to/config.json --name mine

Nothing is loaded or measured: every figure is arithmetic on the shapes below (or a config.json),
stated as an estimate until bench/gpu_check.sh measures it on a GPU. What is counted:

- weights: decoder linears at 2 bytes (bf16/fp16), 1 byte + one float32 scale per output row
  (8-bit, LLM.int8), 0.5 byte + one float32 absmax per 64 values (4-bit NF4, no double
  quantisation); embedding, LM head and norms stay in the 16-bit compute dtype;
- LoRA (the paper's: r 8 on q_proj, v_proj) at 16 bytes a parameter: float32 weight, gradient and
  two Adam moments;
- training activations of one micro-batch: 34 * batch * tokens * hidden bytes per decoder layer at
  16 bits (Korthikanti et al. 2022, "Reducing activation recomputation", without the attention-score
  term that SDPA's fused kernels never store): an upper estimate for LoRA, whose frozen linears
  need not keep their inputs. A split client checkpoints its layers (train.checkpoint-layers=split):
  each keeps its 16-bit input, plus one layer's activations while it is recomputed;
- evaluation KV cache of one batch: eval.batch-size users x eval.num-beams beams x (prompt + new
  tokens), keys and values of every held layer, 16 bits (beam-l2 generation, the paper's);
- the split service: the middle layers' weights, its kept-graph cap (2 GiB, ServiceLimits) and the
  KV sessions of the clients' evaluation batches, at most its session cap (2 GiB); a client whose
  batch needs more than the per-client quota (512 MiB) is refused (413) and listed below the table;
- a CUDA context and allocator slack per process: 0.5 GB (typical for an H100; an assumption).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
CONTEXT_BYTES = 0.5 * GB  # CUDA context + allocator slack per process (assumption)
SERVICE_GRAPH_CAP = 2 << 30  # ServiceLimits.activation_cache_bytes
SERVICE_SESSION_CAP = 2 << 30  # ServiceLimits.session_cache_bytes
SERVICE_CLIENT_QUOTA = 512 << 20  # ServiceLimits.session_bytes_per_client


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_linear_params(self) -> int:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate  # q, o; k, v; gate, up, down

    def layer_linear_rows(self) -> int:
        return 2 * self.hidden + 2 * self.kv_dim + 2 * self.intermediate + self.hidden  # output rows

    def outside_params(self) -> int:
        """Embedding, LM head (unless tied) and final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def total_params(self) -> int:
        return self.layers * (self.layer_linear_params() + 2 * self.hidden) + self.outside_params()


# from the models' published config.json files
SMOLLM2_135M = Shape("SmolLM2-135M", hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152,
                     tied=True)
LLAMA_7B = Shape("LLaMA-7B", hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
                 tied=False)


@dataclass(frozen=True)
class Workload:
    micro_batch: int = 4  # train.batch-size (effective 64 = 4 x train.grad-accum 16)
    tokens: int = 256  # train.max-length
    lora_r: int = 8
    lora_modules: tuple[str, ...] = ("q_proj", "v_proj")
    eval_batch: int = 16  # eval.batch-size
    beams: int = 4  # eval.num-beams
    eval_tokens: int = 256 + 32  # prompt + eval.max-new-tokens


def layer_weight_bytes(shape: Shape, precision: str) -> float:
    linear = shape.layer_linear_params()
    if precision in ("bf16", "fp16"):
        w = 2.0 * linear
    elif precision == "8bit":
        w = 1.0 * linear + 4.0 * shape.layer_linear_rows()
    elif precision == "4bit":
        w = 0.5 * linear + 4.0 * linear / 64
    else:
        raise ValueError(f"precision {precision!r}: bf16, fp16, 8bit or 4bit")
    return w + 2.0 * 2 * shape.hidden  # two RMSNorm weights, 16-bit


def lora_params_per_layer(shape: Shape, work: Workload) -> int:
    out_dims = {"q_proj": shape.hidden, "k_proj": shape.kv_dim, "v_proj": shape.kv_dim, "o_proj": shape.hidden}
    return sum(work.lora_r * (shape.hidden + out_dims[m]) for m in work.lora_modules)


def activation_bytes(shape: Shape, work: Workload, layers: int, checkpointed: bool) -> float:
    per_layer = 34.0 * work.micro_batch * work.tokens * shape.hidden
    if not checkpointed:
        return layers * per_layer
    return layers * 2.0 * work.micro_batch * work.tokens * shape.hidden + per_layer


def kv_bytes(shape: Shape, work: Workload, layers: int) -> float:
    return 2.0 * 2 * layers * work.eval_batch * work.beams * work.eval_tokens * shape.kv_dim


def client_bytes(shape: Shape, precision: str, work: Workload, k: int | None) -> dict[str, float]:
    """One client process: `k` None = the whole model; else a split client holding 2k layers."""
    held = shape.layers if k is None else 2 * k
    parts = {
        "weights": held * layer_weight_bytes(shape, precision) + 2.0 * shape.outside_params(),
        "lora+adam": 16.0 * held * lora_params_per_layer(shape, work),
        "activations": activation_bytes(shape, work, held, checkpointed=k is not None),
        "eval kv": kv_bytes(shape, work, held),
        "context": CONTEXT_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def service_bytes(shape: Shape, precision: str, work: Workload, k: int, clients: int) -> dict[str, float]:
    middle = shape.layers - 2 * k
    parts = {
        "weights": middle * layer_weight_bytes(shape, precision),
        "graph cap": float(SERVICE_GRAPH_CAP),
        "eval kv": min(clients * kv_bytes(shape, work, middle), float(SERVICE_SESSION_CAP)),
        "context": CONTEXT_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def table(shapes: list[Shape], precisions: list[str], ks: list[int], clients: int, work: Workload) -> list[str]:
    rows = [f"| model | weights | client, unsplit | " + " | ".join(f"client, k={k} | service, k={k}" for k in ks) + " |",
            "|---|---|---|" + "---|---|" * len(ks)]
    for shape in shapes:
        for precision in precisions:
            cells = [shape.name, precision, f"{client_bytes(shape, precision, work, None)['total'] / GB:.1f}"]
            for k in ks:
                if 2 * k >= shape.layers:
                    cells += ["-", "-"]
                    continue
                cells.append(f"{client_bytes(shape, precision, work, k)['total'] / GB:.1f}")
                cells.append(f"{service_bytes(shape, precision, work, k, clients)['total'] / GB:.1f}")
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def shape_from_config(path: Path, name: str) -> Shape:
    c = json.loads(path.read_text())
    return Shape(name, c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"],
                 c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"],
                 bool(c.get("tie_word_embeddings", False)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, help="a model's config.json instead of the two built-in shapes")
    ap.add_argument("--name", default="model")
    ap.add_argument("--clients", type=int, default=5, help="clients whose evaluation KV the service holds at once")
    ap.add_argument("--micro-batch", type=int, default=Workload.micro_batch)
    ap.add_argument("--tokens", type=int, default=Workload.tokens)
    args = ap.parse_args(argv)
    shapes = [shape_from_config(args.config, args.name)] if args.config else [SMOLLM2_135M, LLAMA_7B]
    work = Workload(micro_batch=args.micro_batch, tokens=args.tokens)
    print(f"ESTIMATES in GB (1e9 bytes) from the shapes, not measurements; micro-batch {work.micro_batch} x "
          f"{work.tokens} tokens, LoRA r{work.lora_r} on {', '.join(work.lora_modules)}, eval {work.eval_batch} users x "
          f"{work.beams} beams, service KV for {args.clients} clients")
    for shape in shapes:
        print(f"{shape.name}: {shape.total_params() / 1e9:.3f} B parameters")
    print("\n".join(table(shapes, ["bf16", "8bit", "4bit"], [1, 2, 4], args.clients, work)))
    for shape in shapes:
        for k in (1, 2, 4):
            need = kv_bytes(shape, work, shape.layers - 2 * k)
            if 2 * k < shape.layers and need > SERVICE_CLIENT_QUOTA:
                per_user = need / work.eval_batch
                fits = int(SERVICE_CLIENT_QUOTA // per_user)
                advice = (f"at most {fits} user(s) per batch (eval.batch-size)" if fits else
                          f"even one user ({per_user / GB:.2f} GB) does not fit")
                print(f"{shape.name}, k={k}: one client's evaluation batch needs {need / GB:.1f} GB of service KV "
                      f"> the per-client quota {SERVICE_CLIENT_QUOTA / GB:.2f} GB: {advice}; the service's session "
                      "limits must grow (ServiceLimits: session_bytes_per_client, session_cache_bytes)")


if __name__ == "__main__":
    main()
