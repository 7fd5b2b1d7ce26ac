#!/usr/bin/env bash
# ATM's masking, controlled: ATM as it is (adaptive targeting, linear threshold), ATM with uniform targeting
# (every latent dropped at the batch mean of the adaptive p: dropout at ATM's rate) and ATM with the log
# threshold, at the demo's sizes on the demo's store (run `make demo` first), the same r and the same L0
# target; then absorption, FVU, CE score and the masking diagnostics of each, side by side.
# Every setting is in a recipe: stages/train-atm.toml, then stages/demo-train.toml (sizes), then the
# control's own file in stages/masking-controls/. Re-running skips finished stages, resumes an interrupted one.
set -euo pipefail
cd "$(dirname "$0")/.."
source stages/lib.sh

STORE=${STORE:-cache/demo-l9.zarr}
RUNS=runs/masking-controls
RECORD=$RUNS
RESULTS=results/gemma-3-270m-l9-demo/masking-controls
RUN_NAMES=(atm atm-uniform atm-log)

mkdir -p "$RUNS"
for run in "${RUN_NAMES[@]}"; do
    recipes=(--config stages/train-atm.toml --config stages/demo-train.toml)
    [[ $run == atm ]] || recipes+=(--config "stages/masking-controls/${run#atm-}.toml")
    stage "train-$run" "$RUNS/$run/atmpipe.json" -- "$ATMPIPE" train "${recipes[@]}" --store "$STORE" \
        --out "$RUNS/$run" --resume
done
stage eval "$RESULTS/report.md" -- "$ATMPIPE" eval --config stages/masking-controls-eval.toml \
    "${RUN_NAMES[@]/#/--sae=$RUNS/}" --out "$RESULTS"
.venv/bin/python stages/experiment.py label-demo "$RESULTS"
cp "$RECORD/commands.sh" "$RECORD/wall_times.tsv" "$RESULTS/"
echo
.venv/bin/python stages/experiment.py masking "$RESULTS"
