#!/usr/bin/env bash
# The one script for a GPU machine (an H100 with its own torch and no network): build for sm_90
# against that torch (no installs), run the CUDA-marked tests and the GPU benchmarks, print a
# short table last. Budget: under 6 minutes.
#
#   bash scripts/device_check.sh            # full logs under $OUT (or /tmp/stepscope_device)
#   NCU=0 SANITIZER=0 NVTX_CHECK=0 TARGETS=0 OVERHEAD_MODELS=mlp bash scripts/device_check.sh  # the short one
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
if STEPSCOPE_BUILD_DIR=build-device $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . \
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
# The C++ runtime the libraries were linked with: one shared libstdc++ per process, no copy inside.
{
  echo "c++: $(c++ --version 2>&1 | head -1); libstdc++.so link: $(c++ -print-file-name=libstdc++.so)"
  echo "CXXFLAGS=${CXXFLAGS:-} LDFLAGS=${LDFLAGS:-}"
  grep -E "stepscope: (the compiler|no shared)" "$OUT/build.log" || true
  lib=$($PY -c "import stepscope, os; print(os.path.join(os.path.dirname(stepscope.__file__), 'libstepscope.so'))")
  ldd "$lib" | grep -E "stdc|gcc_s"
  echo "std:: functions defined in libstepscope.so: $(nm -C --defined-only "$lib" 2>/dev/null | grep -c ' [TtWw] std::')"
} >>"$OUT/env.txt" 2>&1
tail -5 "$OUT/env.txt"

# ---- a bad CUDA input must raise, not crash (the process survives to print the error)
timeout 60 $PY -c "
import torch, stepscope
for dev in ('cpu', 'cuda'):
    m = stepscope.ClassificationMetrics('multiclass', num_classes=4, device=dev)
    try:
        m.update(torch.randn(8, 4, device=dev), torch.randint(0, 4, (7,), device=dev))
    except ValueError as e:
        print(dev, 'ValueError:', str(e)[:60])
" >"$OUT/bad_input.log" 2>&1
rc=$?
row "bad CUDA input" "rc $rc: $(head -c 90 "$OUT/bad_input.log" | tr '\n' ' ')"
if [ $rc -ne 0 ] && command -v cuda-gdb >/dev/null; then
  timeout 90 cuda-gdb -batch -ex run -ex bt --args $PY -c "
import torch, stepscope
m = stepscope.ClassificationMetrics('multiclass', num_classes=4, device='cuda')
m.update(torch.randn(8, 4, device='cuda'), torch.randint(0, 4, (7,), device='cuda'))
" >>"$OUT/bad_input.log" 2>&1
  grep -E "^#[0-9]+" "$OUT/bad_input.log" | head -12
fi

# ---- CUDA-marked tests (metrics, monitor, nvtx) and the opcheck/compile tests on CUDA
# (the misuse tests apart: were one to crash the process, the others still report)
timeout 240 $PY -m pytest tests/python -m cuda -k "not misuse" -q -rs -p no:cacheprovider --durations=10 \
  >"$OUT/pytest_cuda.log" 2>&1
rc=$?
row "pytest -m cuda (not misuse)" "$(tail -1 "$OUT/pytest_cuda.log") (rc $rc)"
[ $rc -ne 0 ] && grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -20
timeout 120 $PY -m pytest tests/python -m cuda -k misuse -q -rs -p no:cacheprovider >"$OUT/pytest_misuse.log" 2>&1
rc=$?
row "pytest -m cuda -k misuse" "$(tail -1 "$OUT/pytest_misuse.log") (rc $rc)"
[ $rc -ne 0 ] && grep -E "^(FAILED|ERROR)" "$OUT/pytest_misuse.log" | head -10
cat "$OUT/pytest_misuse.log" >>"$OUT/pytest_cuda.log" && rm -f "$OUT/pytest_misuse.log"

# ---- Monitor: device phase times against hand-placed torch.cuda.Event pairs, under
# set_sync_debug_mode('error') (the test prints the comparison table; -s keeps it)
$PY -m pytest tests/python/test_monitor.py -m cuda -q -s -rs -p no:cacheprovider >"$OUT/monitor_cuda.log" 2>&1
rc=$?
row "monitor vs cuda events" "$(tail -1 "$OUT/monitor_cuda.log") (rc $rc)"

# ---- ctest where GoogleTest was available there
if [ -f build-device/CTestTestfile.cmake ] && command -v ctest >/dev/null; then
  ctest --test-dir build-device -j4 >"$OUT/ctest.log" 2>&1
  row "ctest" "$(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
  cat "$OUT/ctest.log" >>"$OUT/pytest_cuda.log" && rm -f "$OUT/ctest.log"
fi

