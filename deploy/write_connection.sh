#!/usr/bin/env bash
# Write the [superlink.$CONNECTION] entry (TLS, our CA) into $FLWR_HOME/config.toml, replacing
# an older entry of the same name. `flwr run . $CONNECTION`, `flwr list`, `flwr stop` use it.
# Usage: deploy/write_connection.sh      (on the server: the Control API listens on its loopback only;
# from another machine first open a tunnel: ssh -N -L $CONTROL_PORT:127.0.0.1:$CONTROL_PORT server)
set -euo pipefail
source "$(dirname "$0")/common.sh"
cfg="$FLWR_HOME/config.toml"
mkdir -p "$FLWR_HOME"
[[ -f "$cfg" ]] || flwr config list >/dev/null 2>&1 || true   # let flwr create its default file
touch "$cfg"
# Drop an existing block of that name (its header up to the next [section]).
awk -v hdr="[superlink.$CONNECTION]" '
  /^\[/ { skip = ($0 == hdr) }
  !skip' "$cfg" > "$cfg.tmp"
cat >> "$cfg.tmp" <<TOML

[superlink.$CONNECTION]
address = "127.0.0.1:$CONTROL_PORT"
root-certificates = "$CERTS/ca.crt"
TOML
mv "$cfg.tmp" "$cfg"
echo "connection '$CONNECTION' -> 127.0.0.1:$CONTROL_PORT (the SuperLink's Control API) written to $cfg"
