"""Deployment end to end: SuperLink + 3 SuperNodes with TLS and node auth, and the split service.

Everything is started with the deploy/ scripts on 127.0.0.1 (free ports, a private FLWR_HOME,
DEPLOY_DIR and FELLREC_CACHE) and killed by PID at the end, also when a test fails.

Every run trains and evaluates through the split service (`split.enabled=true`, its https URL in
the run config, each client's token file and the CA in its node config).

One cluster serves all tests, in this order (each builds on evidence, not on luck):
1. a SuperNode with an unregistered key is refused;
2. the split service (TLS, per-client HMAC tokens) refuses missing / tampered credentials, and a
   client rides out a service restart by retrying;
3. run A: 2 rounds of FELLRec complete (`flwr list` says finished:completed; outputs written);
4. run B resumes A for rounds 3..4: SuperNode 2 is SIGKILLed while training round 3 -> round 3
   completes without it (the SuperLink declares it unavailable after ~30-60 s of missing
   heartbeats: Flower's fixed 30 s interval, patience 2); round 4 waits only node-wait-timeout,
   then goes on with 2 clients; meanwhile SuperNode 2 restarts with the same key (same node id)
   and the ServerApp is stopped (`flwr stop`) mid-round 4;
5. run C resumes B's checkpoint (round 3): in round 4 the rejoined client 2 gets its own
   personalised LoRA back, the split service is killed and restarted while the clients train
   (they retry), and the run completes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from deploy_helpers import Cluster, wait_for

pytestmark = [pytest.mark.slow]

if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
    pytest.skip("the deploy scripts need openssl and ssh-keygen", allow_module_level=True)

TINY = (
    "data.num-clients=3 min-clients=3 data.train-samples=48 data.valid-users=30 data.test-users=30 "
    "data.bpr-epochs=2 eval.num-beams=2 eval.max-new-tokens=8 eval.interval=0 model.tiny-layers=3 "
    "model.tiny-vocab=800 train.batch-size=8 run-name='deploy' split.front-k=1 split.back-k=1 "
    "model.tiny-pretrain-prompts=0"  # a random tiny base: no warm-up, which costs minutes per process
)
NODE_WAIT = 5  # node-wait-timeout of the failure run, seconds
HEARTBEAT_LIMIT = 2 * 30 + 30  # Flower: 30 s heartbeat interval x patience 2, plus slack for a loaded CI box


def _prepare_data(cluster: Cluster) -> tuple[dict[int, Path], Path]:
    """Prepare the demo data and the tiny tokenizer once: for the ServerApp (cache), the split
    service (the tokenizer), and for each client only its own partition (its node config
    data-path), exported with deploy/export_partition.py as deploy/README.md tells."""
    from flwr.common.config import parse_config_args

    from data_prep.prepare import prepare
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.loading import load_base_model
    from fellrec_flwr.data.prepared import PreparedData

    cfg = from_run_config(parse_config_args([TINY]))
    folder = prepare(cfg.data, cluster.root / "cache", seed=cfg.seed, progress=False)
    load_base_model(cfg.model, PreparedData.load(folder).titles, folder)  # writes tokenizer-<hash>/
    tokenizer_dir = next(folder.glob("tokenizer-*"))
    parts = {}
    for i in range(cluster.num_nodes):
        parts[i] = cluster.root / f"client-data-{i}"
        out = subprocess.run([sys.executable, str(ROOT / "deploy" / "export_partition.py"), str(folder), str(i),
                              str(parts[i])], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    return parts, tokenizer_dir


def run_config(cluster: Cluster, extra: str) -> str:
    return f"{TINY} split.enabled=true split.service-url='https://127.0.0.1:{cluster.split_port}' {extra}"


def start_split_service(cluster: Cluster) -> None:
    """The run's tiny model: same tokenizer, shape and seed as model.load_base_model builds."""
    # DEBUG: the access log shows when clients are using it
    cluster.start_split_service(cluster.tokenizer_dir, "--tiny-layers", "3", "--tiny-seed", "0", "--log-level", "DEBUG")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("deploy"))
    try:
        c.setup()
        c.data_paths, c.tokenizer_dir = _prepare_data(c)
        start_split_service(c)
        c.start_superlink()
        c.register_nodes()
        for i in range(c.num_nodes):
            c.start_node(i)
        wait_for(lambda: all(c.node_id_of(f"sn{i}") for i in range(c.num_nodes)), 90, "3 SuperNodes to join",
                 context=c.tails)
        yield c
    finally:
        c.stop_all()
        left = c.leftovers()
        assert not left, f"processes outlived the test: {left}"


