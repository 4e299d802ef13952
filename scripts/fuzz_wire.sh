#!/usr/bin/env bash
# scripts/fuzz_wire.sh SECONDS - fuzzes the tcp server's wire checks (tests/fuzz/wire_fuzz.c)
# with libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer for SECONDS, starting
# from the committed seeds (tests/fuzz/corpus/, read only; new inputs go to a scratch
# folder). A crash, a sanitizer report or a leak fails it and leaves the input in
# build/fuzz/. Ends with the executions and the coverage reached.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-45}
scripts/setup_fuzz.sh
out=build/fuzz
mkdir -p "$out"
clang -g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Icsrc \
  tests/fuzz/wire_fuzz.c csrc/wire.c csrc/region.c csrc/err.c -o "$out/wire_fuzz"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/last_run.log"
echo "fuzz_wire: ${secs} s from $(ls tests/fuzz/corpus | wc -l) seeds (log: $log)"
"$out/wire_fuzz" -max_total_time="$secs" -max_len=40000 -print_final_stats=1 -print_coverage=1 -artifact_prefix="$out/" \
  "$work" tests/fuzz/corpus >"$log" 2>&1 || { tail -60 "$log"; exit 1; }
grep -E "DONE" "$log" | tail -1
grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$log"
# edges reached per function of the code under test (wire.c, region.c's checks)
grep -E "COVERED_FUNC.*(kvt_wire_|kvt_table_acquire|kvt_table_release|check_slot|slot_of)" "$log" \
  | sed -E 's/.*edges: ([0-9]+\/[0-9]+) ([^ ]+) .*/  \2: \1 edges/' || true
echo "fuzz_wire: $(ls "$work" | wc -l) new inputs kept"
