"""Where things run on a GPU box (issue 22): the test suite's CPU pin, the device policy of clients,
service and ServerApp, GPU memory reporting, TF32, fp16 loss scaling. CUDA is faked where a test
needs it on the CPU (device counts, memory functions, empty_cache)."""

from __future__ import annotations

import os

import pytest
import torch

from fellrec_flwr.model.loading import resolve_device


def test_tests_without_the_gpu_marker_run_on_the_cpu():
    """conftest pins them: model.device=auto resolves to the CPU, subprocesses see no GPU."""
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert resolve_device("auto") == torch.device("cpu")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""


@pytest.mark.gpu
def test_gpu_tests_see_the_gpu():
    assert torch.cuda.is_available()
    assert resolve_device("auto").type == "cuda"
    x = torch.ones(4, device="cuda")
    assert float((x * 2).sum().cpu()) == 8.0


# ---------------------------------------------------------------- devices


def test_cuda_n_beyond_the_visible_gpus_is_a_clear_error(monkeypatch):
    """A simulation's client actor sees one GPU (as cuda:0): model.device='cuda:1' there used to load anyway."""
    from fellrec_flwr.model.loading import ModelLoadError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ModelLoadError, match=r"sees 1 GPU.*use 'cuda' or 'auto'"):
        resolve_device("cuda:1")
    with pytest.raises(ModelLoadError, match="split.service-device='cuda:2'"):
        resolve_device("cuda:2", key="split.service-device")


@pytest.fixture
def hidden_gpus(tmp_path, monkeypatch):
    """A machine whose driver knows two GPUs that this process does not see (CUDA_VISIBLE_DEVICES='')."""
    import fellrec_flwr.model.loading as loading

    for i in range(2):
        (tmp_path / f"0000:0{i}:00.0").mkdir()
    monkeypatch.setattr(loading, "NVIDIA_GPU_DIR", tmp_path)
    monkeypatch.setattr(loading, "_WARNED_HIDDEN", False)
    return tmp_path


def test_auto_on_the_cpu_of_a_gpu_machine_warns(hidden_gpus, caplog):
    with caplog.at_level("WARNING"):
        assert resolve_device("auto") == torch.device("cpu")
        resolve_device("auto")  # once per process
    warnings = [r.getMessage() for r in caplog.records if "NVIDIA GPU" in r.getMessage()]
    assert len(warnings) == 1 and "2 NVIDIA GPU(s)" in warnings[0] and "num-gpus" in warnings[0]


def test_auto_on_a_machine_without_gpus_is_silent(tmp_path, monkeypatch, caplog):
    import fellrec_flwr.model.loading as loading

    monkeypatch.setattr(loading, "NVIDIA_GPU_DIR", tmp_path / "absent")
    monkeypatch.setattr(loading, "_WARNED_HIDDEN", False)
    with caplog.at_level("WARNING"):
        assert resolve_device("auto") == torch.device("cpu")
    assert not [r for r in caplog.records if "NVIDIA GPU" in r.getMessage()]


def test_the_loopback_service_runs_on_split_service_device_not_model_device(monkeypatch, tmp_path):
    import types

    import fellrec_flwr.model.parts as parts
    import fellrec_flwr.runtime as runtime
    import server_app.split_service as split_service
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.loading import ModelLoadError

    seen = {}

    def fake_server_part(model_cfg, *args):
        seen["device"] = model_cfg.device
        body = torch.nn.Linear(2, 2)
        body.plan = types.SimpleNamespace(front_k=1, back_k=1)  # what a ServerBody carries
        return body

    monkeypatch.setattr(parts, "load_server_part", fake_server_part)
    monkeypatch.setattr(runtime, "prepare_data", lambda cfg: pytest.fail("the service must not prepare data"))
    monkeypatch.setattr(split_service, "start_service", lambda body, *a, **k: ("started", k.get("device")))
    cfg = from_run_config({"split.enabled": True, "model.device": "cuda", "split.service-device": "cpu"})
    checkpoint = tmp_path / "checkpoint"
    assert split_service.start_service_for_run(cfg, checkpoint, tmp_path / "secret") == ("started", "cpu")
    assert seen["device"] == "cpu"  # not the clients' model.device
    cfg = from_run_config({"split.enabled": True, "model.device": "cpu", "split.service-device": "cuda:0"})
    with pytest.raises(ModelLoadError, match="split.service-device='cuda:0' but CUDA is not available"):
        split_service.start_service_for_run(cfg, checkpoint, tmp_path / "secret")


