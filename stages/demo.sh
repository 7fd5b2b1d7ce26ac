#!/usr/bin/env bash
# `make demo`: the whole pipeline once, small, on the embedded gemma-3-270m — harvest ~100k tokens of its
# middle layer, train ATM, TopK, JumpReLU and ReLU at matched L0 on the same tokens, evaluate all four side
# by side. Sized for ≤ 20 minutes on 2 CPU cores, so its numbers are a DEMONSTRATION, not results: the real
# experiment is `make reproduce` (stages/reproduce.sh). Re-running skips finished stages and resumes an
# interrupted one. Sizes live in stages/demo-harvest.toml and stages/demo-eval.toml and below.
set -euo pipefail
cd "$(dirname "$0")/.."
source stages/lib.sh

STORE=cache/demo-l9.zarr
RUNS=runs/demo
REPORT=reports/demo
RECORD=$RUNS # done-markers, commands.sh, wall_times.tsv
METHODS=(atm topk jumprelu relu)

# Training: 4× width, 200 steps of 1024 tokens (two passes over the store), all four methods at L0 ≈ 64
# (TopK's k; a λ controller for ReLU and ATM; JumpReLU's (L0/target − 1)² loss), the same seed and so the
# same data order. Short runs need a larger lr and short warm-ups (ATM masks after 30 steps, fully from 60).
# The recipes' λ = 5 with its controller from step 10 makes L0 collapse to ~1 and recover only to 70–110:
# here λ starts near its equilibrium (0.7), ramps in over 25% of the steps, then the controller (rate 0.02)
# holds L0. JumpReLU's l0_coeff 0.5 leaves L0 near 140; 50 (with log θ at 10× the lr) reaches the target.
TARGET_L0=64
TRAIN=(--d-sae 2560 --batch-size 1024 --tokens 204800 --lr 1e-3 --seed 0 --checkpoint-every 50)
L1_CONTROL="--l1 0.7 --target-l0 $TARGET_L0 --hparam l1_warmup_frac=0.25 --hparam l0_controller_rate=0.02"
declare -A METHOD_ARGS=(
    [atm]="$L1_CONTROL --hparam warmup_steps=30"
    [topk]="--k $TARGET_L0"
    [jumprelu]="--hparam target_l0=$TARGET_L0 --hparam l0_coeff=50 --hparam threshold_lr_scale=10"
    [relu]="$L1_CONTROL"
)

mkdir -p "$RUNS"
stage harvest "$STORE" -- "$ATMPIPE" harvest --config stages/demo-harvest.toml --out "$STORE"
for m in "${METHODS[@]}"; do
    # shellcheck disable=SC2086  # METHOD_ARGS holds several words on purpose
    stage "train-$m" "$RUNS/$m/atmpipe.json" -- "$ATMPIPE" train --config "stages/train-$m.toml" --store "$STORE" \
        "${TRAIN[@]}" ${METHOD_ARGS[$m]} --out "$RUNS/$m" --resume
done
# The feature browser, before the eval so its report links to it; --absorption runs the LM on the first-letter
# prompts once, and the eval then reads them from the shared activation cache.
stage inspect "$REPORT/features/index.html" -- "$ATMPIPE" inspect "${METHODS[@]/#/--sae=$RUNS/}" --store "$STORE" \
    --absorption --out "$REPORT/features"
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
