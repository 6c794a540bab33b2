# The two commands (README): `make bench` runs the benchmark suite, `make test` the tests.
# Each sets up everything it needs from nothing: a virtual env in .venv with torch from
# constraints.txt, then builds fastattn (CPU + CUDA kernels when nvcc is present) into it.
#
# Helpers: `make quick` (CPU-only in-place rebuild for the inner loop), `make test-fast`
# (skips the slow checks), `make resources` (register/shared-memory report of the GPU
# kernels, no GPU needed), `make gpu-check` (on a GPU machine: build, GPU tests, benchmarks).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
KERNEL_SOURCES := setup.py $(shell find kernels -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: test test-fast bench quick resources gpu-check clean

$(VENV)/.deps: constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch setuptools wheel ninja pytest pytest-benchmark numpy \
		safetensors tqdm transformers
	touch $@

# Full build into the venv (editable). The log keeps the compiler output, including ptxas's
# register/spill lines for every CUDA kernel (FASTATTN_PTXAS_VERBOSE=1).
build/.built: $(VENV)/.deps $(KERNEL_SOURCES)
	mkdir -p build
	@echo "building fastattn (log: build/build.log)"
	@FASTATTN_PTXAS_VERBOSE=1 $(PY) -m pip install -v --no-build-isolation --no-deps -e . \
		> build/build.log 2>&1 || { tail -n 60 build/build.log; exit 1; }
	@grep -m1 -oE "fastattn: building.*" build/build.log || true
	@echo "ptxas compiled $$(grep -c "Compiling entry function" build/build.log) CUDA kernel variants"
	@$(PY) -c "import torch, fastattn; print('fastattn._C kernels: CPU', \
		fastattn._library.has_kernel('softmax', 'CPU'), '| CUDA', fastattn._library.has_kernel('softmax', 'CUDA'))"
	touch $@

test: build/.built
	$(PY) -m pytest tests
	@echo "GPU kernel resources (compiled for sm_80/sm_90 without a GPU; full table: build/resources.md):"
	@$(PY) tools/resource_report.py --build-log build/build.log --markdown build/resources.md | tail -n 4

test-fast: build/.built
	$(PY) -m pytest tests -m "not slow"

bench: build/.built
	$(PY) -m fastattn.cli bench --device auto

# CPU kernels only (about 20 s instead of about 1 min); the next `make test` rebuilds in full.
quick: $(VENV)/.deps
	rm -f build/.built
	FASTATTN_NO_CUDA=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .

resources: build/.built
	$(PY) tools/resource_report.py --build-log build/build.log

# For a lent GPU machine (its own torch/Triton, no internet): uses the python on PATH.
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf build fastattn/_C*.so *.egg-info
