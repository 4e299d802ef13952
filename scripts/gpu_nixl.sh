#!/usr/bin/env bash
# scripts/gpu_nixl.sh - one call on a lent GPU machine: NIXL's UCX READ between two
# processes on one GPU (VRAM registrations, bench/peer_nixl.py --backend cuda) beside
# our shm CUDA IPC path (bench/transfer_bw.py --device cuda), same 512 MiB of seeded
# bytes, same permutations, 32 KiB, 256 KiB and 4 MiB blocks, bytes checked first.
# NIXL is tried in each configuration below (UCX_TLS x error mode x target progress
# thread; the initiator always polls), each bounded by a timeout; every result, or why
# there is none, goes to $OUT/nixl_summary.txt with the configuration that gave it.
# Needs NIXL's CUDA 13 wheel (nixl-cu13, ~59 MB) and the nixl meta wheel in .whl/.
#   device tool: run(command="bash scripts/gpu_nixl.sh", kind="nvidia-h100-x1", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TOTAL=${GPU_NIXL_TOTAL:-512M}
BACKEND=${GPU_NIXL_BACKEND:-cuda}  # sm: the same loop on host memory (a dry run on a CPU machine)
TLS_LIST=${GPU_NIXL_TLS:-"cuda_ipc,cuda_copy,sm,self cuda_ipc,cuda_copy,tcp cuda_ipc,cuda_copy ^ib,rc,ud,dc,rdmacm"}
SIZES=(32768 262144 4194304)
ITERS=${GPU_NIXL_ITERS:-20}
# GPU_NIXL_TIMEOUT: seconds each configuration may take (a READ that never completes ends there)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import nixl_cu13, importlib.metadata as m; print("nixl-cu13", m.version("nixl-cu13"))'
} 2>&1 | tee "$OUT/machine.txt"
python3 setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1 || { tail -20 "$OUT/build.txt"; exit 2; }

# ours: shm (CUDA IPC, batched copies) and the one-process ceiling d2d
timeout 240 python3 bench/transfer_bw.py --device cuda --transports shm,d2d --sizes 32K,256K,4M --total "$TOTAL" \
  --iters "$ITERS" --json "$OUT/ours.json" > "$OUT/ours.txt" 2> "$OUT/ours.err"
echo "ours: rc $?"; grep -E '^\[transfer_bw\]' "$OUT/ours.err"

commands() {  # bench/peer_common.py's commands: verify, 3 warmup passes, ITERS timed
  for s in "${SIZES[@]}"; do printf 'prepare %s\npasses 3\npasses %s\n' "$s" "$ITERS"; done
}
n=0
for tls in $TLS_LIST; do  # the last default: every transport UCX finds but RDMA's (none on one GPU)
  for mode in ${GPU_NIXL_MODES:-none peer}; do
    for tthread in 0 1; do
      n=$((n + 1)); tag="c$n"
      echo "$tag UCX_TLS=$tls error_mode=$mode target_thread=$tthread" > "$OUT/nixl_$tag.cfg"
      commands | timeout "${GPU_NIXL_TIMEOUT:-150}" python3 bench/peer_nixl.py --backend "$BACKEND" --bytes "$TOTAL" --ucx-tls "$tls" \
        --error-mode "$mode" --target-thread "$tthread" > "$OUT/nixl_$tag.jsonl" 2> "$OUT/nixl_$tag.err"
      echo "rc $?" >> "$OUT/nixl_$tag.cfg"
    done
  done
done

python3 - "$OUT" "$TOTAL" <<'PY' | tee "$OUT/nixl_summary.txt"
import glob, json, statistics, sys
out = sys.argv[1]
total = int(sys.argv[2][:-1]) << {"K": 10, "M": 20, "G": 30}[sys.argv[2][-1]]
sizes = (32768, 262144, 4194304)
ours = {}
if glob.glob(f"{out}/ours.json"):
    ours = {r["block_bytes"]: r["bw_avg_gbps"] for r in json.load(open(f"{out}/ours.json")) if r["system"] == "shm"}
print("GB/s: NIXL from its median pass; ours shm BW avg (bench/transfer_bw.py --device cuda, $OUT/ours.txt)")
print("ours shm: " + "; ".join(f"{s >> 10}K {ours[s]:.1f}" if s in ours else f"{s >> 10}K -" for s in sizes))
for cfg in sorted(glob.glob(f"{out}/nixl_c*.cfg"), key=lambda p: int(p.rsplit("_c", 1)[1][:-4])):
    tag = cfg.rsplit("nixl_", 1)[1][:-4]
    desc, rc = open(cfg).read().split("\n")[:2]
    lines = [json.loads(l) for l in open(f"{out}/nixl_{tag}.jsonl") if l.startswith("{")]
    if not lines or "error" in lines[0]:
        print(f"{desc} [{rc}]: NOT RUN: {lines[0]['error'] if lines else 'no hello (see nixl_' + tag + '.err)'}")
        continue
    cells = []
    for k, s in enumerate(sizes):
        got = lines[1 + 3 * k: 4 + 3 * k]
        bad = next((g["error"] for g in got if "error" in g), None)
        if bad or len(got) < 3:
            cells.append(f"{s >> 10}K FAILED: {bad or 'no answer (rc 124: its time limit, GPU_NIXL_TIMEOUT)'}")
            break
        gbps = (total // s) * s / statistics.median(got[2]["pass_ns"])
        ratio = f" (ours/nixl {ours[s] / gbps:.2f}x)" if s in ours else ""
        cells.append(f"{s >> 10}K {gbps:.2f}{ratio}")
    print(f"{desc} [{rc}]: " + "; ".join(cells))
PY
