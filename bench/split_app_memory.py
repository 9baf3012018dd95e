"""Peak memory of the app's own processes with flexible storage, for SmolLM2-135M.

    nice -n 10 python bench/split_app_memory.py                # k = 1, 2, 4; writes the CSV
    python bench/split_app_memory.py --ks 1 --out /tmp/m.csv

Every figure is the peak resident set (VmHWM / ru_maxrss) of a fresh process:

- bare:      `python -c "import torch"`;
- imports:   a process that imports the ClientApp (torch, transformers, peft, flwr): the floor
             of any client process, before it loads a weight;
- full:      the real ClientApp (`client_app.app`) handling one TRAIN message without split:
             the whole model, LoRA, one local round (2 steps of 4 prompts);
- client k:  the same ClientApp message with `split.enabled` (front_k = back_k = k): it loads
             only its part from the checkpoint (`model_parts.load_client_part`) and trains
             through a real service process;
- service k: `python -m server_app.split_service --model <checkpoint>` (only the middle layers,
             `split.load_server_body`), peak after serving that client.

`loaded_mb` is the peak once the process has loaded (client: data, its model part, LoRA, the
service connection; service: listening), `peak_mb` the peak after the training round, which
adds the activations (client: logits over SmolLM2's 49k vocabulary for 4 x 128 tokens; service:
the middle layers' autograd graph).

`weights_mb` is what the process holds in parameters (unique tensors with storage; LoRA
excluded) — for the service, the middle layers' bytes in the checkpoint. The goal of issue #12
is client peak <= 1.3 x weights_mb + the bare process; the CSV states both floors so the
comparison can be made against either. The GGUF is de-quantised once to float32 safetensors
(the preparation step, in its own process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread: a shared machine, and comparable runs
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GGUF = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RUN = {  # a small demo run: 2 clients, 8 training prompts each, batches of 4
    "model.name": str(GGUF), "model.device": "cpu", "data.dataset": "demo", "data.num-clients": 2,
    "min-clients": 2, "data.train-samples": 16, "data.valid-users": 8, "data.test-users": 8,
    "data.bpr-epochs": 2, "train.batch-size": 4, "train.max-length": 128,
}
RESULTS = ROOT / "bench" / "results" / "split_app_memory.csv"
MB = 1 << 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _held_weight_mb(model) -> float:
    unique = {id(p): p for n, p in model.named_parameters() if p.device.type != "meta" and "lora_" not in n}
    return sum(p.numel() * p.element_size() for p in unique.values()) / MB


# --------------------------------------------------------------------------- children


def child(kind: str, k: int, url: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    if kind == "imports":
        import client_app.app  # noqa: F401

        print(json.dumps({"peak_mb": _peak_mb()}))
        return
    if kind == "prepare":
        from fellrec_flwr.config import from_run_config
        from fellrec_flwr.model.parts import checkpoint_for
        from fellrec_flwr.paths import default_secret_file
        from fellrec_flwr.runtime import prepare_data
        from fellrec_flwr.split.auth import write_secret

        cfg = from_run_config(RUN)
        data = prepare_data(cfg)
        if not default_secret_file().exists():
            write_secret(default_secret_file())
        print(json.dumps({"checkpoint": str(checkpoint_for(cfg.model, data.titles, data.path)),
                          "secret": str(default_secret_file())}))
        return
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from flwr.supercore.task_identity import TaskIdentity

    from client_app.app import app
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.lora_state import state_to_record
    from fellrec_flwr.runtime import get_runtime, initial_lora
    from fellrec_flwr.split.runtime import attach_split

    run = dict(RUN)
    if kind == "client":
        run.update({"split.enabled": True, "split.front-k": k, "split.back-k": k, "split.service-url": url})
    cfg = from_run_config(run)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # needed to build a Message
    msg = Message(RecordDict({"arrays": state_to_record(initial_lora(cfg)),
                              "config": ConfigRecord({"server-round": 1})}),
                  message_type=MessageType.TRAIN, dst_node_id=5)
    with tempfile.TemporaryDirectory() as state_dir:
        node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": state_dir}
        ctx = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run)
        # what the ClientApp's first message builds (it reuses these cached objects), measured apart
        attach_split(get_runtime(cfg), cfg, node_config, {})
        loaded = _peak_mb()
        t0 = time.perf_counter()
        reply = app(msg, ctx)
        seconds = time.perf_counter() - t0
    if reply.has_error():
        raise SystemExit(f"ClientApp failed: {reply.error}")
    print(json.dumps({"loaded_mb": loaded, "peak_mb": _peak_mb(), "weights_mb": _held_weight_mb(get_runtime(cfg).model),
                      "train_loss": float(reply.content["metrics"]["train-loss"]), "seconds": seconds}))


def _run_child(kind: str, k: int = 0, url: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--k", str(k), "--url", url], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bare() -> float:
    out = subprocess.run([sys.executable, "-c", "import resource, torch; "
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _service(checkpoint: str, secret: str, k: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "server_app.split_service", "--model", checkpoint,
                             "--front-k", str(k), "--back-k", str(k), "--secret-file", secret, "--threads", "1",
                             "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "split service listening on http://127.0.0.1:PORT (...)"
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the split service did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def _service_weight_mb(checkpoint: str, k: int) -> float:
    from fellrec_flwr.split.plan import held_bytes_on_disk, load_config, plan_split

    config = load_config(checkpoint)
    return held_bytes_on_disk(checkpoint, plan_split(config.num_hidden_layers, k, k), "server") / MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", default="")
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.k, args.url)
        return
    if not GGUF.exists():
        raise SystemExit(f"{GGUF} not found: the benchmark needs SmolLM2-135M from ../shared/models/.")
    prep = _run_child("prepare")
    bare, imports = _bare(), _run_child("imports")["peak_mb"]
    rows = [{"process": "bare python+torch", "k": "", "loaded_mb": bare, "peak_mb": bare, "weights_mb": 0.0},
            {"process": "ClientApp imports", "k": "", "loaded_mb": imports, "peak_mb": imports, "weights_mb": 0.0}]
    full = _run_child("full")
    rows.append({"process": "full-model ClientApp", "k": "", "loaded_mb": full["loaded_mb"], "peak_mb": full["peak_mb"],
                 "weights_mb": full["weights_mb"]})
    for k in [int(x) for x in args.ks.split(",")]:
        proc, url = _service(prep["checkpoint"], prep["secret"], k)
        service_loaded = _hwm_mb(proc.pid)
        try:
            client = _run_child("client", k, url)
            service_peak = _hwm_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        rows.append({"process": "split ClientApp", "k": k, "loaded_mb": client["loaded_mb"], "peak_mb": client["peak_mb"],
                     "weights_mb": client["weights_mb"]})
        rows.append({"process": "split service", "k": k, "loaded_mb": service_loaded, "peak_mb": service_peak,
                     "weights_mb": _service_weight_mb(prep["checkpoint"], k)})
    for row in rows:
        w = row["weights_mb"]
        row["goal_vs_bare_mb"] = round(1.3 * w + bare, 1) if row["process"] == "split ClientApp" else ""
        row["goal_vs_imports_mb"] = round(1.3 * w + imports, 1) if row["process"] == "split ClientApp" else ""
        row["loaded_mb"], row["peak_mb"], row["weights_mb"] = round(row["loaded_mb"], 1), round(row["peak_mb"], 1), round(w, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| process | k | peak RSS loaded (MB) | peak RSS after a training round (MB) | weights held (MB) "
          "| 1.3 x weights + bare | 1.3 x weights + imports |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['process']} | {r['k']} | {r['loaded_mb']} | {r['peak_mb']} | {r['weights_mb']} | "
              f"{r['goal_vs_bare_mb']} | {r['goal_vs_imports_mb']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
