#!/usr/bin/env bash
# `make demo`: the whole pipeline once, small, on the embedded gemma-3-270m — harvest ~100k tokens of its
# middle layer, train ATM, TopK, JumpReLU and ReLU at matched L0 on the same tokens, evaluate all four side
# by side. Sized for ≤ 20 minutes on 2 CPU cores, so its numbers are a DEMONSTRATION, not results: the real
# experiment is `make reproduce` (stages/reproduce.sh). Re-running skips finished stages and resumes an
# interrupted one. Sizes live in stages/demo-harvest.toml, stages/demo-train.toml and stages/demo-eval.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
source stages/lib.sh

STORE=cache/demo-l9.zarr
RUNS=runs/demo
REPORT=reports/demo
RECORD=$RUNS # done-markers, commands.sh, wall_times.tsv
METHODS=(atm topk jumprelu relu)

# Training: every setting is in a recipe — the method's (stages/train-<method>.toml: all four at L0 ≈ 64)
# layered with the demo's sizes (stages/demo-train.toml: 4× width, 200 steps of 1024 tokens, lr 1e-3).
# Each run records both files and the paths given here (train_config.json, atmpipe.json).
mkdir -p "$RUNS"
stage harvest "$STORE" -- "$ATMPIPE" harvest --config stages/demo-harvest.toml --out "$STORE"
for m in "${METHODS[@]}"; do
    stage "train-$m" "$RUNS/$m/atmpipe.json" -- "$ATMPIPE" train --config "stages/train-$m.toml" \
        --config stages/demo-train.toml --store "$STORE" --out "$RUNS/$m" --resume
done
# The feature browser, before the eval so its report links to it; --absorption runs the LM on the first-letter
# prompts once, and the eval then reads them from the shared activation cache.
stage inspect "$REPORT/features/index.html" -- "$ATMPIPE" inspect "${METHODS[@]/#/--sae=$RUNS/}" --store "$STORE" \
    --absorption --absorption-config stages/demo-eval.toml --out "$REPORT/features"
stage eval "$REPORT/report.md" -- "$ATMPIPE" eval --config stages/demo-eval.toml \
    "${METHODS[@]/#/--sae=$RUNS/}" --out "$REPORT"

# Say on every page of the report that these numbers come from a demonstration-sized run.
.venv/bin/python stages/experiment.py label-demo "$REPORT"

echo
echo "wall time per stage (seconds, summed over re-runs):"
wall_summary
echo
echo "headline metrics (DEMONSTRATION sizes):"
.venv/bin/python stages/experiment.py table "$REPORT"
echo
echo "demo report: $REPORT/report.md  ·  $REPORT/report.html  ·  $REPORT/results.json"
echo "(a demonstration: the real comparison is \`make reproduce\`, committed under results/)"
