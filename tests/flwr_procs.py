"""Start and stop Flower CLI processes for end-to-end tests, leaving nothing behind.

The managed local SuperLink that `flwr run .` starts is a detached background process: a
test gives it a private FLWR_HOME and port, and kills it (and its process group) by PID at
the end, as CI must not leak processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_DEDUP_LOGS": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update(extra)
    return env


def pids_matching(fragment: str) -> list[int]:
    """PIDs whose command line contains `fragment` (read from /proc; Linux only)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def kill_tree(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each PID's process group, then SIGKILL whatever is left (the app's own safe stop)."""
    from fellrec_flwr.run import end_process_groups

    end_process_groups(pids, grace)


def run_list_json(env: dict[str, str]) -> list[dict]:
    out = subprocess.run([str(BIN / "flwr"), "list", "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=60)
    start = out.stdout.find("{")
    payload = json.loads(out.stdout[start:]) if start >= 0 else {}
    return payload.get("runs", [])
