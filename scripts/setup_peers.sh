#!/usr/bin/env bash
# The peers' environment for bench/transfer_bw.py --peers (NIXL, Mooncake), idempotently:
# .venv-peers with the CPU build of torch first (NIXL's wheels require torch, unpinned: a
# bare install would pull a multi-GB CUDA build), then the requirements of pyproject.toml's
# extra bench-peers (not kvtransfer itself: the peer drivers need only numpy and the peers).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${PEERS_VENV:-.venv-peers}

[ -x "$VENV/bin/python" ] || { echo "setup-peers: creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup-peers: installing torch==$TORCH_VERSION (CPU build)"
  $PIP install -q "torch==$TORCH_VERSION"
fi
stamp="$VENV/.peers-deps"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  reqs=$("$VENV/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench-peers"]))')
  echo "setup-peers: installing" $reqs
  # shellcheck disable=SC2086  # one word a requirement (none holds a space)
  $PIP install -q $reqs
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import nixl._api, mooncake.engine' && echo "setup-peers: $VENV has NIXL and Mooncake"
