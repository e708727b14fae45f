#!/usr/bin/env bash
# One GPU check from a checkout: the kernel tests on CUDA, then bench/gpu_bench.py, in at most
# 8 minutes in all (a device call may run 10).  Full results under $OUT (default ./out); the markdown summary is printed last.
# GPU_CHECK_DRY=1: CPU dry run (reference path, tiny benchmark shapes) to check it end to end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
start=$(date +%s)
python3 -c "import torch, triton, transformers, peft, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee "$OUT/versions.txt"
# The kernel tests are mostly Triton JIT compiles: run them on 8 workers when pytest-xdist is
# there.  Each phase is bounded so that one slow phase cannot eat the whole device lease.
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
timeout 100 python3 -m pytest tests/kernels -m "not slow" -q -p no:cacheprovider "${xdist[@]}" 2>&1 | tee "$OUT/kernel_tests.log"
rc=${PIPESTATUS[0]}
# the CUDA tests of the rest of the library (extension, correction, emulator streaming)
timeout 90 python3 -m pytest tests --ignore=tests/kernels -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log"
crc=${PIPESTATUS[0]}
[ "$crc" = 5 ] && crc=0  # exit 5: no test selected (CPU dry run)
tests="kernels: $(tail -n 1 "$OUT/kernel_tests.log" | tr -d '=' | sed 's/^ *//; s/ *$//') (exit $rc); library: $(tail -n 1 "$OUT/cuda_tests.log" | tr -d '=' | sed 's/^ *//; s/ *$//') (exit $crc); $(( $(date +%s) - start )) s"
rc=$(( rc != 0 ? rc : crc ))
# the benchmark gets what is left of 480 s (at least 120): it starts no case in its last 60 s
# and rewrites its CSV/JSON after every case, so a cut-off run keeps what it measured
left=$(( 480 - ($(date +%s) - start) ))
[ "$left" -lt 120 ] && left=120
timeout "$left" python3 bench/gpu_bench.py --out "$OUT" --tests "$tests" --budget $(( left - 60 )) 2>&1 | tee "$OUT/gpu_bench.log"
brc=${PIPESTATUS[0]}
exit $(( rc != 0 ? rc : brc ))
