"""Wire a client's runtime to the split-inference service (flexible storage, client side).

With `split.enabled`, the client's model holds only the embedding, the first `front_k` and
last `back_k` decoder layers, the final norm, the LM head and its LoRA — read from the
checkpoint by `fellrec_flwr.model.parts.load_client_part`, the middle layers never loaded; a proxy that
calls the service (`fellrec_flwr.split.client`) takes their place. Training, the validation
loss, generation and the grounding catalogue then run unchanged through the split.

Credentials: in a deployment each SuperNode has a token file from the server operator
(`split-token-file` in its node config). In a local simulation the clients run on the same
machine as the service and derive their tokens from its secret file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

from fellrec_flwr.config import ConfigError, FellRecConfig, LoraSettings

if TYPE_CHECKING:
    from fellrec_flwr.split.plan import SplitPlan


def client_lora_settings(lora: LoraSettings, plan: SplitPlan | None) -> LoraSettings:
    """LoRA restricted to the client-held layers of `plan` (None: no split, `lora` as it is): the
    server's middle layers stay frozen and shared."""
    if plan is None:
        return lora
    held = plan.client_layers
    wanted = lora.layer_list()
    if wanted is None:
        return replace(lora, layers=",".join(str(i) for i in held))
    outside = sorted(set(wanted) - set(held))
    if outside:
        raise ConfigError(f"lora.layers includes {outside}, which the split service runs (the client holds "
                          f"{held}); LoRA must live on client-held layers.")
    return lora


def attach_split(rt: Any, cfg: FellRecConfig, node_config: Mapping[str, Any], message_config: Mapping[str, Any]) -> None:
    """Route `rt.model`'s middle layers through the service, as this node's client (no-op without split)."""
    if not cfg.split.enabled:
        return
    from fellrec_flwr.train.client_state import node_settings
    from fellrec_flwr.split.plan import _causal_lm, check_service_probe, loaded_plan
    from fellrec_flwr.split.client import RemoteBody, make_split_model, service_client

    url = cfg.split.service_url or str(message_config.get("split-url", ""))
    if not url:
        raise ConfigError("split.enabled but no split service URL: set split.service-url, or let the ServerApp "
                          "start one (it then sends its URL with every message).")
    node = node_settings(node_config)
    if node.split_token_file:
        client = service_client(url, node.split_key(), token=node.split_token(), ca_file=node.split_ca_file or None)
    else:  # local simulation: the service's secret is on this machine
        from fellrec_flwr.paths import default_secret_file

        client = service_client(url, node.split_key(), secret_file=default_secret_file())
    from fellrec_flwr.seeding import derive_seed
    from fellrec_flwr.split.defence import WireDefence

    # each client its own noise stream, reproducible from the run's seed
    defence = WireDefence.from_settings(cfg.split, derive_seed(cfg.seed, "split-defence", node.split_key()))
    if cfg.split.defence == "nopeek":  # a loss term, not a change to what is sent: hooks on the client's model
        from fellrec_flwr.split.nopeek import NoPeek

        if rt.nopeek is not None:
            rt.nopeek.detach()
        seed = derive_seed(cfg.seed, "split-nopeek", node.split_key())
        rt.nopeek = NoPeek(cfg.split.nopeek_alpha, seed).attach(rt.model, cfg.split.front_k)
    body = next((m for m in rt.model.modules() if isinstance(m, RemoteBody)), None)
    if body is not None:  # one simulation process serves many clients: switch identity
        body.client, body.defence = client, defence
        return
    # a client-only model cannot compare the service's weight probe with its own layers: read the
    # probed tensors' first values from the checkpoint instead
    checkpoint = getattr(_causal_lm(rt.model), "split_checkpoint", None)
    if checkpoint:
        check_service_probe(checkpoint, client.info().get("probe", {}), url)
    # the catalogue (grounding) is embedded later, through the split: this process holds no middle layer
    make_split_model(rt.model, loaded_plan(rt.model), client, wire=cfg.split.wire_dtype, defence=defence)
