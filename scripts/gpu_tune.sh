#!/usr/bin/env bash
# scripts/gpu_tune.sh - tuning data in one call on a lent GPU machine: gather kernel
# shapes against copy_ (bench/gather_sweep.py), where a shm READ's time goes
# (KVTRANSFER_TRACE=1, 32 KiB blocks, 1/2/4 copy threads), and, with two GPUs, the
# same for reads from the other GPU. Logs under $OUT.
#   device tool: run(command="bash scripts/gpu_tune.sh", kind="nvidia-h100-x2", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,pci.bus_id --format=csv | tee "$OUT/machine.txt"
nvidia-smi topo -m >> "$OUT/machine.txt" 2>&1
python3 setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1 || tail -20 "$OUT/build.txt"
timeout 150 python3 bench/gather_sweep.py --json "$OUT/sweep1.json" 2>&1 | tee "$OUT/sweep1.txt" | grep -v '^{'
for th in 1 2 4; do
  KVTRANSFER_TRACE=1 timeout 60 python3 bench/transfer_bw.py --device cuda --sizes 32K --iters 20 \
    --transports shm,d2d,kernel,gather --shm-threads $th > "$OUT/shm_t$th.txt" 2>&1
  echo "threads $th: $(grep -E '^\[transfer_bw\]' "$OUT/shm_t$th.txt" | awk '{print $2, $6, $10}' | tr '\n' ';')"
  grep -m 4 trace "$OUT/shm_t$th.txt" | tail -3
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 100 python3 bench/gather_sweep.py --src-device 1 --quick --json "$OUT/sweep_peer_pull.json" 2>&1 \
    | tee "$OUT/sweep_peer_pull.txt" | grep -v '^{'
  timeout 100 python3 bench/gather_sweep.py --src-device 1 --run-on src --quick --json "$OUT/sweep_peer_push.json" 2>&1 \
    | tee "$OUT/sweep_peer_push.txt" | grep -v '^{'
  timeout 60 python3 bench/gpu_peer.py 2>&1 | tail -8
fi