def test_each_client_machine_holds_only_its_own_partition(cluster):
    from fellrec_flwr.data.prepared import PreparedData

    for i, path in cluster.data_paths.items():
        data = PreparedData.load(path)
        for name in ("train", "valid", "test"):
            assert set(data.split_frame(name)["client"]) == {i}, (i, name)
        assert set(data.train_sequences["client"]) == {i}
        assert data.manifest["partition"]["client"] == i


# --------------------------------------------------------------------------- node authentication


def test_unregistered_supernode_key_is_refused(cluster):
    rogue = cluster.start_node(cluster.num_nodes, label="rogue")  # key sn3 exists but was never registered
    code = wait_for(lambda: rogue.proc.poll() is not None, 90, "the unregistered SuperNode to exit",
                    context=rogue.text)
    assert code and rogue.proc.returncode != 0, rogue.text()
    assert "Exit Code: 305" in rogue.text()  # Flower's code for "SuperNode connection error"
    assert "Failed to initialize the connection to the SuperLink" in rogue.text()
    assert "2004" in rogue.text()  # [code: 2004] Failed to activate SuperNode
    cluster.procs.pop("rogue")
    assert len([s for s in cluster.nodes().values() if s == "online"]) == cluster.num_nodes


# --------------------------------------------------------------------------- split service


def _call(cluster: Cluster, method: str, metadata=(), trust: str = "our-ca"):
    """One gRPC call of the split service, no retries: (gRPC status, reply JSON or engine error code).
    trust: "our-ca" (TLS verified against the deployment's CA), "system" (the system store), "plain"."""
    import grpc

    from fellrec_flwr.split.wire import ERROR_CODE_KEY, method_path

    target = f"127.0.0.1:{cluster.split_port}"
    if trust == "plain":
        channel = grpc.insecure_channel(target)
    else:
        ca = (cluster.deploy_dir / "certs" / "ca.crt").read_bytes() if trust == "our-ca" else None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
    with channel:
        try:
            return grpc.StatusCode.OK, json.loads(channel.unary_unary(method_path(method))(b"", metadata=metadata,
                                                                                           timeout=30))
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ()).get(ERROR_CODE_KEY)


def _token(cluster: Cluster, i: int) -> str:
    return (cluster.deploy_dir / "split" / "tokens" / f"client-{i}.token").read_text().strip()


def test_split_service_refuses_missing_or_tampered_credentials(cluster):
    import grpc

    from fellrec_flwr.split.auth import auth_metadata

    codes = grpc.StatusCode
    good = _token(cluster, 0)
    assert _call(cluster, "Health") == (codes.OK, {"status": "ok"})  # open, for load balancers
    assert _call(cluster, "Info") == (codes.UNAUTHENTICATED, "missing_credentials")
    tampered = ("0" if good[0] != "0" else "1") + good[1:]
    assert _call(cluster, "Info", auth_metadata("client-0", tampered)) == (codes.PERMISSION_DENIED, "bad_credentials")
    other = auth_metadata("client-0", _token(cluster, 1))  # another client's token
    assert _call(cluster, "Info", other)[0] == codes.PERMISSION_DENIED
    status, info = _call(cluster, "Info", auth_metadata("client-0", good))
    assert status == codes.OK and info["hidden_size"] > 0
    # TLS only, and only for clients that trust our CA (the system store does not know it)
    assert _call(cluster, "Health", trust="plain")[0] == codes.UNAVAILABLE
    assert _call(cluster, "Health", trust="system")[0] == codes.UNAVAILABLE


