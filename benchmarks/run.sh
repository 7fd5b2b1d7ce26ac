#!/usr/bin/env bash
# `make bench`: the peers' venv (once), then every benchmark. Extra arguments go to run_all.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PEERS=.venv-peers

test -x .venv/bin/python || { echo "error: .venv is missing; run \`make setup\` first" >&2; exit 2; }
# SAELens and sparsify live in their own venv (torch pinned first so no CUDA build is pulled), as `make peers` does.
if [ ! -f "$PEERS/.atmpipe-peers" ]; then
    echo "creating $PEERS (sae-lens, eai-sparsify) for the peer comparison"
    test -x "$PEERS/bin/python" || "$PY" -m venv "$PEERS"
    "$PEERS/bin/pip" install -q torch==2.13.0
    "$PEERS/bin/pip" install -q sae-lens eai-sparsify
    touch "$PEERS/.atmpipe-peers"
fi
exec .venv/bin/python benchmarks/run_all.py "$@"
