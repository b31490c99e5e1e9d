#!/usr/bin/env bash
# The GPU pass on a lent device machine (bench/GPU_PASS.md): the carried wheels in .whl/ if there
# are any, then `python -m fastppo.bench.gpu_pass` with this script's arguments. Results go to
# $OUT (the device tool's folder), or to --out.
#
#   bash bench/gpu_pass.sh --commit "$SHA"            # the whole pass, <= 8 minutes
#   bash bench/gpu_pass.sh --dry-run --out /tmp/gp    # the same phases on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  # No registry there: wheels for what the image lacks travel in .whl/ (`carry`), installed apart.
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "gpu_pass.sh: installing the carried wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$py" -m fastppo.bench.gpu_pass "$@"
