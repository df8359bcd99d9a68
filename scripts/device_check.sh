#!/usr/bin/env bash
# The one script for a GPU machine (see DESIGN.md, "Verifying on a GPU"): build against the torch
# already installed there (no installs, no network), run the CUDA-marked tests, print what they
# measured. Whatever this prints is the only evidence that the CUDA paths work.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PYTHON:-python3}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
CMAKE="$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || command -v cmake)"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
"$CMAKE" -S . -B build-device "${GEN[@]}" -Wno-dev -DPython_EXECUTABLE="$(command -v "$PY")" -DSTEPSCOPE_BUILD_TESTS=OFF >/dev/null
"$CMAKE" --build build-device -j "$(nproc)"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import stepscope; print(stepscope.build_info())"
# -s: the Monitor-vs-hand-placed-events table is printed by the test itself.
"$PY" -m pytest tests/python -m cuda -q -rs -s -p no:cacheprovider
