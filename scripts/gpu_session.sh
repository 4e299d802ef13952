#!/usr/bin/env bash
# scripts/gpu_session.sh - everything a GPU machine is lent for, in one call: the control
# plane benchmark (16 cores: a quieter place than a 2-core VM), the demo with both
# workers' model and KV pool on the GPU (KV moves GPU to GPU through CUDA IPC), then
# scripts/gpu_check.sh (build, GPU tests, transfer benchmark). Logs under $OUT.
#   device tool: run(command="bash scripts/gpu_session.sh", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export KVTRANSFER_CACHE=/tmp/kvt-cache
python3 setup.py -q build_ext --inplace > "$OUT/build0.txt" 2>&1 || tail -20 "$OUT/build0.txt"
timeout 120 python3 bench/control_overhead.py --json "$OUT/control.json" 2>&1 | tee "$OUT/control.txt"
timeout 120 python3 -m kvtransfer.demo --device cuda 2>&1 | tee "$OUT/demo_cuda.txt"
timeout 360 bash scripts/gpu_check.sh
