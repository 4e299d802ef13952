#!/usr/bin/env bash
# scripts/rxe/run_in_rxe_vm.sh CMD [ARGS...]
#
# Runs CMD inside a throw-away QEMU guest that has a soft-RoCE device, rxe0, so
# that real RDMA verbs can be tested on a machine without RDMA hardware (and
# whose own kernel cannot load rdma_rxe). Install what it needs first with
# scripts/rxe/setup_rxe.sh.
#
# How: virtme-ng (`vng`, from .venv-vng/) boots Debian's stock kernel
# (linux-image-amd64, which ships rdma_rxe.ko) with this machine's root
# filesystem shared read-only over 9p (writes to /etc, /usr, /tmp, /var ... land
# in a guest-only overlay and vanish with the guest) and the repository root
# (plus $PWD, if outside it) shared READ-WRITE. In the guest, before CMD, it
# loads rdma_rxe, creates a veth pair veth0 (10.99.0.1) / veth1 (10.99.0.2) and
# `rdma link add rxe0 type rxe netdev veth0`. The guest gets no network device
# (virtme-ng's default), so all RDMA traffic stays inside the guest: rxe0 talks
# to itself (RoCEv2, GID index 1 = ::ffff:10.99.0.1).
#
# CMD runs in the current directory, as root, with these in its environment:
#   RXE_DEV=rxe0 RXE_IP=10.99.0.1 RXE_PEER_IP=10.99.0.2 RXE_GID_INDEX=1
#   KVTRANSFER_IB_DEVICE=rxe0 KVTRANSFER_IB_GID_INDEX=1   (for kvtransfer's verbs transport)
# plus the host's PATH, PYTHONPATH, VIRTUAL_ENV and every variable named in
# RXE_VM_ENV (PATH gets the sbin directories appended). The memlock limit is
# raised to unlimited (guest default: 8192 KiB). Outside the shared folders the
# guest's writes vanish with it, and some paths are read-only there, $HOME
# (/root) included: point caches elsewhere (XDG_CACHE_HOME via RXE_VM_ENV).
#
# Exit status: CMD's own, or
#   124  the whole VM ran past RXE_VM_TIMEOUT and was killed
#   125  the guest did not come up, or setting up rxe0 in it failed
#   126  no kernel with rdma_rxe.ko, or no vng (run scripts/rxe/setup_rxe.sh)
# (CMD's own 124-126 pass through unchanged; the message on stderr tells which.)
#
# Knobs (environment):
#   RXE_VM_TIMEOUT  seconds before the whole VM is killed (default 900)
#   RXE_VM_ACCEL    tcg | kvm | auto (default auto: see below)
#   RXE_VM_MEM      guest memory (default 2G)
#   RXE_VM_CPUS     guest CPUs (default: host nproc)
#   RXE_VM_KERNEL   kernel image (default: newest /boot/vmlinuz-* with rdma_rxe.ko)
#   RXE_VM_VNG      vng to use (default: <repo>/.venv-vng/bin/vng, else vng in PATH)
#   RXE_VM_ENV      extra host variable names to export into the guest
#   RXE_VM_VERBOSE=1  show the guest kernel console on stderr (for boot problems)
#   RXE_VM_APPEND   kernel command line extras (default: a modprobe.blacklist= list)
# Under TCG on a 2-core machine a boot takes ~15-20 s (a trivial CMD: 16-23 s
# wall) and ib_read_bw over rxe0 moves ~0.2-0.3 Gb/s.
set -u

