# Sourced by stages/reproduce.sh after its 2M groups (CONVERGE=0 leaves it out): the verdict at convergence.
# Every registered method (atmpipe.sae.SAE_METHODS, each with its recipe stages/train-<method>.toml) at L0 64
# on a fresh store of the whole embedded corpus (stages/converge-harvest.toml), at 1×, 4× and 16× the
# 2^21-token base (2M, 8M, 32M tokens), each SAE evaluated at eval seeds 0, 1 and 2:
#   1. harvest   the fresh store (all 4.7M tokens of the corpus; the 8M asked for do not exist)
#   2. length    every method at 2M, 8M and 32M tokens, seed 0
#   3. seeds     seeds 1 and 2 at 8M and 32M: the change 8M → 32M needs a seed spread at both ends
#   4. crosscheck  SAEBench beside atmpipe on the 32M seed-0 SAEs, on the verdict's word sample, 3 seeds a side
#   5. controls  ATM's masking controls at 32M, seeds $CONTROL_SEEDS (CONTROL_SEEDS=0 cuts them to seed 0)
#   6. frontier  every method at L0 16, 32 and 128 at 32M, seed 0 (FRONTIER_LONG=0 leaves it out)
# Outcome in $CONV_RESULTS: the aggregate (results.json, table.md, verdict.md at the longest length: stages/
# frontier.py and verdict.py), convergence.{json,md} and one figure per metric against tokens (stages/
# convergence.py). The budget, from the measured stage times (stages/reproduce-budget.json), fp32 on 2 idle
# cores (this CPU has no bf16 units), the convergence part alone:
#     PLAN_ONLY=1 bash stages/reproduce.sh | grep ^converge- | .venv/bin/python stages/experiment.py budget - \
#         stages/reproduce-budget.json
# 92.5 h in full; 82.2 h with CONTROL_SEEDS=0; 56.6 h with FRONTIER_LONG=0 as well (every SAE now also
# gets probing, SCR and TPP, about half of it on estimates): over the 16 h target in every case.

CONV_STORE=${CONV_STORE:-cache/converge-$NAME.zarr}
CONV_RUNS=${CONV_RUNS:-runs/converge/$NAME}
CONV_RESULTS=${CONV_RESULTS:-results/$NAME-converge}
CONV_HARVEST=${CONV_HARVEST:-stages/converge-harvest.toml}
LENGTHS=(1 4 16)                             # × the 2^21 tokens of $SIZES
EVAL_SEEDS=(0 1 2)                           # every SAE, every metric: the probes' randomness in each interval
read -ra CONTROL_SEEDS <<<"${CONTROL_SEEDS:-0 1 2}"
FRONTIER_LONG=${FRONTIER_LONG:-1}
BASE_TOKENS=$(.venv/bin/python -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["tokens"])' "$SIZES")
# atm first, then every other registered method; a method without its recipe is an error, not a silent skip
read -ra CONV_METHODS <<<"$(.venv/bin/python -c 'from atmpipe.sae import SAE_METHODS
print(*sorted(SAE_METHODS, key=lambda m: (m != "atm", m)))')"
for m in "${CONV_METHODS[@]}"; do
    [[ -f stages/train-$m.toml ]] || { echo "converge: method $m has no recipe stages/train-$m.toml" >&2; exit 2; }
done
LONGEST=${LENGTHS[-1]}
RECORD=$CONV_RUNS

# csae VARIANT L0 SEED TIMES: one SAE of the convergence part, TIMES × the base tokens on the fresh store.
csae() {
    local variant=$1 l0=$2 seed=$3 times=$4
    local method=${variant%%-*} name="$1-L$2-s$3"
    ((times > 1)) && name+="-x$times"
    local args=(--config "stages/train-$method.toml" --config "$SIZES")
    [[ -n ${VARIANT_RECIPE[$variant]:-} ]] && args+=(--config "${VARIANT_RECIPE[$variant]}")
    args+=("$(l0_flag "$method")" "$l0" --seed "$seed" --tokens $((BASE_TOKENS * times)))
    GROUP+=("$CONV_RUNS/$name")
    stage "converge-train-$name" "$CONV_RUNS/$name/atmpipe.json" -- "$ATMPIPE" train "${args[@]}" \
        --store "$CONV_STORE" --out "$CONV_RUNS/$name" --resume
}

# cevaluate GROUP: the group's SAEs at every eval seed (evals/GROUP, evals/GROUP-e1, ...), then the aggregate.
cevaluate() {
    local group=$1 seed out
    for seed in "${EVAL_SEEDS[@]}"; do
        out=$CONV_RESULTS/evals/$group
        ((seed > 0)) && out+="-e$seed"
        stage "converge-eval-$group-e$seed" "$out/results.json" -- "$ATMPIPE" eval --config "$EVAL_RECIPE" \
            --seed "$seed" --store "$CONV_STORE" "${GROUP[@]/#/--sae=}" --out "$out"
    done
    GROUP=()
    [[ ${PLAN_ONLY:-} == 1 ]] && return 0
    MODEL=$MODEL LAYER=$LAYER STORE=$CONV_STORE RUNS=$CONV_RUNS \
        .venv/bin/python stages/experiment.py record "$RECORD" "$CONV_RESULTS"
    .venv/bin/python stages/experiment.py converge "$CONV_RESULTS"
}

[[ ${PLAN_ONLY:-} == 1 ]] || mkdir -p "$CONV_RUNS"
echo "converge: $MODEL layer $LAYER → $CONV_STORE, runs in $CONV_RUNS, results in $CONV_RESULTS"
stage converge-harvest "$CONV_STORE" -- "$ATMPIPE" harvest --config "$CONV_HARVEST" --model "$MODEL" \
    --layer "$LAYER" --storage-dtype "$STORAGE_DTYPE" --out "$CONV_STORE"

for t in "${LENGTHS[@]}"; do for m in "${CONV_METHODS[@]}"; do csae "$m" "$HEAD_L0" 0 "$t"; done; done
LONGEST_SAES=("${GROUP[@]: -${#CONV_METHODS[@]}}")
cevaluate length

for t in "${LENGTHS[@]:1}"; do for seed in 1 2; do for m in "${CONV_METHODS[@]}"; do
    csae "$m" "$HEAD_L0" "$seed" "$t"
done; done; done
cevaluate seeds

# On the verdict's word sample (stages/reproduce-eval.toml: 8000 words, floor 400 → 11,490), 3 seeds a side.
stage converge-crosscheck "$CONV_RESULTS/crosscheck/crosscheck.json" -- make --no-print-directory crosscheck \
    SAES="${LONGEST_SAES[*]}" OUT="$CONV_RESULTS/crosscheck" REPORT_ONLY=1 \
    CROSSCHECK_ARGS="--words 8000 --floor 400 --min-letters 20 --seeds 0,1,2 --reuse --store $CONV_STORE"

for seed in "${CONTROL_SEEDS[@]}"; do for v in "${CONTROLS[@]}"; do csae "$v" "$HEAD_L0" "$seed" "$LONGEST"; done; done
cevaluate controls

if [[ $FRONTIER_LONG == 1 ]]; then
    for l0 in 16 32 128; do for m in "${CONV_METHODS[@]}"; do csae "$m" "$l0" 0 "$LONGEST"; done; done
    cevaluate frontier
fi
