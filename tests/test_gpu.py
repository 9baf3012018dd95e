"""What needs a CUDA GPU (marker `gpu`; skipped elsewhere): `pytest -m gpu`, run by bench/gpu_check.sh.

Each test is the CUDA run of something the CPU suite reproduces with fakes (issue 22): half-precision
weights with LoRA on the last layer, split == unsplit, 8/4-bit middle layers behind the service, GPU
memory reporting, and a ServerApp that opens no CUDA context.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fellrec_flwr.config import ModelConfig, TrainSettings
from fellrec_flwr.model.loading import add_lora, load_base_model

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TITLES, TRAIN, small_lora  # noqa: E402

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights_with_lora_on_the_last_layer_train_and_evaluate_on_cuda(work_dir, dtype):
    from fellrec_flwr.train.trainer import eval_loss, train_local

    model, tok = load_base_model(ModelConfig(tiny_pretrain_prompts=0, dtype=dtype, device="cuda"), TITLES, work_dir)
    model = add_lora(model, small_lora(layers="3", dropout=0.0), seed=1)
    cfg = TrainSettings(batch_size=4, lr=1e-2, local_epochs=1, autocast="auto")  # auto = off on CUDA
    before = eval_loss(model, tok, TRAIN[8:16], TITLES, cfg)
    result = train_local(model, tok, TRAIN[:32], TITLES, cfg, seed=3, progress=False)
    after = eval_loss(model, tok, TRAIN[8:16], TITLES, cfg)
    assert np.isfinite(result.loss) and np.isfinite(after) and after < before


def test_split_equals_unsplit_on_cuda(tmp_path):
    from peft import LoraConfig, get_peft_model

    from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer
    from fellrec_flwr.split.auth import issue_token
    from fellrec_flwr.split.client import SplitServiceClient, make_split_model
    from fellrec_flwr.split.plan import plan_for_model
    from server_app.split_service import start_service

    secret = b"gpu-check-secret-0123456789abcdef"
    tok = train_tokenizer(list(TITLES.values()) * 2, 400, tmp_path / "tok")
    full = build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=0).eval().to("cuda")
    plan = plan_for_model(full, 1, 1)
    handle = start_service(full, secret, 1, 1, device="cuda")
    try:
        def lora(model):
            config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                layers_to_transform=plan.client_layers, task_type="CAUSAL_LM")
            peft = get_peft_model(model, config)
            gen = torch.Generator().manual_seed(0)
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.data = (torch.randn(p.shape, generator=gen) * 0.1).to(p.device)
            return peft

        batch = tok(["Quest A0 - Deluxe and Quest B1", "Quest C2"], return_tensors="pt", padding=True).to("cuda")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        ref = lora(copy.deepcopy(full))
        client = SplitServiceClient(handle.url, "client-0", issue_token(secret, "client-0"))
        split = make_split_model(lora(copy.deepcopy(full)), plan, client)
        ref.train(), split.train()
        loss_a, loss_b = ref(**batch).loss, split(**batch).loss
        loss_a.backward(), loss_b.backward()
        diff = abs(loss_a.item() - loss_b.item())
        print(f"GPU-CHECK split-vs-unsplit loss difference: {diff:.2e}")
        assert diff < 1e-3  # TF32 and non-deterministic kernels: close, not bit-identical
        for (name, p), (_, q) in zip(
                [(n, p) for n, p in ref.named_parameters() if p.requires_grad],
                [(n, p) for n, p in split.named_parameters() if p.requires_grad]):
            torch.testing.assert_close(p.grad, q.grad, atol=5e-3, rtol=5e-2, msg=name)
    finally:
        handle.stop()


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantised_service_trains_a_split_step_on_cuda(tmp_path, quant):
    pytest.importorskip("bitsandbytes")
    from fellrec_flwr.model.parts import checkpoint_for, load_server_part
    from fellrec_flwr.split.plan import check_service_probe
    from fellrec_flwr.split.wire import decode, encode
    from server_app.split_service import SplitService

    cfg = ModelConfig(tiny_pretrain_prompts=0, quantization=quant, dtype="bfloat16", device="cuda")
    body = load_server_part(cfg, checkpoint_for(cfg, TITLES, tmp_path), 1, 1)
    check_service_probe(checkpoint_for(cfg, TITLES, tmp_path), body.probe(), "loopback")  # the client's check
    service = SplitService(body, b"s" * 32)
    hidden = torch.randn(2, 5, body.hidden_size)
    pos = torch.arange(5)[None].int().expand(2, -1)
    out, meta = decode(service.forward("client-0", encode({"hidden": hidden, "position_ids": pos},
                                                          {"keep_graph": "1"})))
    assert torch.isfinite(out["hidden"]).all()
    grad, _ = decode(service.backward("client-0", encode(
        {"hidden": hidden, "position_ids": pos, "grad": torch.ones_like(hidden)}, meta)))
    assert torch.isfinite(grad["grad"]).all() and grad["grad"].abs().sum() > 0


def test_gpu_memory_metrics_are_what_the_process_holds():
    from fellrec_flwr.model import memory

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    kept = torch.empty(64 << 20, dtype=torch.uint8, device=device)  # 64 MB kept
    temp = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # 256 MB freed before the report
    del temp
    report = memory.gpu_memory_mb(device)
    assert report["peak-gpu-mb"] >= 64 + 256
    assert 64 <= report["held-gpu-mb"] < 64 + 256  # the freed block went back to the driver
    del kept


def test_the_serverapps_initial_lora_opens_no_cuda_context(tmp_path):
    code = ("import torch; from fellrec_flwr.config import LoraSettings, ModelConfig; "
            "from fellrec_flwr.model.parts import base_config, initial_lora_state; "
            f"c = base_config(ModelConfig(tiny_pretrain_prompts=0), [f'Game {{i}}' for i in range(30)], {str(tmp_path)!r}); "
            "initial_lora_state(c, LoraSettings(), seed=3); print(torch.cuda.is_available(), torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["True", "False"]
