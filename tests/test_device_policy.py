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
