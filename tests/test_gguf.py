"""SmolLM2-135M from its GGUF file (../shared): architecture, tokenizer, safetensors cache, LoRA size."""

from __future__ import annotations

import pytest
import torch

from conftest import need_smollm
from fellrec_flwr.model import loading as model_module
from fellrec_flwr.data.collate import encode_example
from fellrec_flwr.config import LoraSettings, ModelConfig
from fellrec_flwr.model.loading import add_lora, load_base_model

pytestmark = [pytest.mark.slow, pytest.mark.shared]

TITLE = "The Legend of Zelda: Breath of the Wild - Nintendo Switch"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = need_smollm()
    work_dir = tmp_path_factory.mktemp("gguf-work")
    model, tok = load_base_model(ModelConfig(name=str(folder)), [], work_dir)  # ~25 s: de-quantise + cache
    return folder, work_dir, model, tok


def test_architecture_and_tokenizer(loaded):
    _, _, model, tok = loaded
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32
    ids = tok(TITLE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TITLE
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    enc = encode_example(tok, [TITLE], TITLE, max_length=512)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id


def test_second_load_reads_the_safetensors_cache(loaded, monkeypatch):
    folder, work_dir, model, _ = loaded
    assert len(list((work_dir / "base-models").glob("*/model.safetensors"))) == 1

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(model_module, "_convert_gguf", no_conversion)
    again, _ = load_base_model(ModelConfig(name=str(folder)), [], work_dir)
    x = torch.tensor([[1, 504, 3287, 28, 2]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_lora_r8_on_q_and_v_has_the_expected_size(loaded):
    _, _, model, _ = loaded
    peft_model = add_lora(model, LoraSettings(r=8, target_modules="q_proj,v_proj"), seed=1)
    hidden, kv_dim, r, layers = 576, 3 * 64, 8, 30  # 3 key/value heads of 64
    per_layer = (r * hidden + hidden * r) + (r * hidden + kv_dim * r)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == layers * per_layer
    peft_model.unload()  # leave the shared base model as it was
