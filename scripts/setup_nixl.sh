#!/usr/bin/env bash
# Adds vLLM's NixlConnector dependency to .venv-vllm for `make bench-vllm` (bench/vllm_pd.py
# compares our connector with it), idempotently. Not needed by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
NIXL_VERSION=1.5.1
PY=.venv-vllm/bin/python
[ -x "$PY" ] || { echo "setup-nixl: $PY is missing: run scripts/setup_vllm.sh first" >&2; exit 1; }
if ! "$PY" -c "import importlib.metadata as m; assert m.version('nixl') == '$NIXL_VERSION'" 2>/dev/null; then
  echo "setup-nixl: installing nixl==$NIXL_VERSION into .venv-vllm"
  "$PY" -m pip install -q "nixl==$NIXL_VERSION"
fi
