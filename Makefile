# The two commands of the README:
#   make demo   install what is missing, build, run examples/train_classifier.py
#   make test   install what is missing, build, run ctest and pytest
PYTHON ?= python3
BUILD_DIR ?= build
# Tests need the CUDA kernels compiled, not run (no GPU here): one architecture keeps the build
# short. A plain `pip install .` uses the full default list (see README).
TEST_CUDA_ARCHS ?= 9.0

.PHONY: deps test-deps build build-tests demo test clean

deps:
	@$(PYTHON) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 4) else 1)" 2>/dev/null \
	  || $(PYTHON) -m pip install torch==2.14.1
	@$(PYTHON) -c "import setuptools, sys; sys.exit(0 if int(setuptools.__version__.split('.')[0]) >= 64 else 1)" 2>/dev/null \
	  || $(PYTHON) -m pip install "setuptools>=64" wheel
	@$(PYTHON) -c "import cmake, sys; sys.exit(0 if tuple(map(int, cmake.__version__.split('.')[:2])) >= (3, 27) else 1)" 2>/dev/null \
	  || $(PYTHON) -m pip install "cmake>=3.27"
	@command -v ninja >/dev/null || $(PYTHON) -m pip install ninja
	@$(PYTHON) -c "import sklearn" 2>/dev/null || $(PYTHON) -m pip install scikit-learn

test-deps: deps
	@test -f /usr/src/googletest/CMakeLists.txt || { apt-get update && apt-get install -y googletest; } \
	  || echo "warning: googletest unavailable: C++ tests will be skipped"
	@# The HTML report's rendering test (headless Chromium); skipped where it cannot be installed.
	@command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; } \
	  || echo "warning: chromium unavailable: the HTML rendering test will be skipped"
	@$(PYTHON) -c "import pytest, sklearn, torchmetrics, numpy" 2>/dev/null \
	  || $(PYTHON) -m pip install pytest scikit-learn "torchmetrics==1.9.*" numpy
	@$(PYTHON) -c "import matplotlib, tensorboard" 2>/dev/null \
	  || $(PYTHON) -m pip install matplotlib tensorboard
	@# The framework integrations' tests (CPU); pinning the torch already installed keeps pip from replacing it.
	@$(PYTHON) -c "import lightning, transformers, accelerate" 2>/dev/null \
	  || $(PYTHON) -m pip install "lightning>=2.0" "transformers>=4.40" "accelerate>=0.26" \
	       "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])')"

build: deps
	STEPSCOPE_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pip install -v --no-build-isolation --no-deps -e .

build-tests: test-deps
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-$(TEST_CUDA_ARCHS)}" STEPSCOPE_BUILD_DIR=$(BUILD_DIR) \
	  $(PYTHON) -m pip install -v --no-build-isolation --no-deps -e .

demo: build
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install matplotlib
	$(PYTHON) examples/train_classifier.py

test: build-tests
	$$($(PYTHON) -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'))") --test-dir $(BUILD_DIR) --output-on-failure
	$(PYTHON) -m pytest tests/python -q -rs

clean:
	rm -rf $(BUILD_DIR) python/stepscope/*.so python/stepscope/*.so.*
