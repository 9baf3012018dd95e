#!/usr/bin/env bash
# Create the split service's secret (once) and issue one token per client from it.
# Usage: deploy/make_split_credentials.sh NUM_NODES
# Output: $DEPLOY_DIR/split/secret.txt (server only, mode 600) and split/tokens/client-<i>.token
# (copy token i to client machine i only). A token is HMAC-SHA256(secret, "client-<i>"): the
# service checks it without a token table; a new secret revokes every token.
set -euo pipefail
umask 077  # before anything is created: the secret, the tokens and their folders are owner-only
source "$(dirname "$0")/common.sh"
n="${1:?usage: make_split_credentials.sh NUM_NODES}"
mkdir -p "$SPLIT_DIR/tokens"
[[ -f "$SPLIT_DIR/secret.txt" ]] || "$PYTHON" -m fellrec_flwr.split.auth new-secret "$SPLIT_DIR/secret.txt"
for ((i = 0; i < n; i++)); do
  "$PYTHON" -m fellrec_flwr.split.auth issue --secret-file "$SPLIT_DIR/secret.txt" --client-key "client-$i" \
    > "$SPLIT_DIR/tokens/client-$i.token"
done
ls "$SPLIT_DIR/tokens"
