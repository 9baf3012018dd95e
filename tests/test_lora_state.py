"""LoRA state as numpy arrays, its checks, and the Flower ArrayRecord round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fellrec_flwr.config import LoraSettings, ModelConfig
from fellrec_flwr.model.lora_state import (
    LoraStateError,
    flatten_state,
    record_to_state,
    get_lora_state,
    num_parameters,
    set_lora_state,
    state_to_record,
)
from fellrec_flwr.model.loading import add_lora, load_base_model

TITLES = {i: f"Quest {chr(65 + i % 26)}{i} - Deluxe" for i in range(40)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def peft_model(work_dir):
    model, _ = load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)
    return add_lora(model, LoraSettings(r=8, alpha=16, target_modules="q_proj,v_proj"), seed=3)  # the paper's LoRA


def random_state(state, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}


def test_state_is_fp32_copies_of_the_lora_parameters(peft_model):
    state = get_lora_state(peft_model)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(state) == len(params) == 16  # 4 layers x (q, v) x (A, B)
    # peft drops the adapter name: "...q_proj.lora_A.default.weight" -> "...q_proj.lora_A.weight"
    for (key, value), (name, param) in zip(state.items(), params.items()):
        assert key == name.replace(".default", "")
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, param.detach().cpu().numpy())
    state[next(iter(state))][...] = 123.0  # a copy: editing it leaves the model alone
    assert not torch.any(next(iter(params.values())) == 123.0)


def test_set_then_get_round_trips_and_changes_the_model(peft_model):
    x = torch.tensor([[0, 5, 9, 12, 7]])
    with torch.no_grad():
        before = peft_model(x).logits
    new = random_state(get_lora_state(peft_model))
    set_lora_state(peft_model, new)
    got = get_lora_state(peft_model)
    assert list(got) == list(new)
    for k in new:
        np.testing.assert_array_equal(got[k], new[k])
    with torch.no_grad():
        assert not torch.allclose(peft_model(x).logits, before)


def test_mismatched_state_is_a_clear_error(peft_model):
    state = get_lora_state(peft_model)
    missing = dict(list(state.items())[1:])
    with pytest.raises(LoraStateError, match="1 missing key"):
        set_lora_state(peft_model, missing)
    extra = {**state, "base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)}
    with pytest.raises(LoraStateError, match="1 unexpected key"):
        set_lora_state(peft_model, extra)
    key = next(iter(state))
    wrong = {**state, key: np.zeros((4, 64), np.float32)}
    with pytest.raises(LoraStateError, match="shape mismatch.*lora.r"):
        set_lora_state(peft_model, wrong)


def test_array_record_round_trip_keeps_order_values_and_fp32(peft_model):
    state = random_state(get_lora_state(peft_model), seed=1)
    state_f64 = {k: v.astype(np.float64) for k, v in state.items()}
    record = state_to_record(state_f64)
    assert isinstance(record, ArrayRecord)
    back = record_to_state(record)
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], state[k])
    set_lora_state(peft_model, back)  # what a client does with a received record


def test_flatten_concatenates_in_key_order():
    state = {"b": np.array([[1.0, 2.0]], np.float32), "a": np.array([3.0], np.float32)}
    np.testing.assert_array_equal(flatten_state(state), np.array([1.0, 2.0, 3.0], np.float32))
    assert num_parameters(state) == flatten_state(state).size == 3
    assert flatten_state({}).size == 0


def test_bf16_model_ships_fp32_and_accepts_fp32(peft_model):
    peft_model.to(torch.bfloat16)
    state = get_lora_state(peft_model)
    assert all(v.dtype == np.float32 for v in state.values())
    set_lora_state(peft_model, random_state(state))
    assert all(p.dtype == torch.bfloat16 for p in peft_model.parameters() if p.requires_grad)
