#!/usr/bin/env bash
# `make reliability`: run the crash-and-resume, integrity, bad-input, fuzzing, concurrency and safety tests,
# then print the figures they counted (kill-and-resume trials, corruptions injected and detected, bad and
# generated inputs tested, concurrent writers refused).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
counts=$(mktemp -d)/reliability.json
export ATMPIPE_RELIABILITY_COUNTS=$counts OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Generated inputs per fuzzed target (tests/test_reliability_fuzz.py): 4 targets x 250 = 1,000 (pytest alone: 12).
export ATMPIPE_FUZZ_EXAMPLES=${ATMPIPE_FUZZ_EXAMPLES:-250}
# Also the existing tests that check an error of docs/errors.md, so the table's figure is measured.
PYTHONPATH=tests "$PY" -m pytest -q -p reliability_plugin tests/test_reliability_*.py \
    $("$PY" scripts/errors_table.py --tests)
"$PY" - "$counts" <<'PYEOF'
import json, sys
counts = json.load(open(sys.argv[1]))
print("\nreliability figures (counted by the tests above):")
for name, n in sorted(counts.items()):
    print(f"  {n:6d}  {name}")
PYEOF
