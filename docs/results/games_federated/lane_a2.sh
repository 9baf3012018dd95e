#!/usr/bin/env bash
# Lane A as actually run after 22:57 (run.sh's lane a up to FELLRec's training, then this;
# FELLRec+'s evaluation runs in lane B, which ends first: lane_b2.sh + `--phase eval --methods fellrec+`).
set -euo pipefail
B="nice -n 5 python bench/games_federated.py --rounds 2"
ADAPTERS="${FELLREC_CACHE:-.cache/fellrec}/games-federated/adapters"
while [ ! -e "$ADAPTERS/fellrec-r2-c4.safetensors" ]; do sleep 15; done
while pgrep -f -- "--phase train --methods fellrec$" > /dev/null; do sleep 5; done
$B --phase train --methods fellrec+
$B --phase eval --methods fellrec --rounds-to-eval final