# =========================== guest side ===========================================
# The guest re-enters this same script (visible there through the shared root
# filesystem) as: run_in_rxe_vm.sh --rxe-guest STATE_DIR
if [ "${1:-}" = "--rxe-guest" ]; then
    STATE=$2
    # env.sh (written by the host side below) exports the forwarded variables,
    # cd's to the host's $PWD and sets "$@" to CMD ARGS.
    # shellcheck disable=SC1091
    . "$STATE/env.sh" || { echo "run_in_rxe_vm: cannot read $STATE/env.sh in the guest" >&2; exit 125; }
    : > "$STATE/booted"
    export PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"   # the host PATH may lack sbin
    # Each step is checked explicitly: `set -e` would be silently ignored in a
    # group whose status is tested with `||`, and setup would "succeed" anyway.
    step() { "$@" >&2 || { echo "run_in_rxe_vm: guest setup step failed: $*" >&2; return 1; }; }
    # The uverbs device node, the port state and the RoCEv2 GID (filled in by the
    # kernel's GID worker once veth0 is up with its address) all appear
    # asynchronously: wait for each, up to 10 s, so that CMD never races them.
    rxe_ready() {
        local sys=/sys/class/infiniband/rxe0/ports/1 zero=0000:0000:0000:0000:0000:0000:0000:0000 gid
        for _ in $(seq 1 100); do
            gid=$(cat $sys/gids/1 2>/dev/null)
            [ -c /dev/infiniband/uverbs0 ] && grep -qs ACTIVE $sys/state \
                && [ -n "$gid" ] && [ "$gid" != $zero ] && return 0
            sleep 0.1
        done
        echo "run_in_rxe_vm: rxe0 not ready after 10 s: uverbs0 $(ls /dev/infiniband 2>&1 | tr '\n' ' ')," \
             "port state '$(cat $sys/state 2>&1)', GID[1] '$gid'" >&2
        return 1
    }
    if ! { step modprobe rdma_rxe \
           && step ip link set lo up \
           && step ip link add veth0 type veth peer name veth1 \
           && step ip addr add 10.99.0.1/24 dev veth0 \
           && step ip addr add 10.99.0.2/24 dev veth1 \
           && step ip link set veth0 up \
           && step ip link set veth1 up \
           && step rdma link add rxe0 type rxe netdev veth0 \
           && rxe_ready; }; then
        echo "run_in_rxe_vm: rxe setup FAILED in the guest (exit 125)" >&2
        : > "$STATE/rxe_failed"
        exit 125
    fi
    export RXE_DEV=rxe0 RXE_IP=10.99.0.1 RXE_PEER_IP=10.99.0.2 RXE_GID_INDEX=1
    export KVTRANSFER_IB_DEVICE=rxe0 KVTRANSFER_IB_GID_INDEX=1
    # The guest default is 8 MiB; root bypasses it for ibv_reg_mr anyway
    # (CAP_IPC_LOCK), but a process that drops privileges would not.
    ulimit -l unlimited 2>/dev/null || true
    "$@"
    rc=$?
    echo "$rc" > "$STATE/rc"
    exit "$rc"
fi

