"""Loading the tiny base model, LoRA wrapping and the errors for impossible settings."""

from __future__ import annotations

import re

import pytest
import torch

from fellrec_flwr.config import LoraSettings, ModelConfig
from fellrec_flwr.model.loading import (
    LoraTargetError,
    ModelLoadError,
    add_lora,
    find_gguf,
    load_base_model,
    resolve_device,
    resolve_dtype,
)

TITLES = {i: f"Quest {chr(65 + i % 26)}{i} - Deluxe" for i in range(40)}


def lora_param_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_tiny_loads_identically_and_reuses_its_tokenizer(work_dir):
    model, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    folders = list(work_dir.glob("tokenizer-*"))
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").exists()
    mtime = (folders[0] / "tokenizer.json").stat().st_mtime_ns
    model2, tok2 = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    assert (folders[0] / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not retrained
    assert tok.get_vocab() == tok2.get_vocab()
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    assert not model.training
    # a different catalogue gets its own tokenizer instead of a stale one
    load_base_model(ModelConfig(tiny_pretrain_prompts=0), {0: "Another Game"}, work_dir)
    assert len(list(work_dir.glob("tokenizer-*"))) == 2


def test_only_lora_is_trainable_and_its_size_is_r_times_dims(work_dir):
    model, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    peft_model = add_lora(model, LoraSettings(r=8, target_modules="q_proj,v_proj"), seed=1)
    names = lora_param_names(peft_model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    hidden, layers, r = 64, 4, 8  # q and v are hidden x hidden in the tiny model
    assert n_trainable == layers * 2 * (r * hidden + hidden * r)


def test_layers_to_transform_is_respected(work_dir):
    model, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    peft_model = add_lora(model, LoraSettings(layers="1,3"), seed=1)
    layers = {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in lora_param_names(peft_model)}
    assert layers == {1, 3}


def test_absent_target_module_lists_the_available_ones(work_dir):
    model, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    with pytest.raises(LoraTargetError, match=r"c_attn.*available: .*q_proj"):
        add_lora(model, LoraSettings(target_modules="q_proj,c_attn"), seed=1)
    with pytest.raises(LoraTargetError, match="layers"):
        add_lora(model, LoraSettings(layers="0,7"), seed=1)


def test_same_seed_same_lora_init_different_seed_different(work_dir):
    def lora_a(seed):
        model, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
        peft_model = add_lora(model, LoraSettings(), seed=seed)
        return [p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n]

    first, again, other = lora_a(7), lora_a(7), lora_a(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # and the caller's global RNG is left alone
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lora_a(7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])  # conftest pins this test to the CPU, also on a GPU box
def test_quantization_without_cuda_is_a_clear_error(work_dir, quant):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_base_model(ModelConfig(quantization=quant, tiny_pretrain_prompts=0), TITLES, work_dir)


def test_bad_settings_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype("float8")
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        find_gguf(str(tmp_path))
    assert find_gguf(str(tmp_path / "a.gguf")) == tmp_path / "a.gguf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*gguf"):
        load_base_model(ModelConfig(name="no-such-org/no-such-model"), TITLES, tmp_path)


def test_tiny_public_warmup_lowers_loss_and_is_cached(tmp_path):
    """The tiny base model is warmed up on catalogue-only prompts once, then loaded from disk."""
    from fellrec_flwr.model.tiny import public_prompts
    from fellrec_flwr.train.trainer import eval_loss
    from fellrec_flwr.config import TrainSettings

    cold, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, tmp_path)
    warm, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=96), TITLES, tmp_path)
    cached = list(tmp_path.glob("tiny-base-*-p96-*.safetensors"))
    assert len(cached) == 1
    probe = public_prompts(sorted(TITLES), 16, 5, seed=123, titles=TITLES)
    settings = TrainSettings()
    assert eval_loss(warm, tok, probe, TITLES, settings) < eval_loss(cold, tok, probe, TITLES, settings) - 0.5
    again, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=96), TITLES, tmp_path)
    for (name, a), (_, b) in zip(warm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
