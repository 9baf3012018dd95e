#!/usr/bin/env bash
# Create one EC key pair per SuperNode (OpenSSH format, as `flwr supernode register` expects).
# Usage: deploy/make_node_keys.sh NUM_NODES
# Output: $DEPLOY_DIR/keys/sn<i> (private: stays on client machine i) and sn<i>.pub (goes to the
# server for registration). Existing keys are kept: a node's key is its identity (same key ->
# same node id after a restart).
set -euo pipefail
umask 077  # private keys (and the folder) owner-only from creation; ssh-keygen writes sn<i> 600
source "$(dirname "$0")/common.sh"
n="${1:?usage: make_node_keys.sh NUM_NODES}"
mkdir -p "$KEYS"
for ((i = 0; i < n; i++)); do
  [[ -f "$KEYS/sn$i" ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "fellrec-sn$i" -f "$KEYS/sn$i"
done
chmod 644 "$KEYS"/sn*.pub  # public halves: these go to the admin
ls "$KEYS"/sn*.pub
