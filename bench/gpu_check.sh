#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine, one table at the end (docs/gpu.md). About 8 minutes on one H100.
#
#   bash bench/gpu_check.sh              # results under bench/results/gpu_check-<UTC time>/ (or GPU_CHECK_OUT)
#
# 1. pytest -m gpu (tests/test_gpu.py and the other `gpu` tests: bf16/fp16 training with LoRA on the last
#    layer, split == unsplit on CUDA, the service with 8-bit and 4-bit middle layers through a training step,
#    GPU memory reporting, no CUDA context in the ServerApp);
# 2. simulations of 5 clients sharing one GPU (client-resources-num-gpus=0.2), one round each: the tiny model,
#    SmolLM2-135M (the GGUF under ${FELLREC_SHARED:-../shared}/models, skipped when absent), and SmolLM2 split
#    with 8-bit middle layers on the service (split training round on CUDA);
# 3. the table: rounds/hour, peak (and held) GPU memory per client and of the service, split vs unsplit.
#
# On a machine without a CUDA GPU it says so and exits 0. Each step has a time limit; a failed step is a row
# marked with its exit status, and the script goes on. Its own FLWR_HOME: the SuperLink it starts is stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}):"
    echo "gpu_check: nothing to check. Run it on a GPU machine (docs/gpu.md)."
    exit 0
fi

OUT=$(realpath -m "${GPU_CHECK_OUT:-bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}")
mkdir -p "$OUT"
export FLWR_HOME="$OUT/flwr-home" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
trap '"$PY" -m fellrec_flwr.run --stop-superlink >/dev/null 2>&1' EXIT
"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/device.txt"

echo "== 1/3 pytest -m gpu"
timeout 180 "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py tests/test_partial_load.py \
    >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"

# simulate NAME RUN_CONFIG: one round, 5 clients on one GPU
simulate() {
    local name=$1 config=$2 dir="$OUT/$1"
    mkdir -p "$dir"
    echo "== simulation $name"
    timeout 120 "$PY" -m fellrec_flwr.run \
        --federation-config "num-supernodes=5 client-resources-num-cpus=2 client-resources-num-gpus=0.2" \
        --run-config "num-server-rounds=1 data.train-samples=320 data.valid-users=50 data.test-users=50 \
                      eval.batch-size=8 model.device='auto' out-dir='$OUT/runs' run-name='$name' $config" \
        >"$dir/run.log" 2>&1
    echo $? >"$dir/status"
    [ -f "$OUT/runs/$name/metrics.csv" ] && cp "$OUT/runs/$name/metrics.csv" "$dir/"
    echo "exit $(cat "$dir/status")"
}

echo "== 2/3 simulations"
simulate tiny-5-clients "model.name='tiny' model.tiny-pretrain-prompts=64"
SMOL="${FELLREC_SHARED:-../shared}/models/smollm2-135m-instruct"
if ls "$SMOL"/*.gguf >/dev/null 2>&1; then
    SMOL=$(realpath "$SMOL")
    simulate smollm2-5-clients "model.name='$SMOL' model.dtype='bfloat16'"
    simulate smollm2-split-8bit "model.name='$SMOL' model.dtype='bfloat16' model.quantization='8bit' \
        split.enabled=true split.service-device='cuda'"
else
    echo "SmolLM2 GGUF not found under $SMOL: its simulations are skipped" | tee "$OUT/smollm2-skipped.txt"
fi

echo "== 3/3 table"
"$PY" bench/gpu_check.py "$OUT" | tee "$OUT/table.md"
