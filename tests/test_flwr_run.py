"""Real `flwr run .` simulations through the README's wrapper (`python -m fellrec_flwr.run`).

`flwr run --stream` exits 0 even when the run fails; the wrapper reads the run's final status
from `flwr list --format json` and exits 0 only for `finished:completed`. One tiny run must
finish and write its outputs; one broken run must make the wrapper exit 1. The SuperLink is
stopped with the README's safe stop (`--stop-superlink`, this FLWR_HOME's process only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from flwr_procs import BIN, flower_env, free_port, kill_tree, pids_matching, run_list_json

TINY_RUN = (
    "num-server-rounds=2 data.num-clients=2 min-clients=2 data.train-samples=48 data.valid-users=16 "
    "data.test-users=16 data.bpr-epochs=2 eval.num-beams=2 eval.max-new-tokens=8 model.tiny-layers=2 "
    "model.tiny-vocab=800 train.batch-size=8 model.tiny-pretrain-prompts=64"
)


def _wrapper(env, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "fellrec_flwr.run", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_flwr_run_simulation_finishes_and_writes_outputs(tmp_path):
    port = free_port()
    env = flower_env(tmp_path / "flwr-home", port, FELLREC_CACHE=str(tmp_path / "cache"))
    out_dir = tmp_path / "results"
    fed = ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    try:
        proc = _wrapper(env, "--run-config", f"{TINY_RUN} out-dir='{out_dir}' run-name='smoke'", *fed)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "status finished:completed" in proc.stdout, log[-4000:]
        # a run that fails inside the ServerApp (invalid strategy): `flwr run` would exit 0, the wrapper 1
        bad = _wrapper(env, "--run-config", f"{TINY_RUN} out-dir='{out_dir}' strategy='no-such-strategy'", *fed)
        assert bad.returncode == 1, (bad.stdout + bad.stderr)[-4000:]
        assert "finished:failed" in bad.stdout + bad.stderr
        from fellrec_flwr.run import started_run_id

        status = {r["run-id"]: r["status"] for r in run_list_json(env)}
        assert status[started_run_id(bad.stdout)] == "finished:failed"
        # the README's stop ends this FLWR_HOME's SuperLink and nothing else
        assert pids_matching(f"--port {port}"), "the managed SuperLink should still be running"
        stop = _wrapper(env, "--stop-superlink", timeout=60)
        assert stop.returncode == 0 and "stopped 1" in stop.stdout, stop.stdout + stop.stderr
        assert not pids_matching(f"--port {port}"), "a Flower process outlived --stop-superlink"
    finally:
        kill_tree(pids_matching(f"--port {port}"))
    run_dir = out_dir / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["per_client"]) == {"0", "1"}
    assert 0.0 <= summary["overall"]["recall@10"] <= 1.0
    for name in ("metrics.csv", "config.json", "recall_by_round.png"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "adapters" / "client-0" / "adapter_config.json").exists()


def test_status_parsing_and_exit_codes():
    from fellrec_flwr.run import exit_code_for, parse_status, started_run_id

    out = "Loading project configuration...\n🎊 Successfully started run 8127364\n...log..."
    assert started_run_id(out) == "8127364" and started_run_id("nothing") is None
    listing = 'Listing...\n{"success": true, "runs": [{"run-id": "8127364", "status": "finished:failed"}]}'
    assert parse_status(listing, "8127364") == "finished:failed"
    assert parse_status(listing, "1") is None and parse_status("no json", "1") is None
    assert [exit_code_for(s) for s in ("finished:completed", "finished:failed", "finished:stopped", None)] == [0, 1, 1, 2]


def test_stop_superlink_only_matches_its_own_home(tmp_path):
    """The stop selects the SuperLink whose log file lies in its FLWR_HOME, never another one."""
    from fellrec_flwr.run import managed_superlink_pids, stop_superlink

    script = tmp_path / "flower-superlink"  # a stand-in with the managed SuperLink's command line
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")  # no child processes (sh forks)
    script.chmod(0o755)
    other, mine = tmp_path / "other-home", tmp_path / "my-home"
    fake = subprocess.Popen([str(script), "--log-file", str(other / "local-superlink" / "superlink.log")],
                            start_new_session=True)
    try:
        deadline = time.time() + 10
        while not managed_superlink_pids(other) and time.time() < deadline:
            time.sleep(0.1)
        assert managed_superlink_pids(other) == [fake.pid]
        assert managed_superlink_pids(mine) == [] and stop_superlink(mine) == 0
        assert fake.poll() is None  # untouched
        assert stop_superlink(other) == 1
        assert fake.wait(timeout=10) is not None
    finally:
        fake.kill()
