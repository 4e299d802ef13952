# scripts/gpu_env.sh - sourced by the GPU scripts: a lent GPU machine has no package
# registry, so the wheels carried in .whl/ (msgspec, pyzmq, prometheus-client, ...) are
# installed into /tmp/site; this checkout goes first on the path; logs go under $OUT.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/msgspec ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
