"""Shared test fixtures.

Tests use the built-in tiny model and small fixtures; tests that need `../shared`
(real data, the SmolLM2 GGUF) skip with a message when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FELLREC_SHARED", ROOT.parent / "shared"))
GAMES_DIR = SHARED / "data" / "amazon-games"
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def need_games() -> Path:
    if not (GAMES_DIR / "Games-6k.item").exists():
        pytest.skip(f"needs the Amazon Games data at {GAMES_DIR} (../shared is absent in a user's clone)")
    return GAMES_DIR


def need_smollm() -> Path:
    if not any(SMOLLM_DIR.glob("*.gguf")):
        pytest.skip(f"needs the SmolLM2 GGUF under {SMOLLM_DIR} (../shared is absent in a user's clone)")
    return SMOLLM_DIR


@pytest.fixture(autouse=True, scope="session")
def flower_task_identity():
    """Flower >= 1.3x refuses to build a Message outside a Flower process unless a task
    identity is set (private API; see ../shared/notes/flower-1.42.md section 8)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr: nothing to set
        yield
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def _real_cuda() -> bool:
    """Whether this machine really has a usable CUDA GPU, asked once before any test runs. The question
    initialises the CUDA driver with the real CUDA_VISIBLE_DEVICES, so the CPU pin below (which
    empties that variable for subprocesses) never hides the GPU from this process's `gpu` tests."""
    global _CUDA
    if _CUDA is None:
        import torch

        _CUDA = bool(torch.cuda.is_available())
    return _CUDA


_CUDA: bool | None = None


def pytest_configure(config):
    _real_cuda()


@pytest.fixture(autouse=True)
def device_for_the_test(request, monkeypatch):
    """Tests run on the CPU unless marked `gpu` (issue 22): on a GPU box `model.device=auto` would pick
    CUDA, while the tests feed CPU tensors, call .numpy() and compare bit-identical runs (GPU attention
    backward is not deterministic). A `gpu` test skips where there is no CUDA GPU."""
    if request.node.get_closest_marker("gpu") is not None:
        if not _real_cuda():
            pytest.skip("needs a CUDA GPU (marker gpu; bench/gpu_check.sh runs these on a GPU machine)")
        yield
        return
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # flwr run / SuperNode subprocesses: CPU too
    yield


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tiny model is faster on one thread, and CI shares 2 cores with Ray actors."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A folder shared by one test module (tiny tokenizer, converted models)."""
    return tmp_path_factory.mktemp("work")
