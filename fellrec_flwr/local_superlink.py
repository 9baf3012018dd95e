"""One managed local SuperLink per Flower home: its own ports, and found and stopped by its home.

`flwr run` on the local connection (``address = ":local:"``, the default) talks to the SuperLink at
127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and, when nothing answers there, starts a detached
`flower-superlink` with the database and log of ``$FLWR_HOME/local-superlink/``
(flwr/cli/local_superlink.py). That port, and FLWR_LOCAL_CONTROL_API_PORT, default to 39091 and
39093 for every home, so a second project (another FLWR_HOME) submits its runs to the first
project's SuperLink, which runs them with the first project's environment. The wrapper therefore
gives each home its own ports, through those two variables:

- ports the user set in the environment are used as they are;
- a SuperLink of this home that is already running keeps its ports (a plain `flwr run` may have
  started it on the defaults);
- otherwise the ports recorded in ``$FLWR_HOME/local-superlink/fellrec-ports.json`` (chosen free
  on the first run), or new free ones when another program holds them now.

Before a run is submitted, :func:`check_superlink` refuses a port served by anything but this
home's SuperLink, and this home's SuperLink when it was started from another Python environment
or with other FELLREC_* / PYTHONPATH values (its apps would run with those).

Flower records no PID for its SuperLink, but the command line names its own log file in the home,
which is how :func:`managed_superlink_pids` finds it (Linux /proc) and :func:`stop_superlink`
stops exactly that one: never another user's or another project's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

HTTP_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"  # read by flwr/cli/constant.py
CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"
PORTS_FILE = "fellrec-ports.json"


class SuperLinkRefused(RuntimeError):
    """The local SuperLink this run would go to is not this home's, or not in this environment."""


@dataclass(frozen=True)
class Ports:
    http: int
    control: int
    origin: str  # where they come from, for messages

    def env(self) -> dict[str, str]:
        return {HTTP_PORT_ENV: str(self.http), CONTROL_PORT_ENV: str(self.control)}


def superlink_dir(home: Path) -> Path:
    return home / "local-superlink"


# -- finding and stopping this home's SuperLink ----------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd and cmd.index(name) + 1 < len(cmd) else None


def _same_file(pid: int, given: str | None, wanted: Path) -> bool:
    """`given` (a path on `pid`'s command line, relative to its working folder) is `wanted`."""
    if not given:
        return False
    path = Path(given)
    if not path.is_absolute():
        try:
            path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
        except OSError:
            return False
    return os.path.realpath(path) == os.path.realpath(wanted)


def managed_superlink_pids(home: Path) -> list[int]:
    """PIDs of `flower-superlink` processes of this user whose log file lies in `home` (Linux /proc)."""
    log_file = superlink_dir(home) / "superlink.log"
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
        if _same_file(int(entry.name), _option(cmd, "--log-file"), log_file):
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


# -- this home's ports -----------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (SO_REUSEADDR: a recently closed connection does not count,
    as it does not stop the SuperLink's own server from binding)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """`n` distinct ports the kernel reports free now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _running_ports(home: Path) -> Ports | None:
    for pid in managed_superlink_pids(home):
        cmd = _cmdline(pid)
        control = (_option(cmd, "--control-api-address") or "").rpartition(":")[2]
        if (_option(cmd, "--port") or "").isdigit() and control.isdigit():
            return Ports(int(_option(cmd, "--port")), int(control), f"the running SuperLink of {home} (pid {pid})")
    return None


def home_ports(home: Path, environ: Mapping[str, str]) -> Ports:
    """The local SuperLink ports for `home` (module docstring); records newly chosen ones."""
    ports = _running_ports(home) or _recorded_ports(home)
    _record(home, ports)
    given = {key: environ[key] for key in (HTTP_PORT_ENV, CONTROL_PORT_ENV) if environ.get(key)}
    if not given:
        return ports
    try:
        return Ports(int(given.get(HTTP_PORT_ENV, ports.http)), int(given.get(CONTROL_PORT_ENV, ports.control)),
                     " and ".join(given) + " in the environment")
    except ValueError:
        raise SuperLinkRefused(f"{given} is not a port number; unset it (the wrapper then picks free ports) "
                               "or set a number.") from None


