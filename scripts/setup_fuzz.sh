#!/usr/bin/env bash
# scripts/setup_fuzz.sh - install what the tcp wire fuzz harness needs: Debian's clang
# and its compiler-rt runtimes (libFuzzer, AddressSanitizer, UBSan). Idempotent: when
# both are there it only checks that clang links a -fsanitize=fuzzer program.
set -euo pipefail
"$(dirname "$0")/apt_install.sh" setup_fuzz clang libclang-rt-dev
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' \
  > "$probe/p.c"
clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" \
  || { echo "setup_fuzz: clang cannot link a libFuzzer program" >&2; exit 1; }
