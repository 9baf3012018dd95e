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


# -- one local SuperLink per FLWR_HOME -------------------------------------------------------

_LISTENER = (f"#!{sys.executable}\n"  # a stand-in SuperLink: listens on its --port, like the real one
             "import socket, sys, time\n"
             "s = socket.socket()\n"
             "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             "s.bind(('127.0.0.1', int(sys.argv[sys.argv.index('--port') + 1])))\n"
             "s.listen()\n"
             "time.sleep(60)\n")


def _fake_superlink(tmp_path, home, port, env):
    """A process with the command line `flwr run` gives the managed SuperLink of `home`."""
    script = tmp_path / "flower-superlink"
    script.write_text(_LISTENER)
    script.chmod(0o755)
    proc = subprocess.Popen([str(script), "--control-api-address", f"127.0.0.1:{port + 1}", "--port", str(port),
                             "--log-file", str(home / "local-superlink" / "superlink.log")],
                            env=env, start_new_session=True)
    from fellrec_flwr.local_superlink import managed_superlink_pids, port_is_free

    deadline = time.time() + 10
    while (port_is_free(port) or not managed_superlink_pids(home)) and time.time() < deadline:
        time.sleep(0.1)
    return proc


def test_each_home_gets_its_own_recorded_ports(tmp_path):
    import socket

    from fellrec_flwr.local_superlink import CONTROL_PORT_ENV, HTTP_PORT_ENV, PORTS_FILE, home_ports

    a, b = tmp_path / "a", tmp_path / "b"
    first = home_ports(a, {})
    assert json.loads((a / "local-superlink" / PORTS_FILE).read_text()) == {"http": first.http,
                                                                          "control": first.control}
    assert (home_ports(a, {}).http, home_ports(a, {}).control) == (first.http, first.control)  # reused
    other = home_ports(b, {})
    assert len({first.http, first.control, other.http, other.control}) == 4
    assert home_ports(a, {HTTP_PORT_ENV: "40001"}).http == 40001  # the user's setting wins
    assert home_ports(a, {CONTROL_PORT_ENV: "40003"}).control == 40003
    with socket.socket() as taken:  # another program took the recorded port: new free ones
        taken.bind(("127.0.0.1", first.http))
        taken.listen()
        moved = home_ports(a, {})
        assert moved.http != first.http
    assert json.loads((a / "local-superlink" / PORTS_FILE).read_text())["http"] == moved.http


def test_a_run_is_refused_on_another_homes_or_environments_superlink(tmp_path):
    """The default ports are every home's: a second project's run went to the first one's
    SuperLink. The wrapper refuses that, and a SuperLink of its own home started with another
    environment; it reuses a running SuperLink of its own home on that one's ports."""
    import os

    from fellrec_flwr.local_superlink import SuperLinkRefused, check_superlink, free_ports, home_ports

    theirs, mine = tmp_path / "their-home", tmp_path / "my-home"
    port = free_ports(1)[0]
    bin_dir = str(tmp_path)  # where the stand-in's `flower-superlink` lives
    env = {**os.environ, "FELLREC_CACHE": "/their/cache"}
    fake = _fake_superlink(tmp_path, theirs, port, env)
    try:
        # their own home: its running SuperLink's ports, accepted in the same environment
        ports = home_ports(theirs, {})
        assert (ports.http, ports.control) == (port, port + 1)
        check_superlink(theirs, ports, env, bin_dir)
        with pytest.raises(SuperLinkRefused, match=r"another environment: FELLREC_CACHE='/their/cache' "
                                                   r"\(this shell: '/my/cache'\)"):
            check_superlink(theirs, ports, {**env, "FELLREC_CACHE": "/my/cache"}, bin_dir)
        with pytest.raises(SuperLinkRefused, match="another environment: Python environment"):
            check_superlink(theirs, ports, env, str(tmp_path / "other-venv" / "bin"))
        # another home on that port: refused, by the real wrapper, before anything is submitted
        with pytest.raises(SuperLinkRefused, match=f"127.0.0.1:{port} .* is served by another program"):
            check_superlink(mine, home_ports(mine, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}), env, bin_dir)
        wrapper = _wrapper({**os.environ, "FLWR_HOME": str(mine), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)},
                           "--run-config", "num-server-rounds=1", timeout=120)
        assert wrapper.returncode == 2, wrapper.stdout + wrapper.stderr
        assert "is served by another program than the SuperLink of" in wrapper.stderr
        assert "Successfully started run" not in wrapper.stdout
        # without the port in the environment, my home gets its own, free ports
        assert home_ports(mine, {}).http != port
    finally:
        fake.kill()


