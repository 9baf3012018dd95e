"""Peak memory of the app's own processes with flexible storage, for SmolLM2-135M.

    nice -n 10 python bench/split_app_memory.py                # k = 1, 2, 4; writes the CSV and JSON
    python bench/split_app_memory.py --ks 1 --no-full --out /tmp/m.csv --set train.loss-chunk-mb=0

Every figure is a peak resident set (VmHWM) of a fresh process:

- bare:      `python -c "import torch"`;
- imports:   a process that imports the ClientApp (torch, transformers, peft, pandas, flwr): the
             floor of any client process, before it loads a weight;
- full:      the real ClientApp (`client_app.app`) handling one TRAIN message without split (the
             whole model, LoRA, one local round: 2 steps of 4 prompts), then one EVALUATE message
             (validation loss, catalogue, constrained ranking of its validation users);
- client k:  the same two messages with `split.enabled` (front_k = back_k = k): it loads only its
             part from the checkpoint (`fellrec_flwr.model.parts.load_client_part`) and runs
             through a real service process;
- service k: `python -m server_app.split_service --model <checkpoint>` (only the middle layers),
             peak after serving that client.

The client processes report a peak per phase (the JSON next to the CSV): VmHWM is reset to the
current RSS between phases (/proc/self/clear_refs), so each phase's peak is what it reached with
everything held before it; `rss_after_mb` (anon / file-backed) is what stayed. Phases: the
imports one library at a time, the prepared data, weights + tokenizer + LoRA, the service
connection, then inside the messages tokenising, the autocast choice, each optimiser step, the
validation loss, the catalogue and the ranking. The received LoRA is computed by this (parent)
process, as a real client receives it. `loaded_mb` is the peak up to the service connection,
`train_peak_mb` / `eval_peak_mb` those of the two messages, `peak_mb` the process's peak.

`weights_mb` is what the process holds in parameters (unique tensors with storage; LoRA
excluded); for the service, the middle layers' bytes in the checkpoint. The goal of issue #12 is
client peak <= 1.3 x weights_mb + the bare process (`goal_vs_bare_mb`, `goal_met`); against the
import floor (`goal_vs_imports_mb`) for comparison. The GGUF is de-quantised once to float32
safetensors (the preparation step, in its own process).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _status_mb() -> dict[str, float]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in MB."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in wanted:
            out[key] = int(line.split()[1]) / 1024
    return out


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Phases:
    """Peak RSS of each phase of one process: VmHWM, reset to the current RSS between phases.

    A phase's peak is the highest resident set while it ran (everything held before it included);
    `rss_after_mb` what stayed resident after it. Phases with the same name (the optimiser steps)
    keep their highest peak and a call count. Without a resettable VmHWM every peak is cumulative.
    """

    def __init__(self, name: str = "python + this script") -> None:
        self.stack = [name]
        self.rows: dict[str, dict] = {}
        self.resettable = _reset_hwm()

    def _close(self) -> None:
        st = _status_mb()
        name = self.stack[-1]
        row = self.rows.setdefault(name, {"phase": name, "peak_mb": 0.0, "calls": 0})
        row["peak_mb"] = max(row["peak_mb"], st["VmHWM"])
        row["calls"] += 1
        row.update(rss_after_mb=st["VmRSS"], anon_after_mb=st.get("RssAnon", 0.0), file_after_mb=st.get("RssFile", 0.0))
        _reset_hwm()

    def start(self, name: str) -> None:  # a top-level phase after the current one
        self._close()
        self.stack[-1] = name

    @contextlib.contextmanager
    def sub(self, name: str):
        self._close()
        self.stack.append(f"{self.stack[0]}: {name}")  # nested calls are named after the top-level phase
        try:
            yield
        finally:
            self._close()
            self.stack.pop()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Measure every call of owner.attr as phase `name` (inside the current top-level phase)."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def measured(*args, **kwargs):
            with self.sub(name):
                return original(*args, **kwargs)

        setattr(owner, attr, staticmethod(measured) if isinstance(owner, type) else measured)

    def finish(self) -> list[dict]:
        self._close()
        return [{k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()} for row in self.rows.values()]


def _peak_of(phases: list[dict], until: str | None = None) -> float:
    """Highest phase peak (up to and including the top-level phase `until`)."""
    peak = 0.0
    for row in phases:
        peak = max(peak, row["peak_mb"])
        if until is not None and row["phase"] == until:
            break
    return peak


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _held_weight_mb(model) -> float:
    unique = {id(p): p for n, p in model.named_parameters() if p.device.type != "meta" and "lora_" not in n}
    return sum(p.numel() * p.element_size() for p in unique.values()) / MB


HEAVY = ("ray", "pandas", "pyarrow", "scipy", "sklearn", "matplotlib", "datasets", "accelerate", "torch._dynamo",
         "torchvision", "bitsandbytes")


# --------------------------------------------------------------------------- children


def run_config(kind: str, k: int, url: str, overrides: dict) -> dict:
    run = {**RUN, **overrides}
    if kind == "client":
        run.update({"split.enabled": True, "split.front-k": k, "split.back-k": k, "split.service-url": url})
    return run


def child(kind: str, k: int, url: str, overrides: dict, lora_file: str = "") -> None:
    """Runs in a fresh process; prints one JSON line."""
    if kind == "imports":
        import client_app.app  # noqa: F401

        print(json.dumps({"peak_mb": _status_mb()["VmHWM"],
                          "heavy_modules": [m for m in HEAVY if m in sys.modules]}))
        return
    if kind == "prepare":
        from fellrec_flwr.config import from_run_config
        from fellrec_flwr.model.parts import checkpoint_for
        from fellrec_flwr.paths import default_secret_file
        from fellrec_flwr.runtime import prepare_data
        from fellrec_flwr.split.auth import write_secret

        cfg = from_run_config({**RUN, **overrides})
        data = prepare_data(cfg)
        if not default_secret_file().exists():
            write_secret(default_secret_file())
        print(json.dumps({"checkpoint": str(checkpoint_for(cfg.model, data.titles, data.path)),
                          "secret": str(default_secret_file())}))
        return
    ph = Phases()
    # the ClientApp's imports, one library at a time (each phase adds what the earlier ones did not)
    for name, module in [("import torch", "torch"),
                         ("import transformers (Llama)", "transformers.models.llama.modeling_llama"),
                         ("import peft", "peft"), ("import pandas", "pandas"), ("import flwr", "flwr.clientapp"),
                         ("import client_app.app (rest)", "client_app.app")]:
        ph.start(name)
        importlib.import_module(module)
    ph.start("import (bench helpers)")
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fellrec_flwr.eval.evaluate as evaluate_mod
    import fellrec_flwr.train.trainer as trainer_mod
    from client_app.app import app
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.eval.grounding import Catalogue
    from fellrec_flwr.model.lora_state import state_to_record
    from fellrec_flwr.runtime import get_runtime, prepare_data
    from fellrec_flwr.split.runtime import attach_split

    heavy = [m for m in HEAVY if m in sys.modules]
    run = run_config(kind, k, url, overrides)
    cfg = from_run_config(run)
    ph.start("received LoRA message")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # needed to build a Message
    # the server's initial LoRA, computed by the parent process: a real client receives it
    with np.load(lora_file) as npz:
        received = {name: npz[name] for name in npz.files}
    msg = Message(RecordDict({"arrays": state_to_record(received), "config": ConfigRecord({"server-round": 1})}),
                  message_type=MessageType.TRAIN, dst_node_id=5)
    for owner, attr, name in [(trainer_mod, "encode_examples", "tokenise"),
                              (trainer_mod, "fast_forward", "autocast choice (timed steps)"),
                              (trainer_mod, "optimizer_step", "optimiser step"),
                              (trainer_mod, "eval_loss", "validation loss"),
                              (Catalogue, "build", "catalogue embeddings"),
                              (evaluate_mod, "evaluate_recommender", "ranking (constrained decoding)")]:
        ph.wrap(owner, attr, name)
    with tempfile.TemporaryDirectory() as state_dir:
        node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": state_dir}
        ctx = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run)
        # what the ClientApp's first message builds (it reuses these cached objects), measured apart
        ph.start("data (prepared frames)")
        prepare_data(cfg)
        ph.start("weights + tokenizer + LoRA")
        rt = get_runtime(cfg)
        ph.start("service connection")
        attach_split(rt, cfg, node_config, {})
        ph.start("train message")
        t0 = time.perf_counter()
        reply = app(msg, ctx)
        seconds = time.perf_counter() - t0
        if reply.has_error():
            raise SystemExit(f"ClientApp failed: {reply.error}")
        ph.start("evaluate message")
        ev = Message(RecordDict({"arrays": reply.content["arrays"],
                                 "config": ConfigRecord({"server-round": 1, "split": "valid"})}),
                     message_type=MessageType.EVALUATE, dst_node_id=5)
        t1 = time.perf_counter()
        ev_reply = app(ev, ctx)
        eval_seconds = time.perf_counter() - t1
        if ev_reply.has_error():
            raise SystemExit(f"ClientApp evaluate failed: {ev_reply.error}")
    phases = ph.finish()
    top = [r for r in phases if ": " not in r["phase"]]
    print(json.dumps({"loaded_mb": _peak_of(top, "service connection"),
                      "train_peak_mb": max(r["peak_mb"] for r in phases if r["phase"].startswith("train message")),
                      "eval_peak_mb": max(r["peak_mb"] for r in phases if r["phase"].startswith("evaluate message")),
                      "peak_mb": _peak_of(phases), "weights_mb": _held_weight_mb(rt.model),
                      "train_loss": float(reply.content["metrics"]["train-loss"]),
                      "eval_loss": float(ev_reply.content["metrics"]["eval-loss"]),
                      "seconds": seconds, "eval_seconds": eval_seconds, "hwm_resettable": ph.resettable,
                      "heavy_modules": heavy, "phases": phases}))


def _run_child(kind: str, k: int = 0, url: str = "", overrides: dict | None = None, lora_file: str = "") -> dict:
    sets = [f"--set={key}={json.dumps(value)}" for key, value in (overrides or {}).items()]  # TOML-like values
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--k", str(k), "--url", url,
                          "--lora-file", lora_file, *sets], cwd=ROOT, capture_output=True, text=True)
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


def _lora_file(folder: str, kind: str, k: int, overrides: dict) -> str:
    """The initial LoRA the server sends (computed here, in the parent: not the measured process's work)."""
    import numpy as np

    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.runtime import initial_lora

    path = Path(folder) / f"{kind}-{k}.npz"
    np.savez(path, **initial_lora(from_run_config(run_config(kind, k, "", overrides))))
    return str(path)


def _row(process: str, k: Any, res: dict) -> dict:
    return {"process": process, "k": k, "loaded_mb": res["loaded_mb"], "train_peak_mb": res.get("train_peak_mb", ""),
            "eval_peak_mb": res.get("eval_peak_mb", ""), "peak_mb": res["peak_mb"], "weights_mb": res["weights_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-full", action="store_true", help="skip the full-model ClientApp (quicker)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config entry, as flwr --run-config (e.g. train.loss-chunk-mb=0)")
    ap.add_argument("--child", default="")
    ap.add_argument("--lora-file", default="")
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.child:  # the parent passes JSON values; no import here that the measured child would count
        sets = dict(item.split("=", 1) for item in args.set)
        child(args.child, args.k, args.url, {key: json.loads(value) for key, value in sets.items()}, args.lora_file)
        return
    from flwr.common.config import parse_config_args

    overrides = parse_config_args(args.set) if args.set else {}
    if not GGUF.exists():
        raise SystemExit(f"{GGUF} not found: the benchmark needs SmolLM2-135M from ../shared/models/.")
    prep = _run_child("prepare", overrides=overrides)
    loras = tempfile.TemporaryDirectory()
    bare, imported = _bare(), _run_child("imports")
    imports = imported["peak_mb"]
    rows = [{"process": "bare python+torch", "k": "", "loaded_mb": bare, "peak_mb": bare, "weights_mb": 0.0},
            {"process": "ClientApp imports", "k": "", "loaded_mb": imports, "peak_mb": imports, "weights_mb": 0.0}]
    detail: dict[str, Any] = {"command": "python bench/split_app_memory.py " + " ".join(sys.argv[1:]),
                              "run": {**RUN, **overrides},
                              "bare_python_torch_mb": round(bare, 1), "clientapp_imports_mb": round(imports, 1),
                              "clientapp_heavy_modules": imported["heavy_modules"], "processes": []}
    if not args.no_full:
        full = _run_child("full", overrides=overrides, lora_file=_lora_file(loras.name, "full", 0, overrides))
        rows.append(_row("full-model ClientApp", "", full))
        detail["processes"].append({"process": "full-model ClientApp", "k": None, **full})
    for k in [int(x) for x in args.ks.split(",")]:
        proc, url = _service(prep["checkpoint"], prep["secret"], k)
        service_loaded = _hwm_mb(proc.pid)
        try:
            client = _run_child("client", k, url, overrides, _lora_file(loras.name, "client", k, overrides))
            service_peak = _hwm_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        rows.append(_row("split ClientApp", k, client))
        service = {"loaded_mb": service_loaded, "peak_mb": service_peak,
                   "weights_mb": _service_weight_mb(prep["checkpoint"], k)}
        rows.append(_row("split service", k, service))
        detail["processes"] += [{"process": "split ClientApp", "k": k, **client},
                                {"process": "split service", "k": k, **service}]
    for row in rows:
        w = row["weights_mb"]
        split_client = row["process"] == "split ClientApp"
        row["goal_vs_bare_mb"] = round(1.3 * w + bare, 1) if split_client else ""
        row["goal_met"] = (row["peak_mb"] <= 1.3 * w + bare) if split_client else ""
        row["goal_vs_imports_mb"] = round(1.3 * w + imports, 1) if split_client else ""
        for key in ("loaded_mb", "train_peak_mb", "eval_peak_mb", "peak_mb", "weights_mb"):
            if isinstance(row.get(key), float):
                row[key] = round(row[key], 1)
        row.setdefault("train_peak_mb", "")
        row.setdefault("eval_peak_mb", "")
    detail["rows"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["process", "k", "loaded_mb", "train_peak_mb", "eval_peak_mb", "peak_mb", "weights_mb",
              "goal_vs_bare_mb", "goal_met", "goal_vs_imports_mb"]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps(detail, indent=1) + "\n")  # the per-phase breakdown
    print("| process | k | peak loaded (MB) | peak train (MB) | peak eval (MB) | peak (MB) | weights held (MB) "
          "| 1.3 x weights + bare | met | 1.3 x weights + imports |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(" | ".join(["", *(str(r[f]) for f in fields), ""]).strip())
    for proc_detail in detail["processes"]:
        for phase in proc_detail.get("phases", []):
            print(f"{proc_detail['process']} k={proc_detail['k']}: {phase['phase']:60s} peak {phase['peak_mb']:7.1f}"
                  f"  after {phase['rss_after_mb']:7.1f} (anon {phase['anon_after_mb']:.0f}, file "
                  f"{phase['file_after_mb']:.0f})  x{phase['calls']}")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
