#!/usr/bin/env bash
# Lane B as actually run after 22:48 (run.sh's lane b up to the centralized training, then this:
# FedAvg's round-1 evaluation was dropped to fit the deadline; the first method to finish takes
# FELLRec+'s evaluation, see docs/results.md).
set -euo pipefail
B="nice -n 5 python bench/games_federated.py --rounds 2"
ADAPTERS="${FELLREC_CACHE:-.cache/fellrec}/games-federated/adapters"
while [ ! -e "$ADAPTERS/centralized-r2.safetensors" ]; do sleep 15; done
sleep 5
$B --phase eval --methods centralized --rounds-to-eval 1,2
$B --phase train --methods local
while [ ! -e "$ADAPTERS/fedavg-r2-c4.safetensors" ]; do sleep 20; done
$B --phase eval --methods fedavg --rounds-to-eval 2
$B --phase eval --methods local --rounds-to-eval final