@pytest.mark.slow
def test_two_homes_side_by_side_each_run_on_their_own_superlink(tmp_path):
    """Two projects (FLWR_HOMEs) at once, no ports set: each wrapper gives its home its own
    SuperLink and each run lands there, not on the other's. A run that fails at once in the
    ServerApp (an unknown strategy) keeps it short: it is still submitted, run and finished."""
    from fellrec_flwr.local_superlink import PORTS_FILE, managed_superlink_pids
    from fellrec_flwr.run import started_run_id

    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    envs = []
    for home in homes:
        env = flower_env(home, 0, FELLREC_CACHE=str(tmp_path / "cache"))
        env.pop("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT")  # the wrapper chooses
        envs.append(env)
    run = [sys.executable, "-m", "fellrec_flwr.run", "--run-config",
           f"{TINY_RUN} strategy='no-such-strategy' out-dir='{tmp_path / 'out'}'",
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    procs = [subprocess.Popen(run, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in envs]
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        ports = [json.loads((home / "local-superlink" / PORTS_FILE).read_text())["http"] for home in homes]
        assert ports[0] != ports[1]
        for home, env, proc, out, port in zip(homes, envs, procs, outputs, ports):
            assert proc.returncode == 1 and "finished:failed" in out, out[-4000:]  # the unknown strategy
            assert f"Using SuperLink: local (127.0.0.1:{port})" in out, out[-4000:]
            assert (home / "local-superlink" / "superlink.log").exists()
            listed = run_list_json({**env, "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)})
            assert [str(r["run-id"]) for r in listed] == [started_run_id(out)]  # its run only
        # each home's stop ends its own SuperLink and leaves the other's running
        stop = _wrapper(envs[0], "--stop-superlink", timeout=60)
        assert "stopped 1" in stop.stdout and not managed_superlink_pids(homes[0]), stop.stdout + stop.stderr
        assert managed_superlink_pids(homes[1])
        assert "stopped 1" in _wrapper(envs[1], "--stop-superlink", timeout=60).stdout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for home in homes:
            kill_tree(managed_superlink_pids(home))


# -- relative paths --------------------------------------------------------------------------


def test_the_wrapper_makes_relative_paths_absolute_against_its_folder(tmp_path):
    """Flower's apps run in the SuperLink's folder: the wrapper resolves data.path,
    data.prepared-dir, resume-from and out-dir (also the default) against the folder it runs in,
    and passes every other value through unchanged, as Flower's own parser reads it."""
    from flwr.common.config import parse_config_args

    from fellrec_flwr.run import with_absolute_paths

    given = ("data.path='mydata' data.prepared-dir='../prep dir' data.user-col=\"it's\" num-server-rounds=2 "
             "train.lr=0.0001 split.enabled=true")
    for args in (["--run-config", given, "--federation-config", "num-supernodes=2"],
                 ["-c", given, "--federation-config", "num-supernodes=2"],
                 [f"--run-config={given}", "--federation-config", "num-supernodes=2"]):
        out, notes = with_absolute_paths(args, str(ROOT), tmp_path / "here")
        assert out[:2] == ["--federation-config", "num-supernodes=2"] and out[2] == "--run-config"
        assert parse_config_args([out[3]]) == {**parse_config_args([given]), "data.path": f"{tmp_path}/here/mydata",
                                               "data.prepared-dir": f"{tmp_path}/prep dir",
                                               "out-dir": f"{tmp_path}/here/results"}
        assert "data.path='mydata' -> " in notes[0] and len(notes) == 3
    absolute = ["--run-config", f"data.path='{tmp_path}' out-dir='{tmp_path}/out'"]
    assert with_absolute_paths(absolute, str(ROOT), tmp_path) == (absolute, [])


def test_the_apps_refuse_relative_data_paths_and_the_checker_resolves_them(tmp_path, monkeypatch, capsys):
    """A plain `flwr run` reads a relative path from the SuperLink's folder: the apps refuse it,
    naming the absolute-path fix; the checker shows what it means from here."""
    from flwr.app import Context, RecordDict

    from fellrec_flwr.config import ConfigError, from_run_config, main as check_cli, refuse_relative_paths

    relative = {"data.dataset": "table", "data.path": "../mydata"}
    with pytest.raises(ConfigError, match=r"data.path='../mydata': a relative path, but Flower's apps run in the "
                                          r"SuperLink's working folder .* data.path='\$PWD/../mydata'.*fellrec_flwr.run"):
        refuse_relative_paths(from_run_config(relative))
    refuse_relative_paths(from_run_config({"data.path": str(tmp_path), "out-dir": "results"}))  # out-dir may be
    import server_app.app as server
    from client_app.app import client_config

    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config=relative)
    for app_entry in (lambda: server.main(None, context), lambda: client_config(context)):
        with pytest.raises(ConfigError, match="a relative path"):
            app_entry()
    monkeypatch.chdir(tmp_path)
    assert check_cli(["data.dataset='table' data.path='mydata'"]) == 0
    printed = capsys.readouterr().out
    assert f"data.path='mydata' -> {tmp_path}/mydata (relative: python -m fellrec_flwr.run passes this " \
           "absolute path; plain flwr run refuses it; not found)" in printed
    assert f"out-dir='results' -> {tmp_path}/results" in printed


def test_the_default_size_notice_is_hidden_only_when_the_size_is_given():
    from fellrec_flwr.run import shown

    notice = "WARNING :   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2."
    assert not shown(notice, ["--federation-config", "num-supernodes=5"])
    assert shown(notice, ["--run-config", "num-server-rounds=1"]) and shown("INFO : other", ["num-supernodes=5"])
