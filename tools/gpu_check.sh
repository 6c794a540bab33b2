#!/usr/bin/env bash
# GPU evidence in one command, for a lent GPU machine (torch and Triton preinstalled there,
# no internet): build in place, run the whole test suite (GPU-marked tests included), run the
# benchmark suite on the GPU, and write benchmarks/results/<gpu>-<date>.{json,md}.
# Logs go to ${OUT:-build}/ as well, so a remote run can bring them back.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build}"
mkdir -p "$out" build
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
FASTATTN_PTXAS_VERBOSE=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -n 80 "$out/build.log"; exit 1; }
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# fastattn._triton lives in kernels/triton; an in-place build has no package mapping for it.
ln -sfn ../kernels/triton fastattn/_triton
trap 'rm -f fastattn/_triton' EXIT
python3 -m pytest tests -q -rs 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m fastattn.cli bench --device cuda 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
cp benchmarks/results/*"$(date +%F)"* "$out"/ 2>/dev/null || true
exit $(( tests_rc != 0 || bench_rc != 0 ))
