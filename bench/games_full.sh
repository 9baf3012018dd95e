#!/usr/bin/env bash
# The Games verdict of the item-token head (docs/results.md "Games at full data"): every method through the
# app's own code path — the centralized command and `flwr run` (python -m fellrec_flwr.run) — on 5 K-means
# clients, every training window, 10,000 test users; run folders under docs/results/games-full/.
#   nice bash bench/games_full.sh [step ...]     steps: data baselines centralized fedavg fellrec report curve
#   FED_ROUNDS=1 bash bench/games_full.sh fedavg   (override the file's num-server-rounds for the federated runs)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-$(cd .. && pwd)/shared}
PREPARED=${PREPARED:-$PWD/.cache/prepared/games-k5}
ALL_USERS=${ALL_USERS:-$PWD/.cache/prepared/games-all}
OUT=${OUT:-$PWD/docs/results/games-full}
MODEL=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
GAMES=$SHARED/data/amazon-games
[ -f "$MODEL" ] && [ -d "$GAMES" ] || { echo "needs $MODEL and $GAMES (../shared)"; exit 2; }
RC="$(python bench/item_head_settings.py) model.name='$MODEL' data.prepared-dir='$PREPARED' out-dir='$OUT'"
FED="num-supernodes=5 client-resources-num-cpus=1"
steps=${*:-data baselines centralized fedavg fellrec report curve}

for step in $steps; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case $step in
    data)  # 5 K-means clients on BPR-MF user embeddings, every window, 2,000 valid / 10,000 test users
      [ -f "$PREPARED/manifest.json" ] || python -m data_prep --dataset games --path "$GAMES" --out "$PREPARED" \
        --partitioner kmeans --num-clients 5 --train-samples 0 --valid-users 2000 --test-users 10000 --history-len 10
      [ -f "$ALL_USERS/manifest.json" ] || python -m data_prep --dataset games --path "$GAMES" --out "$ALL_USERS" \
        --partitioner iid --num-clients 5 --train-samples 100 --valid-users 2000 --test-users 0 --history-len 10 ;;
    baselines)
      for b in popularity markov sasrec; do
        python -m fellrec_flwr.train.centralized --$b --run-config "$RC run-name='$b'"
      done ;;
    centralized) python -m fellrec_flwr.train.centralized --run-config "$RC run-name='centralized'" ;;
    fedavg|fellrec|fellrec+|fedprox|local)
      FRC="$(python bench/item_head_settings.py ${FED_ROUNDS:+num-server-rounds=$FED_ROUNDS}) model.name='$MODEL'"
      FRC="$FRC data.prepared-dir='$PREPARED' out-dir='$OUT'"
      python -m fellrec_flwr.run --run-config "$FRC strategy='$step' run-name='$step'" --federation-config "$FED" ;;
    report)
      runs=(); for r in centralized fedavg fellrec; do [ -f "$OUT/$r/summary.json" ] && runs+=("$OUT/$r"); done
      python -m fellrec_flwr.eval.compare "${runs[@]}" --out "$OUT/compare"
      python -m fellrec_flwr.eval.breakdown "${runs[@]}" --out "$OUT" ;;
    curve) python bench/item_head_curve.py --prepared-dir "$PREPARED" --all-users-dir "$ALL_USERS" --epochs 2 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
