#!/usr/bin/env bash
# Start SuperNode number INDEX of NUM_NODES (client machine INDEX) in the foreground.
# Usage: deploy/start_supernode.sh INDEX NUM_NODES
# Environment (optional):
#   DATA_PATH   this client's prepared-data folder (else the settings-keyed cache under FELLREC_CACHE)
#   STATE_DIR   where the client keeps its adapter and counters (default $DEPLOY_DIR/nodes/sn<i>/state)
#   NODE_PORT   local Runtime API port; nodes sharing a machine need distinct ports (default 9200+INDEX)
# Needs on this machine: $DEPLOY_DIR/certs/ca.crt, keys/sn<i> (registered), and for split runs
# split/tokens/client-<i>.token. The split token reaches the ClientApp through the node config
# (a file path), never through the run config, which every node sees.
set -euo pipefail
umask 077  # this client's state, adapters and logs are its own
source "$(dirname "$0")/common.sh"
i="${1:?usage: start_supernode.sh INDEX NUM_NODES}"
n="${2:?usage: start_supernode.sh INDEX NUM_NODES}"
state_dir="${STATE_DIR:-$DEPLOY_DIR/nodes/sn$i/state}"
mkdir -p "$state_dir"
node_config="partition-id=$i num-partitions=$n state-dir='$state_dir'"
token="$SPLIT_DIR/tokens/client-$i.token"
[[ -f "$token" ]] && node_config+=" split-token-file='$token' split-ca-file='$CERTS/ca.crt'"
[[ -n "${DATA_PATH:-}" ]] && node_config+=" data-path='$DATA_PATH'"
cd "$state_dir"
exec flower-supernode \
  --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" \
  --root-certificates "$CERTS/ca.crt" \
  --auth-supernode-private-key "$KEYS/sn$i" \
  --node-config "$node_config" \
  --port "${NODE_PORT:-$((9200 + i))}"
