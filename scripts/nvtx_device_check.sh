#!/usr/bin/env bash
# NVTX on a GPU machine (called by scripts/device_check.sh, whose summary shows the last line):
# does an NVIDIA tool see the stepscope ranges and select the forward kernels by them?
# Nsight Compute profiles a 2-step CUDA training loop twice: once with
# --nvtx-include "stepscope@forward/" (domain@range, trailing '/' = a push/pop range at the
# bottom of the domain's stack) and once unfiltered. The filter works when it keeps some kernels
# and fewer than all. The injection-library tests on CUDA tensors run in device_check.sh's
# `pytest -m cuda` (tests/python/test_nvtx.py).
#
#   bash scripts/nvtx_device_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/stepscope_device}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
if [ ! -x "$NCU" ]; then
  echo "ncu not found: NVTX filtering unverified"
  exit 2
fi

cat >"$OUT/nvtx_loop.py" <<'PYEOF'
import torch, stepscope
from stepscope._C import nvtx as nv
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 256, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
with stepscope.Monitor(model, opt):
    for _ in range(2):
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
torch.cuda.synchronize()
print("monitor", "tool attached:", nv.tool_attached())
PYEOF

NCU_ARGS=(--metrics gpu__time_duration.sum --cache-control none --clock-control none)
timeout 40 "$NCU" --nvtx --nvtx-include "stepscope@forward/" "${NCU_ARGS[@]}" \
  $PY "$OUT/nvtx_loop.py" >"$OUT/ncu_forward.txt" 2>&1
rc_f=$?
timeout 40 "$NCU" "${NCU_ARGS[@]}" $PY "$OUT/nvtx_loop.py" >"$OUT/ncu_all.txt" 2>&1
rc_a=$?
fwd=$(grep -c "gpu__time_duration.sum" "$OUT/ncu_forward.txt")
all=$(grep -c "gpu__time_duration.sum" "$OUT/ncu_all.txt")
echo "== kernels ncu profiled inside stepscope@forward/ (rc $rc_f):"
grep -B3 "Section: Command line profiler metrics" "$OUT/ncu_forward.txt" | grep -v "Section\|^--" | head -20
tail -3 "$OUT/ncu_forward.txt"
echo "== unfiltered run (rc $rc_a): $all kernels"
if [ "$rc_f" -eq 0 ] && [ "$fwd" -gt 0 ] && [ "$fwd" -lt "$all" ]; then
  echo "ncu --nvtx-include stepscope@forward/: $fwd of $all kernels: OK"
else
  echo "ncu --nvtx-include stepscope@forward/: $fwd of $all kernels: FAILED"
  exit 1
fi