def test_the_serverapps_initial_lora_opens_no_cuda_context(monkeypatch, tmp_path):
    """seeded_torch asked torch.cuda.current_device() on any CUDA machine: a CUDA context in the ServerApp."""
    from fellrec_flwr.config import LoraSettings, ModelConfig
    from fellrec_flwr.model.parts import base_config, initial_lora_state

    def no_context():
        raise AssertionError("the ServerApp opened a CUDA context")

    config = base_config(ModelConfig(tiny_pretrain_prompts=0), [f"Game {i}" for i in range(30)], tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine ...
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # ... whose CUDA this process never used
    monkeypatch.setattr(torch.cuda, "current_device", no_context)
    state = initial_lora_state(config, LoraSettings(), seed=3)
    assert state and all(v.dtype.kind == "f" for v in state.values())


# ---------------------------------------------------------------- GPU memory


class FakeCudaMemory:
    """The CUDA allocator's counters: 3 MB reserved at the peak, 1 MB kept once the cache is emptied."""

    def __init__(self):
        self.reserved, self.emptied = 3 * 2**20, 0

    def empty_cache(self):
        self.emptied += 1
        self.reserved = 2**20

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", self.empty_cache)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2**20)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * 2**20)
        return self


def test_gpu_memory_reported_is_what_the_actor_holds(monkeypatch):
    from fellrec_flwr.model import memory

    fake = FakeCudaMemory().install(monkeypatch)
    assert memory.gpu_memory_mb(torch.device("cuda")) == {"peak-gpu-mb": 3.0, "held-gpu-mb": 1.0}
    assert fake.emptied == 1


def test_every_client_message_gives_the_gpu_cache_back(monkeypatch):
    from client_app.app import return_memory

    fake = FakeCudaMemory().install(monkeypatch)
    assert return_memory("msg", "ctx", lambda m, c: "reply") == "reply"
    assert fake.emptied == 1
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a CPU client: CUDA left alone
    return_memory("msg", "ctx", lambda m, c: "reply")
    assert fake.emptied == 1


# ---------------------------------------------------------------- precision


def test_tf32_is_a_setting_applied_on_cuda_only():
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.precision import use_tf32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert use_tf32(True, torch.device("cpu")) is False and matmul.fp32_precision == "ieee"
        assert use_tf32(True, torch.device("cuda")) is True and matmul.fp32_precision == "tf32"
        assert use_tf32(False, torch.device("cuda")) is False and matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before
    assert from_run_config({}).train.tf32 is True
    assert from_run_config({"train.tf32": False}).train.tf32 is False


# ---------------------------------------------------------------- 7B scale


def test_gguf_conversion_runs_once_when_processes_start_together(tmp_path, monkeypatch):
    """Client actors starting together each de-quantised the whole GGUF (float32: ~27 GB for 7B) at once."""
    import threading
    import time

    import fellrec_flwr.model.loading as loading

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def slow_convert(path, out_dir):
        conversions.append(path)
        time.sleep(0.3)  # the others arrive while this one converts
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.resolve_checkpoint(gguf, tmp_path / "work")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1
    assert len(results) == 3 and len(set(results)) == 1 and (results[0] / "config.json").exists()


# ---------------------------------------------------------------- host syncs in hot loops


def test_constrained_search_copies_the_beam_index_to_the_host_once_per_step(monkeypatch):
    """Each layer's reorder copied the beam index to the host: on a GPU a sync per layer per step."""
    from transformers import DynamicCache

    from fellrec_flwr.eval.constrained import _share_prompt

    layers, rows = 6, 3
    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.randn(rows, 2, 5, 4), torch.randn(rows, 2, 5, 4), i)
    assert _share_prompt(cache)
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(1) or real_cpu(self, *a, **k))
    for step in range(2):
        cache.reorder_cache(torch.tensor([2, 0, 0, 1]) if step == 0 else torch.tensor([3, 1]))
    assert len(copies) == 2  # one per step, not one per layer and step (12)
    # prompts [0,1,2] -> rows [2,0,0,1] -> rows [3,1] of those: prompts 1 and 0, in every layer
    assert all(layer.row_prompt.tolist() == [1, 0] for layer in cache.layers)


def test_an_optimiser_step_reads_its_loss_back_once(monkeypatch):
    """loss.item() per micro-batch: with 16 accumulated micro-batches (the paper's 7B setting), 16 syncs a step."""
    from fellrec_flwr.train.trainer import optimizer_step

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    group = [{"labels": torch.tensor([[1, 2, 3]])} for _ in range(4)]  # 2 labelled tokens each

    def loss_fn(batch):
        return 2 * (weight ** 2).sum(), 2

    reads = []
    real_item, real_float = torch.Tensor.item, torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append("item") or real_item(self))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append("float") or real_float(self))
    loss = optimizer_step(None, optimizer, group, [weight], [], 0.0, torch.device("cpu"), loss_fn=loss_fn)
    assert loss == pytest.approx(4 * 6 / 8)  # token mean over the step
    assert len(reads) == 1
    torch.testing.assert_close(weight.detach(), torch.full((3,), 1 - 0.1 * 4 * 4 / 8))  # the step was taken


@pytest.mark.parametrize("dtype,bf16_gpu,expected", [(torch.float32, True, torch.bfloat16), (torch.bfloat16, True, None),
                                                     (torch.float16, True, None), (torch.float32, False, None)])
def test_auto_autocast_on_a_gpu_is_bf16_for_float32_weights(monkeypatch, dtype, bf16_gpu, expected):
    """'auto' left a float32 model in plain float32 on a GPU (slow by default)."""
    from fellrec_flwr.model.speed import AutocastChooser

    model = torch.nn.Linear(4, 4).to(dtype).requires_grad_(False)
    model.adapter = torch.nn.Linear(4, 1)  # trainable float32 (LoRA-like): not what decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_gpu)
    never = lambda dtype: pytest.fail("no timing on a GPU")  # noqa: E731
    assert AutocastChooser(None).choose("auto", torch.device("cuda"), model, never) == expected
    assert AutocastChooser(None).choose("off", torch.device("cuda"), model, never) is None
