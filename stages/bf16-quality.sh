#!/usr/bin/env bash
# bf16 against fp32 training, paired: the four methods × 3 seeds at the DEMO's sizes (stages/demo-train.toml
# layered on each method's recipe), each seed trained twice on the same tokens, --precision fp32 and
# --precision bf16, then all of them evaluated in one `atmpipe eval` (stages/demo-eval.toml; core, absorption
# and ATM's masking diagnostics), and stages/bf16_quality.py turns the pairs into differences with 95%
# intervals over the training seeds and TOST equivalence tests (results/bf16-quality/).
#
# On a CPU without bf16 units (AVX2) a native bf16 GEMM is tens of times slower than fp32, so this study sets
# ATMPIPE_EMULATE_BF16=1: every bf16 GEMM runs as an fp32 GEMM of its bf16 operands, rounded to bf16, what a
# bf16 unit computes (tests/test_precision.py checks the emulated step against the native one). On a CPU
# with the units (or a GPU) run it with ATMPIPE_EMULATE_BF16=0 for the native step.
#   stages/bf16-quality.sh [STORE]     (default cache/demo-l9.zarr, from `make demo`)
# Smaller, on busy cores: TOKENS (each run's --tokens, default the demo's) and METRICS (default
# core,absorption,masking); JOBS trainings at a time (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
source stages/lib.sh

STORE=${1:-cache/demo-l9.zarr}
RUNS=${RUNS:-runs/bf16-quality}
REPORT=${REPORT:-reports/bf16-quality}
RESULTS=${RESULTS:-results/bf16-quality}
RECORD=$RUNS
METHODS=(atm topk jumprelu relu)
SEEDS=(${SEEDS:-0 1 2})
METRICS=${METRICS:-core,absorption,masking}
TOKENS=(${TOKENS:+--tokens "$TOKENS"})
export ATMPIPE_EMULATE_BF16=${ATMPIPE_EMULATE_BF16:-1}

# JOBS trainings at a time, one thread each (on shared cores, 2-thread GEMMs lose more to waiting than they
# gain); each job trains one method and seed in both precisions.
JOBS=${JOBS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pair() {
    local m=$1 s=$2 p
    for p in fp32 bf16; do
        stage "train-$m-$p-s$s" "$RUNS/$m-$p-s$s/atmpipe.json" -- "$ATMPIPE" train --config "stages/train-$m.toml" \
            --config stages/demo-train.toml --store "$STORE" --out "$RUNS/$m-$p-s$s" --seed "$s" --precision "$p" \
            "${TOKENS[@]}" --resume >"$RUNS/$m-$p-s$s.log" 2>&1
    done
}
mkdir -p "$RUNS"
saes=()
for s in "${SEEDS[@]}"; do
    for m in "${METHODS[@]}"; do
        saes+=("--sae=$RUNS/$m-fp32-s$s" "--sae=$RUNS/$m-bf16-s$s")
        while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
        pair "$m" "$s" &
    done
done
wait
for s in "${SEEDS[@]}"; do  # every training must have finished (a failed one left no done-marker)
    for m in "${METHODS[@]}"; do
        for p in fp32 bf16; do
            [[ -e $RUNS/done/train-$m-$p-s$s ]] || { echo "train-$m-$p-s$s failed: see $RUNS/$m-$p-s$s.log" >&2; exit 1; }
        done
    done
done
[[ ${TRAIN_ONLY:-} == 1 ]] && exit 0 # (several seeds trained by separate invocations, evaluated by the last)
stage eval "$REPORT/results.json" -- "$ATMPIPE" eval --config stages/demo-eval.toml --metrics "$METRICS" \
    "${saes[@]}" --out "$REPORT"
"${PYTHON:-.venv/bin/python}" stages/bf16_quality.py "$REPORT/results.json" "$RESULTS" --runs "$RUNS"
