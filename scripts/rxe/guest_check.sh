#!/usr/bin/env bash
# scripts/rxe/guest_check.sh          (runs INSIDE the rxe guest, from the repo root)
#
#   scripts/rxe/run_in_rxe_vm.sh scripts/rxe/guest_check.sh
#
# Checks that the guest is fit for testing kvtransfer's verbs transport, and
# prints what such a transport must know about it:
#   1. rxe0 as ibv_devinfo sees it: port state, MTU, GID table, and the device
#      limits a transport sizes its queues by (max_qp_wr, max_sge, max_qp_rd_atom...);
#   2. the environment: memlock limit, /dev/infiniband access, repo read-write;
#   3. verbs from Python with Debian's /usr/bin/python3 + python3-pyverbs: open
#      rxe0, query the port and the RoCEv2 GID, register an MR for remote read;
#   4. the project's .venv Python in the guest: its interpreter is a symlink into
#      /root/.pyenv on the host, which the guest must resolve too.
# Ends with GUEST_CHECK_OK and exit 0, or the list of failures and exit 1.
set -u
cd "$(dirname "$0")/../.."
DEV=${RXE_DEV:-rxe0}
GIDX=${RXE_GID_INDEX:-1}
fail=()

echo "== 1. $DEV (ibv_devinfo -v -d $DEV)"
if info=$(timeout 30 ibv_devinfo -v -d "$DEV" 2>&1); then
    echo "$info" | grep -E '^\s*(hca_id|transport|fw_ver|node_guid|vendor_id|hw_ver|phys_port_cnt|max_mr_size|page_size_cap|max_qp|max_qp_wr|device_cap_flags|max_sge|max_sge_rd|max_cq|max_cqe|max_mr|max_pd|max_qp_rd_atom|max_qp_init_rd_atom|max_res_rd_atom|atomic_cap|max_srq|max_srq_wr|max_pkeys|port|state|max_mtu|active_mtu|link_layer)\b|^\s*GID\[' \
        | sed 's/^\s*/  /'
    echo "$info" | grep -q 'PORT_ACTIVE' || fail+=("$DEV port not ACTIVE")
else
    echo "$info"; fail+=("ibv_devinfo -d $DEV failed")
fi
gid=$(cat "/sys/class/infiniband/$DEV/ports/1/gids/$GIDX" 2>/dev/null)
gtype=$(cat "/sys/class/infiniband/$DEV/ports/1/gid_attrs/types/$GIDX" 2>/dev/null)
gndev=$(cat "/sys/class/infiniband/$DEV/ports/1/gid_attrs/ndevs/$GIDX" 2>/dev/null)
echo "  GID index $GIDX: $gid ($gtype on $gndev)"
case $gtype in *v2*) ;; *) fail+=("GID index $GIDX is not RoCEv2 ($gtype)") ;; esac
echo "  netdev: $(ip -br addr show dev "$gndev" 2>/dev/null) mtu $(cat "/sys/class/net/$gndev/mtu" 2>/dev/null)"

echo "== 2. environment"
echo "  kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%d MiB", $2/1024}' /proc/meminfo), uid $(id -u)"
echo "  ulimit -l (memlock, KiB): soft $(ulimit -S -l), hard $(ulimit -H -l) (guest default 8192; run_in_rxe_vm.sh raises it)"
for d in /dev/infiniband/*; do
    [ -c "$d" ] || continue
    if [ -r "$d" ] && [ -w "$d" ]; then echo "  $d: read-write ok ($(stat -c '%A %U' "$d"))"
    else echo "  $d: NOT accessible"; fail+=("$d not accessible"); fi
done
[ -c /dev/infiniband/uverbs0 ] || fail+=("/dev/infiniband/uverbs0 missing")
probe=".rxe-guest-check.$$"
if echo ok > "$probe" && [ "$(cat "$probe")" = ok ] && rm -f "$probe"; then
    echo "  $(pwd): read-write ok ($(findmnt -n -o FSTYPE,OPTIONS --target . | cut -c1-60))"
else
    rm -f "$probe" 2>/dev/null; fail+=("$(pwd) not writable"); echo "  $(pwd): NOT writable"
fi
echo "  HOME=$HOME: $( [ -w "$HOME" ] && echo writable || echo 'read-only (host root fs over 9p)')"

echo "== 3. pyverbs with /usr/bin/python3"
if timeout 60 /usr/bin/python3 - "$DEV" "$GIDX" <<'EOF'
import sys
import pyverbs.device as d
import pyverbs.enums as e
from pyverbs.pd import PD
from pyverbs.mr import MR
dev, gidx = sys.argv[1], int(sys.argv[2])
print("  python", sys.version.split()[0], "devices:", [x.name.decode() for x in d.get_device_list()])
with d.Context(name=dev) as ctx:
    a = ctx.query_device()
    print("  max_qp_wr=%d max_sge=%d max_qp_rd_atom=%d max_mr_size=%#x" %
          (a.max_qp_wr, a.max_sge, a.max_qp_rd_atom, a.max_mr_size))
    p = ctx.query_port(1)
    print("  port 1: state=%d active_mtu=%d gid[%d]=%s" % (p.state, p.active_mtu, gidx, ctx.query_gid(1, gidx)))
    assert p.state == e.IBV_PORT_ACTIVE, "port not active"
    with PD(ctx) as pd:
        flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        with MR(pd, 1 << 20, flags) as mr:
            mr.write(b"hello-rxe", 9)
            got = mr.read(9, 0)
            assert got == b"hello-rxe", got
            print("  MR ok: lkey=%#x rkey=%#x len=%d" % (mr.lkey, mr.rkey, mr.length))
print("  PYVERBS_OK")
EOF
then :; else fail+=("pyverbs check"); fi

echo "== 4. the project's .venv in the guest"
if [ -e .venv/bin/python ]; then
    echo "  .venv/bin/python -> $(readlink -f .venv/bin/python)"
    if timeout 120 .venv/bin/python -c "import sys, kvtransfer, numpy; print('  python', sys.version.split()[0], 'kvtransfer at', kvtransfer.__file__, 'numpy', numpy.__version__)"; then :
    else fail+=(".venv python cannot import kvtransfer/numpy"); fi
else
    echo "  no .venv/bin/python (run scripts/setup_env.sh on the host first)"
    fail+=(".venv missing")
fi

if [ ${#fail[@]} -eq 0 ]; then echo "GUEST_CHECK_OK"; exit 0; fi
printf 'GUEST_CHECK_FAILED: %s\n' "${fail[@]}"
exit 1
