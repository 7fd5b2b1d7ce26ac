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
STORAGE_DTYPE=${STORAGE_DTYPE:-float32}  # bfloat16 halves the store (2M × 2304 × 4 B = 19 GB for Gemma-2-2b)

NAME=${MODEL##*/}-l$LAYER
STORE=cache/reproduce-$NAME.zarr
RUNS=runs/reproduce/$NAME
RECORD=$RUNS
RESULTS=results/$NAME

# Every setting is in a recipe: the method's (stages/train-<method>.toml: the four at matched L0 64), layered
# with the reproduction's sizes (stages/reproduce-train.toml: 8× width, one pass over the 2^21-token store,
# 512 steps of 4096) and, for ATM's c/r sweep, the one change of each sweep point (stages/atm-sweep/*.toml).
# Each run records its recipe files and the paths given here (train_config.json, atmpipe.json).
MAIN=(atm topk jumprelu relu)
SWEEP=(atm atm-c0.5 atm-c2 atm-r0.5 atm-r2)  # the default ATM again, as the sweep's reference row

train_runs() {
    local run method recipes
    for run in "$@"; do
        method=${run%%-*}
        recipes=(--config "stages/train-$method.toml" --config stages/reproduce-train.toml)
        [[ $run == "$method" ]] || recipes+=(--config "stages/atm-sweep/${run#atm-}.toml")
        stage "train-$run" "$RUNS/$run/atmpipe.json" -- "$ATMPIPE" train "${recipes[@]}" --store "$STORE" \
            --out "$RUNS/$run" --resume
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
