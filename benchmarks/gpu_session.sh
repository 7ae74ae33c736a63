#!/usr/bin/env bash
# On a lent GPU machine (device tool `run` with carry ["build/wheels"], which benchmarks/fetch_wheels.sh fills):
# install the wheels the image lacks and tilefuse itself, then spend what is left of BUDGET seconds (default 560,
# under the tool's 600-second limit) on benchmarks/gpu_session.py's plan. Extra arguments go to that script.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
: "${OUT:?OUT must name the folder whose files come back}"
if compgen -G "build/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile build/wheels/*.whl
else
    echo "build/wheels is empty: optuna, lightgbm and liger-kernel will be missing (run benchmarks/fetch_wheels.sh)" >&2
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile -e .
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv || true
budget=$(( ${BUDGET:-560} - (SECONDS - start) ))
exec python3 -m tilefuse.benchmarks.gpu_session --out "$OUT" --budget "$budget" "$@"
