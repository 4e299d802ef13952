#!/usr/bin/env bash
# scripts/gpu_tune.sh - tuning data in one call on a lent GPU machine (logs under $OUT,
# packed into $OUT/tune.tgz: a call brings back at most 8 files):
#   GPU_TUNE_SWEEP=1     gather kernel shapes against copy_, one pass at a time (bench/gather_sweep.py --single)
#   GPU_TUNE_KERNEL=1    the engine's kernel alone: one launch against its three jobs (bench/engine_kernel.py)
#   always               shm READs against copy_ with KVTRANSFER_TRACE=1 (medians by
#                        bench/trace_summary.py); with two GPUs, reads from the other GPU
#   device tool: run(command="bash scripts/gpu_tune.sh", kind="nvidia-h100-x2", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,pci.bus_id --format=csv | tee "$OUT/machine.txt"
python3 setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1 || tail -20 "$OUT/build.txt"
if [ "${GPU_TUNE_SWEEP:-0}" = 1 ]; then
  timeout 150 python3 bench/gather_sweep.py --single --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" | grep -v '^{'
fi
if [ "${GPU_TUNE_KERNEL:-0}" = 1 ]; then
  timeout 120 python3 bench/engine_kernel.py > "$OUT/engine_kernel.txt" 2>&1
fi
for th in ${GPU_TUNE_THREADS:-2}; do
  KVTRANSFER_TRACE=1 timeout 90 python3 bench/transfer_bw.py --device cuda --transports shm,d2d --shm-threads $th \
    --iters 30 > "$OUT/shm_t$th.txt" 2>&1
  grep -E '^\[transfer_bw\]' "$OUT/shm_t$th.txt"
  python3 bench/trace_summary.py "$OUT/shm_t$th.txt"
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  KVTRANSFER_TRACE=1 timeout 120 python3 bench/gpu_peer.py > "$OUT/peer.txt" 2>&1
  python3 bench/trace_summary.py "$OUT/peer.txt"; tail -5 "$OUT/peer.txt"
fi
(cd "$OUT" && tar czf /tmp/tune.tgz ./*.txt ./*.json 2>/dev/null && rm -f ./*.txt ./*.json && mv /tmp/tune.tgz .)
