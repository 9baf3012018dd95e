#!/usr/bin/env bash
# The paper's claim in the paper's setting (docs/results.md "FELLRec vs FedAvg on K-means Games clients"):
# every method on one Games partition, for several seeds, through the app's own code path — `flwr run`
# (python -m fellrec_flwr.run) for the federated methods, the centralized command for centralized — with the
# item-token head (bench/games_full.toml) and the same examples budget for every method: ROUNDS rounds, each
# on a fresh FRACTION share of every client's users (train.data-fraction), so that a run costs minutes.
#
#   bash bench/games_paper.sh PARTITION [SEED ...]      PARTITION: kmeans | hetero
#   METHODS="fedavg fellrec" bash bench/games_paper.sh kmeans 1 2 3
#
#   kmeans: 5 clients from K-means on BPR-MF user embeddings (the paper's construction)
#   hetero: 20 clients, Dirichlet(0.1) over 10 K-means groups (stronger heterogeneity: JS in docs/results/games-hetero)
# Run folders: docs/results/games-<partition>/<method>-s<seed>/ (config.json, summary.json, per_user.csv with the
# popularity, Markov and SASRec rows of the same users, metrics.csv, balance_weights.png for FELLRec).
# A finished run (summary.json present) is skipped: rerunning the script resumes the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTITION=${1:?usage: bash bench/games_paper.sh kmeans|hetero [SEED ...]}
shift
SEEDS=${*:-1 2 3}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
GAMES=$SHARED/data/amazon-games
MODEL=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
ROUNDS=${ROUNDS:-4}
FRACTION=${FRACTION:-0.075}  # 4 rounds x 7.5 % = 0.3 of an epoch per method: the budget two CPU cores allow
# 16 sequence chunks per step instead of the verdict's 64: four times the optimiser steps for the same windows
# (a client makes ~20 steps per round at 64 and learned little more than popularity in 4 rounds)
BATCH=${BATCH:-16}
CLIENT_CPUS=${CLIENT_CPUS:-1}  # Ray CPUs per simulated client: 2 on a 2-core box = one client at a time
METHODS=${METHODS:-fedavg fellrec fellrec+ fedprox ffa-lora fedsa-lora local centralized}
[ -f "$MODEL" ] && [ -d "$GAMES" ] || { echo "needs $MODEL and $GAMES (../shared)"; exit 2; }
case $PARTITION in
  kmeans) CLIENTS=5; PART_FLAGS="--partitioner kmeans" ;;
  hetero) CLIENTS=20; PART_FLAGS="--partitioner dirichlet --dirichlet-alpha 0.1" ;;
  *) echo "unknown partition $PARTITION (kmeans | hetero)"; exit 2 ;;
esac
PREPARED=${PREPARED:-$PWD/.cache/prepared/games-$PARTITION}
OUT=${OUT:-$PWD/docs/results/games-$PARTITION}
# every window of every user, 2,000 valid and 2,000 test users (the same users in both partitions)
[ -f "$PREPARED/manifest.json" ] || python -m data_prep --dataset games --path "$GAMES" --out "$PREPARED" $PART_FLAGS \
  --num-clients $CLIENTS --train-samples 0 --valid-users 2000 --test-users 2000 --history-len 10

for seed in $SEEDS; do
  for method in $METHODS; do
    name="$method-s$seed"
    if [ -f "$OUT/$name/summary.json" ]; then echo "== $name: done before"; continue; fi
    echo "== $name ($(date -u +%H:%M:%S))"
    RC="$(python bench/item_head_settings.py num-server-rounds=$ROUNDS train.data-fraction=$FRACTION train.batch-size=$BATCH \
          data.num-clients=$CLIENTS min-clients=$CLIENTS seed=$seed)"
    RC="$RC model.name='$MODEL' data.prepared-dir='$PREPARED' out-dir='$OUT' run-name='$name'"
    if [ "$method" = centralized ]; then
      python -m fellrec_flwr.train.centralized --run-config "$RC"
    else
      python -m fellrec_flwr.run --run-config "$RC strategy='$method'" \
        --federation-config "num-supernodes=$CLIENTS client-resources-num-cpus=$CLIENT_CPUS"
    fi
  done
done
