#!/usr/bin/env bash
# scripts/rxe/bench_rdma.sh OUT.json          (runs INSIDE the rxe guest; `make bench-rdma`)
#
# Our verbs READ beside perftest's ib_read_bw on the same device (rxe0), same message
# sizes (64 KiB and 1 MiB), same guest boot. Writes one JSON list to OUT.json with the
# records of both (systems "ib_read_bw" and "verbs", bench/transfer_bw.py's schema)
# and prints both tables and the ratio verbs / ib_read_bw of BW average per size.
# Knobs: RDMA_BENCH_TOTAL (bytes per pass of ours, default 32M), RDMA_BENCH_ITERS (5).
set -euo pipefail
out=${1:?usage: bench_rdma.sh OUT.json}
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "=== perftest ib_read_bw on ${RXE_DEV:-rxe0} (GID index ${RXE_GID_INDEX:-1})" >&2
scripts/rxe/ib_read_bw_pair.sh 65536 1048576 > "$tmp/ib_read_bw.jsonl"
cat "$tmp/ib_read_bw.jsonl"

echo "=== kvtransfer verbs READ, same device and sizes" >&2
timeout 600 "$PY" bench/transfer_bw.py --transports verbs --sizes 64K,1M --total "${RDMA_BENCH_TOTAL:-32M}" \
    --iters "${RDMA_BENCH_ITERS:-5}" --warmup 1 --json "$tmp/verbs.json"

"$PY" - "$tmp/ib_read_bw.jsonl" "$tmp/verbs.json" "$out" <<'PY'
import json, sys
ib = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
ours = json.load(open(sys.argv[2]))
json.dump(ib + ours, open(sys.argv[3], "w"), indent=1)
by = {(r["system"], r["block_bytes"]): r for r in ib + ours}
for size in sorted({r["block_bytes"] for r in ours}):
    a, b = by.get(("verbs", size)), by.get(("ib_read_bw", size))
    if a and b:
        print(f" {size >> 10:>5} KiB blocks : verbs {a['bw_avg_gbps']:.4f} GB/s, ib_read_bw {b['bw_avg_gbps']:.4f} GB/s,"
              f" ratio {a['bw_avg_gbps'] / b['bw_avg_gbps']:.2f}x")
print(f" records written to {sys.argv[3]}")
PY
