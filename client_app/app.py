"""The FELLRec ClientApp: local LoRA training and evaluation on one client's private data.

A client is identified by its partition id (`partition-id` in the node config, set by the
simulation or by `flower-supernode --node-config`). It sends back that id as
`client-key`, the stable identity the strategies key their per-client state by.
Interaction data never leaves this function: only LoRA weights and scalar metrics do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fellrec_flwr.train.client_state import ClientStateStore, adapter_fingerprint, apply_node_settings, node_settings
from fellrec_flwr.config import FellRecConfig, from_run_config, refuse_relative_paths
from fellrec_flwr.model import memory
from fellrec_flwr.model.lora_state import get_lora_state, record_to_state, state_to_record, set_lora_state
from fellrec_flwr.data.prepared import with_prepared_settings
from fellrec_flwr.runtime import derive_seed, get_runtime
from fellrec_flwr.split.runtime import attach_split


def return_memory(msg: Message, context: Context, call_next) -> Message:
    """Every message: freed tensors go back to the system, none stays resident between messages
    (a client's peak is then what it holds plus one step's temporaries; fellrec_flwr/model/memory.py)."""
    memory.return_freed_memory()
    try:
        return call_next(msg, context)
    finally:
        memory.trim()
        memory.release_gpu_cache()  # the GPU's share too: clients on one GPU (num-gpus < 1) need it


memory.return_freed_memory()  # this process's loading (data, weights) too, not only the messages
app = ClientApp(mods=[return_memory])


def client_key(context: Context) -> int:
    return node_settings(context.node_config).partition_id  # raises naming the fix if absent


def client_config(context: Context) -> FellRecConfig:
    """The run config, with this node's own data folder (node config `data-path`) if it has one."""
    cfg = apply_node_settings(refuse_relative_paths(from_run_config(context.run_config)),
                              node_settings(context.node_config))
    return with_prepared_settings(cfg)  # data settings of an already prepared folder


@contextlib.contextmanager
def lora_a_frozen(model, freeze: bool) -> Iterator[None]:
    """Keep every lora_A weight out of training while inside (the runtime's model is reused: restore after)."""
    frozen = [p for name, p in model.named_parameters() if freeze and "lora_A" in name and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the strategy who this node is (node ids change when a SuperNode restarts)."""
    return Message(RecordDict({"metrics": MetricRecord({"client-key": client_key(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from fellrec_flwr.heads import train_head
    from fellrec_flwr.train.trainer import checkpoint_layers_wanted, checkpointed_layers

    cfg = client_config(context)
    key = client_key(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 1))
    received = record_to_state(msg.content["arrays"])
    # Counters and adapter on the client's own disk: they survive a SuperNode restart.
    store = ClientStateStore(node_settings(context.node_config, context.run_id).state_dir, key)
    store.begin_training(context.run_id, server_round, context.node_id, received)
    rt = get_runtime(cfg)
    attach_split(rt, cfg, context.node_config, config)
    set_lora_state(rt.model, received)
    device = next(rt.model.parameters()).device
    on_gpu = device.type == "cuda"
    if on_gpu:  # per-client peak GPU memory, for sharing one GPU between simulated clients
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    checkpointed = checkpoint_layers_wanted(cfg.train.checkpoint_layers, cfg.split.enabled)
    with lora_a_frozen(rt.model, bool(config.get("freeze-lora-a", False))), \
            checkpointed_layers(rt.model, checkpointed):  # FFA-LoRA; a split client's memory bound
        result = train_head(cfg, rt, key, seed=derive_seed(cfg.seed, server_round, key),
                            proximal_mu=float(config.get("proximal-mu", 0.0)),
                            lr_scale=float(config.get("lr-scale", 1.0)))
    trained = get_lora_state(rt.model)
    store.finish_training(trained, float(result.loss), adapter_fingerprint(cfg))
    metrics = MetricRecord({"train-loss": float(result.loss), "num-examples": int(result.num_examples), "client-key": key,
                            "train-seconds": time.time() - t0})
    if on_gpu:  # peak and held GPU memory of this actor (reserved, as the GPU's other clients see it)
        metrics.update(memory.gpu_memory_mb(device))
    return Message(RecordDict({"arrays": state_to_record(trained), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fellrec_flwr.eval.results import flat_top_items
    from fellrec_flwr.heads import evaluate_head

    cfg = client_config(context)
    key = client_key(context)
    rt = get_runtime(cfg)
    attach_split(rt, cfg, context.node_config, msg.content["config"])
    split = str(msg.content["config"].get("split", "valid"))
    set_lora_state(rt.model, record_to_state(msg.content["arrays"]))
    examples = rt.data.split(split, client=key)
    loss, scores, rows = evaluate_head(cfg, rt, examples)
    metrics = {"eval-loss": float(loss), "num-examples": len(examples), "client-key": key}
    metrics.update({k: float(v) for k, v in scores.items() if k.startswith(("recall@", "ndcg@", "valid-title"))})
    # Each evaluated user's target rank (-1 = not in the top 20), for paired bootstrap intervals on the
    # server, with the target and the top 10 (flat, 10 per user, -1 = empty) for per_user.csv.
    per_user = ConfigRecord({"user-ids": [int(r["user_id"]) for r in rows],
                             "target-ranks": [int(r["target_rank"]) for r in rows],
                             "targets": [int(r["target"]) for r in rows],
                             "top10": flat_top_items(r["top10"] for r in rows)})
    return Message(RecordDict({"metrics": MetricRecord(metrics), "per-user": per_user}), reply_to=msg)