def _recorded_ports(home: Path) -> Ports:
    """The recorded ports while both are free; else new free ones."""
    record = superlink_dir(home) / PORTS_FILE
    try:
        saved = json.loads(record.read_text())
        ports = Ports(int(saved["http"]), int(saved["control"]), str(record))
        if port_is_free(ports.http) and port_is_free(ports.control):
            return ports
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: choose new ones
    http, control = free_ports(2)
    return Ports(http, control, f"{record}, chosen free now")


def _record(home: Path, ports: Ports) -> None:
    record = superlink_dir(home) / PORTS_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"http": ports.http, "control": ports.control}) + "\n")
    tmp.replace(record)


# -- is it the right SuperLink? --------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {key: value for key, _, value in pairs}


def _bin_dir(cmd: list[str]) -> str | None:
    """The folder of the `flower-superlink` executable a command line ran (None: a bare name)."""
    for part in cmd[:2]:
        if Path(part).name == "flower-superlink" and os.sep in part:
            return os.path.dirname(os.path.abspath(part))
    return None


def environment_differences(pid: int, environ: Mapping[str, str], bin_dir: str) -> list[str]:
    """How the SuperLink `pid` was started differently from a run with `environ` whose Flower
    executables live in `bin_dir`: the Python environment, and FELLREC_* or PYTHONPATH."""
    out = []
    theirs = _bin_dir(_cmdline(pid))
    if theirs is not None and theirs != os.path.abspath(bin_dir):
        out.append(f"Python environment {theirs} (this one: {os.path.abspath(bin_dir)})")
    started = _environ(pid)
    if started:  # unreadable (another user's): nothing to compare
        for key in sorted({k for k in (*started, *environ) if k.startswith("FELLREC_") or k == "PYTHONPATH"}):
            if started.get(key) != environ.get(key):
                out.append(f"{key}={started.get(key)!r} (this shell: {environ.get(key)!r})")
    return out


def check_superlink(home: Path, ports: Ports, environ: Mapping[str, str], bin_dir: str) -> None:
    """Refuse (SuperLinkRefused) when a run with `environ` would reach another SuperLink than
    this home's, or this home's started in another environment. Nothing listening is fine:
    `flwr run` starts this home's SuperLink there."""
    mine = managed_superlink_pids(home)
    on_port = [p for p in mine if _option(_cmdline(p), "--port") == str(ports.http)]
    stop = "python -m fellrec_flwr.run --stop-superlink"
    if mine and not on_port:
        raise SuperLinkRefused(
            f"The SuperLink of FLWR_HOME={home} runs on another port than {ports.http} ({ports.origin}); a second "
            f"one would share its database. Unset {HTTP_PORT_ENV}, or stop it first: {stop}")
    if not on_port:
        if not port_is_free(ports.http):
            raise SuperLinkRefused(
                f"127.0.0.1:{ports.http} ({ports.origin}) is served by another program than the SuperLink of "
                f"FLWR_HOME={home} (another project's SuperLink?); this run would go there. Give this project its "
                f"own port: unset {HTTP_PORT_ENV} (the wrapper then picks free ones) or set it to a free port.")
        return
    differences = environment_differences(on_port[0], environ, bin_dir)
    if differences:
        raise SuperLinkRefused(
            f"The SuperLink of FLWR_HOME={home} (pid {on_port[0]}) was started with another environment: "
            f"{'; '.join(differences)}. Its apps would run with that one. Stop it ({stop}) and run again.")


def shell_exports(ports: Ports) -> str:
    """`export` lines that point plain `flwr` commands (list, log, stop, run) at this home's SuperLink."""
    return "\n".join(f"export {key}={value}" for key, value in ports.env().items())