def test_split_service_restart_is_survived_by_retrying_clients(cluster):
    from fellrec_flwr.split.client import SplitServiceClient

    client = SplitServiceClient(f"https://127.0.0.1:{cluster.split_port}", "client-0", _token(cluster, 0),
                                ca_file=cluster.deploy_dir / "certs" / "ca.crt", retries=12, backoff=0.5,
                                max_backoff=4.0)
    hidden_size = client.info()["hidden_size"]
    hidden = torch.randn(2, 5, hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5).unsqueeze(0)
    before, _ = client.forward(hidden, None, positions)

    cluster.stop("split", signal.SIGKILL)  # a crash, not a clean shutdown
    restarter = threading.Timer(1.0, lambda: start_split_service(cluster))
    restarter.start()
    try:
        after, _ = client.forward(hidden, None, positions)  # retries until the new process listens
    finally:
        restarter.join()
    assert client.stats["retries"] >= 1
    torch.testing.assert_close(after, before)  # same weights after the restart: same answer
    client.close()


# --------------------------------------------------------------------------- run A: a clean run


@pytest.fixture(scope="module")
def run_a(cluster):
    out = cluster.root / "results" / "a"
    started = cluster.submit(run_config(cluster, f"num-server-rounds=2 node-wait-timeout=120 out-dir='{out}'"),
                             "run-a")
    run_id = cluster.run_id_of("run-a")
    t0 = time.monotonic()
    status = cluster.wait_run_finished(run_id, 480)["status"]
    started.proc.wait(timeout=60)
    return {"run_id": run_id, "status": status, "run_dir": out / "deploy", "seconds": time.monotonic() - t0,
            "log": started.text()}


