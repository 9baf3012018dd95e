#!/usr/bin/env bash
# Start the SuperLink (server machine) in the foreground: TLS, SuperNode authentication (only
# registered keys may join), state in a database (runs, logs and registered nodes survive a
# restart), and the installed project instead of a per-run `uv sync`.
# Usage: deploy/start_superlink.sh            (stop with Ctrl-C / SIGTERM)
#
# Safe layout (hardening finding 1): Flower 1.42 serves the Fleet, Control and Runtime APIs on
# one port, and the open-source Control API has no user authentication: whoever reaches it can
# register nodes and run any ServerApp. So the SuperLink itself listens on 127.0.0.1:$CONTROL_PORT
# only (Control + Runtime + Fleet: the operator's `flwr` CLI runs on this machine or through an
# SSH tunnel), and deploy/fleet_gateway.py listens on $BIND_HOST:$SUPERLINK_PORT, the address
# SuperNodes use, and forwards the Fleet API (POST /v1/fleet/...) and nothing else.
# The ServerApp runs with this script's working directory ($DEPLOY_DIR/superlink): pass absolute
# paths (out-dir, resume-from) in the run config.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/common.sh"
umask 077  # the database and logs are the operator's only
mkdir -p "$DEPLOY_DIR/superlink" && cd "$DEPLOY_DIR/superlink"
for f in "$CERTS/ca.crt" "$CERTS/server.pem" "$CERTS/server.key"; do
  [[ -f "$f" ]] || { echo "error: $f is missing; run deploy/make_certs.sh first" >&2; exit 2; }
done

flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth \
  --database "$DEPLOY_DIR/superlink/state.db" \
  --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$CONTROL_PORT" &
superlink=$!
gateway=""
stop() { kill $gateway "$superlink" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT
trap 'exit 143' TERM INT

for ((t = 0; t < 600; t++)); do  # until the SuperLink accepts connections (60 s)
  (exec 3<>"/dev/tcp/127.0.0.1/$CONTROL_PORT") 2>/dev/null && break
  kill -0 "$superlink" 2>/dev/null || { echo "error: the SuperLink exited" >&2; exit 1; }
  sleep 0.1
done
"$PYTHON" "$here/fleet_gateway.py" --listen "$BIND_HOST:$SUPERLINK_PORT" \
  --upstream "https://127.0.0.1:$CONTROL_PORT" --ca-file "$CERTS/ca.crt" \
  --certfile "$CERTS/server.pem" --keyfile "$CERTS/server.key" &
gateway=$!
echo "SuperLink Control API (operators only): https://127.0.0.1:$CONTROL_PORT"
echo "Fleet gateway for SuperNodes: https://$BIND_HOST:$SUPERLINK_PORT"
wait -n "$superlink" "$gateway"  # either one ending ends both (trap)
