#!/usr/bin/env bash
# scripts/gpu_session.sh - everything a GPU machine is lent for, in one call: the control
# plane benchmark (16 cores: a quieter place than a 2-core VM), the demo with both
# workers' model and KV pool on the GPU (KV moves GPU to GPU through CUDA IPC), then
# scripts/gpu_check.sh (build, GPU tests, transfer benchmark), and with two GPUs reads
# from the other one (bench/gpu_peer.py). Logs under $OUT, packed into $OUT/session.tgz
# (a call brings back at most 8 files).
#   device tool: run(command="bash scripts/gpu_session.sh", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export KVTRANSFER_CACHE=/tmp/kvt-cache
python3 setup.py -q build_ext --inplace > "$OUT/build0.txt" 2>&1 || tail -20 "$OUT/build0.txt"
timeout 120 python3 bench/control_overhead.py --json "$OUT/control.json" 2>&1 | tee "$OUT/control.txt"
timeout 300 python3 scripts/demo.py --model random --device cuda 2>&1 | tee "$OUT/demo_cuda.txt"
timeout 360 bash scripts/gpu_check.sh
status=$?
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 120 python3 bench/gpu_peer.py --json "$OUT/peer.json" 2>&1 | tee "$OUT/peer.txt" | tail -6
fi
(cd "$OUT" && tar czf /tmp/session.tgz ./*.txt ./*.json ./*.err 2>/dev/null && rm -f ./*.txt ./*.json ./*.err && mv /tmp/session.tgz .)
exit $status
