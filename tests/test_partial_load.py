"""Flexible storage in the app: each process holds only its part of the model.

- the client part (embedding, first/last k layers, norm, head) and the service part (middle
  layers) are read from the checkpoint with no other tensor, and equal the full model's;
- the ServerApp's initial LoRA comes from the config + seed and equals a real model + peft;
- the split demo runs in-process with every full-model constructor patched to fail;
- 8/4-bit: compute dtype from the config (fake quantised module on CPU), `cuda:N` honoured.
"""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest
import torch
from torch import nn

from fellrec_flwr.model import parts as model_parts
from fellrec_flwr.config import LoraSettings, ModelConfig
from fellrec_flwr.model.lora_state import get_lora_state
from fellrec_flwr.model.loading import ModelLoadError, add_lora, load_base_model, quantized_device_map
from fellrec_flwr.model.parts import (
    base_config, checkpoint_for, compute_dtype_for, initial_lora_state, load_client_part, load_server_part,
)
from fellrec_flwr.split.plan import ServerBody, compute_dtype_of, plan_split

TITLES = {i: f"{name} {i}" for i, name in enumerate(["Star Quest", "Dragon Tale", "Kart Rally", "Puzzle Box"] * 6)}
LAYERS = 4
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parts")


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(tiny_pretrain_prompts=0, tiny_layers=LAYERS, **kw)


def layer_indices(names) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _LAYER.search(n))}


def test_client_part_holds_only_its_layers_and_equals_the_full_model(work_dir):
    full, _ = load_base_model(tiny_cfg(), TITLES, work_dir)
    client, tok = load_client_part(tiny_cfg(), TITLES, work_dir, 1, 1)
    names = [n for n, _ in client.named_parameters()]
    assert layer_indices(names) == {0, LAYERS - 1}  # no middle-layer parameter at all
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)
    assert not any(t.device.type == "meta" for t in [*client.parameters(), *client.buffers()])
    reference = dict(full.named_parameters())
    for name, value in client.named_parameters():
        assert torch.equal(value, reference[name]), name
    assert tok.padding_side == "left" and tok.pad_token_id is not None


@pytest.mark.parametrize("front_k,back_k", [(1, 1), (1, 2)])
def test_service_part_holds_only_the_middle_layers(work_dir, front_k, back_k):
    body = load_server_part(tiny_cfg(), checkpoint_for(tiny_cfg(), TITLES, work_dir), front_k, back_k)
    names = [n for n, _ in body.named_parameters()]
    plan = plan_split(LAYERS, front_k, back_k)
    assert len(body.layers) == len(plan.server_layers)
    assert names and all(n.startswith("layers.") for n in names)  # no embedding, final norm or head
    full, _ = load_base_model(tiny_cfg(), TITLES, work_dir)
    for i, layer_idx in enumerate(plan.server_layers):  # the same tensors as the full model's middle
        mine = dict(body.layers[i].named_parameters())
        for name, value in full.model.layers[layer_idx].named_parameters():
            assert torch.equal(mine[name], value), (layer_idx, name)


def test_a_client_without_middle_layers_still_checks_the_service_weights(work_dir):
    """The service's probe is compared with the checkpoint (one row read per probed tensor)."""
    from fellrec_flwr.split.plan import SplitError, check_service_probe, checkpoint_probe

    folder = checkpoint_for(tiny_cfg(), TITLES, work_dir)
    probe = load_server_part(tiny_cfg(), folder, 1, 1).probe()
    assert checkpoint_probe(folder, probe) == probe  # float32 checkpoint, float32 service: exact
    check_service_probe(folder, probe, "http://svc")  # same weights: no error
    other = {k: [v + 0.5 for v in values] for k, values in probe.items()}
    with pytest.raises(SplitError, match="different weights"):
        check_service_probe(folder, other, "http://svc")


def test_checkpoint_is_prepared_once(work_dir, monkeypatch):
    folder = checkpoint_for(tiny_cfg(), TITLES, work_dir)
    monkeypatch.setattr(model_parts, "_save_tiny", lambda *a: pytest.fail("prepared twice"))
    assert checkpoint_for(tiny_cfg(), TITLES, work_dir) == folder


