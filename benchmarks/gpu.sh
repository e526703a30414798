#!/usr/bin/env bash
# MAS attention on a CUDA machine: first the fast path's exactness against the dense mask, then causal /
# dense / fast / flex at 2k-16k tokens in bf16, forward and forward + backward, into a table.
#
#     benchmarks/gpu.sh                        # table: benchmarks/gpu-results.txt, records: .json beside it
#     PYTHON=python benchmarks/gpu.sh /tmp/gpu.txt
#
# The fast path's CUDA kernel (segmask.kernels "cuda-flash") is never selected by default; this script
# names it. If the check fails nothing is timed and the script exits 1; without CUDA it exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
TABLE="${1:-benchmarks/gpu-results.txt}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); nothing checked or timed" >&2
    exit 2
fi

COMMON=(--device cuda --kernel cuda-flash --dtype bfloat16 --layouts prompt chat fewshot)
echo "== exactness: mas-fast (cuda-flash) against SDPA with the dense mask, output and gradients"
"$PYTHON" benchmarks/attention.py "${COMMON[@]}" --check-only --lengths 2048 4096 --batch 1
"$PYTHON" benchmarks/attention.py "${COMMON[@]}" --check-only --lengths 2048 --batch 3
echo "== timing (table: $TABLE)"
"$PYTHON" benchmarks/attention.py "${COMMON[@]}" --lengths 2048 4096 8192 16384 --repeats 10 \
    --json "${TABLE%.*}.json" | tee "$TABLE"
