#!/usr/bin/env bash
# One GPU check from a checkout: the kernel tests on CUDA, then bench/gpu_bench.py.
# Full results under $OUT (default ./out); the markdown summary is printed last.
# GPU_CHECK_DRY=1: CPU dry run (reference path, tiny benchmark shapes) to check it end to end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
start=$(date +%s)
python3 -m pytest tests/kernels -m "not slow" -x -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log"
rc=${PIPESTATUS[0]}
tests="$(tail -n 1 "$OUT/kernel_tests.log" | tr -d '=' | sed 's/^ *//; s/ *$//') (exit $rc, $(( $(date +%s) - start )) s)"
python3 bench/gpu_bench.py --out "$OUT" --tests "$tests" 2>&1 | tee "$OUT/gpu_bench.log"
brc=${PIPESTATUS[0]}
exit $(( rc != 0 ? rc : brc ))
