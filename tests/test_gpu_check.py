"""bench/gpu_check.sh on a machine without a GPU (it says so and exits 0), and its table (bench/gpu_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_without_a_gpu_it_says_so_and_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_OUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout and "nothing to check" in done.stdout
    assert not out.exists()  # nothing was started


def test_the_table_reads_what_the_steps_left(tmp_path):
    from gpu_check import table

    sim = tmp_path / "smollm2-split-8bit"
    sim.mkdir()
    (sim / "status").write_text("0\n")
    (sim / "run.log").write_text("INFO : Split service peak GPU memory: 2345 MB\n")
    rows = ["round,client,split,metric,value", "1,-1,train,round-seconds,36.0"]
    rows += [f"1,{c},train,peak-gpu-mb,{1000 + c}" for c in range(5)]
    rows += [f"1,{c},train,held-gpu-mb,{400 + c}" for c in range(5)]
    (sim / "metrics.csv").write_text("\n".join(rows) + "\n")
    failed = tmp_path / "tiny-5-clients"
    failed.mkdir()
    (failed / "status").write_text("124\n")  # timed out, no metrics
    (tmp_path / "flwr-home").mkdir()  # not a simulation: no row
    (tmp_path / "pytest.log").write_text("GPU-CHECK split-vs-unsplit loss difference: 3.1e-06\n"
                                         "..........\n10 passed, 2 warnings in 61.20s\n")
    text = table(tmp_path)
    assert "| smollm2-split-8bit | 0 | 100.0 | 1004 | 404 | 2345 |" in text
    assert "| tiny-5-clients | 124 | - | - | - | - |" in text
    assert "flwr-home" not in text
    assert "pytest -m gpu: 10 passed, 2 warnings" in text and "3.1e-06" in text


def test_the_papers_7b_run_line_in_docs_gpu_md_is_a_valid_run_config():
    import re

    from fellrec_flwr.config import check_overrides

    text = (ROOT / "docs" / "gpu.md").read_text()
    block = text.split("<!-- paper-7b-run -->", 1)[1].split("```", 2)[1]
    run_config = re.search(r'--run-config "([^"]+)"', block).group(1)
    cfg = check_overrides([run_config])
    assert (cfg.model.quantization, cfg.lora.r, cfg.lora.target_modules, cfg.train.lr) == ("8bit", 8, "q_proj,v_proj",
                                                                                         1e-4)
    assert cfg.train.batch_size * cfg.train.grad_accum == 64 and cfg.eval.num_beams == 4
    assert "client-resources-num-gpus" in block


def test_memory_estimates_follow_the_shapes():
    from gpu_memory import LLAMA_7B, SMOLLM2_135M, Workload, client_bytes, layer_weight_bytes, service_bytes

    assert round(LLAMA_7B.total_params() / 1e9, 2) == 6.74  # LLaMA-7B's published size
    assert round(SMOLLM2_135M.total_params() / 1e6) == 135
    work = Workload()
    whole = client_bytes(LLAMA_7B, "bf16", work, None)["weights"]
    assert whole == pytest.approx(2 * LLAMA_7B.total_params(), rel=1e-6)  # bf16: 2 bytes each
    for k in (1, 2, 4):  # the split moves layers to the service, none is lost or counted twice
        split = client_bytes(LLAMA_7B, "8bit", work, k)["weights"] + service_bytes(LLAMA_7B, "8bit", work, k, 5)["weights"]
        assert split == pytest.approx(client_bytes(LLAMA_7B, "8bit", work, None)["weights"], rel=1e-9)
    assert layer_weight_bytes(LLAMA_7B, "4bit") < layer_weight_bytes(LLAMA_7B, "8bit") < layer_weight_bytes(LLAMA_7B, "bf16")
