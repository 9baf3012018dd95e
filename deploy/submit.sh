#!/usr/bin/env bash
# Submit a FELLRec run to the SuperLink, stream its log, and exit non-zero unless it *completed*
# (`flwr run --stream` itself exits 0 even when the run failed).
# Usage (from the project root): deploy/submit.sh "RUN-CONFIG OVERRIDES"
#   e.g. deploy/submit.sh "num-server-rounds=3 min-clients=3 data.num-clients=3 out-dir='$PWD/results'"
set -euo pipefail
source "$(dirname "$0")/common.sh"
flwr run . "$CONNECTION" --stream --run-config "${1:-}"
# The newest run is ours; its status must be finished:completed.
status="$(flwr list "$CONNECTION" --format json | "$PYTHON" -c '
import json, sys
text = sys.stdin.read()
runs = json.loads(text[text.find("{"):]).get("runs", [])
print(max(runs, key=lambda r: int(r["run-id"]))["status"] if runs else "no-run")')"
echo "run status: $status"
[[ "$status" == "finished:completed" ]]
