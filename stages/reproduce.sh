#!/usr/bin/env bash
# `make reproduce`: the verdict on ATM as the field measures it — an L0 frontier with seeds, ATM's masking
# controls and a longer training run, every metric of `atmpipe eval`, on one store of the embedded
# gemma-3-270m's layer 9. Outcome in results/<model>-l<layer>/: results.json (every number), table.md (L0 64,
# mean ± sd over seeds, the paper's numbers beside), one figure per question, experiment.json (commands,
# versions, hardware, wall times). Every stage is resumable: finished stages are skipped (done-markers), an
# interrupted harvest continues from its last committed shard and an interrupted training from its last
# checkpoint; the aggregate is rewritten after every evaluation, so partial results are readable early.
#
#     bash stages/reproduce.sh                                 # or `make reproduce`
#     STORE=/big/disk/l9.zarr RUNS=/big/disk/runs bash stages/reproduce.sh   # a long run outside the tree
#     PLAN_ONLY=1 bash stages/reproduce.sh                     # print every stage and its command; run none
#     MODEL=gemma-2-2b LAYER=12 bash stages/reproduce.sh       # the paper's model, on a GPU
#
# The plan: 41 SAEs, all 8× wide (5120 latents), one pass over the 2^21-token store unless said otherwise:
#   1. head      atm, topk, jumprelu, relu, matryoshka at L0 64, seed 0   5 SAEs, then eval and make crosscheck
#   2. seeds     the same at seeds 1 and 2 (error bars at L0 64)                        10 SAEs, then eval
#   3. frontier  the five methods at L0 16, 32 and 128, seed 0                          15 SAEs, then eval
#   4. controls  ATM with uniform targeting, the log threshold, r = 0.5; seeds 0-2        9 SAEs, then eval
#   5. long      atm and topk at L0 64, seed 0, 4× the tokens (4 passes over the store)  2 SAEs, then eval
# Every eval runs every metric of stages/reproduce-eval.toml (absorption, core, probing over the 51 sae-probes
# tasks, SCR, TPP, ...) at eval seed 0; the L0-64 groups (head, seeds, controls) are evaluated again on
# absorption alone at eval seeds $ABSORPTION_SEEDS (default 1 2: evals/<group>-e1, -e2), so that every
# absorption difference at L0 64 has the probes' randomness in its interval (stages/verdict.py needs 3).
#   6. converge  the verdict at convergence (stages/converge.sh; CONVERGE=0 leaves it out): a fresh store,
#                every registered method at 2M/8M/32M tokens, 3 eval seeds per SAE, the crosscheck at the
#                verdict's sample; its own budget (50 h fp32 in full, over the 16 h target) is in its header
# Most informative first: if the budget runs out, what is missing is the least needed. One eval per group:
# the eval caches the LM's activations per model and layer, so the LM passes are paid once (group 1).
#
# Budget on 2 idle CPU cores: the estimate adds per-stage times over the stages not yet done,
#     PLAN_ONLY=1 bash stages/reproduce.sh | .venv/bin/python stages/experiment.py budget - stages/reproduce-budget.json
# (its inputs, what is measured and what estimated: stages/reproduce-budget.json; the run's real wall times
# go to experiment.json). Minutes per group (train + eval), the store reused, the eval's LM passes paid once
# in the head group (~25 min: SAEBench's absorption prompts), make crosscheck ~45 min (5 seeds a side):
#                                        head  crosscheck  seeds  frontier  controls  long  total
#   dense steps (2026-11-29 wall times)    59          45     69       103       109    56  7.4 h
#   sparse steps (measured 2026-11-30)     48          45     45        68        53    37  4.9 h
# (those two rows are the 35-SAE plan before Matryoshka, full-size probing/SCR/TPP and the absorption eval
# seeds joined it; the budget command above gives the current plan's total, and says which inputs are
# estimates). The order above means an over-run loses the least informative groups first; other load on the
# cores stretches everything (this run's own wall times, on shared cores, are in experiment.json).
set -euo pipefail
cd "$(dirname "$0")/.."
source stages/lib.sh