# ---- Monitor overhead on CUDA: a small host-bound step and a GPU-bound one, against bare and torch.profiler
for m in ${OVERHEAD_MODELS:-mlp gpu-bound}; do
  if [ $m = mlp ]; then steps=200; rounds=11; else steps=50; rounds=5; fi
  timeout 120 $PY bench/overhead_bench.py --device cuda --model $m --rounds $rounds --steps $steps \
    >"$OUT/overhead.part" 2>&1
  row "overhead bench (cuda, $m)" "rc $? ($(awk '$1 == "monitor" && $2 ~ /^[0-9.]+$/ {m = $4} $1 == "health" && $2 == "off" {h = $5} END {print m "x paired, health off " h "x"}' "$OUT/overhead.part"))"
  cat "$OUT/overhead.part" >>"$OUT/overhead_cuda.txt" && rm -f "$OUT/overhead.part"
done

# ---- gradient statistics: one update on CUDA (ATen ops until a fused kernel) against the hand-written ways
timeout 90 $PY bench/health_bench.py --device cuda --rounds 11 --updates 100 >"$OUT/health_bench_cuda.txt" 2>&1
row "health bench (cuda)" "rc $? ($(awk '$NF ~ /^[0-9.]+$/ && /stepscope/ {printf "%s%sx", sep, $NF; sep=" "}' "$OUT/health_bench_cuda.txt") of foreach)"

# ---- throughput: FLOPs counted against the analytic count, MFU against the datasheet peak
timeout 90 $PY bench/mfu_bench.py --device cuda >"$OUT/mfu_cuda.txt" 2>&1
row "mfu bench (cuda)" "rc $? ($(awk '$1 == "fp32" || $1 == "bf16" {for (i = 2; i <= NF; i++) if ($i ~ /%$/) {printf "%s%s MFU %s", sep, $1, $i; sep=", "; break}}' "$OUT/mfu_cuda.txt"))"

# ---- metrics kernel: the bandwidth targets (against a copy of the same bytes, same run)
if [ "${TARGETS:-1}" = 1 ]; then
  timeout 150 $PY bench/metrics_bench.py --device cuda --targets --target-log2 26 27 >"$OUT/metrics_bench_cuda.txt" 2>&1
  row "metrics bandwidth targets" "rc $? ($(tail -1 "$OUT/metrics_bench_cuda.txt" | grep -o '[0-9]* row(s) under target'))"
fi

# ---- Nsight Compute (occupancy, DRAM throughput) and compute-sanitizer on the metrics kernels
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  timeout 120 ncu --clock-control none -k regex:mc_ --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    $PY scripts/gpu_kernel_cases.py --ncu >"$OUT/ncu.txt" 2>&1
  row "ncu (metrics kernels)" "rc $?"
fi
if [ "${SANITIZER:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool $tool $PY scripts/gpu_kernel_cases.py --small >"$OUT/sanitizer.txt.part" 2>&1
    row "compute-sanitizer $tool" "rc $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.txt.part" | tail -1))"
    cat "$OUT/sanitizer.txt.part" >>"$OUT/sanitizer.txt" && rm -f "$OUT/sanitizer.txt.part"
  done
fi

# ---- NVTX: the ranges as an NVIDIA tool sees them (when the NVTX check script is present)
if [ "${NVTX_CHECK:-1}" = 1 ] && [ -f scripts/nvtx_device_check.sh ]; then
  timeout 90 bash scripts/nvtx_device_check.sh "$OUT" >"$OUT/nvtx_check.log" 2>&1
  row "nvtx / ncu filter" "rc $? ($(tail -1 "$OUT/nvtx_check.log"))"
fi

row "total wall time" "$(($(date +%s) - t0)) s"
echo
echo "==== metrics bandwidth targets (cuda) ===="
grep -v "^# seed" "$OUT/metrics_bench_cuda.txt" 2>/dev/null
echo
echo "==== ncu: duration, DRAM throughput, achieved occupancy, registers ===="
grep -E "mc_[a-z_]+kernel|^ +(Duration|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Grid Size) " "$OUT/ncu.txt" 2>/dev/null | \
  sed -E 's/\(stepscope::metrics::.*Params\)//; s/void stepscope::metrics::[(]anonymous namespace[)]:://; s/ +/ /g' | head -40
echo
echo "==== mfu (cuda) ===="
cat "$OUT/mfu_cuda.txt" 2>/dev/null
echo
echo "==== monitor overhead (cuda) ===="
grep -vE "USDT|UserWarning|_warn_once" "$OUT/overhead_cuda.txt"
echo
echo "==== monitor: device phase times vs hand-placed events ===="
grep -E "monitor .* hand events|^phase|^(data|forward|loss|backward|other|optimizer|step) " "$OUT/monitor_cuda.log" | head -20
echo
echo "==== device check summary ===="
printf '%s\n' "${ROWS[@]}"
