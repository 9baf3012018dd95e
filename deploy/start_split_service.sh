#!/usr/bin/env bash
# Start the split-inference service (the middle decoder layers) in the foreground: gRPC over TLS
# with the server certificate, accepting only clients with a token derived from split/secret.txt.
# Usage: deploy/start_split_service.sh MODEL [extra service options]
#   MODEL: a safetensors folder or .gguf file/folder of the run's model.name, or
#          `tiny --tokenizer DIR [--tiny-layers L ...]` for the built-in tiny model.
# Environment: FRONT_K / BACK_K (default 1/1, must match split.front-k / split.back-k), DEVICE (cpu).
# Clients reach it at https://$SUPERLINK_HOST:$SPLIT_PORT (pass it as split.service-url; the
# https scheme means gRPC over TLS). Liveness probe: the gRPC method
# /fellrec.split.v2.SplitService/Health (no credentials), not an HTTP GET.
set -euo pipefail
umask 077
source "$(dirname "$0")/common.sh"
[[ "$(stat -c %a "$SPLIT_DIR/secret.txt" 2>/dev/null)" == 600 ]] || {
  echo "error: $SPLIT_DIR/secret.txt must exist with mode 600 (deploy/make_split_credentials.sh)" >&2; exit 2; }
model="${1:?usage: start_split_service.sh MODEL [options]}"; shift
exec "$PYTHON" -m server_app.split_service --model "$model" "$@" \
  --front-k "${FRONT_K:-1}" --back-k "${BACK_K:-1}" --device "${DEVICE:-cpu}" \
  --secret-file "$SPLIT_DIR/secret.txt" \
  --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" \
  --host "$BIND_HOST" --port "$SPLIT_PORT"
