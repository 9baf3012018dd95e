"""One real `flwr run .` simulation with a tiny config: it must *finish* and write its outputs.

`flwr run --stream` exits 0 even when the run fails, so the test checks the run status with
`flwr list --format json` and the files in the run folder. Every process it started is
killed at the end.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT
from flwr_procs import BIN, flower_env, free_port, kill_tree, pids_matching, run_list_json

TINY_RUN = (
    "num-server-rounds=2 data.num-clients=2 min-clients=2 data.train-samples=48 data.valid-users=16 "
    "data.test-users=16 data.bpr-epochs=2 eval.num-beams=2 eval.max-new-tokens=8 model.tiny-layers=2 "
    "model.tiny-vocab=800 train.batch-size=8 model.tiny-pretrain-prompts=64"
)


@pytest.mark.slow
def test_flwr_run_simulation_finishes_and_writes_outputs(tmp_path):
    port = free_port()
    env = flower_env(tmp_path / "flwr-home", port, FELLREC_CACHE=str(tmp_path / "cache"))
    out_dir = tmp_path / "results"
    cmd = [str(BIN / "flwr"), "run", str(ROOT), "--stream",
           "--run-config", f"{TINY_RUN} out-dir='{out_dir}' run-name='smoke'",
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        runs = run_list_json(env)
        assert runs, f"flwr list shows no run; output:\n{log[-4000:]}"
        assert runs[-1]["status"] == "finished:completed", f"{runs[-1]}\n{log[-4000:]}"
    finally:
        kill_tree(pids_matching(f"--port {port}"))
    run_dir = out_dir / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["per_client"]) == {"0", "1"}
    assert 0.0 <= summary["overall"]["recall@10"] <= 1.0
    for name in ("metrics.csv", "config.json", "checkpoint.pkl", "recall_by_round.png"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "adapters" / "client-0" / "adapter_config.json").exists()
    assert not pids_matching(f"--port {port}"), "a Flower process outlived the test"
