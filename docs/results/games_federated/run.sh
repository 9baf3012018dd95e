#!/usr/bin/env bash
# The exact command sequence of the Games verdict: two lanes of one torch thread each, nice 5.
# Run from the repository root with the project's env active (FELLREC_CACHE set).
# Rounds: 2 (one local epoch of 400 windows per client each); see docs/results.md for why.
set -euo pipefail
B="nice -n 5 python bench/games_federated.py --rounds 2"
ADAPTERS="${FELLREC_CACHE:-.cache/fellrec}/games-federated/adapters"
states() {
  $B --phase states --parts catalogue,test,valid      # catalogue + test converted from games_retrieval's cache
  $B --phase states --parts windows --clients 0,1,2 & $B --phase states --parts windows --clients 3,4; wait
}
lane_a() {
  $B --phase train --methods fedavg          # round 1 (shared by every federated method) + FedAvg
  $B --phase train --methods fellrec
  $B --phase train --methods fellrec+
  $B --phase eval --methods fellrec,fellrec+ --rounds-to-eval final
}
lane_b() {
  $B --phase baselines
  $B --phase train --methods centralized
  $B --phase eval --methods centralized --rounds-to-eval 1,2
  while [ ! -e "$ADAPTERS/round1-c4.safetensors" ]; do sleep 20; done
  $B --phase train --methods local
  while [ ! -e "$ADAPTERS/fedavg-r2-c4.safetensors" ]; do sleep 20; done
  $B --phase eval --methods fedavg --rounds-to-eval 1,2
  $B --phase eval --methods local --rounds-to-eval final
}
case "${1:-}" in
  states) states ;;
  a) lane_a ;;
  b) lane_b ;;
  report) python bench/games_federated.py --rounds 2 --phase report ;;
  *) echo "usage: $0 states|a|b|report (a and b run side by side)"; exit 2 ;;
esac
