#!/usr/bin/env bash
# scripts/setup_fuzz.sh - install what the tcp wire fuzz harness needs: Debian's clang
# and its compiler-rt runtimes (libFuzzer, AddressSanitizer, UBSan). Idempotent: when
# both are there it only checks that clang links a -fsanitize=fuzzer program.
set -euo pipefail
APT_PACKAGES="clang libclang-rt-dev"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup_fuzz: installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' \
  > "$probe/p.c"
clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" \
  || { echo "setup_fuzz: clang cannot link a libFuzzer program" >&2; exit 1; }
