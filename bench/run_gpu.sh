#!/usr/bin/env bash
# On a CUDA machine: the kernel and engine tests with Triton compiled for real, then the benchmark suite.
# Writes device.txt, tests.log, bench.log and gpu.json (for bench/report.py) under $OUT (default ./out).
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 MAX_JOBS=16
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py tests/test_tree_verify.py \
    tests/test_paged_attention.py tests/test_engine_cuda.py 2>&1 | tee "$out/tests.log" | tail -25
python3 -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-json="$out/gpu.json" "$@" 2>&1 \
    | tee "$out/bench.log" | tail -60
