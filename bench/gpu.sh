#!/usr/bin/env bash
# The GPU check (bench/gpu.py): everything a lent CUDA machine should measure, in one run.
#
#   bash bench/gpu.sh --fetch-wheels     # on this machine: wheels the CUDA image lacks -> .whl/
#   bash bench/gpu.sh --out "$OUT"       # on the CUDA machine (device run with carry: [".whl"])
#   bash bench/gpu.sh --dry-run --out /tmp/gpu-dry   # CPU, toy sizes: checks the script
#
# The CUDA image has torch, Lightning, transformers and safetensors but not omegaconf,
# webdataset or diffusers; --fetch-wheels downloads those (pure-Python wheels, ~7 MB) for the
# image's Python 3.12, and a run installs them from .whl/ into /tmp/site when .whl/ is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

if [ "${1:-}" = "--fetch-wheels" ]; then
    rm -rf .whl && mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl \
        omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 webdataset==1.0.2 braceexpand==0.1.7 \
        diffusers==0.42.1 importlib_metadata zipp
    ls -l .whl
    exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" bench/gpu.py "$@"
