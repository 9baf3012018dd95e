"""A real TLS + node-auth Flower deployment on 127.0.0.1 for tests, built with the deploy/ scripts.

`Cluster` runs the scripts exactly as deploy/README.md tells a user to, with everything private
to one temporary folder (DEPLOY_DIR, FLWR_HOME, FELLREC_CACHE) and free ports. Every process it
starts gets its own process group; `stop_all()` kills those groups and any descendants that
left them (the SuperLink's SuperExec starts its own session), by PID, never by name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from conftest import ROOT
from flwr_procs import BIN, free_port

DEPLOY = ROOT / "deploy"


class WaitTimeout(AssertionError):
    """A condition a test waited for did not happen in time."""


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5,
             context: Callable[[], str] | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` (and some context)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{context()}" if context else ""
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def _children() -> dict[int, list[int]]:
    """ppid -> [pid] for every process (Linux /proc)."""
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the "(comm)" that may hold spaces
        tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """True for a running process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 10.0) -> None:
    """Signal a process started with start_new_session=True, its group and all its descendants."""
    targets = [proc.pid, *descendants(proc.pid)]
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in targets:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.1)
    for pid in targets:  # whatever ignored `sig`
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Started:
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """One deployment: SuperLink, SuperNodes, split service; a fresh folder and fresh ports."""

    root: Path
    num_nodes: int = 3
    superlink_port: int = field(default_factory=free_port)  # the Fleet gateway (what SuperNodes reach)
    control_port: int = field(default_factory=free_port)  # the SuperLink itself, on loopback (flwr CLI)
    split_port: int = field(default_factory=free_port)
    bind_host: str = "127.0.0.1"
    connection: str = "fellrec-test"
    data_path: Path | None = None  # the clients' prepared-data folder (node config data-path)
    data_paths: dict[int, Path] = field(default_factory=dict)  # per client: only its own partition
    tokenizer_dir: Path | None = None  # the tiny model's tokenizer, for the split service
    procs: dict[str, Started] = field(default_factory=dict)
    node_ports: dict[int, int] = field(default_factory=dict)

    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy-state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHON": sys.executable,
            "DEPLOY_DIR": str(self.deploy_dir),
            "FLWR_HOME": str(self.root / "flwr-home"),
            "FELLREC_CACHE": str(self.root / "cache"),
            "BIND_HOST": self.bind_host,
            "SUPERLINK_HOST": "127.0.0.1",
            "SUPERLINK_PORT": str(self.superlink_port),
            "CONTROL_PORT": str(self.control_port),
            "SPLIT_PORT": str(self.split_port),
            "CONNECTION": self.connection,
            # three ClientApps + the ServerApp share two cores: one thread each avoids oversubscription
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        })
        env.update(extra)
        return env

    # -- scripts ----------------------------------------------------------------------------

    def script(self, name: str, *args: str, timeout: float = 120, check: bool = True,
               **extra: str) -> subprocess.CompletedProcess:
        out = subprocess.run([str(DEPLOY / name), *args], cwd=ROOT, env=self.env(**extra), capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def start(self, label: str, script: str, *args: str, **extra: str) -> Started:
        """Run a foreground deploy script in its own process group, output to logs/<label>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{label}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen([str(DEPLOY / script), *args], cwd=ROOT, env=self.env(**extra), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[label] = Started(proc, log)
        return self.procs[label]

    def stop(self, label: str, sig: int = signal.SIGKILL) -> None:
        started = self.procs.pop(label, None)
        if started is not None:
            kill_group(started.proc, sig)

    def stop_all(self) -> None:
        """Newest first: SuperNodes deregister while the SuperLink still answers."""
        for label in reversed(list(self.procs)):
            self.stop(label, signal.SIGTERM)

    def leftovers(self) -> list[int]:
        """PIDs of processes still running with this cluster's ports on their command line."""
        fragments = [f"127.0.0.1:{self.superlink_port}", f"--port {self.superlink_port}",
                     f"--port {self.control_port}", f"{self.bind_host}:{self.superlink_port}",
                     f"--port {self.split_port}", *(f"--port {p}" for p in self.node_ports.values())]
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(cmd.rstrip().endswith(f) or f"{f} " in cmd for f in fragments) and alive(int(proc.name)):
                found.append(int(proc.name))
        return found

    # -- the deployment -----------------------------------------------------------------------

    def setup(self) -> None:
        """Certificates, node keys, split credentials and the CLI connection (no process yet)."""
        self.script("make_certs.sh")
        self.script("make_node_keys.sh", str(self.num_nodes + 1))  # the extra key is never registered
        self.script("make_split_credentials.sh", str(self.num_nodes))
        self.script("write_connection.sh")

    def start_superlink(self) -> Started:
        started = self.start("superlink", "start_superlink.sh")
        gateway = f"Uvicorn running on https://{self.bind_host}:{self.superlink_port}"  # after the SuperLink
        wait_for(lambda: gateway in started.text() or started.proc.poll() is not None,
                 90, "the SuperLink and its Fleet gateway to listen", context=started.text)
        assert started.proc.poll() is None, started.text()
        return started

    def register_nodes(self) -> None:
        keys = [str(self.deploy_dir / "keys" / f"sn{i}.pub") for i in range(self.num_nodes)]
        self.script("register_nodes.sh", *keys, timeout=180)

    def start_node(self, i: int, label: str | None = None, **extra: str) -> Started:
        port = self.node_ports.setdefault(i, free_port())
        path = self.data_paths.get(i, self.data_path)
        if path is not None:
            extra.setdefault("DATA_PATH", str(path))
        return self.start(label or f"sn{i}", "start_supernode.sh", str(i), str(self.num_nodes),
                          NODE_PORT=str(port), **extra)

    def node_id_of(self, label: str) -> int | None:
        match = re.search(r"SuperNode ID: (\d+)", self.procs[label].text())
        return int(match.group(1)) if match else None

    def start_split_service(self, tokenizer_dir: Path, *args: str, label: str = "split") -> Started:
        started = self.start(label, "start_split_service.sh", "tiny", "--tokenizer", str(tokenizer_dir), *args)
        wait_for(lambda: "listening on" in started.text() or started.proc.poll() is not None, 120,
                 "the split service to listen", context=started.text)
        assert started.proc.poll() is None, started.text()
        return started

    # -- flwr CLI -------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def runs(self) -> dict[int, dict]:
        """run id -> `flwr list --format json` entry."""
        out = self.flwr("list", self.connection, "--format", "json")
        start = out.stdout.find("{")
        payload = json.loads(out.stdout[start:]) if start >= 0 else {}
        return {int(r["run-id"]): r for r in payload.get("runs", [])}

    def nodes(self) -> dict[int, str]:
        """node id -> status (registered / online / offline) from `flwr supernode list`."""
        out = self.flwr("supernode", "list", self.connection, "--format", "json")
        start = out.stdout.find("{")
        payload = json.loads(out.stdout[start:]) if start >= 0 else {}
        return {int(n["node-id"]): n["status"] for n in payload.get("nodes", [])}

    def submit(self, run_config: str, label: str) -> Started:
        """`flwr run <project> <connection> --stream` in the background; its output is the run log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{label}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), self.connection, "--stream",
                                     "--run-config", run_config], cwd=ROOT, env=self.env(), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[label] = Started(proc, log)
        return self.procs[label]

    def run_id_of(self, label: str, timeout: float = 120) -> int:
        started = self.procs[label]
        match = wait_for(lambda: re.search(r"Successfully started run (\d+)", started.text()), timeout,
                         f"{label} to be submitted", context=lambda: started.text()[-3000:])
        return int(match.group(1))

    def wait_run_finished(self, run_id: int, timeout: float) -> dict:
        def finished() -> dict | None:
            run = self.runs().get(run_id)
            return run if run and str(run["status"]).startswith("finished") else None

        return wait_for(finished, timeout, f"run {run_id} to finish", interval=3.0, context=self.tails)

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {label} ---\n{s.text()[-chars:]}" for label, s in self.procs.items())

    # -- client state written by the ClientApps ------------------------------------------------

    def state_dir(self, i: int) -> Path:
        return self.deploy_dir / "nodes" / f"sn{i}" / "state"

    def client_state(self, i: int) -> dict:
        path = self.state_dir(i) / f"client-{i}" / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def history(self, i: int, run_id: int | None = None) -> list[dict]:
        entries = self.client_state(i).get("history", [])
        return [e for e in entries if run_id is None or e["run_id"] == run_id]

    def entry(self, i: int, run_id: int, server_round: int, status: str | None = None) -> dict | None:
        for e in self.history(i, run_id):
            if e["round"] == server_round and (status is None or e["status"] == status):
                return e
        return None
