"""bf16/fp16 weights as a GPU runs them, reproduced on the CPU (issue 22).

On CUDA ``train.autocast='auto'`` turns autocast off and the precision is ``model.dtype``'s;
these tests run exactly that configuration on the CPU: ``model.dtype=bfloat16|float16``,
``train.autocast=off``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fellrec_flwr.config import LoraSettings, ModelConfig, TrainSettings
from fellrec_flwr.model.loading import add_lora, load_base_model
from fellrec_flwr.model.speed import FastForward
from fellrec_flwr.train.trainer import eval_loss, train_local

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TITLES, TRAIN, small_lora  # noqa: E402

HALF = ["bfloat16", "float16"]
LAST_LAYER = "3"  # the tiny model has 4 layers: LoRA on the last one only -> a 3-layer frozen prefix


def half_model(work_dir, dtype: str, lora: LoraSettings):
    model, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0, dtype=dtype, device="cpu"), TITLES, work_dir)
    return add_lora(model, lora, seed=1), tok


@pytest.mark.parametrize("dtype", HALF)
def test_half_weights_with_lora_on_the_last_layer_train_and_evaluate(work_dir, dtype):
    """The prefix cache fed float32 states to bf16/fp16 layers: 'expected m1 and m2 to have the same dtype'."""
    lora = small_lora(layers=LAST_LAYER, dropout=0.0)
    model, tok = half_model(work_dir, dtype, lora)
    forward = FastForward(model, torch.device("cpu"), prefix_cache_mb=64)
    assert forward.prefix_start == 3  # the cached path is the one under test
    cfg = TrainSettings(batch_size=4, lr=1e-2, local_epochs=1, autocast="off")
    result = train_local(model, tok, TRAIN[:8], TITLES, cfg, seed=3, progress=False)
    assert np.isfinite(result.loss) and result.steps == 2
    cached = eval_loss(model, tok, TRAIN[8:16], TITLES, cfg)
    whole = eval_loss(model, tok, TRAIN[8:16], TITLES, TrainSettings(batch_size=4, autocast="off", prefix_cache_mb=0))
    # same weights, same precision: the cached prefix changes nothing but the speed
    assert np.isfinite(cached) and cached == pytest.approx(whole, rel=2e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_cached_prefix_states_keep_the_layers_dtype(work_dir, dtype):
    model, tok = half_model(work_dir, dtype, small_lora(layers=LAST_LAYER, dropout=0.0))
    forward = FastForward(model, torch.device("cpu"), prefix_cache_mb=64)
    states = forward.prefix_states([[1, 5, 7, 9], [1, 4]], batch_size=2)
    assert states is not None and {s.dtype for s in states} == {getattr(torch, dtype)}
    assert [s.shape[0] for s in states] == [4, 2]


@pytest.mark.parametrize("dtype", HALF)
def test_retrieval_head_on_cached_states_with_half_weights(work_dir, dtype):
    """encode_states had the same float32-into-bf16 pattern as the generative prefix cache."""
    from fellrec_flwr.config import RetrievalSettings
    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.model.retrieval import (encode_all_states, frozen_prefix_layers, item_token_ids,
                                              prefix_states, train_retrieval_states)

    model, tok = half_model(work_dir, dtype, LoraSettings(layers=LAST_LAYER))
    start = frozen_prefix_layers(model)
    groups = TitleGroups.from_titles(TITLES)
    items = prefix_states(model, tok, item_token_ids(tok, groups.titles, 64), start, batch_size=8)
    vectors = encode_all_states(model, items, start, "mean", batch_size=8)
    assert vectors.shape[0] == len(groups) and np.isfinite(vectors).all()
    users = items[:8]  # any states of the right kind: the point is that a step runs
    result = train_retrieval_states(model, start, users, list(range(8)), [[] for _ in range(8)], items,
                                    TrainSettings(batch_size=4, local_epochs=1, autocast="off"), RetrievalSettings(),
                                    seed=1)
    assert result.steps == 2 and np.isfinite(result.loss)


# ---------------------------------------------------------------- rotary frequencies


def _inv_freqs(module):
    return {name: buf for name, buf in module.named_buffers() if name.endswith("inv_freq")}


@pytest.mark.parametrize("dtype", HALF)
def test_rotary_frequencies_stay_float32_when_the_weights_are_cast(work_dir, dtype):
    """model.to(bf16) rounded inv_freq (up to 0.4 % relative error in each token's rotation angle)."""
    from fellrec_flwr.model.parts import checkpoint_for, load_client_part, load_server_part

    cfg = ModelConfig(tiny_pretrain_prompts=0, dtype=dtype, device="cpu")
    reference = _inv_freqs(load_base_model(ModelConfig(tiny_pretrain_prompts=0), TITLES, work_dir)[0])
    whole = load_base_model(cfg, TITLES, work_dir)[0]
    assert next(whole.parameters()).dtype == getattr(torch, dtype)  # the weights were cast
    client, _ = load_client_part(cfg, TITLES, work_dir, 1, 1)
    body = load_server_part(cfg, checkpoint_for(cfg, TITLES, work_dir), 1, 1)
    for model in (whole, client, body):
        found = _inv_freqs(model)
        assert found
        for name, buf in found.items():
            assert buf.dtype == torch.float32, name
            torch.testing.assert_close(buf, next(iter(reference.values())), rtol=0, atol=0)


# ---------------------------------------------------------------- float16 training


class SpyScaler(torch.amp.GradScaler):
    made: list["SpyScaler"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaled = 0
        SpyScaler.made.append(self)

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)


@pytest.mark.parametrize("dtype,scaled", [("float16", True), ("bfloat16", False), ("float32", False)])
def test_float16_training_uses_loss_scaling(work_dir, monkeypatch, dtype, scaled):
    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    SpyScaler.made = []
    model, tok = half_model(work_dir, dtype, small_lora(dropout=0.0))
    cfg = TrainSettings(batch_size=4, lr=1e-2, local_epochs=1, autocast="off", grad_accum=2)
    result = train_local(model, tok, TRAIN[:16], TITLES, cfg, seed=3, proximal_mu=0.1, progress=False)
    assert np.isfinite(result.loss) and result.steps == 2
    scaler = SpyScaler.made[-1]
    assert scaler.is_enabled() == scaled
    assert scaler.scaled == 2 * (2 + 1)  # every micro-batch's loss and the proximal term, in both steps
    if scaled:
        assert scaler.get_scale() > 1  # the loss really was multiplied


def test_float16_trainable_weights_are_refused_naming_bfloat16(work_dir):
    from fellrec_flwr.train.trainer import TrainingError

    model, tok = half_model(work_dir, "float16", small_lora(dropout=0.0))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.half()
    with pytest.raises(TrainingError, match="bfloat16"):
        train_local(model, tok, TRAIN[:4], TITLES, TrainSettings(batch_size=4, autocast="off"), seed=3,
                    progress=False)


def test_quantised_compute_dtype_is_the_same_whole_and_split(monkeypatch):
    """4-bit with float32 weights computed in float32 loaded whole (bnb_4bit_compute_dtype) and in
    float16 loaded in parts; both now take compute_dtype_for."""
    import importlib.util

    import fellrec_flwr.model.loading as loading

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    for dtype, expected in (("float32", torch.float16), ("bfloat16", torch.bfloat16)):
        cfg = ModelConfig(quantization="4bit", dtype=dtype)
        quant = loading.quantization_config(cfg, torch.device("cuda"))
        assert quant.bnb_4bit_compute_dtype == loading.compute_dtype_for(cfg) == expected


# ---------------------------------------------------------------- the whole app, as CUDA runs it


@pytest.mark.parametrize("dtype", HALF)
def test_a_federated_round_with_half_weights_and_lora_on_the_last_layer(tmp_path, monkeypatch, dtype):
    """ServerApp + ClientApp in process: train and evaluate messages (validation loss, constrained decoding,
    grounding catalogue) with model.dtype=bfloat16|float16, lora.layers on the last layer, autocast off."""
    import json

    from flwr.app import Context, RecordDict

    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.inprocess_grid import InProcessGrid
    from test_app_inprocess import SMALL

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    run_config = {**SMALL, "num-server-rounds": 1, "out-dir": str(tmp_path), "run-name": "half",
                  "model.dtype": dtype, "lora.layers": "1", "train.autocast": "off", "eval.interval": 1}
    grid = InProcessGrid(client_app, 2, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    summary = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert set(summary["per_client"]) == {"0", "1"}
    assert np.isfinite(summary["overall"]["recall@10"])
