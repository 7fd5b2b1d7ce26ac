#!/usr/bin/env bash
# `make reproduce`: the paper's comparison measured by atmpipe — ATM vs TopK vs JumpReLU vs ReLU at matched
# L0 on one store, plus a small sweep over ATM's c and r, every metric of `atmpipe eval`, and the outcome
# (report, results.json, exact commands, versions, hardware, wall times) in results/<model>-l<layer>/.
#
# Hours on 2 CPU cores (the embedded gemma-3-270m), minutes on a GPU. The same experiment on Gemma-2-2b:
#     MODEL=gemma-2-2b LAYER=12 bash stages/reproduce.sh
# An interrupted run resumes where it stopped: finished stages are skipped (done-markers), an interrupted
# harvest continues from its last committed shard and an interrupted training from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source stages/lib.sh

MODEL=${MODEL:-gemma-3-270m}
LAYER=${LAYER:-9}
TARGET_L0=${TARGET_L0:-64}               # the matched sparsity, within the paper's 40–80
EXPANSION=${EXPANSION:-8}                # d_sae = 8 × d_model (5120 for gemma-3-270m, 18432 for gemma-2-2b)
TRAIN_TOKENS=${TRAIN_TOKENS:-2097152}    # one pass over the 2^21-token store: 512 steps of 4096 (~11 min per SAE on 2 cores)
STORAGE_DTYPE=${STORAGE_DTYPE:-float32}  # bfloat16 halves the store (2M × 2304 × 4 B = 19 GB for Gemma-2-2b)

NAME=${MODEL##*/}-l$LAYER
STORE=cache/reproduce-$NAME.zarr
RUNS=runs/reproduce/$NAME
RECORD=$RUNS
RESULTS=results/$NAME

# The four methods from their stage recipes (stages/train-<method>.toml: the paper's settings), with what the
# comparison fixes passed as flags: the store, width, tokens, seed (hence the same data order), and L0 —
# TopK's k; for ReLU and ATM a λ controller, with λ starting near its equilibrium (0.7) and ramped in over
# 25% of the steps before the controller (rate 0.02) takes over (the recipes' λ = 5 with the controller from
# 5% makes L0 collapse to ~1, then recover unevenly); JumpReLU's (L0/target − 1)² loss with l0_coeff 50 and
# log θ at 20× the lr (at 0.5 and 1× its L0 stays near twice the target). ATM's warm-up is 10% of the
# steps (the recipe's 1000 steps would never mask in a 1024-step run), then r ramps in over as many steps.
# Settings found on the demo's store (stages/demo.sh); they are recorded in every run's metadata.
STEPS=$((TRAIN_TOKENS / 4096))
ATM_WARMUP=$((STEPS / 10))
COMMON=(--store "$STORE" --expansion "$EXPANSION" --batch-size 4096 --tokens "$TRAIN_TOKENS" --seed 0
    --checkpoint-every 100 --resume)
L1_CONTROL="--l1 0.7 --target-l0 $TARGET_L0 --hparam l1_warmup_frac=0.25 --hparam l0_controller_rate=0.02"
ATM="$L1_CONTROL --hparam warmup_steps=$ATM_WARMUP"
declare -A RUN_ARGS=(
    [atm]="$ATM"
    [topk]="--k $TARGET_L0"
    [jumprelu]="--hparam target_l0=$TARGET_L0 --hparam l0_coeff=50 --hparam threshold_lr_scale=20"
    [relu]="$L1_CONTROL"
    # ATM's sweep: c (threshold = mean + c·std of importance) and r (masking rate) around the defaults 1, 1
    [atm-c0.5]="$ATM --hparam c=0.5"
    [atm-c2]="$ATM --hparam c=2.0"
    [atm-r0.5]="$ATM --hparam r=0.5"
    [atm-r2]="$ATM --hparam r=2.0"
)
MAIN=(atm topk jumprelu relu)
SWEEP=(atm atm-c0.5 atm-c2 atm-r0.5 atm-r2)  # the default ATM again, as the sweep's reference row

train_runs() {
    local run method
    for run in "$@"; do
        method=${run%%-*}
        # shellcheck disable=SC2086  # RUN_ARGS holds several words on purpose
        stage "train-$run" "$RUNS/$run/atmpipe.json" -- "$ATMPIPE" train --config "stages/train-$method.toml" \
            "${COMMON[@]}" ${RUN_ARGS[$run]} --out "$RUNS/$run"
    done
}

# Each report is written only once every SAE in it is evaluated, so results/ never holds a partial table.
# The comparison comes first and is committed alone; the sweep follows (the evaluation's LM activations are
# cached, so the second eval pays only for its SAEs).
finish() {
    MODEL=$MODEL LAYER=$LAYER .venv/bin/python stages/experiment.py record "$RECORD" "$RESULTS"
    echo
    echo "wall time per stage (seconds, summed over re-runs):"
    wall_summary
    echo
    .venv/bin/python stages/experiment.py table "$1"
    echo
    echo "results: $1/report.md · report.html · results.json (commands, versions, hardware, wall times: $RESULTS)"
}

mkdir -p "$RUNS"
echo "reproduce: $MODEL layer $LAYER → $STORE, runs in $RUNS, results in $RESULTS"
stage harvest "$STORE" -- "$ATMPIPE" harvest --config stages/reproduce-harvest.toml --model "$MODEL" \
    --layer "$LAYER" --storage-dtype "$STORAGE_DTYPE" --out "$STORE"

train_runs "${MAIN[@]}"
stage eval "$RESULTS/report.md" -- "$ATMPIPE" eval --config stages/reproduce-eval.toml \
    "${MAIN[@]/#/--sae=$RUNS/}" --out "$RESULTS"
finish "$RESULTS"

train_runs "${SWEEP[@]}"
stage eval-sweep "$RESULTS/atm-sweep/report.md" -- "$ATMPIPE" eval --config stages/reproduce-eval.toml \
    "${SWEEP[@]/#/--sae=$RUNS/}" --out "$RESULTS/atm-sweep"
finish "$RESULTS/atm-sweep"
