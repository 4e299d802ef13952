#!/usr/bin/env bash
# scripts/gpu_tune.sh - tuning data in one call on a lent GPU machine (logs under $OUT,
# packed into $OUT/tune.tgz: a call brings back at most 8 files):
#   GPU_TUNE_SWEEP=1  gather kernel shapes against copy_ (bench/gather_sweep.py)
#   always            what cutting a gather into jobs costs on the GPU alone
#                     (gather_sweep.py --pipeline); shm READs with KVTRANSFER_TRACE=1
#                     at two device job sizes and 2/4 copy threads; with two GPUs,
#                     reads from the other GPU (bench/gpu_peer.py)
#   device tool: run(command="bash scripts/gpu_tune.sh", kind="nvidia-h100-x2", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,pci.bus_id --format=csv | tee "$OUT/machine.txt"
python3 setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1 || tail -20 "$OUT/build.txt"
if [ "${GPU_TUNE_SWEEP:-0}" = 1 ]; then
  timeout 150 python3 bench/gather_sweep.py --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" | grep -v '^{'
fi
timeout 120 python3 bench/gather_sweep.py --pipeline --json "$OUT/pipeline.json" > "$OUT/pipeline.txt" 2>&1
python3 - "$OUT/pipeline.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    print(f"{r['cut']:<28} {r['jobs']:>2} jobs {r['streams']} streams upload={r['upload']!s:<5} {r['us']:7.1f} us "
          f"{r['ratio']:.3f}x of copy_+sync {'' if r['ok'] else 'WRONG BYTES'}")
PY
for job in 65536 262144; do
  for th in 2 4; do
    KVTRANSFER_SHM_DEV_JOB_KB=$job KVTRANSFER_TRACE=1 timeout 90 python3 bench/transfer_bw.py --device cuda \
      --transports shm,d2d --shm-threads $th --iters 20 > "$OUT/shm_j${job}_t$th.txt" 2>&1
    echo "job $((job / 1024)) MiB, $th threads: $(grep -E '^\[transfer_bw\]' "$OUT/shm_j${job}_t$th.txt" \
      | awk '{print $2, $3, $6}' | tr '\n' ';')"
    grep -m 3 trace "$OUT/shm_j${job}_t$th.txt" | tail -2
  done
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  KVTRANSFER_TRACE=1 timeout 120 python3 bench/gpu_peer.py > "$OUT/peer.txt" 2>&1
  grep -m 3 trace "$OUT/peer.txt" | tail -2; tail -6 "$OUT/peer.txt"
fi
(cd "$OUT" && tar czf /tmp/tune.tgz ./*.txt ./*.json 2>/dev/null && rm -f ./*.txt ./*.json && mv /tmp/tune.tgz .)
