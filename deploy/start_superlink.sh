#!/usr/bin/env bash
# Start the SuperLink (server machine) in the foreground: TLS, SuperNode authentication (only
# registered keys may join), state in a database (runs, logs and registered nodes survive a
# restart), and the installed project instead of a per-run `uv sync`.
# Usage: deploy/start_superlink.sh            (stop with Ctrl-C / SIGTERM)
# The ServerApp runs with this script's working directory ($DEPLOY_DIR/superlink): pass absolute
# paths (out-dir, resume-from) in the run config.
set -euo pipefail
source "$(dirname "$0")/common.sh"
mkdir -p "$DEPLOY_DIR/superlink" && cd "$DEPLOY_DIR/superlink"
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth \
  --database "$DEPLOY_DIR/superlink/state.db" \
  --disable-runtime-dependency-installation \
  --host "$BIND_HOST" --port "$SUPERLINK_PORT"