MODEL=${MODEL:-gemma-3-270m}
LAYER=${LAYER:-9}
STORAGE_DTYPE=${STORAGE_DTYPE:-float32} # bfloat16 halves the store (2M × 2304 × 4 B = 19 GB for Gemma-2-2b)
NAME=${MODEL##*/}-l$LAYER
STORE=${STORE:-cache/reproduce-$NAME.zarr} # an existing store is reused if its configuration matches
RUNS=${RUNS:-runs/reproduce/$NAME}         # SAEs, done-markers, commands.sh, wall_times.tsv
RESULTS=${RESULTS:-results/$NAME}          # committed: evals/<group>/ and the aggregate
RECORD=$RUNS
# The recipes: what every SAE of the experiment shares (stages/reproduce-train.toml: width, tokens, lr,
# batch) layered over its method's recipe (stages/train-<method>.toml), then a variant's recipe. A run adds
# only what the experiment varies — L0 (TopK's k, the others' target_l0), seed, tokens — and its paths.
SIZES=${SIZES:-stages/reproduce-train.toml}
HARVEST_RECIPE=${HARVEST_RECIPE:-stages/reproduce-harvest.toml}
EVAL_RECIPE=${EVAL_RECIPE:-stages/reproduce-eval.toml}
declare -A VARIANT_RECIPE=(
    [atm-uniform]=stages/masking-controls/uniform.toml # every latent dropped at ATM's mean rate
    [atm-log]=stages/masking-controls/log.toml         # θ and θ − I on log importance
    [atm-r0.5]=stages/atm-sweep/r0.5.toml              # half the masking rate
)
METHODS=(atm topk jumprelu relu matryoshka)
CONTROLS=(atm-uniform atm-log atm-r0.5)
HEAD_L0=64
read -ra ABSORPTION_SEEDS <<<"${ABSORPTION_SEEDS-1 2}" # ABSORPTION_SEEDS= leaves them out
# The groups evaluated with probing, SCR and TPP (each SAE encodes every cached probing text: minutes per SAE,
# stages/eval_cost.py); the others run the recipe's remaining metrics. LABELLED_GROUPS="head seeds controls"
# keeps them at L0 64, where the verdict reads the paper's claims 3-5.
read -ra LABELLED_GROUPS <<<"${LABELLED_GROUPS-head seeds frontier controls long}"
UNLABELLED_METRICS=core,absorption,training,masking # stages/reproduce-eval.toml's metrics less those three
LONG=${LONG:-stages/reproduce-long.toml} # the longer runs' tokens, layered after $SIZES
LONG_TIMES=$(.venv/bin/python -c 'import sys, tomllib; a, b = (tomllib.load(open(f, "rb"))["tokens"] for f in sys.argv[1:])
print(b // a)' "$SIZES" "$LONG")

# l0_flag METHOD: the flag that sets a method's L0 — k for the TopK family (TopK, Matryoshka BatchTopK), the
# target L0 for the methods that steer toward one (ATM, JumpReLU, ReLU); converge.sh uses it too.
l0_flag() {
    case $1 in
    topk | matryoshka) echo --k ;;
    *) echo --target-l0 ;;
    esac
}

# sae VARIANT L0 SEED [long]: train one SAE (skipped when done) and add it to the current eval group. L0
# and seed are flags (TopK's k, the others' target L0; the seed): the sweep's two variables, recorded
# in each run's train_config as overrides.
# Its name says what it is (atm-uniform-L64-s1, topk-L64-s0-x4); stages/frontier.py parses it back.
GROUP=()
sae() {
    local variant=$1 l0=$2 seed=$3 long=${4:-}
    local method=${variant%%-*} name="$1-L$2-s$3"
    local args=(--config "stages/train-$method.toml" --config "$SIZES")
    [[ -n ${VARIANT_RECIPE[$variant]:-} ]] && args+=(--config "${VARIANT_RECIPE[$variant]}")
    if [[ -n $long ]]; then
        name+="-x$LONG_TIMES"
        args+=(--config "$LONG")
    fi
    args+=("$(l0_flag "$method")" "$l0" --seed "$seed")
    GROUP+=("$RUNS/$name")
    stage "train-$name" "$RUNS/$name/atmpipe.json" -- "$ATMPIPE" train "${args[@]}" --store "$STORE" \
        --out "$RUNS/$name" --resume
}

# evaluate GROUP [absorption-seeds]: one eval of the group's SAEs (once all are trained) with every metric of
# the recipe at eval seed 0; with "absorption-seeds", absorption alone again at each of $ABSORPTION_SEEDS
# (evals/GROUP-e1, ...: each seed redraws the split, the in-context examples and the probes over the same
# words; the other metrics' intervals carry their own sampling). Then the aggregate is rewritten.
evaluate() {
    local group=$1 seeded=${2:-} seed metrics=()
    [[ " ${LABELLED_GROUPS[*]} " == *" $group "* ]] || metrics=(--metrics "$UNLABELLED_METRICS")
    stage "eval-$group" "$RESULTS/evals/$group/results.json" -- "$ATMPIPE" eval --config "$EVAL_RECIPE" \
        "${metrics[@]}" "${GROUP[@]/#/--sae=}" --out "$RESULTS/evals/$group"
    if [[ $seeded == absorption-seeds ]]; then
        for seed in "${ABSORPTION_SEEDS[@]}"; do
            stage "eval-$group-e$seed" "$RESULTS/evals/$group-e$seed/results.json" -- "$ATMPIPE" eval \
                --config "$EVAL_RECIPE" --metrics absorption --seed "$seed" "${GROUP[@]/#/--sae=}" \
                --out "$RESULTS/evals/$group-e$seed"
        done
    fi
    GROUP=()
    [[ ${PLAN_ONLY:-} == 1 ]] && return 0
    # the record first: the aggregate reads each stage's code version from its experiment.json
    MODEL=$MODEL LAYER=$LAYER STORE=$STORE RUNS=$RUNS \
        .venv/bin/python stages/experiment.py record "$RECORD" "$RESULTS"
    .venv/bin/python stages/experiment.py frontier "$RESULTS"
}

[[ ${PLAN_ONLY:-} == 1 ]] || mkdir -p "$RUNS"
echo "reproduce: $MODEL layer $LAYER → $STORE, runs in $RUNS, results in $RESULTS"
stage harvest "$STORE" -- "$ATMPIPE" harvest --config "$HARVEST_RECIPE" --model "$MODEL" --layer "$LAYER" \
    --storage-dtype "$STORAGE_DTYPE" --out "$STORE"

for m in "${METHODS[@]}"; do sae "$m" "$HEAD_L0" 0; done
HEAD_SAES=("${GROUP[@]}")
evaluate head absorption-seeds

# SAEBench's own absorption eval beside atmpipe's on the head SAEs, Matryoshka among them (SAEBench loads it
# through SAELens as the JumpReLU it is at inference) (make crosscheck, stages/crosscheck.py),
# right after them: it checks the metric every later group is read with. A disagreement beyond tolerance is
# written to $RESULTS/crosscheck/crosscheck.md as a finding and the experiment goes on (REPORT_ONLY).
stage crosscheck "$RESULTS/crosscheck/crosscheck.json" -- make --no-print-directory crosscheck \
    SAES="${HEAD_SAES[*]}" OUT="$RESULTS/crosscheck" REPORT_ONLY=1

for seed in 1 2; do for m in "${METHODS[@]}"; do sae "$m" "$HEAD_L0" "$seed"; done; done
evaluate seeds absorption-seeds

for l0 in 16 32 128; do for m in "${METHODS[@]}"; do sae "$m" "$l0" 0; done; done
evaluate frontier

for seed in 0 1 2; do for v in "${CONTROLS[@]}"; do sae "$v" "$HEAD_L0" "$seed"; done; done
evaluate controls absorption-seeds

for m in atm topk; do sae "$m" "$HEAD_L0" 0 long; done
evaluate long

# The verdict at convergence: a fresh store, a training-length axis, 3 eval seeds per SAE (stages/converge.sh).
[[ ${CONVERGE:-1} == 1 ]] && source stages/converge.sh

[[ ${PLAN_ONLY:-} == 1 ]] && exit 0
echo
echo "wall time per stage (seconds, summed over re-runs):"
wall_summary
echo
cat "$RESULTS/table.md"
echo
echo "results: $RESULTS/results.json · table.md · *.png · experiment.json (evals: $RESULTS/evals/<group>/)"
[[ ${CONVERGE:-1} == 1 ]] && echo "convergence: $CONV_RESULTS/convergence.md · verdict.md · results.json"
