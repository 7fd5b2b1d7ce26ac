#!/usr/bin/env bash
# The GPU benchmark in one call (prepared for an H200, under 5 minutes; see benchmarks/README.md).
#   here, once:           bash benchmarks/gpu.sh --prepare    (downloads the wheels the GPU image lacks into .whl/)
#   on the GPU machine:   bash benchmarks/gpu.sh [--quick]    (carry: .whl)
# Writes benchmarks/results/<date>-<host>-gpu.json (and copies it and the log to $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."

# What atmpipe needs beyond the GPU image's python (torch, numpy, safetensors, rich, typer, transformers are there).
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0"

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$w"
    done
    ls -la .whl
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
log=${OUT:-benchmarks/.work}/gpu-bench.log
mkdir -p "$(dirname "$log")"
status=0
timeout 290 python3 benchmarks/gpu.py "$@" 2>&1 | tee "$log" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*-gpu*.json "$OUT/" 2>/dev/null || true; fi
exit "$status"