# =========================== host side ============================================
[ $# -ge 1 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
SELF=$(readlink -f "$0")
REPO=$(cd "$(dirname "$SELF")/../.." && pwd)
TIMEOUT=${RXE_VM_TIMEOUT:-900}

# --- the kernel: Debian's stock one, whose modules include rdma_rxe ---
KERNEL=${RXE_VM_KERNEL:-}
if [ -z "$KERNEL" ]; then
    for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -rV); do
        v=${k#/boot/vmlinuz-}
        if find "/lib/modules/$v" -name 'rdma_rxe.ko*' 2>/dev/null | grep -q .; then KERNEL=$k; break; fi
    done
fi
if [ -z "$KERNEL" ] || [ ! -r "$KERNEL" ]; then
    echo "run_in_rxe_vm: no readable /boot/vmlinuz-* whose /lib/modules has rdma_rxe.ko" \
         "(exit 126): run scripts/rxe/setup_rxe.sh" >&2
    exit 126
fi

# --- vng, from the project's own venv (setup_rxe.sh), else PATH ---
VNG=${RXE_VM_VNG:-}
if [ -z "$VNG" ]; then
    if [ -x "$REPO/.venv-vng/bin/vng" ]; then VNG=$REPO/.venv-vng/bin/vng; else VNG=$(command -v vng || true); fi
fi
if [ -z "$VNG" ] || [ ! -x "$VNG" ]; then
    echo "run_in_rxe_vm: virtme-ng's vng not found (exit 126): run scripts/rxe/setup_rxe.sh" >&2
    exit 126
fi
HOST_PATH=$PATH
export PATH="$(dirname "$VNG"):$PATH"   # vng runs virtme-run from PATH

# --- accelerator: TCG unless KVM is known to work ---
# Under a PVM-based /dev/kvm (module kvm_pvm, as on this kind of machine) the
# stock kernel hangs at boot, so pure emulation (TCG) is the default there and
# wherever /dev/kvm is not usable; elsewhere KVM is much faster.
ACCEL=${RXE_VM_ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
    if [ -d /sys/module/kvm_pvm ] || [ ! -w /dev/kvm ]; then ACCEL=tcg; else ACCEL=kvm; fi
fi
ACCEL_OPT=()
[ "$ACCEL" = tcg ] && ACCEL_OPT=(--disable-kvm)

# --- what the guest runs ---
# The command and environment travel in a file, not on the kernel command line
# (virtme-ng puts --exec there, base64-encoded, and x86 caps it at 2048 bytes: a
# long PATH would not fit). The folder is shared read-write, so the guest also
# leaves markers in it telling how far it got, and CMD's exit status.
STATE=$(mktemp -d /tmp/rxe-vm.XXXXXX) || exit 125
trap 'rm -rf "$STATE"' EXIT
{
    for n in PATH PYTHONPATH VIRTUAL_ENV ${RXE_VM_ENV:-}; do
        [[ $n =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "run_in_rxe_vm: bad name in RXE_VM_ENV: $n" >&2; exit 2; }
        if [ "$n" = PATH ]; then printf 'export PATH=%q\n' "$HOST_PATH"
        elif [ -n "${!n+x}" ]; then printf 'export %s=%q\n' "$n" "${!n}"; fi
    done
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'set --'; printf ' %q' "$@"; printf '\n'
} > "$STATE/env.sh" || exit 2

RWDIRS=(--rwdir="$REPO" --rwdir="$STATE")
case "$PWD/" in "$REPO"/*) ;; *) RWDIRS+=(--rwdir="$PWD") ;; esac

VERB=(); [ "${RXE_VM_VERBOSE:-0}" = 1 ] && VERB=(-v)
# Stop udev coldplug from auto-loading modules that are useless here and slow
# under TCG (kvm_amd alone ~5 s); only alias-based autoloading is blocked, an
# explicit modprobe still works.
APPEND=${RXE_VM_APPEND:-modprobe.blacklist=kvm,kvm_amd,kvm_intel,powernow_k8,sr_mod,cdrom,iTCO_wdt,iTCO_vendor_support,lpc_ich,i2c_i801,pcspkr,ahci,libahci,i6300esb,aesni_intel,ghash_clmulni_intel,joydev,evdev,serio_raw}

# timeout(1) makes itself a process-group leader, so on expiry it kills
# vng + virtme-run + qemu together; our own INT/TERM/HUP are forwarded to it.
# stdout/stderr go through pipes: QEMU re-opens /proc/self/fd/{1,2}, and were
# those regular files it would write from offset 0 over earlier output.
# stdin is /dev/null: CI has none, and the guest must not read a terminal.
start=$(date +%s)
timeout -k 10 "$TIMEOUT" "$VNG" --run "$KERNEL" "${ACCEL_OPT[@]}" --force-9p \
    --memory "${RXE_VM_MEM:-2G}" --cpus "${RXE_VM_CPUS:-$(nproc)}" \
    "${RWDIRS[@]}" --cwd "$PWD" "${VERB[@]}" --append "$APPEND" \
    --exec "exec $(printf '%q' "$SELF") --rxe-guest $(printf '%q' "$STATE")" \
    < /dev/null > >(cat) 2> >(cat >&2) &
TPID=$!
trap 'kill -TERM $TPID 2>/dev/null' INT TERM HUP
while :; do
    wait $TPID; rc=$?
    kill -0 $TPID 2>/dev/null || break      # wait was only interrupted by a trapped signal
done
wait                                         # let the output pipes drain
secs=$(( $(date +%s) - start ))

# The markers tell apart CMD's own status from a VM that never got that far.
if [ -f "$STATE/rc" ]; then
    rc=$(cat "$STATE/rc")
    [ "$rc" = 0 ] || echo "run_in_rxe_vm: CMD exited $rc (VM ran ${secs}s)" >&2
elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "run_in_rxe_vm: timed out after ${TIMEOUT}s (RXE_VM_TIMEOUT); VM killed (exit 124)" >&2
    rc=124
elif [ -f "$STATE/rxe_failed" ]; then
    echo "run_in_rxe_vm: rxe setup failed in the guest (exit 125); its messages are above" >&2
    rc=125
elif [ -f "$STATE/booted" ]; then
    echo "run_in_rxe_vm: the guest stopped while CMD ran, without an exit status (vng exit $rc):" \
         "kernel panic or out of memory? rerun with RXE_VM_VERBOSE=1 (exit 125)" >&2
    rc=125
else
    echo "run_in_rxe_vm: the guest did not come up (vng exit $rc after ${secs}s);" \
         "rerun with RXE_VM_VERBOSE=1 to see its console (exit 125)" >&2
    rc=125
fi
exit "$rc"
