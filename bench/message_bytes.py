"""Bytes a client sends per round vs the raw LoRA bytes (goal: framing <= 5 %).

    python bench/message_bytes.py

Builds the train reply a ClientApp sends (LoRA ArrayRecord + metrics) for LoRA shapes of the
tiny model, SmolLM2-135M and LLaMA-7B (r=8 on q/v), serialises it with Flower's own protobuf
serde (what goes over the transport; chunking into 5 MB ArrayChunks adds a few bytes per
chunk), and reports the overhead. Writes bench/results/message_bytes.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

# (layers, hidden, q/v output sizes) with LoRA r=8 on q_proj and v_proj
MODELS = {
    "tiny (64 hidden, 4 layers)": (4, 64, 64, 64),
    "SmolLM2-135M (576, 30 layers)": (30, 576, 576, 192),
    "LLaMA-7B (4096, 32 layers)": (32, 4096, 4096, 4096),
}
R = 8


def lora_record(layers: int, hidden: int, q_out: int, v_out: int) -> ArrayRecord:
    arrays = {}
    for i in range(layers):
        for name, out in (("q_proj", q_out), ("v_proj", v_out)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            arrays[f"{prefix}.lora_A.weight"] = Array(np.zeros((R, hidden), np.float32))
            arrays[f"{prefix}.lora_B.weight"] = Array(np.zeros((out, R), np.float32))
    return ArrayRecord(arrays)


def main() -> None:
    rows = []
    for name, shape in MODELS.items():
        record = lora_record(*shape)
        raw = sum(a.numpy().nbytes for a in record.values())
        reply = RecordDict({"arrays": record, "metrics": MetricRecord(
            {"train-loss": 1.0, "num-examples": 200, "client-key": 3})})
        wire = len(recorddict_to_proto(reply).SerializeToString())
        rows.append({"model": name, "lora_params": raw // 4, "lora_bytes": raw, "message_bytes": wire,
                     "overhead_pct": round(100 * (wire - raw) / raw, 3)})
        print(f"{name:32s} LoRA {raw / 1e6:8.3f} MB  message {wire / 1e6:8.3f} MB  overhead {rows[-1]['overhead_pct']:.3f} %")
    out = Path(__file__).parent / "results" / "message_bytes.csv"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
