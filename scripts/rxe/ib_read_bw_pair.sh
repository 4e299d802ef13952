#!/usr/bin/env bash
# scripts/rxe/ib_read_bw_pair.sh [SIZE...]      (runs INSIDE the rxe guest)
#
#   scripts/rxe/run_in_rxe_vm.sh scripts/rxe/ib_read_bw_pair.sh 65536 1048576
#
# The perftest baseline for kvtransfer's verbs transport: for each message size
# (default 65536 and 1048576 bytes) it runs one ib_read_bw server + client pair
# over $RXE_DEV (rxe0, talking to itself) and prints one JSON record per line on
# stdout, with the fields of bench/transfer_bw.py's --json records (less "iters"):
#   {"system": "ib_read_bw", "block_bytes": N, "blocks": ITERS, "bw_avg_gbps": X,
#    "bw_peak_gbps": Y, "mops": Z, "p50_us": null, "p99_us": null}
# where bw_*_gbps are GB/s = 10^9 bytes/s (the name follows the bench's fields).
# Everything else (progress, perftest's own output on failure) goes to stderr.
#
# Units: perftest's "BW average[MB/sec]" is MiB/s (perftest_parameters.c,
# print_report_bw: format_factor = 0x100000 for MB/s, 125000000 for
# --report_gbits). Its Gb/s figures are printed with 2 decimals only ("0.40" at
# the ~0.4 Gb/s of emulated rxe, a 1% step), so the MiB/s form is parsed and
# converted: GB/s = MiB/s * 1048576 / 1e9. perftest's MsgRate[Mpps] has 6
# decimals (3 digits at ~0.0004); "mops" is computed from the same average
# instead (average bytes/s / size / 1e6, which is how perftest derives it).
#
# Timing: perftest times with rdtsc. Under TCG the guest kernel marks the TSC
# unstable (vCPU TSCs unsynchronized), so the client is pinned to one vCPU (the
# last) and the server to the first. Pinned runs were also faster in a
# side-by-side test in one guest (30-35 vs 23-27 MiB/s at 64 KiB; runs vary by
# +-20% from boot to boot under TCG). Each record's client wall time (connection
# setup included) goes to stderr as a sanity check of perftest's figure.
#
# Knobs: RXE_BW_BYTES bytes to move per size (default 160 MiB: 5-7 s at the
# 0.2-0.3 Gb/s measured in a 2-vCPU TCG guest, ~3 s at 0.4 Gb/s;
# iterations = that / size, clamped to [100, 5000] since perftest's peak search
# is quadratic in iterations), RXE_BW_TIMEOUT seconds per server/client (120).
# Exit status: 0 when every size produced a record, 1 otherwise.
set -u

DEV=${RXE_DEV:-rxe0}
GID=${RXE_GID_INDEX:-1}
IP=${RXE_IP:-10.99.0.1}
BUDGET=${RXE_BW_BYTES:-$((160 * 1024 * 1024))}
TMO=${RXE_BW_TIMEOUT:-120}
[ $# -ge 1 ] || set -- 65536 1048576
CLIENT_CPU=$(( $(nproc) - 1 ))

command -v ib_read_bw >/dev/null || { echo "ib_read_bw_pair: ib_read_bw missing (apt-get install perftest)" >&2; exit 1; }
[ -e "/sys/class/infiniband/$DEV" ] || { echo "ib_read_bw_pair: no RDMA device $DEV: run me through scripts/rxe/run_in_rxe_vm.sh" >&2; exit 1; }

LOGS=$(mktemp -d)                 # in the guest's /tmp overlay: gone with the guest
trap 'rm -rf "$LOGS"' EXIT

# A TCP port for perftest's out-of-band exchange that nothing listens on now.
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$(( 20000 + RANDOM % 40000 ))
        ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return 0; }
    done
    return 1
}

# Wait (up to $2 s) until something listens on TCP port $1, or until pid $3 dies.
wait_listen() {
    local deadline=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        ss -Htln "sport = :$1" | grep -q . && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

rc=0
for size in "$@"; do
    case $size in ''|*[!0-9]*) echo "ib_read_bw_pair: bad size '$size'" >&2; rc=1; continue ;; esac
    iters=$(( BUDGET / size ))
    [ "$iters" -lt 100 ] && iters=100
    [ "$iters" -gt 5000 ] && iters=5000
    port=$(free_port) || { echo "ib_read_bw_pair: no free port" >&2; rc=1; continue; }
    # -F: don't fail on cpufreq governor warnings (meaningless in a VM).
    args=(-d "$DEV" -i 1 -x "$GID" -s "$size" -n "$iters" -p "$port" -F)
    echo "ib_read_bw_pair: size $size x $iters iterations, port $port" >&2

    timeout "$TMO" taskset -c 0 ib_read_bw "${args[@]}" > "$LOGS/srv.$size" 2>&1 &
    spid=$!
    if ! wait_listen "$port" 30 "$spid"; then
        echo "ib_read_bw_pair: server for size $size not listening on $port after 30 s" >&2
        cat "$LOGS/srv.$size" >&2
        kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
        rc=1; continue
    fi
    t0=$(date +%s.%N)
    timeout "$TMO" taskset -c "$CLIENT_CPU" ib_read_bw "${args[@]}" "$IP" > "$LOGS/cli.$size" 2>&1
    crc=$?
    t1=$(date +%s.%N)
    wait "$spid"; src=$?

    # The result line follows the header " #bytes  #iterations  BW peak[MB/sec]
    # BW average[MB/sec]  MsgRate[Mpps]": bytes iters peak avg mpps.
    line=$(awk '/#bytes/ {getline; print; exit}' "$LOGS/cli.$size")
    if [ "$crc" != 0 ] || [ "$src" != 0 ] || ! grep -q 'BW average\[MB/sec\]' "$LOGS/cli.$size" \
       || [ "$(echo "$line" | awk '{print NF}')" -lt 5 ]; then
        echo "ib_read_bw_pair: size $size failed (client exit $crc, server exit $src)" >&2
        echo "--- server:" >&2; cat "$LOGS/srv.$size" >&2
        echo "--- client:" >&2; cat "$LOGS/cli.$size" >&2
        rc=1; continue
    fi
    echo "$line" | awk -v wall="$(echo "$t0 $t1" | awk '{print $2 - $1}')" '{
        avg = $4 * 1048576 / 1e9; peak = $3 * 1048576 / 1e9     # MiB/s -> GB/s
        printf "{\"system\": \"ib_read_bw\", \"block_bytes\": %d, \"blocks\": %d, \"bw_avg_gbps\": %.6f, \"bw_peak_gbps\": %.6f, \"mops\": %.8f, \"p50_us\": null, \"p99_us\": null}\n", $1, $2, avg, peak, avg * 1e3 / $1
        printf "ib_read_bw_pair: size %d: %.2f MiB/s avg (%.3f Gb/s), %.2f MiB/s peak, %s Mpps; client ran %.1f s (%.2f MiB/s with setup)\n", $1, $4, avg * 8, $3, $5, wall, $1 * $2 / wall / 1048576 > "/dev/stderr"
    }'
done
exit $rc
