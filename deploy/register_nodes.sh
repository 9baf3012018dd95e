#!/usr/bin/env bash
# Register SuperNode public keys with the running SuperLink (needs write_connection.sh first).
# Usage: deploy/register_nodes.sh [PUBLIC_KEY ...]     (default: every $DEPLOY_DIR/keys/sn*.pub)
# Prints the node id bound to each key; a key registered before is reported, not re-added.
set -euo pipefail
source "$(dirname "$0")/common.sh"
(($#)) || set -- "$KEYS"/sn*.pub
for pub in "$@"; do
  name="$(basename "$pub" .pub)"
  if ! out="$(flwr supernode register "$pub" "$CONNECTION" --name "$name" 2>&1)"; then
    echo "$out" >&2
    if ! grep -qi "already" <<<"$out"; then exit 1; fi
  fi
  echo "$out" | tail -n 2
done
flwr supernode list "$CONNECTION"
