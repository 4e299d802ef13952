#!/usr/bin/env bash
# scripts/gpu_check.sh - one call on a lent GPU machine (no package registry there):
# install carried wheels (.whl/, if any), build the extension in place, run the gpu
# tests and the whole suite, and the transfer benchmark, writing logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; uname -r; python3 --version; } | tee "$OUT/machine.txt"
python3 setup.py -q build_ext --inplace 2>&1 | tail -5 | tee "$OUT/build.txt"
python3 -m kvtransfer doctor 2>&1 | tee "$OUT/doctor.txt"
python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
python3 -m pytest -q -x tests --ignore=tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/pytest_all.txt"
