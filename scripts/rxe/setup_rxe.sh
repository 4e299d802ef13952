#!/usr/bin/env bash
# scripts/rxe/setup_rxe.sh - install what the soft-RoCE (rdma_rxe) test guest needs.
#
# The host kernel here has no RDMA device and cannot load rdma_rxe, so real verbs
# are tested inside a QEMU guest that boots Debian's stock kernel (which ships
# rdma_rxe.ko) over this machine's own root filesystem (scripts/rxe/run_in_rxe_vm.sh).
# This script installs, idempotently and only what is missing:
#   1. Debian packages: QEMU, the stock kernel + modules (into /boot and
#      /lib/modules), perftest (ib_read_bw), rdma-core/ibverbs-utils (the rxe
#      provider, ibv_devinfo), python3-pyverbs, libibverbs-dev (verbs headers);
#      iproute2 (ip/rdma/ss, used in the guest), busybox-static (virtme-ng packs it
#      into the small initramfs that loads the 9p/virtio modules, which Debian
#      builds as modules) and python3-venv (for step 2).
#      The guest sees the host's /usr, so everything it runs is installed here.
#   2. virtme-ng (the `vng` launcher), pinned, in its own venv .venv-vng/ in the
#      repository root, made with Debian's /usr/bin/python3 so that it depends on
#      neither .venv nor pyenv. Nothing is added to .venv.
# It prints what it installs and ends with a check that a kernel with rdma_rxe.ko
# and a working vng are there. Re-running it when all is installed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/../.."

APT_PACKAGES="qemu-system-x86 linux-image-amd64 perftest rdma-core ibverbs-utils
              python3-pyverbs libibverbs-dev iproute2 busybox-static python3-venv"
VNG_VERSION=${VNG_VERSION:-1.42}     # 1.42 is the version this setup was tested with
VNG_VENV=${VNG_VENV:-.venv-vng}

# ---- 1. Debian packages --------------------------------------------------------
# linux-image-amd64's postinst builds an initramfs (initramfs-tools); the guest does
# not use it (virtme-ng boots the kernel directly over 9p), it is just the price of
# the package. No bootloader is touched (none is installed here).
scripts/apt_install.sh setup_rxe $APT_PACKAGES

# ---- 2. virtme-ng in its own venv ------------------------------------------------
have=$("$VNG_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("virtme-ng"))' 2>/dev/null || true)
if [ "$have" != "$VNG_VERSION" ]; then
  echo "setup_rxe: installing virtme-ng==$VNG_VERSION into $VNG_VENV/ (had: ${have:-none})"
  [ -x "$VNG_VENV/bin/python" ] || /usr/bin/python3 -m venv "$VNG_VENV"
  "$VNG_VENV/bin/python" -m pip install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
else
  echo "setup_rxe: virtme-ng $have already in $VNG_VENV/"
fi

# ---- check -------------------------------------------------------------------------
kernel=""
for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -rV); do
  v=${k#/boot/vmlinuz-}
  if find "/lib/modules/$v" -name 'rdma_rxe.ko*' 2>/dev/null | grep -q .; then kernel=$k; break; fi
done
if [ -z "$kernel" ]; then
  echo "setup_rxe: ERROR: no /boot/vmlinuz-* whose /lib/modules has rdma_rxe.ko" >&2
  exit 1
fi
"$VNG_VENV/bin/vng" --version >/dev/null 2>&1 || { echo "setup_rxe: ERROR: $VNG_VENV/bin/vng does not run" >&2; exit 1; }
echo "setup_rxe: ok: kernel $kernel ($(find "/lib/modules/${kernel#/boot/vmlinuz-}" -name 'rdma_rxe.ko*' | head -1)), $($VNG_VENV/bin/vng --version 2>&1 | head -1)"