def test_a_second_writer_keeps_the_first_checkpoint(work_dir):
    """Client processes on one machine may race to save the tiny model: the winner's folder stays."""
    folder = checkpoint_for(tiny_cfg(), TITLES, work_dir)
    before = (folder / "config.json").stat().st_ino
    model_parts._save_tiny(tiny_cfg(), TITLES, work_dir, folder)  # loses the race: no error, no replacement
    assert (folder / "config.json").stat().st_ino == before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layers", ["0,3", ""])
def test_initial_lora_from_the_config_equals_a_real_model_with_peft(work_dir, dtype, layers):
    """The ServerApp's LoRA init (meta skeleton, no weights) is what every client's real model gets."""
    cfg = tiny_cfg(dtype=dtype)
    lora = LoraSettings(layers=layers)
    base, _ = load_base_model(cfg, TITLES, work_dir)
    real = get_lora_state(add_lora(base, lora, seed=11))
    from_config = initial_lora_state(base_config(cfg, TITLES, work_dir), lora, seed=11,
                                     dtype=model_parts.lora_dtype(cfg))
    assert list(from_config) == list(real)
    for key, value in real.items():
        np.testing.assert_array_equal(from_config[key], value, err_msg=key)
    assert any(np.abs(v).sum() > 0 for v in real.values())  # lora_A is random: equality is not vacuous
    other = initial_lora_state(base_config(cfg, TITLES, work_dir), lora, seed=12, dtype=model_parts.lora_dtype(cfg))
    assert any(not np.array_equal(other[k], real[k]) for k in real)


def test_base_config_without_a_prepared_checkpoint(tmp_path):
    """The LoRA shapes need no weights: the tiny config comes from its tokenizer alone."""
    config = base_config(tiny_cfg(), TITLES, tmp_path)
    assert config.num_hidden_layers == LAYERS and not list(tmp_path.glob("tiny-full-*"))


# ---------------------------------------------------------------------------
# 8/4-bit: compute dtype and device
# ---------------------------------------------------------------------------


