#!/usr/bin/env bash
# scripts/gpu_before_after.sh - one change's before/after on one lent GPU: the same CUDA
# transfer benchmark (shm against copy_, scattered 32K and 256K blocks) on the base
# tree (.before/) and this one, alternating ROUNDS times, so that both meet the same
# card in the same minutes. Ratios are printed per run; logs and JSON under $OUT.
#   rm -rf .before && mkdir .before && git archive BASE | tar -x -C .before
#   device tool: run(command="bash scripts/gpu_before_after.sh", carry=[".whl", ".before"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
ROUNDS=${ROUNDS:-3}  # TRANSPORTS: the systems compared (default shm,d2d)
[ -f .before/setup.py ] || { echo ".before/ holds no tree (see the header)"; exit 2; }
(cd .before && python3 setup.py -q build_ext --inplace) > "$OUT/build_before.txt" 2>&1 || { tail -20 "$OUT/build_before.txt"; exit 1; }
python3 setup.py -q build_ext --inplace > "$OUT/build_after.txt" 2>&1 || { tail -20 "$OUT/build_after.txt"; exit 1; }
site=${PYTHONPATH#"$PWD"}
for r in $(seq "$ROUNDS"); do
  for tree in before after; do
    dir=$PWD; [ "$tree" = before ] && dir=$PWD/.before
    (cd "$dir" && PYTHONPATH=$dir$site timeout 150 python3 bench/transfer_bw.py --device cuda --transports "${TRANSPORTS:-shm,d2d}" \
      --sizes 32K,256K --iters 20 --json "$OUT/$tree-$r.json") > "$OUT/$tree-$r.txt" 2>&1
    echo "$tree round $r: $(sed -n '/Ratios of BW avg/,/^-/p' "$OUT/$tree-$r.txt" | grep -o '[0-9.]*x' | tr '\n' ' ')"
  done
done
