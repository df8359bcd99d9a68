#!/usr/bin/env bash
# The one script for a GPU machine (an H100 with its own torch and no network): build for sm_90
# against that torch (no installs), run the CUDA-marked tests and the GPU benchmarks, print a
# short table last. Budget: under 6 minutes.
#
#   bash scripts/device_check.sh            # full logs under $OUT (or /tmp/stepscope_device)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/stepscope_device}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
declare -a ROWS
row() { ROWS+=("$(printf '%-34s %s' "$1" "$2")"); }
t0=$(date +%s)

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee -a "$OUT/env.txt"

# ---- build: the documented editable install, with the machine's own torch (no installs)
if STEPSCOPE_BUILD_DIR=build-device $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
    >"$OUT/build.log" 2>&1; then
  row "build (sm_90, pip -e)" "ok ($(($(date +%s) - t0)) s)"
else
  # pip too old for PEP 660 editables: drive CMake directly (same definition, same outputs).
  CM=$($PY -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null || echo cmake)
  if $CM -S . -B build-device -G Ninja -Wno-dev -DPython_EXECUTABLE="$(command -v $PY)" >>"$OUT/build.log" 2>&1 &&
     $CM --build build-device -j "$MAX_JOBS" >>"$OUT/build.log" 2>&1; then
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
    row "build (sm_90, cmake)" "ok ($(($(date +%s) - t0)) s)"
  else
    row "build" "FAILED (see build.log)"
    tail -30 "$OUT/build.log"
    printf '%s\n' "${ROWS[@]}"
    exit 1
  fi
fi
$PY -c "import stepscope; print(stepscope.build_info())" | tee -a "$OUT/env.txt"

# ---- CUDA-marked tests (metrics, monitor, nvtx) and the opcheck/compile tests on CUDA
$PY -m pytest tests/python -m cuda -q -rs -p no:cacheprovider >"$OUT/pytest_cuda.log" 2>&1
rc=$?
row "pytest -m cuda" "$(tail -1 "$OUT/pytest_cuda.log") (rc $rc)"
[ $rc -ne 0 ] && grep -E "^(FAILED|ERROR|E )" "$OUT/pytest_cuda.log" | head -20

# ---- Monitor: device phase times against hand-placed torch.cuda.Event pairs, under
# set_sync_debug_mode('error') (the test prints the comparison table; -s keeps it)
$PY -m pytest tests/python/test_monitor.py -m cuda -q -s -rs -p no:cacheprovider >"$OUT/monitor_cuda.log" 2>&1
rc=$?
row "monitor vs cuda events" "$(tail -1 "$OUT/monitor_cuda.log") (rc $rc)"

# ---- ctest where GoogleTest was available there
if [ -f build-device/CTestTestfile.cmake ] && command -v ctest >/dev/null; then
  ctest --test-dir build-device -j4 >"$OUT/ctest.log" 2>&1
  row "ctest" "$(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
fi

# ---- GPU metrics bench: a few sizes against torchmetrics, copy-bandwidth share, launches, syncs
timeout 150 $PY bench/metrics_bench.py --device cuda --classes 10 1000 32000 --min-log2 20 --max-log2 26 \
  --step-log2 3 --sklearn-max-log2 0 >"$OUT/metrics_bench_cuda.txt" 2>&1
row "metrics bench (cuda)" "rc $? (table below)"

# ---- Monitor overhead on CUDA: a small host-bound step and a GPU-bound one, against bare and torch.profiler
for m in mlp gpu-bound; do
  timeout 120 $PY bench/overhead_bench.py --device cuda --model $m --rounds 11 --steps 50 \
    >"$OUT/overhead_cuda_$m.txt" 2>&1
  row "overhead bench (cuda, $m)" "rc $? ($(grep -E '^monitor ' "$OUT/overhead_cuda_$m.txt" | awk '{print $4"x paired"}'))"
done

# ---- NVTX: the ranges as an NVIDIA tool sees them (when the NVTX check script is present)
if [ -f scripts/nvtx_device_check.sh ]; then
  timeout 90 bash scripts/nvtx_device_check.sh "$OUT" >"$OUT/nvtx_check.log" 2>&1
  row "nvtx / ncu filter" "rc $? ($(tail -1 "$OUT/nvtx_check.log"))"
fi

row "total wall time" "$(($(date +%s) - t0)) s"
echo
echo "==== metrics bench (cuda) ===="
cat "$OUT/metrics_bench_cuda.txt"
echo
echo "==== monitor overhead (cuda) ===="
cat "$OUT"/overhead_cuda_*.txt | grep -v USDT
echo
echo "==== monitor: device phase times vs hand-placed events ===="
grep -E "monitor .* hand events|^phase|^(data|forward|loss|backward|other|optimizer|step) " "$OUT/monitor_cuda.log" | head -20
echo
echo "==== device check summary ===="
printf '%s\n' "${ROWS[@]}"
