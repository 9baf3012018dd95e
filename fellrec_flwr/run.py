"""`flwr run` that tells the truth about failures, and a stop that ends only this project's SuperLink.

    python -m fellrec_flwr.run [--app .] [any `flwr run` option ...]   # exit 0 only if the run completed
    python -m fellrec_flwr.run --stop-superlink                          # stop the SuperLink of $FLWR_HOME

`flwr run --stream` exits 0 even when the run fails (the ServerApp crashed, the simulation had
no resources, ...). This wrapper runs it, reads the run id it printed, asks `flwr list --run-id
ID --format json` for the final status and exits with:

    0  finished:completed        1  finished:failed / finished:stopped / any other final status
    2  no run was started, or its status could not be read

`flwr run .` on the local connection starts a detached `flower-superlink` and leaves it running,
with the environment of its first start, on ports that are the same for every FLWR_HOME unless
set, and runs the apps in that SuperLink's working folder. So the wrapper:

- makes relative paths in --run-config (and the default out-dir) absolute against the folder it
  runs in (config.PATH_KEYS), for the local SuperLink;
- gives each FLWR_HOME its own ports and refuses to submit to a SuperLink of another home or
  environment (fellrec_flwr/local_superlink.py); `--print-env` prints the ports for plain `flwr`;
- hides Flower's notice that the default number of simulated SuperNodes changed when
  --federation-config sets num-supernodes (the next line states the real number).

`--stop-superlink` ends exactly this home's SuperLink (and its process group): never another
user's or another project's.

    python -m fellrec_flwr.run --print-env      # export lines: eval "$(python -m fellrec_flwr.run --print-env)"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fellrec_flwr.local_superlink import (  # noqa: F401 (end_process_groups, managed_superlink_pids: re-exported)
    SuperLinkRefused, check_superlink, end_process_groups, home_ports, managed_superlink_pids, shell_exports,
    stop_superlink)

COMPLETED = "finished:completed"
# Printed by Flower (>= 1.32) on every simulation, also when num-supernodes is set.
DEFAULT_SIZE_NOTICE = "default simulated SuperNodes changed from 10 to 2"
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
    # `flwr` starts the local SuperLink as `flower-superlink` from PATH: this environment's.
    env["PATH"] = os.pathsep.join([str(Path(flwr_bin()).parent), env.get("PATH", "")])
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


_RUN_CONFIG = ("--run-config", "-c")


def _toml_value(value: object) -> str:
    """A run-config value as `flwr run --run-config` text reads it back (Flower's own parser)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"  # a TOML literal string: no escapes
    if '"' not in text:
        return json.dumps(text)  # a TOML basic string (JSON escapes are TOML escapes)
    raise SystemExit(f"fellrec: the run-config value {text!r} holds both quote characters; Flower cannot pass it.")


def with_absolute_paths(flwr_args: list[str], app: str, cwd: Path) -> tuple[list[str], list[str]]:
    """`flwr run` arguments whose path keys (config.PATH_KEYS, given or the app's default) are
    absolute against `cwd`, since the apps run in the SuperLink's folder; and a note per change.
    Arguments without a relative path come back unchanged."""
    from flwr.common.config import flatten_dict, parse_config_args

    from fellrec_flwr.config import PATH_KEYS

    values, rest = [], []
    i = 0
    while i < len(flwr_args):
        arg = flwr_args[i]
        if arg in _RUN_CONFIG and i + 1 < len(flwr_args):
            values.append(flwr_args[i + 1])
            i += 2
            continue
        if arg.startswith("--run-config="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    given = parse_config_args(values) if values else {}  # as `flwr run` reads them
    try:  # the app's defaults (out-dir = "results")
        import tomllib

        defaults = flatten_dict(tomllib.loads((Path(app) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, ValueError):
        defaults = {}
    changed = {}
    for key in PATH_KEYS:
        value = given.get(key, defaults.get(key, ""))
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            changed[key] = os.path.abspath(cwd / os.path.expanduser(value))
    if not changed:
        return list(flwr_args), []
    text = " ".join(f"{k}={_toml_value(v)}" for k, v in {**given, **changed}.items())
    notes = [f"{k}={given.get(k, defaults.get(k))!r} -> {v!r}" for k, v in changed.items()]
    return [*rest, "--run-config", text], notes


def shown(line: str, flwr_args: list[str]) -> bool:
    """False for Flower's default-size notice when the federation size is given."""
    return not (DEFAULT_SIZE_NOTICE in line and any("num-supernodes" in a for a in flwr_args))


def uses_local_superlink(superlink: str | None) -> bool:
    """True if the connection (`superlink`, else the default of $FLWR_HOME/config.toml) is Flower's
    managed local SuperLink, read with Flower's own config reader."""
    from flwr.cli.constant import LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY
    from flwr.cli.flower_config import read_superlink_connection

    try:
        address = read_superlink_connection(superlink).address
    except Exception:  # noqa: BLE001 -- a broken config: `flwr run` itself says what is wrong
        return True
    return address in (None, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY)


def with_home_superlink(env: dict[str, str]) -> dict[str, str]:
    """`env` with this FLWR_HOME's local SuperLink ports; raises SuperLinkRefused when that port is
    another home's SuperLink, or this home's in another environment."""
    home = flwr_home()
    ports = home_ports(home, env)
    check_superlink(home, ports, env, str(Path(flwr_bin()).parent))
    print(f"fellrec: FLWR_HOME={home} has its local SuperLink on 127.0.0.1:{ports.http} (from {ports.origin})",
          flush=True)
    return {**env, **ports.env()}


def run(app: str, flwr_args: list[str], superlink: str | None = None) -> int:
    env = run_env()
    local = uses_local_superlink(superlink)
    if local:  # a remote SuperLink's apps run on another machine: its paths are not ours to resolve
        flwr_args, notes = with_absolute_paths(flwr_args, app, Path.cwd())
        if notes:
            print(f"fellrec: paths resolved against {Path.cwd()}: " + ", ".join(notes), flush=True)
        try:
            env = with_home_superlink(env)
        except SuperLinkRefused as err:
            print(f"fellrec: {err}", file=sys.stderr)
            return 2
    args = list(flwr_args)
    if "--stream" not in args:
        args.append("--stream")  # without it `flwr run` returns right after submitting
    connection = [superlink] if superlink else []
    proc = subprocess.Popen([flwr_bin(), "run", app, *connection, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # pass the log through as it streams
        seen.append(line)
        if shown(line, args):
            sys.stdout.write(line)
            sys.stdout.flush()
    proc.wait()
    run_id = started_run_id("".join(seen))
    if run_id is None:
        print(f"\nfellrec: no run was started (flwr run exited {proc.returncode}).", file=sys.stderr)
        return 2
    status = run_status(run_id, env, superlink)
    code = exit_code_for(status)
    ports = ' (in a shell after: eval "$(python -m fellrec_flwr.run --print-env)")' if local else ""
    print(f"\nfellrec: run {run_id} status {status or 'unknown'}; details: flwr list --run-id {run_id}, "
          f"log: flwr log {run_id}{ports}" + ("" if code == 0 else f" -> exit {code}"),
          file=sys.stderr if code else sys.stdout)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fellrec_flwr.run", description=__doc__.split("\n\n")[0],
        epilog="Every other option is passed to `flwr run` (e.g. --run-config, --federation-config).")
    parser.add_argument("--app", default=".", help="the Flower app folder (default: .)")
    parser.add_argument("--superlink", default=None,
                        help="SuperLink connection name from $FLWR_HOME/config.toml (default: the local one)")
    parser.add_argument("--stop-superlink", action="store_true",
                        help="stop the managed local SuperLink of $FLWR_HOME (only that one) and exit")
    parser.add_argument("--print-env", action="store_true",
                        help="print `export` lines with the local SuperLink ports of $FLWR_HOME, for plain "
                             "`flwr` commands, and exit")
    args, rest = parser.parse_known_args(argv)
    if args.print_env:
        try:
            print(shell_exports(home_ports(flwr_home(), os.environ)))
        except SuperLinkRefused as err:
            print(f"fellrec: {err}", file=sys.stderr)
            return 2
        return 0
    if args.stop_superlink:
        home = flwr_home()
        n = stop_superlink(home)
        print(f"stopped {n} SuperLink process(es) of FLWR_HOME={home}" if n else
              f"no managed SuperLink of FLWR_HOME={home} is running")
        return 0
    return run(args.app, rest, args.superlink)


if __name__ == "__main__":
    raise SystemExit(main())
