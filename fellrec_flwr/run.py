"""`flwr run` that tells the truth about failures, and a stop that ends only this project's SuperLink.

    python -m fellrec_flwr.run [--app .] [any `flwr run` option ...]   # exit 0 only if the run completed
    python -m fellrec_flwr.run --stop-superlink                          # stop the SuperLink of $FLWR_HOME

`flwr run --stream` exits 0 even when the run fails (the ServerApp crashed, the simulation had
no resources, ...). This wrapper runs it, reads the run id it printed, asks `flwr list --run-id
ID --format json` for the final status and exits with:

    0  finished:completed        1  finished:failed / finished:stopped / any other final status
    2  no run was started, or its status could not be read

`flwr run .` on the local connection starts a detached `flower-superlink` and leaves it running,
with the environment of its first start. Flower records no PID for it, but its command line
names its own log file under `$FLWR_HOME/local-superlink/`, so `--stop-superlink` ends exactly
that process (and its process group): never another user's or another project's SuperLink.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

COMPLETED = "finished:completed"
_STARTED = re.compile(r"Successfully started run (\d+)")


def flwr_home() -> Path:
    """Flower's home folder, as the `flwr` CLI resolves it (FLWR_HOME, else ~/.flwr)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().resolve()


def flwr_bin() -> str:
    """The `flwr` CLI of this Python environment (the one the project is installed in)."""
    local = Path(sys.executable).parent / "flwr"
    if local.exists():
        return str(local)
    found = shutil.which("flwr")
    if found is None:
        raise SystemExit("`flwr` is not installed in this environment: pip install -e . (see README).")
    return found


def run_env() -> dict[str, str]:
    """The environment for `flwr`: this project's defaults, anything the user set wins."""
    env = dict(os.environ)
    # Use this environment instead of building a fresh one per run (needs the network, reinstalls torch).
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def started_run_id(output: str) -> str | None:
    """The run id `flwr run` printed ('Successfully started run 123'), or None."""
    found = _STARTED.findall(output)
    return found[-1] if found else None


def parse_status(list_output: str, run_id: str) -> str | None:
    """The status of `run_id` from `flwr list --format json` output (text before the JSON is skipped)."""
    start = list_output.find("{")
    if start < 0:
        return None
    try:
        payload = json.loads(list_output[start:])
    except json.JSONDecodeError:
        return None
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status"))
    return None


def exit_code_for(status: str | None) -> int:
    if status is None:
        return 2
    return 0 if status == COMPLETED else 1


def run_status(run_id: str, env: dict[str, str], superlink: str | None, wait_s: float = 60.0) -> str | None:
    """Final status of `run_id`; waits briefly for a run that is still being finalised."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run([flwr_bin(), "list", *([superlink] if superlink else []), "--run-id", run_id,
                              "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        status = parse_status(out.stdout, run_id)
        if status is None or status.startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(2.0)


def run(app: str, flwr_args: list[str], superlink: str | None = None) -> int:
    env = run_env()
    args = list(flwr_args)
    if "--stream" not in args:
        args.append("--stream")  # without it `flwr run` returns right after submitting
    connection = [superlink] if superlink else []
    proc = subprocess.Popen([flwr_bin(), "run", app, *connection, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # pass the log through as it streams
        sys.stdout.write(line)
        sys.stdout.flush()
        seen.append(line)
    proc.wait()
    run_id = started_run_id("".join(seen))
    if run_id is None:
        print(f"\nfellrec: no run was started (flwr run exited {proc.returncode}).", file=sys.stderr)
        return 2
    status = run_status(run_id, env, superlink)
    code = exit_code_for(status)
    print(f"\nfellrec: run {run_id} status {status or 'unknown'}; details: flwr list --run-id {run_id}, "
          f"log: flwr log {run_id}" + ("" if code == 0 else f" -> exit {code}"),
          file=sys.stderr if code else sys.stdout)
    return code


# -- stopping the managed local SuperLink ----------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def managed_superlink_pids(home: Path) -> list[int]:
    """PIDs of `flower-superlink` processes of this user whose log file lies in `home` (Linux /proc)."""
    log_file = str(home / "local-superlink" / "superlink.log")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        cmd = _cmdline(int(entry.name))
        if not cmd or not any(Path(c).name == "flower-superlink" for c in cmd[:2]):
            continue
        if "--log-file" in cmd and cmd.index("--log-file") + 1 < len(cmd) and cmd[cmd.index("--log-file") + 1] == log_file:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def end_process_groups(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM each PID's process group (a SuperLink's simulation children run in its group),
    then SIGKILL whatever is still there after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


def stop_superlink(home: Path, grace_s: float = 10.0) -> int:
    """Stop the managed SuperLink of `home` (and its process group); returns how many were found."""
    pids = managed_superlink_pids(home)
    end_process_groups(pids, grace_s)
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fellrec_flwr.run", description=__doc__.split("\n\n")[0],
        epilog="Every other option is passed to `flwr run` (e.g. --run-config, --federation-config).")
    parser.add_argument("--app", default=".", help="the Flower app folder (default: .)")
    parser.add_argument("--superlink", default=None,
                        help="SuperLink connection name from $FLWR_HOME/config.toml (default: the local one)")
    parser.add_argument("--stop-superlink", action="store_true",
                        help="stop the managed local SuperLink of $FLWR_HOME (only that one) and exit")
    args, rest = parser.parse_known_args(argv)
    if args.stop_superlink:
        home = flwr_home()
        n = stop_superlink(home)
        print(f"stopped {n} SuperLink process(es) of FLWR_HOME={home}" if n else
              f"no managed SuperLink of FLWR_HOME={home} is running")
        return 0
    return run(args.app, rest, args.superlink)


if __name__ == "__main__":
    raise SystemExit(main())
