#!/usr/bin/env bash
# After the 2-round verdict: a third round for FedAvg and centralized (lanes side by side), to test
# the budget extrapolation with a measured point. Report with --rounds 2 stays the verdict table.
set -euo pipefail
B="nice -n 5 python bench/games_federated.py --rounds 3"
case "$1" in
  a) $B --phase train --methods fedavg && $B --phase eval --methods fedavg --rounds-to-eval 3 ;;
  b) $B --phase train --methods centralized && $B --phase eval --methods centralized --rounds-to-eval 3 ;;
esac
# then (23:45) the same for FELLRec+ and local, side by side:
#   nice -n 5 python bench/games_federated.py --rounds 3 --phase train --methods fellrec+ && ... --phase eval --methods fellrec+ --rounds-to-eval 3
#   nice -n 5 python bench/games_federated.py --rounds 3 --phase train --methods local && ... --phase eval --methods local --rounds-to-eval 3
# then (00:10) FELLRec alone:
#   python bench/games_federated.py --rounds 3 --phase train --methods fellrec && ... --phase eval --methods fellrec --rounds-to-eval 3
#   python bench/games_federated.py --rounds 3 --phase report --report-name games_federated_round3