def test_deployed_fellrec_run_completes_with_outputs(cluster, run_a):
    assert run_a["status"] == "finished:completed", cluster.tails()
    run_dir = run_a["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["per_client"]) == {"0", "1", "2"}
    assert summary["failed_clients"] == {}
    assert 0.0 <= summary["overall"]["recall@10"] <= 1.0
    rows = pd.read_csv(run_dir / "metrics.csv")
    train = rows[(rows.split == "train") & (rows.metric == "train-loss")]
    assert sorted(set(zip(train["round"], train["client"]))) == [(r, c) for r in (1, 2) for c in (0, 1, 2)]
    for i in range(3):
        assert (run_dir / "adapters" / f"client-{i}" / "adapter_config.json").exists()
    assert "Received 3 results and 0 failures" in run_a["log"]
    # the split tokens reach the clients through their node config, never the run
    config_text = (run_dir / "config.json").read_text()
    assert all(_token(cluster, i) not in config_text + run_a["log"] for i in range(3))


def test_client_state_is_kept_on_the_client_disk(cluster, run_a):
    from fellrec_flwr.train.client_state import ClientStateStore, adapter_digest

    for i in range(3):
        state = cluster.client_state(i)
        assert state["rounds_trained"] == 2 and state["last_round"] == 2, state
        done = cluster.history(i, run_a["run_id"])
        assert [e["round"] for e in done] == [1, 2] and all(e["status"] == "done" for e in done)
        assert {e["node_id"] for e in done} == {cluster.node_id_of(f"sn{i}")}
        adapter = ClientStateStore(cluster.state_dir(i), i).load_adapter(state["adapter_fingerprint"])
        assert adapter is not None and adapter_digest(adapter) == state["adapter_digest"]
        # round 2's arrays are what the server sent: a different personalised adapter per client
    received = {cluster.entry(i, run_a["run_id"], 2)["received"] for i in range(3)}
    assert len(received) == 3


# --------------------------------------------------------------------------- runs B and C: failures


def _checkpoint_round(run_dir: Path) -> int:
    from fellrec_flwr.train.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(run_dir).round
    except CheckpointError:
        return 0


@pytest.fixture(scope="module")
def failures(cluster, run_a):
    """Run B (rounds 3..4, resumed from A): a SuperNode crash, then a stop; run C resumes B."""
    from fellrec_flwr.train.checkpoint import load_checkpoint

    assert run_a["status"] == "finished:completed", "run A must complete first"
    results = cluster.root / "results"
    b_dir, ev = results / "b" / "deploy", {}
    b_log = cluster.submit(run_config(cluster, f"num-server-rounds=4 node-wait-timeout={NODE_WAIT} "
                                               f"resume-from='{run_a['run_dir']}' out-dir='{results / 'b'}'"), "run-b")
    b = ev["run_b"] = cluster.run_id_of("run-b")

    # SuperNode 2 dies (SIGKILL to its whole process group) while its ClientApp trains round 3.
    wait_for(lambda: cluster.entry(2, b, 3, status="started"), 300, "client 2 to start training round 3",
             interval=0.2, context=cluster.tails)
    ev["node2_id"] = cluster.node_id_of("sn2")
    ev["rounds_before_kill"] = cluster.client_state(2)["rounds_trained"]
    cluster.stop("sn2", signal.SIGKILL)
    t_kill = time.monotonic()

    wait_for(lambda: _checkpoint_round(b_dir) >= 3, HEARTBEAT_LIMIT + 120, "round 3 to complete without node 2",
             interval=1.0, context=cluster.tails)
    ev["round3_after_kill_s"] = time.monotonic() - t_kill
    t3 = time.monotonic()
    wait_for(lambda: cluster.entry(0, b, 4) and cluster.entry(1, b, 4), NODE_WAIT + 120,
             "round 4 to start with the two live clients", interval=0.5, context=cluster.tails)
    ev["round4_start_s"] = time.monotonic() - t3

    # Restart SuperNode 2 with the same key and state dir, and stop the ServerApp mid-round 4:
    # the checkpoint of round 3 stays.
    cluster.start_node(2, label="sn2-restarted")
    stop = cluster.flwr("stop", str(b), cluster.connection)
    ev["stop_rc"], ev["stop_out"] = stop.returncode, stop.stdout + stop.stderr
    ev["status_b"] = cluster.wait_run_finished(b, 120)["status"]
    b_log.proc.wait(timeout=60)
    ev["log_b"], ev["ckpt3"] = b_log.text(), load_checkpoint(b_dir)
    wait_for(lambda: cluster.node_id_of("sn2-restarted"), HEARTBEAT_LIMIT, "SuperNode 2 to rejoin",
             context=cluster.tails)
    ev["node2_id_restarted"] = cluster.node_id_of("sn2-restarted")

    # Run C continues B from its checkpoint: round 4 with all three clients, then the final test.
    c_log = cluster.submit(run_config(cluster, f"num-server-rounds=4 node-wait-timeout={NODE_WAIT} "
                                               f"resume-from='{b_dir}' out-dir='{results / 'c'}'"), "run-c")
    c = ev["run_c"] = cluster.run_id_of("run-c")
    # The split service crashes while the clients train round 4, and restarts: they retry.
    wait_for(lambda: cluster.entry(0, c, 4, status="started"), 300, "client 0 to start round 4 of run C",
             interval=0.2, context=cluster.tails)
    seen = len(cluster.procs["split"].text())
    wait_for(lambda: "call Forward from" in cluster.procs["split"].text()[seen:], 120,
             "a client to call the split service", interval=0.1, context=cluster.tails)
    cluster.stop("split", signal.SIGKILL)
    t_split = time.monotonic()
    start_split_service(cluster)
    ev["split_restart_s"] = time.monotonic() - t_split
    ev["status_c"] = cluster.wait_run_finished(c, 480)["status"]
    c_log.proc.wait(timeout=60)
    ev["log_c"], ev["c_dir"] = c_log.text(), results / "c" / "deploy"
    return ev


def test_killed_supernode_round_completes_and_failure_is_recorded(cluster, failures):
    assert failures["round3_after_kill_s"] < HEARTBEAT_LIMIT + 60
    assert "Received 2 results and 1 failures" in failures["log_b"]
    assert "Node Unavailable" in failures["log_b"]
    assert [(f["round"], f["client"]) for f in failures["ckpt3"].strategy_state["failures"]] == [(3, 2)]
    summary = json.loads((failures["c_dir"] / "summary.json").read_text())
    assert summary["failed_clients"] == {"3": [2]}  # kept through the stop and the resume


def test_next_round_waits_only_node_wait_timeout(cluster, failures):
    assert "Only 2 of 3 required nodes connected" in failures["log_b"]
    assert failures["round4_start_s"] < NODE_WAIT + 90
    b = failures["run_b"]
    assert cluster.entry(0, b, 4) and cluster.entry(1, b, 4) and not cluster.entry(2, b, 4)


def test_rejoined_supernode_keeps_node_id_history_and_personal_lora(cluster, failures):
    from fellrec_flwr.train.client_state import adapter_digest

    b, c = failures["run_b"], failures["run_c"]
    assert failures["node2_id_restarted"] == failures["node2_id"]  # node auth: same key, same node id
    killed, rejoined = cluster.entry(2, b, 3), cluster.entry(2, c, 4)
    assert killed["status"] == "started" and rejoined["status"] == "done"
    assert killed["node_id"] == rejoined["node_id"] == failures["node2_id"]
    personal = {k: adapter_digest(v) for k, v in failures["ckpt3"].strategy_state["personal"].items()}
    assert rejoined["received"] == personal[2]  # its own adapter, not another client's or the init
    assert personal[2] not in (personal[0], personal[1])
    assert rejoined["received"] == killed["received"]  # unchanged while it was away
    state = cluster.client_state(2)
    assert state["rounds_trained"] == failures["rounds_before_kill"] + 1  # counters survived the restart
    assert state["rounds_trained"] == sum(e["status"] == "done" for e in state["history"])


def test_split_service_restart_mid_round_is_survived(cluster, failures):
    """Killed while the clients of run C were calling it; they retried until it was back."""
    node_logs = "".join(cluster.procs[label].text() for label in ("sn0", "sn1", "sn2-restarted"))
    back = f"service back in {failures['split_restart_s']:.1f} s; clients retry for ~16 s"
    assert "retry 1/" in node_logs, f"no client had to retry ({back})"
    assert failures["status_c"] == "finished:completed"
    c = failures["run_c"]
    assert all(cluster.entry(i, c, 4, status="done") for i in range(3)), back


def test_stopped_serverapp_resumes_from_checkpoint(cluster, failures):
    assert failures["stop_rc"] == 0, failures["stop_out"]
    assert failures["status_b"] == "finished:stopped"
    assert failures["ckpt3"].round == 3
    assert failures["status_c"] == "finished:completed", cluster.tails()
    assert "Resuming deploy from round 3" in failures["log_c"]
    rows = pd.read_csv(failures["c_dir"] / "metrics.csv")
    train = rows[(rows.split == "train") & (rows.metric == "train-loss")]
    by_round = train.groupby("round")["client"].apply(lambda s: sorted(s.tolist())).to_dict()
    assert by_round == {1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1], 4: [0, 1, 2]}
    summary = json.loads((failures["c_dir"] / "summary.json").read_text())
    assert set(summary["per_client"]) == {"0", "1", "2"}
    assert np.isfinite(summary["overall"]["recall@10"])