class FakeInt8Layer(nn.Module):
    """A decoder layer whose weight is stored as int8 (as under bitsandbytes); records the input dtype."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, hidden, dtype=torch.int8), requires_grad=False)
        self.seen: list[torch.dtype] = []

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                use_cache=False, past_key_values=None, **kwargs):
        self.seen.append(hidden_states.dtype)
        return hidden_states * 2


def fake_quantised_body(compute: torch.dtype) -> ServerBody:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
    config.quantization_config = types.SimpleNamespace(bnb_4bit_compute_dtype=compute)
    return ServerBody(config, plan_split(4, 1, 1), [FakeInt8Layer(16), FakeInt8Layer(16)],
                      LlamaRotaryEmbedding(config=config))


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_service_computes_in_the_configured_dtype_not_the_int8_storage(compute):
    from fellrec_flwr.split.wire import decode, encode
    from server_app.split_service import SplitService

    body = fake_quantised_body(compute)
    assert next(body.parameters()).dtype == torch.int8  # the old rule (first parameter) would say int8
    assert body.compute_dtype == compute_dtype_of(body) == compute
    service = SplitService(body, b"s" * 32)
    assert service.dtype == compute
    hidden = torch.randn(2, 3, 16)
    out, _ = decode(service.forward("client-0", encode({"hidden": hidden, "position_ids": torch.arange(3)[None].int()},
                                                      {})))
    assert body.layers[0].seen == [compute] and body.layers[1].seen == [compute]
    assert out["hidden"].dtype == torch.float32  # answered in the wire dtype the client sent
    torch.testing.assert_close(out["hidden"], (hidden.to(compute) * 4).float())


def test_compute_dtype_from_the_quantisation_config_as_a_dict_or_string():
    body = fake_quantised_body(torch.bfloat16)
    body.config.quantization_config = {"bnb_4bit_compute_dtype": "bfloat16"}
    assert compute_dtype_of(body) == torch.bfloat16
    body.config.quantization_config = None  # no config and only int8 weights: float32 on the CPU
    assert compute_dtype_of(body) == torch.float32


@pytest.mark.parametrize("quant,dtype,expected", [("4bit", "bfloat16", torch.bfloat16), ("8bit", "float16", torch.float16),
                                                  ("8bit", "float32", torch.float16), ("none", "float32", torch.float32)])
def test_compute_dtype_for_the_config(quant, dtype, expected):
    assert compute_dtype_for(ModelConfig(quantization=quant, dtype=dtype)) == expected


def fake_quantise(module, quant, device):
    """Stands in for bitsandbytes on the CPU: decoder linears stored as int8, as bnb stores them."""
    layers = module.layers if isinstance(module, ServerBody) else module.model.layers
    for layer in layers:
        for sub in layer.modules():
            if type(sub) is nn.Linear:
                sub.weight = nn.Parameter(sub.weight.data.to(torch.int8), requires_grad=False)
    module.config.quantization_config = quant
    return module


def test_quantised_parts_use_the_config_compute_dtype_on_both_sides(work_dir, monkeypatch):
    """Client part and service part: int8 storage, activations (embedding, norms) in the compute dtype."""
    quant = types.SimpleNamespace(load_in_8bit=False, bnb_4bit_compute_dtype=torch.bfloat16)
    monkeypatch.setattr(model_parts, "quantization_config", lambda cfg, device: quant)
    monkeypatch.setattr(model_parts, "quantize_decoder_linears", fake_quantise)
    cfg = tiny_cfg(quantization="4bit", dtype="bfloat16")
    body = load_server_part(cfg, checkpoint_for(cfg, TITLES, work_dir), 1, 1)
    assert body.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    assert body.compute_dtype == torch.bfloat16
    client, _ = load_client_part(cfg, TITLES, work_dir, 1, 1)
    assert client.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert client.model.embed_tokens.weight.dtype == torch.bfloat16  # what the client's activations start as
    assert compute_dtype_of(client) == torch.bfloat16


def test_quantised_device_map_honours_cuda_n(monkeypatch):
    assert quantized_device_map(torch.device("cuda:3")) == {"": 3}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # the GPU a simulation assigned
    assert quantized_device_map(torch.device("cuda")) == {"": 2}
    with pytest.raises(ModelLoadError, match="CUDA GPU"):
        quantized_device_map(torch.device("cpu"))


def test_quantised_part_on_cpu_is_refused_clearly(work_dir):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_client_part(tiny_cfg(quantization="8bit", device="cpu"), TITLES, work_dir, 1, 1)


@pytest.mark.gpu  # bitsandbytes needs a CUDA GPU
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantised_split_parts_on_gpu(work_dir, quant):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg(quantization=quant, dtype="bfloat16", device=f"cuda:{torch.cuda.device_count() - 1}")
    body = load_server_part(cfg, checkpoint_for(cfg, TITLES, work_dir), 1, 1)
    client, _ = load_client_part(cfg, TITLES, work_dir, 1, 1)
    want = torch.device(cfg.device)
    assert body.compute_dtype == torch.bfloat16 and next(body.parameters()).device == want
    assert next(client.parameters()).device == want
    assert type(body.layers[0].self_attn.q_proj).__name__ in ("Linear8bitLt", "Linear4bit")
    hidden = torch.randn(1, 3, body.hidden_size, device=want, dtype=torch.bfloat16)
    out = body(hidden, None, torch.arange(3, device=want)[None])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# The app: the split demo with no full model anywhere
# ---------------------------------------------------------------------------


SMALL = {
    "data.num-clients": 2, "min-clients": 2, "data.train-samples": 48, "data.valid-users": 16,
    "data.test-users": 16, "data.bpr-epochs": 2, "eval.num-beams": 2, "eval.max-new-tokens": 8,
    "model.tiny-layers": 4, "model.tiny-vocab": 800, "train.batch-size": 8, "model.tiny-pretrain-prompts": 64,
    "split.enabled": True, "split.front-k": 1, "split.back-k": 1, "num-server-rounds": 1, "eval.interval": 0,
}


def test_split_demo_runs_without_ever_constructing_a_full_model(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict
    from transformers import LlamaForCausalLM

    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.model import loading as model_loading
    from fellrec_flwr import runtime
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.inprocess_grid import InProcessGrid

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "_CACHE", {})
    cfg = from_run_config(SMALL)
    data = runtime.prepare_data(cfg)
    checkpoint_for(cfg.model, data.titles, data.path)  # the documented one-off preparation step

    def refuse(*args, **kwargs):
        raise AssertionError("a full model was loaded")

    for name in ("load_base_model", "_load_tiny", "_convert_gguf", "_load_pretrained"):
        monkeypatch.setattr(model_loading, name, refuse)
    monkeypatch.setattr(model_parts, "_save_tiny", refuse)
    real_init = LlamaForCausalLM.__init__

    def meta_only_init(self, *args, **kwargs):  # any full LlamaForCausalLM with real storage fails
        if torch.get_default_device().type != "meta":
            raise AssertionError("LlamaForCausalLM built with real weights")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "__init__", meta_only_init)
    bodies = []
    real_server_part = model_parts.load_server_part
    monkeypatch.setattr(model_parts, "load_server_part", lambda *a, **k: bodies.append(real_server_part(*a, **k))
                        or bodies[-1])

    run_config = {**SMALL, "out-dir": str(tmp_path / "runs"), "run-name": "split"}
    grid = InProcessGrid(client_app, 2, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))

    summary = json.loads((tmp_path / "runs" / "split" / "summary.json").read_text())
    # a client that hit a refused loader would answer with an error reply, which the strategy tolerates
    assert not summary["failed_clients"] and set(summary["per_client"]) == {"0", "1"}
    assert (tmp_path / "runs" / "split" / "adapters" / "client-1" / "adapter_model.safetensors").is_file()
    (client_rt,) = runtime._CACHE.values()
    client_names = [n for n, p in client_rt.model.named_parameters() if p.device.type != "meta"]
    assert layer_indices(client_names) == {0, 3}  # the client never held layers 1, 2
    (body,) = bodies
    body_names = [n for n, _ in body.named_parameters()]
    assert layer_indices(body_names) == {0, 1} and not any("embed" in n or "lm_head" in n for n in body_names)


# --------------------------------------------------------------------------- one plan, one checkpoint
def test_the_run_service_loads_its_checkpoint_without_preparing_data(work_dir, tmp_path, monkeypatch):
    """The ServerApp hands the service the checkpoint folder; the service prepares no data to find it."""
    from fellrec_flwr import runtime
    from fellrec_flwr.config import FellRecConfig, SplitSettings
    from server_app.split_service import start_service_for_run

    folder = checkpoint_for(tiny_cfg(), TITLES, work_dir)
    monkeypatch.setattr(runtime, "prepare_data", lambda cfg: pytest.fail("the split service prepared data"))
    cfg = FellRecConfig(model=tiny_cfg(), split=SplitSettings(enabled=True, front_k=1, back_k=2))
    handle = start_service_for_run(cfg, folder, secret_file=tmp_path / "secret.txt")
    try:
        assert handle.service.body.plan == plan_split(LAYERS, 1, 2)
    finally:
        handle.stop()


def test_the_client_plan_travels_with_the_loaded_model(work_dir):
    """LoRA layers and the split come from the plan the client part was cut with, not a rebuilt one."""
    from fellrec_flwr.config import SplitSettings
    from fellrec_flwr.split.plan import SplitError, loaded_plan, plan_from_settings
    from fellrec_flwr.split.runtime import client_lora_settings

    client, _ = load_client_part(tiny_cfg(), TITLES, work_dir, 1, 2)
    plan = loaded_plan(client)
    assert plan == plan_from_settings(SplitSettings(enabled=True, front_k=1, back_k=2), LAYERS)
    assert plan_from_settings(SplitSettings(enabled=False), LAYERS) is None
    assert client_lora_settings(LoraSettings(), plan).layer_list() == plan.client_layers
    assert client_lora_settings(LoraSettings(), None) == LoraSettings()
    with pytest.raises(SplitError, match="not loaded as a split client"):
        loaded_plan(load_base_model(tiny_cfg(), TITLES, work_dir)[0])
