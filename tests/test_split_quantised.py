"""Split + 8/4-bit: a quantised service body passes the client's weight-probe check (issue 22, item 3).

bitsandbytes stores the middle layers' weights as int8 (8-bit) or packed uint8 (4-bit); the probe the
service sends must still be comparable with the client's floating-point checkpoint. The repository's
CPU stand-in for bitsandbytes (`fake_quantise`, int8 storage) plays the quantiser here.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from fellrec_flwr.config import from_run_config
from fellrec_flwr.model import parts as model_parts
from fellrec_flwr.model.loading import add_lora
from fellrec_flwr.model.parts import checkpoint_for, load_client_part, load_server_part
from fellrec_flwr.split.plan import SplitError, check_service_probe

sys.path.insert(0, str(Path(__file__).parent))
from test_partial_load import TITLES, fake_quantise, tiny_cfg  # noqa: E402


def fake_packed_4bit(module, quant, device):
    """Like bitsandbytes' Params4bit: two 4-bit values per uint8, a [n/2, 1] tensor."""
    for layer in module.layers:
        for sub in layer.modules():
            if type(sub) is torch.nn.Linear:
                packed = (sub.weight.data.flatten()[::2] * 7 + 8).clamp(0, 15).to(torch.uint8)[:, None]
                sub.weight = torch.nn.Parameter(packed, requires_grad=False)
    module.config.quantization_config = quant
    return module


@pytest.fixture(params=["8bit", "4bit"])
def quantised_body(request, work_dir, monkeypatch):
    quant = types.SimpleNamespace(load_in_8bit=request.param == "8bit", bnb_4bit_compute_dtype=torch.bfloat16)
    monkeypatch.setattr(model_parts, "quantization_config", lambda cfg, device: quant)
    monkeypatch.setattr(model_parts, "quantize_decoder_linears",
                        fake_quantise if request.param == "8bit" else fake_packed_4bit)
    cfg = tiny_cfg(quantization=request.param, dtype="bfloat16")
    body = load_server_part(cfg, checkpoint_for(cfg, TITLES, work_dir), 1, 1)
    assert not body.layers[0].self_attn.q_proj.weight.dtype.is_floating_point  # really quantised
    return body


def test_quantised_service_probe_matches_the_checkpoint(work_dir, quantised_body):
    folder = checkpoint_for(tiny_cfg(), TITLES, work_dir)
    probe = quantised_body.probe()
    assert len(probe) == 4  # q_proj and down_proj of the first and last middle layer
    check_service_probe(folder, probe, "http://svc")  # raised "holds different weights" before
    with pytest.raises(SplitError, match="different weights"):  # and a wrong model is still caught
        check_service_probe(folder, {k: [v + 0.5 for v in vals] for k, vals in probe.items()}, "http://svc")


def test_a_client_attaches_to_a_quantised_service(work_dir, quantised_body, monkeypatch):
    """The whole client path: attach_split reads the service's info (its probe) and splits the model."""
    from server_app.split_service import SplitService

    import fellrec_flwr.split.client as split_client
    from fellrec_flwr.split.client import RemoteBody
    from fellrec_flwr.split.runtime import attach_split, client_lora_settings

    service = SplitService(quantised_body, b"s" * 32)
    monkeypatch.undo()  # the client part in floating point (its own quantisation is not under test)
    fake_client = types.SimpleNamespace(url="http://svc", info=service.info)
    monkeypatch.setattr(split_client, "service_client", lambda *a, **k: fake_client)
    cfg = from_run_config({"split.enabled": True, "split.service-url": "http://svc", "model.tiny-layers": 4,
                           "model.tiny-pretrain-prompts": 0})
    client, _ = load_client_part(tiny_cfg(), TITLES, work_dir, 1, 1)
    rt = types.SimpleNamespace(model=add_lora(client, client_lora_settings(cfg.lora, client.split_plan), seed=1))
    attach_split(rt, cfg, {"partition-id": 0, "num-partitions": 1}, {})
    assert any(isinstance(m, RemoteBody) for m in rt.model.modules())


# ---------------------------------------------------------------- the service's graph cap (issue 22, item 4)


@pytest.fixture
def tiny_service(work_dir):
    from fellrec_flwr.split.engine import ServiceLimits
    from server_app.split_service import SplitService

    body = load_server_part(tiny_cfg(), checkpoint_for(tiny_cfg(), TITLES, work_dir), 1, 1)
    grad_modes = []
    body.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    return SplitService(body, b"s" * 32, ServiceLimits()), grad_modes


def _forward(service, batch, tokens=4):
    from fellrec_flwr.split.wire import decode, encode

    hidden = torch.randn(batch, tokens, service.hidden_size)
    request = encode({"hidden": hidden, "position_ids": torch.arange(tokens)[None].int().expand(batch, -1)},
                     {"keep_graph": "1"})
    out, meta = decode(service.forward("client-0", request))
    assert out["hidden"].shape == hidden.shape
    return meta


def test_a_graph_over_the_cap_is_never_built(tiny_service):
    """It was built, measured, then dropped: a large Forward could run out of GPU memory on the way."""
    service, grad_modes = tiny_service
    assert "activation_id" in _forward(service, 1)  # one example: its graph is measured and kept
    one = next(iter(service._activations.values())).nbytes
    service.limits.activation_cache_bytes = int(1.5 * one)
    grad_modes.clear()
    assert "activation_id" not in _forward(service, 8)  # ~8x the graph: over the cap
    assert grad_modes == [False]  # run without autograd: no graph at all


def test_out_of_memory_while_building_a_graph_answers_without_it(tiny_service, monkeypatch):
    service, _ = tiny_service
    forward = service.body.forward

    def short_of_memory(*args, **kwargs):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(service.body, "forward", short_of_memory)
    assert "activation_id" not in _forward(service, 2)  # answered (a 500 before), the backward will recompute
    assert "activation_id" not in _forward(service, 2)  # and the size is not tried again
