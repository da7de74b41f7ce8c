#!/usr/bin/env bash
# The kernel benchmark's device check on the lent H100, through the device tool:
#
#   run(command="bash experiments/bench/device_check.sh", carry=[".whl"], timeout_s=600)
#
# Prepare .whl/ here first, in the repository root (see experiments/bench/kernels.py):
#   .venv/bin/pip wheel --no-deps -w .whl .
#   .venv/bin/pip download fla-core==0.6.0 --no-deps -d .whl
# It installs the carried wheels into .deps (fla-core, xformjax; the machine has jax,
# torch, triton and einops), then copies this working tree's xformjax over the wheel's
# (`kernels/` is the package `xformjax.kernels`, as pyproject maps it): the run checks
# the code that travelled, even if the wheel is older or pyproject's package list lags
# a new subpackage. Results go to $OUT (kernels.md, kernels.json, kernels.png and
# kernels.log come back); the run is stopped at 9 minutes, and as the tables are
# rewritten after every cell, a stopped run leaves the partial ones.
set -uo pipefail
OUT="${OUT:-experiments/results}"
mkdir -p "$OUT" .deps
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .deps .whl/*.whl || exit 2
else
    echo "no wheels in .whl/ (carry=[\".whl\"]): fla will be 'not installed'" >&2
fi
rm -rf .deps/xformjax && cp -r xformjax .deps/xformjax && rm -rf .deps/xformjax/kernels \
    && cp -r kernels .deps/xformjax/kernels || exit 2
# -P: the working directory does not go first on sys.path, so xformjax comes from .deps
# (the tree's xformjax/ has no kernels/ inside) and experiments/ from the tree.
export PYTHONPATH=".deps:." PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout -k 15 540 python3 -P -m experiments.bench.kernels --device-check --out "$OUT" 2>&1 \
    | tee "$OUT/kernels.log"
