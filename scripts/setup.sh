#!/usr/bin/env bash
# Set up SpecAttn on a fresh machine (python3 + pip, nothing else): a virtual environment in .venv, the project
# with its calibrate, serve and dev extras, and the shipped models and texts (fetched, verified, converted once).
# Idempotent: a second run checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    # A machine that already has torch (say a CUDA build) lends it to the venv instead of replacing it.
    if "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m venv --system-site-packages .venv
    else
        "$PY" -m venv .venv
    fi
fi
VPY=.venv/bin/python

stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
    "$VPY" -m pip install --quiet --upgrade pip
    # Exactly this torch when none is present: a local CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
    "$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install --quiet "torch==2.13.0"
    "$VPY" -m pip install --quiet -e ".[calibrate,serve,dev]"
    echo "$stamp" > .venv/.setup-stamp
fi

"$VPY" -m pipelines.assets fetch --pair "${SPECATTN_PAIR:-quick}"
