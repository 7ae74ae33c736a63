#!/usr/bin/env bash
# Download, here, the wheels tilefuse needs that the GPU machine's image lacks (it has no network): optuna and its
# database layer, lightgbm (the cost model) and Liger-Kernel (a benchmark contender), for the image's Python 3.12
# on x86-64. Versions match what `make test` installs here. The device tool carries build/wheels (about 14 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-build/wheels}
PIP=${PIP:-$( [ -x .venv/bin/pip ] && echo .venv/bin/pip || echo "python3 -m pip" )}
mkdir -p "$DEST"
$PIP download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    optuna==5.0.0 alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0 SQLAlchemy==2.1.9 psycopg2-binary==2.9.13 \
    lightgbm==4.7.0 liger-kernel==0.8.5
ls -l "$DEST"
