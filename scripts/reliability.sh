#!/usr/bin/env bash
# `make reliability`: run the crash-and-resume, integrity, bad-input, fuzzing, concurrency, disk-full,
# object-store-fault and safety tests at full counts, then print one table of what they counted
# (scripts/reliability_table.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
export ATMPIPE_RELIABILITY_COUNTS=$tmp/reliability.json OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Generated inputs per fuzzed target (tests/test_reliability_fuzz.py): 4 targets x 250 = 1,000 (pytest alone: 12).
export ATMPIPE_FUZZ_EXAMPLES=${ATMPIPE_FUZZ_EXAMPLES:-250}
# SIGKILLs of `atmpipe eval` and of `atmpipe inspect` (tests/test_reliability_eval_kill.py; pytest alone: 1 each).
export ATMPIPE_KILLS=${ATMPIPE_KILLS:-12}
# Share of the object-store requests answered by a fault (tests/test_reliability_object_store.py; pytest alone: 3%).
export ATMPIPE_FAULT_RATE=${ATMPIPE_FAULT_RATE:-0.1}
start=$(date +%s)
# Also the existing tests that check an error of docs/errors.md, so the table's figure is measured.
PYTHONPATH=tests${PYTHONPATH:+:$PYTHONPATH} "$PY" -m pytest -q -p reliability_plugin --junitxml="$tmp/junit.xml" tests/test_reliability_*.py \
    $("$PY" scripts/errors_table.py --tests)
"$PY" scripts/reliability_table.py "$ATMPIPE_RELIABILITY_COUNTS" "$tmp/junit.xml" $(($(date +%s) - start))
